"""Streamed anatomy: read-on-access models give the in-memory results, each module read a bounded number of times."""

from __future__ import annotations

import math

import torch

from lineage.anatomy import AlignedPair, explain
from lineage.lazyroles import LazyRoles, PairView, map_roles, numel_of, recall, remember, rows_of, shape_of
from lineage.signals.direction import direction
from lineage.signals.lowrank import lowrank, lowrank_modules
from lineage.signals.pairstats import pair_stats
from lineage.signals.quantgrid import detect_modules


def _model(seed: int, layers: int = 3, h: int = 64, inter: int = 160) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {"embed.weight": torch.randn(300, h, generator=g) / math.sqrt(h)}
    for i in range(layers):
        for kind, shape in (("attn.q", (h, h)), ("attn.k", (h // 2, h)), ("attn.v", (h // 2, h)), ("attn.o", (h, h)),
                            ("mlp.up", (inter, h)), ("mlp.down", (h, inter))):
            out[f"L{i}.{kind}.weight"] = torch.randn(*shape, generator=g) / math.sqrt(shape[1])
        out[f"L{i}.norm.attn.weight"] = 1 + 0.1 * torch.randn(h, generator=g)
    return out


def _lora(base: dict[str, torch.Tensor], kinds: tuple[str, ...], rank: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = dict(base)
    for k, w in base.items():
        if w.dim() == 2 and any(f".{kind}." in k for kind in kinds):
            d = torch.randn(w.shape[0], rank, generator=g) @ torch.randn(rank, w.shape[1], generator=g)
            out[k] = w + d * (0.05 * w.norm() / d.norm())
    return out


def _int8_rows(w: torch.Tensor) -> torch.Tensor:
    s = w.abs().amax(1, keepdim=True) / 127
    return torch.round(w / s) * s


class Counting(LazyRoles):
    """LazyRoles over a dict that counts reads per role and tracks how many tensors are alive at once."""

    def __init__(self, d: dict[str, torch.Tensor], **kw) -> None:
        self.per_role: dict[str, int] = {}
        super().__init__(self._get, {k: tuple(v.shape) for k, v in d.items()}, **kw)
        self._d = d

    def _get(self, role: str) -> torch.Tensor:
        self.per_role[role] = self.per_role.get(role, 0) + 1
        return self._d[role].clone()


def _key(rel):
    d = rel.details
    return rel.relation, rel.parent, d.get("rank"), tuple(d.get("modules") or ()), d.get("quant_format")


def test_lazy_roles_mapping_basics() -> None:
    d = {"a": torch.ones(3, 4), "b": torch.zeros(5)}
    m = Counting(d, cache=1)
    assert list(m) == ["a", "b"] and len(m) == 2 and "a" in m and "c" not in m
    assert shape_of(m, "a") == torch.Size([3, 4]) and numel_of(m, "b") == 5
    assert m.reads == 0  # shapes are read-free
    assert torch.equal(m["a"], d["a"]) and torch.equal(m["a"], d["a"])
    assert m.per_role == {"a": 1}  # the second access hit the cache
    m["b"]
    m["a"]
    assert m.per_role == {"a": 2, "b": 1}  # cache of one entry: "a" was evicted
    assert torch.equal(rows_of(m, "a", torch.tensor([0, 2])), d["a"][[0, 2]])
    assert shape_of({"x": (None, torch.ones(2, 2))}, "x") == torch.Size([2, 2])
    assert remember(m, "k", lambda: 5) == 5 and remember(m, "k", lambda: 6) == 5 and recall(m, "k") == 5
    assert recall({}, "k") is None
    pv = PairView(m, m, ["a"])
    assert list(pv) == ["a"] and pv.shape("a") == torch.Size([3, 4]) and pv.lazy


def test_map_roles_keeps_order_and_bounds_in_flight() -> None:
    import threading
    import time

    live = 0
    peak = 0
    lock = threading.Lock()

    def fn(r: int) -> int:
        nonlocal live, peak
        with lock:
            live += 1
            peak = max(peak, live)
        time.sleep(0.002)
        with lock:
            live -= 1
        assert torch.get_num_threads() == 1
        return r * r

    out = list(map_roles(fn, range(40), workers=2))
    assert out == [(r, r * r) for r in range(40)]
    assert peak <= 2


def test_pair_stats_match_float64() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 257, generator=g) * 0.02 + 0.001
    y = x + 0.003 * torch.randn(300, 257, generator=g)
    y[0, :7] = 0
    st = pair_stats(x, y, chunk=1000)
    xd, yd = x.double().flatten(), y.double().flatten()
    assert math.isclose(st.var("x"), float(xd.var()), rel_tol=1e-5)
    assert math.isclose(st.var("d"), float((yd - xd).var()), rel_tol=1e-5)
    assert math.isclose(st.pearson, float(torch.corrcoef(torch.stack([xd, yd]))[0, 1]), rel_tol=1e-6)
    xc = xd - xd.mean()
    kx = float((xc**4).mean() / (xc**2).mean() ** 2 - 3)
    assert abs(st.kurtosis("x") - kx) < 1e-4
    assert st.zeros_only_y == 7 and st.zeros_only_x == 0


def test_streamed_explain_matches_in_memory_and_reads_each_module_once() -> None:
    base = _model(1)
    child = _lora(base, ("attn.q", "attn.v"), 4, seed=2)
    child_bf16 = {k: v.bfloat16().float() for k, v in child.items()}
    child_int8 = {k: (_int8_rows(v) if v.dim() == 2 else v) for k, v in child.items()}
    for c in (child, child_bf16, child_int8):
        mem = explain(AlignedPair(base, c))
        a, b = Counting(base), Counting(c)
        rel = explain(AlignedPair(a, b))
        assert _key(rel) == _key(mem)
        assert rel.relation == "lora merge" and rel.details["rank"] == 4
        assert set(rel.details["modules"]) == {k for k in base if ".attn.q." in k or ".attn.v." in k}
        # one pass reads every module; direction's grid sample and the identity check add a few reads
        assert max(a.per_role.values()) <= 3 and sum(b.per_role.values()) <= len(base) + 12
    # 64-wide rows cannot be told from 64-blocks (quantgrid names them as the block format)
    assert explain(AlignedPair(Counting(base), Counting(child_int8))).details["quant_format"].startswith("int8")


def test_streamed_explain_when_b_is_the_parent_and_for_dense_changes() -> None:
    base = _model(3)
    child = _lora(base, ("mlp.up",), 2, seed=4)
    rel = explain(AlignedPair(Counting(child), Counting(base)))  # B is the parent: results recomputed oriented
    assert _key(rel) == _key(explain(AlignedPair(child, base)))
    assert rel.relation == "lora merge" and rel.parent == "b" and rel.details["rank"] == 2
    g = torch.Generator().manual_seed(5)
    ft = {k: v + 0.3 * v.std() * torch.randn(v.shape, generator=g) for k, v in base.items()}
    rel = explain(AlignedPair(Counting(base), Counting(ft)))
    assert rel.relation != "lora merge" and _key(rel) == _key(explain(AlignedPair(base, ft)))
    unrelated = _model(9)
    assert explain(AlignedPair(Counting(base), Counting(unrelated))).relation == "unrelated"


def test_signals_accept_lazy_mappings() -> None:
    base = _model(6, layers=2)
    child = {k: (_int8_rows(v) if v.dim() == 2 else v) for k, v in base.items()}
    a, b = Counting(base), Counting(child)
    assert direction(a, b).to_dict() == direction(base, child).to_dict()
    mats = [k for k in base if base[k].dim() == 2]
    lazy_pairs = PairView(a, b, mats)
    res, summ = lowrank_modules(lazy_pairs, workers=2)
    res_mem, summ_mem = lowrank_modules({k: (base[k], child[k]) for k in mats})
    assert summ == summ_mem and {k: v.rank for k, v in res.items()} == {k: v.rank for k, v in res_mem.items()}
    q_lazy = detect_modules(lazy_pairs)[1]
    q_mem = detect_modules({k: (base[k], child[k]) for k in mats})[1]
    assert q_lazy == q_mem and q_lazy.format is not None and q_lazy.format.startswith("int8")


def test_rank_above_half_the_width_is_low_rank_when_the_spectrum_falls_to_the_floor() -> None:
    # gpt2-zoo case: rank 64 on 96-wide modules, trained-like decaying spectrum (s_64 / s_1 ~ 1e-3)
    g = torch.Generator().manual_seed(7)
    for m, n, r in ((96, 96, 64), (384, 96, 64), (96, 96, 80), (128, 128, 100)):
        w = torch.randn(m, n, generator=g) / math.sqrt(n)
        U, _ = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))
        V, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))
        s = torch.logspace(0, -3, r, dtype=torch.float64)
        d = ((U * s) @ V.T).float()
        child = w + d * (0.6 * w.norm() / d.norm())
        for c in (child, child.bfloat16().float() if r <= 64 else child):
            res = lowrank(w, c)
            if c is child:
                assert res.status == "low-rank" and res.rank == r, (m, n, r, res.status, res.rank)
    # dense changes stay dense / noise-like: a slowly decaying full spectrum and iid noise
    for m, n in ((96, 96), (128, 128), (384, 96)):
        w = torch.randn(m, n, generator=g) / math.sqrt(n)
        U, _ = torch.linalg.qr(torch.randn(m, min(m, n), generator=g))
        V, _ = torch.linalg.qr(torch.randn(n, min(m, n), generator=g))
        s = torch.arange(1, min(m, n) + 1, dtype=torch.float32) ** -0.5
        res = lowrank(w, w + ((U * s) @ V.T) * 0.05 * w.norm() / s.norm())
        assert res.status == "dense", (m, n, res.status, res.rank)
        for seed in range(20):
            gg = torch.Generator().manual_seed(seed)
            res = lowrank(w, (w + 0.05 * w.std() * torch.randn(m, n, generator=gg)).bfloat16().float())
            assert res.status == "noise-like", (m, n, seed, res.status, res.rank)
