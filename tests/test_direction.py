"""Direction on planted edges: fine-tune, LoRA, quantised, pruned, re-encoded, continued pre-training.

These are synthetic; the zoo's chains are the real validation.
"""

from __future__ import annotations

import torch

from lineage.signals.direction import direction


ROLES = [f"L{i}.{p}.weight" for i in range(6) for p in ("attn.q", "mlp.up")]


def _pretrained(seed=0):
    g = torch.Generator().manual_seed(seed)
    # heavy-tailed, as after pre-training
    return {r: 0.02 * torch.randn(96, 128, generator=g) / torch.sqrt(torch.rand(96, 128, generator=g) + 0.05)
            for r in ROLES}


def _noise(model, rel, seed, heavy=False):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for r, w in model.items():
        e = torch.randn(w.shape, generator=g)
        if heavy:  # sparse large outliers: what long training grows
            e = e + 12 * e * (torch.rand(w.shape, generator=g) < 0.01)
            e = e / e.std()
        out[r] = w + rel * w.std() * e
    return out


def test_fine_tune_edge_both_orders():
    p = _pretrained(1)
    c = _noise(p, 0.05, 2)
    d = direction(p, c)
    assert d.parent == "a" and d.decided_by == "variance_growth" and d.confidence > 0.6
    assert direction(c, p).parent == "b"


def test_lora_edge():
    p = _pretrained(2)
    g = torch.Generator().manual_seed(3)
    c = {r: w + 0.002 * torch.randn(96, 8, generator=g) @ torch.randn(8, 128, generator=g)
         for r, w in p.items()}
    assert direction(p, c).parent == "a"
    assert direction(c, p).parent == "b"


def test_continued_pretraining_edge_where_kurtosis_flips():
    p = _pretrained(3)
    c = _noise(p, 0.5, 4, heavy=True)  # large, heavy-tailed update: kurtosis grows
    d = direction(p, c, relation="continued pre-training")
    assert d.parent == "a"
    k = d.evidence["kurtosis"]
    assert k["kurtosis_b"] > k["kurtosis_a"]  # the naive "higher kurtosis is the parent" rule would fail
    assert direction(c, p, relation="continued pre-training").parent == "b"


def test_quantised_pruned_and_recast_children():
    p = _pretrained(4)
    q = {r: torch.round(w / (w.abs().amax(1, keepdim=True) / 127)) * (w.abs().amax(1, keepdim=True) / 127)
         for r, w in p.items()}
    d = direction(q, p)
    assert d.parent == "b" and d.decided_by == "grid"
    pr = {r: torch.where(w.abs() < w.abs().quantile(0.3), torch.zeros_like(w), w) for r, w in p.items()}
    d = direction(p, pr)
    assert d.parent == "a" and d.decided_by == "sparsity"
    bf = {r: w.bfloat16().float() for r, w in p.items()}
    d = direction(bf, p)
    assert d.parent == "b" and d.decided_by == "precision"


def test_identical_is_undecided():
    p = _pretrained(5)
    d = direction(p, {r: w.clone() for r, w in p.items()})
    assert d.parent is None and d.confidence == 0.0
    assert d.to_dict()["parent"] is None
