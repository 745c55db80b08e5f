"""Direction beyond the element-wise rules: shape surgery, merges ("between"), re-orderings.

Planted on synthetic weights; ``benchmarks/direction_check.py`` is the validation on the zoo.
"""

from __future__ import annotations

import torch

from lineage.signals.direction import between, direction, structure_evidence

ROLES = [f"L{i}.{p}.weight" for i in range(4) for p in ("attn.q", "attn.o", "mlp.up", "mlp.down")]


def _model(seed: int, inter: int = 96, vocab: int = 256, layers: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    m = {"embed.weight": torch.randn(vocab, 64, generator=g)}
    for i in range(layers):
        m[f"L{i}.attn.q.weight"] = 0.1 * torch.randn(64, 64, generator=g)
        m[f"L{i}.attn.o.weight"] = 0.1 * torch.randn(64, 64, generator=g)
        m[f"L{i}.mlp.up.weight"] = 0.1 * torch.randn(inter, 64, generator=g)
        m[f"L{i}.mlp.down.weight"] = 0.1 * torch.randn(64, inter, generator=g)
    return m


def _update(m: dict[str, torch.Tensor], rel: float, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {r: w + rel * w.std() * torch.randn(w.shape, generator=g) for r, w in m.items()}


def _shared(a, b):
    keys = [r for r in a if r in b and a[r].shape == b[r].shape]
    return {r: a[r] for r in keys}, {r: b[r] for r in keys}


def _dir(a, b):
    pa, pb = _shared(a, b)
    return direction(pa, pb, full_a=a, full_b=b)


def _relayer(m, layer_map):
    out = {k: v for k, v in m.items() if not k.startswith("L")}
    for new, old in enumerate(layer_map):
        for r, w in m.items():
            if r.startswith(f"L{old}."):
                out[f"L{new}." + r.split(".", 1)[1]] = w.clone()
    return out


def test_dropped_layers_parent_is_deeper_duplicated_layers_child_is_deeper():
    p = _model(0)
    drop = _relayer(p, [0, 1, 3])
    d = _dir(p, drop)
    assert d.parent == "a" and d.decided_by == "structure" and d.evidence["structure"]["kind"] == "depth"
    assert _dir(drop, p).parent == "b"
    dup = _relayer(p, [0, 1, 1, 2, 3])
    d = _dir(p, dup)
    assert d.parent == "a" and d.evidence["structure"]["duplicate_layer_pearson"] > 0.99
    assert _dir(dup, p).parent == "b"
    # healed duplicate: the copied layers drift apart but stay far more alike than distinct layers
    assert _dir(p, _update(dup, 0.3, 1)).parent == "a"


def test_width_pruned_child_is_narrower_grown_child_is_wider():
    p = _model(1)
    keep = torch.arange(0, 96, 2)
    pruned = dict(p)
    grown = dict(p)
    for i in range(4):
        pruned[f"L{i}.mlp.up.weight"] = p[f"L{i}.mlp.up.weight"][keep]
        pruned[f"L{i}.mlp.down.weight"] = p[f"L{i}.mlp.down.weight"][:, keep]
        # net2net-style widening: duplicate 32 neurons, split their output weights
        dupl = torch.arange(32)
        grown[f"L{i}.mlp.up.weight"] = torch.cat([p[f"L{i}.mlp.up.weight"], p[f"L{i}.mlp.up.weight"][dupl]])
        down = p[f"L{i}.mlp.down.weight"].clone()
        down[:, dupl] /= 2
        grown[f"L{i}.mlp.down.weight"] = torch.cat([down, down[:, dupl]], dim=1)
    d = _dir(p, pruned)
    assert d.parent == "a" and d.evidence["structure"]["kind"] == "width"
    assert _dir(pruned, p).parent == "b"
    d = _dir(p, grown)
    assert d.parent == "a" and d.evidence["structure"]["grown_units"] >= 16
    assert _dir(grown, p).parent == "b"


def test_vocabulary_extension_and_pruning():
    p = _model(2)
    e = p["embed.weight"]
    g = torch.Generator().manual_seed(3)
    ext = dict(p)
    ext["embed.weight"] = torch.cat([e, e.mean(0, keepdim=True) + 0.1 * e.std() * torch.randn(40, 64, generator=g)])
    d = _dir(p, ext)
    assert d.parent == "a" and d.evidence["structure"]["fresh_rows"] >= 40
    assert _dir(ext, p).parent == "b"
    pruned = dict(p)
    pruned["embed.weight"] = e[:200].clone()
    assert _dir(p, pruned).parent == "a"
    assert _dir(pruned, p).parent == "b"
    assert structure_evidence(p, dict(p))["vote"] is None


def test_merge_seen_from_one_parent_is_undecided_and_found_between_the_parents():
    base = _model(4)
    fa = _update(base, 0.3, 5)
    fb = _update(base, 0.3, 6)
    assert direction(base, fa).parent == "a"  # an independent update is oriented
    merge = {r: 0.3 * fa[r] + 0.7 * fb[r] for r in base}
    # from the minority parent both sides shrink along the difference: undecided, flagged
    d = direction(fa, merge)
    assert d.parent is None and d.evidence["variance_growth"]["between"]
    # (from the majority parent the merge looks like its parent: pairwise evidence cannot tell,
    # which is why family trees look at three models at a time)
    bt = between(merge, fa, fb)
    assert bt.interpolates and abs(bt.alpha - 0.3) < 1e-6 and bt.residual < 1e-6
    assert not between(fa, merge, fb).interpolates   # a parent would need extrapolation
    assert not between(base, fa, fb).interpolates    # the common parent is not between its children
    # a sparsified (TIES-like) merge leaves the segment but not the task-vector cone over the base
    ties = {r: base[r] + _ties([fa[r] - base[r], fb[r] - base[r]]) for r in base}
    assert between(ties, fa, fb, base=base).interpolates
    assert not between(fa, ties, fb, base=base).interpolates


def _ties(tvs: list[torch.Tensor], density: float = 0.5) -> torch.Tensor:
    """TIES: trim each task vector to its largest ``density`` fraction, elect signs, disjoint mean."""
    trimmed = []
    for t in tvs:
        k = int(density * t.numel())
        thr = t.abs().flatten().kthvalue(t.numel() - k).values
        trimmed.append(torch.where(t.abs() > thr, t, torch.zeros_like(t)))
    st = torch.stack(trimmed)
    sign = torch.sign(st.sum(0))
    agree = (torch.sign(st) == sign) & (st != 0)
    return (st * agree).sum(0) / agree.sum(0).clamp_min(1)


def test_siblings_and_reordering_are_undecided():
    base = _model(8)
    fa, fb = _update(base, 0.3, 9), _update(base, 0.3, 10)
    assert direction(fa, fb).parent is None  # siblings: neither is the other's parent
    perm = torch.randperm(256, generator=torch.Generator().manual_seed(11))
    re = dict(base)
    re["embed.weight"] = base["embed.weight"][perm]
    d = direction(base, re)
    assert d.parent is None and d.decided_by is None  # kurtosis is reported, never decisive
