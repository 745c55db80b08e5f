"""Family trees on planted tiny checkpoints: chains, a quantised copy, a merge, an unrelated model."""

from __future__ import annotations

import torch

from lineage.family import FamilyOptions, elementwise_evidence, family_tree
from lineage.testing.derive import add_noise, merge_linear, quantise_int8_per_row
from lineage.testing.models import TinyConfig, init_weights, save_model
from lineage.tree import render_html


def _write(tmp_path, name, cfg, w):
    return str(save_model(tmp_path / name, cfg, w))


def test_planted_family_with_merge_and_unrelated(tmp_path):
    cfg = TinyConfig(family="llama", vocab=256, hidden=64, n_layers=2, intermediate=128)
    base = init_weights(cfg, 1)
    ft1, _ = add_noise(base, 0.3, 2)
    ft2, _ = add_noise(base, 0.3, 3)
    chain, _ = add_noise(ft1, 0.2, 4)
    quant, _ = quantise_int8_per_row(ft2)
    merge, _ = merge_linear([ft1, ft2], [0.3, 0.7])
    other = init_weights(cfg, 99)
    models = {"base": base, "ft1": ft1, "ft2": ft2, "chain": chain, "quant": quant, "merge": merge, "other": other}
    refs = [_write(tmp_path, n, cfg, w) for n, w in models.items()]
    res = family_tree(refs, family=FamilyOptions())
    t = res.tree
    assert sorted(t.roots) == ["base", "other"]
    assert t.parent_of("ft1") == "base" and t.parent_of("ft2") == "base"
    assert t.parent_of("chain") == "ft1"
    assert t.parent_of("quant") == "ft2"
    (e,) = [e for e in t.edges if e.child == "merge"]
    assert e.relation == "merge" and {e.parent, *e.other_parents} == {"ft1", "ft2"}
    assert e.parent == "ft2"  # the larger weight is the main parent
    rel = {e.child: e.relation for e in t.edges}
    assert rel["quant"] == "quantised copy"
    # only the model no element-wise link explains went through the canonical comparison
    assert res.reports and all("other" in (r.a.ref.rsplit("/", 1)[-1], r.b.ref.rsplit("/", 1)[-1])
                               for r in res.reports)
    assert all(not r.verdict.derived for r in res.reports)
    page = render_html(t)
    assert "stroke-dasharray" in page  # the second parent of the merge is drawn


def test_elementwise_evidence_unrelated_and_related():
    cfg = TinyConfig(family="llama", vocab=256, hidden=64, n_layers=2, intermediate=128)
    a = {k: v for k, v in init_weights(cfg, 5).items()}
    b = {k: v for k, v in init_weights(cfg, 6).items()}
    ev = elementwise_evidence(a, b)
    assert not ev.related and ev.parent is None
    c = {k: v + 0.1 * v.std() * torch.randn(v.shape, generator=torch.Generator().manual_seed(7))
         for k, v in a.items()}
    ev = elementwise_evidence(a, c)
    assert ev.related and ev.parent == "a" and 0.05 < ev.distance < 0.2
