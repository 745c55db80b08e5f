"""Low-rank delta analysis: planted LoRA ranks survive bf16 casting and int8 quantisation."""

from __future__ import annotations

import pytest
import torch

from lineage.signals.floatgrid import float_grid
from lineage.signals.lowrank import LADDER, LowRankConfig, lowrank, lowrank_modules
from lineage.signals.lowrank_summary import compress_modules, summarise


def _base(m: int, n: int, seed: int) -> torch.Tensor:
    """Heavy-tailed weights with unequal row and column scales (like trained layers)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=g) / torch.sqrt(torch.rand(m, n, generator=g) * 0.9 + 0.1)
    rs = torch.exp(torch.randn(m, 1, generator=g) * 0.3)
    cs = torch.exp(torch.randn(1, n, generator=g) * 0.3)
    return (0.02 * w * rs * cs).float()


def _lora(base: torch.Tensor, r: int, rel: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1000)
    m, n = base.shape
    d = torch.randn(m, r, generator=g) @ torch.randn(r, n, generator=g)
    return d * (rel * base.norm() / d.norm())


def _int8_rows(w: torch.Tensor) -> torch.Tensor:
    s = w.abs().amax(1, keepdim=True) / 127
    return torch.round(w / s) * s


_BASE = _base(384, 512, 0)


@pytest.mark.parametrize("r", [1, 2, 3, 8, 16, 32, 64])
@pytest.mark.parametrize("post", ["fp32", "bf16", "int8"])
def test_planted_rank_recovered_exactly(r, post):
    child = _BASE + _lora(_BASE, r, 0.05, seed=r)
    if post == "bf16":
        child = child.bfloat16().float()
    elif post == "int8":
        child = _int8_rows(child)
    res = lowrank(_BASE, child)
    assert res.status == "low-rank", res.to_dict()
    assert res.rank == r
    assert res.gap is not None and res.gap > 1.2
    # the energy ladder agrees: left-over energy collapses at the planted rank
    k_at = max(k for k in LADDER if k <= r)
    if post == "fp32" and k_at == r:
        assert res.energy_left[r] < 1e-6


def test_rank_at_low_snr_bf16_and_streaming_matches():
    base = _base(600, 300, 3)
    child = (base + _lora(base, 24, 0.01, seed=4)).bfloat16().float()
    dense = lowrank(base, child)
    streamed = lowrank(base, child, config=LowRankConfig(stream_elems=1000, block_rows=77))
    assert dense.rank == 24 and streamed.rank == 24
    assert streamed.status == dense.status == "low-rank"
    assert abs(streamed.delta_norm - dense.delta_norm) < 1e-6 * dense.delta_norm


def test_delta_only_input():
    base = _BASE
    d = _lora(base, 5, 0.05, seed=9)
    res = lowrank(delta=d)
    assert res.rank == 5 and res.child_float_grid is None and res.base_norm is None


def test_unchanged_and_recast_copies():
    assert lowrank(_BASE, _BASE.clone()).status == "unchanged"
    res = lowrank(_BASE, _BASE.bfloat16().float())
    assert res.status == "rounding" and res.child_float_grid == "bf16" and res.rank == 0
    res = lowrank(_BASE, _BASE.half().float())
    assert res.status == "rounding" and res.child_float_grid == "fp16"


def test_quantised_copy_is_noise_like_not_low_rank():
    res = lowrank(_BASE, _int8_rows(_BASE))
    assert res.status == "noise-like" and res.rank == 0


def test_dense_update_is_not_low_rank():
    g = torch.Generator().manual_seed(5)
    m, n = _BASE.shape
    # a "trained" dense delta: full-rank with a smoothly decaying spectrum
    U, _ = torch.linalg.qr(torch.randn(m, m, generator=g))
    V, _ = torch.linalg.qr(torch.randn(n, m, generator=g))
    s = torch.arange(1, m + 1, dtype=torch.float32) ** -0.5
    d = (U * s) @ V.T
    d *= 0.05 * _BASE.norm() / d.norm()
    res = lowrank(_BASE, _BASE + d)
    assert res.status == "dense"
    # iid noise of fine-tune size reads as noise-like (no structure); its level is far above rounding
    res = lowrank(_BASE, (_BASE + 0.05 * _BASE.std() * torch.randn(m, n, generator=g)).bfloat16().float())
    assert res.status == "noise-like"
    assert res.noise_sigma > 5 * res.rounding_sigma


def test_summary_names_modules_and_rank():
    base = {f"L{i}.attn.{p}.weight": _base(128, 128, 10 * i + j) for i in range(3)
            for j, p in enumerate("qkv")}
    pairs = {}
    for k, b in base.items():
        c = b + _lora(b, 4, 0.05, seed=hash(k) % 1000) if (".q." in k or ".v." in k) else b.clone()
        pairs[k] = (b, c.bfloat16().float())
    results, summ = lowrank_modules(pairs)
    assert summ.kind == "low-rank" and summ.rank == 4
    assert set(summ.modules) == {k for k in base if ".q." in k or ".v." in k}
    assert "attn.q, attn.v in layers 0-2" in summ.description
    assert results["L0.attn.k.weight"].status == "rounding"
    assert summ.to_dict()["kind"] == "low-rank"
    assert summarise({}).kind == "unchanged"


def test_helpers():
    assert compress_modules(["L0.mlp.up.weight", "L1.mlp.up.weight", "L3.mlp.up.weight", "embed.weight"]) \
        == "mlp.up in layers 0-1,3; embed.weight"
    assert float_grid(torch.tensor([1.0, 0.5])) == "bf16"
    assert float_grid(torch.tensor([1.0 + 2**-10])) == "fp16"
    assert float_grid(torch.tensor([1.0 + 2**-20])) == "fp32"
    with pytest.raises(ValueError):
        lowrank(torch.zeros(2, 2), torch.zeros(3, 2))
    d = lowrank(_BASE, _BASE + _lora(_BASE, 2, 0.05, 1)).to_dict()
    assert d["rank"] == 2 and isinstance(d["energy_left"], dict)


# ----------------------------------------------------------------------------- anatomy (uses lowrank)

from lineage.anatomy import AlignedPair, explain  # noqa: E402

_ROLES = [f"L{i}.{p}.weight" for i in range(3) for p in ("attn.q", "attn.v", "mlp.up")]


def _model(seed):
    return {r: _base(96, 160, seed * 100 + j) for j, r in enumerate(_ROLES)}


def test_anatomy_relations():
    p = _model(1)
    assert explain(AlignedPair(p, {r: w.clone() for r, w in p.items()})).relation == "identical"
    rel = explain(AlignedPair(p, {r: w.bfloat16().float() for r, w in p.items()}))
    assert rel.relation == "identical" and "bf16" in rel.details["encoding"]

    q = {r: _int8_rows(w) for r, w in p.items()}
    rel = explain(AlignedPair(q, p))
    assert rel.relation == "quantised copy" and rel.parent == "b"
    assert rel.details["quant_format"] == "int8-per-row"

    g4 = {}
    for r, w in p.items():
        v = w.reshape(-1, 32)
        st = v.abs().amax(1, keepdim=True) / 7
        g4[r] = (torch.round(v / st) * st).reshape(w.shape)
    rel = explain(AlignedPair(p, g4))
    assert rel.relation == "quantised copy" and rel.parent == "a"
    assert rel.details["quant_format"] == "int4-g32-sym"

    lora = {r: (w + _lora(w, 4, 0.05, j) if ".q." in r else w) for j, (r, w) in enumerate(p.items())}
    rel = explain(AlignedPair(p, {r: _int8_rows(w) for r, w in lora.items()}))
    assert rel.relation == "lora merge" and rel.details["rank"] == 4
    assert set(rel.details["modules"]) == {r for r in _ROLES if ".q." in r}
    assert rel.details["quant_format"] == "int8-per-row"

    g = torch.Generator().manual_seed(0)
    ft = {r: w + 0.05 * w.std() * torch.randn(w.shape, generator=g) for r, w in p.items()}
    rel = explain(AlignedPair(p, ft))
    assert rel.relation == "fine-tune" and rel.parent == "a"
    def trained(w, rel):  # structured dense delta: full rank, decaying spectrum
        m, n = w.shape
        U, _ = torch.linalg.qr(torch.randn(m, min(m, n), generator=g))
        V, _ = torch.linalg.qr(torch.randn(n, min(m, n), generator=g))
        s = torch.arange(1, min(m, n) + 1, dtype=torch.float32) ** -0.5
        d = (U * s) @ V.T
        return w + d * (rel * w.norm() / d.norm())

    cpt = {r: trained(w, 0.3) for r, w in p.items()}
    rel = explain(AlignedPair(cpt, p))
    assert rel.relation == "continued pre-training" and rel.parent == "b"
    assert rel.details["lowrank"]["kind"] == "dense"
    # the same size of iid noise is a perturbation, not training
    noisy = {r: w + 0.3 * w.std() * torch.randn(w.shape, generator=g) for r, w in p.items()}
    rel = explain(AlignedPair(p, noisy))
    assert rel.relation == "fine-tune" and rel.details["lowrank"]["kind"] == "noise-like"

    other = _model(2)
    assert explain(AlignedPair(p, other)).relation == "unrelated"
    assert explain(AlignedPair(p, ft, p_value=0.3)).relation == "unrelated"
    rel = explain(AlignedPair(p, ft, layers_a=4, layers_b=3, dropped_layers=(2,)))
    assert rel.relation == "pruned" and rel.parent == "a"
    pr = {r: torch.where(w.abs() < w.abs().quantile(0.4), torch.zeros_like(w), w) for r, w in p.items()}
    assert explain(AlignedPair(p, pr)).relation == "pruned"


def test_anatomy_merge_with_parents():
    base = _model(3)
    g = torch.Generator().manual_seed(5)
    p1 = {r: w + 0.05 * w.std() * torch.randn(w.shape, generator=g) for r, w in base.items()}
    p2 = {r: w + 0.05 * w.std() * torch.randn(w.shape, generator=g) for r, w in base.items()}
    child = {r: 0.4 * p1[r] + 0.6 * p2[r] for r in base}
    rel = explain(AlignedPair(p1, child), parents=[p1, p2], base=base)
    assert rel.relation == "merge"
    w = rel.details["merge"]["weights"]
    assert abs(w[0] - 0.4) < 0.02 and abs(w[1] - 0.6) < 0.02
