"""Family trees on planted tiny checkpoints: chains, a quantised copy, a merge, an unrelated model."""

from __future__ import annotations

import torch

from lineage.family import (
    CHAIN_RETAINED,
    FamilyOptions,
    clean_components,
    elementwise_evidence,
    family_tree,
    rescale_gain,
    retained_share,
)
from lineage.testing.derive import add_noise, merge_linear, quantise_int8_per_row
from lineage.testing.models import TinyConfig, init_weights, save_model
from lineage.render.tree import render_html


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


def test_rescale_gain_separates_rescaling_from_updates():
    g = torch.Generator().manual_seed(11)
    a = torch.randn(48, 32, generator=g, dtype=torch.float64)
    r = torch.exp(0.3 * torch.randn(48, generator=g, dtype=torch.float64))
    c = torch.exp(0.3 * torch.randn(32, generator=g, dtype=torch.float64))
    assert rescale_gain(a, a * r[:, None] * c) > 0.99          # folded gains / traded scales
    assert rescale_gain(a, a + 0.2 * torch.randn(48, 32, generator=g, dtype=torch.float64)) < 0.1
    assert rescale_gain(a, a) == 0.0                            # nothing to undo


def test_retained_share_tells_chains_from_siblings():
    g = torch.Generator().manual_seed(3)

    def update(m):
        return {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in m.items()}

    p = {f"L{i}.attn.q.weight": torch.randn(64, 64, generator=g) for i in range(2)}
    x = update(p)
    chain = update(x)        # trained further from x: carries x's whole update
    sibling = update(p)      # trained from p: independent of x's update
    assert abs(retained_share(p, x, chain) - 1.0) < 0.1
    assert abs(retained_share(p, x, sibling)) < 0.1
    assert retained_share(p, x, sibling) < CHAIN_RETAINED <= retained_share(p, x, chain)


def test_clean_components():
    comps = clean_components(["a", "b", "c", "d", "e"], [("a", "b"), ("d", "e"), ("b", "c")])
    assert comps == [["a", "b", "c"], ["d", "e"]]
    assert clean_components(["x", "y"], []) == [["x"], ["y"]]


def test_disguised_subfamily_and_partial_disguises(tmp_path):
    """A disguised fine-tune with its own quantised child hangs from the fine-tune; copies disguised
    only in part (traded Q/K scales: every matrix still correlates) hang from the base as disguised
    copies; siblings sharing a common drift are not chained."""
    from lineage.testing.transforms import qk_scale, residual_permutation

    cfg = TinyConfig(family="llama", vocab=256, hidden=64, n_layers=2, intermediate=128)
    base = init_weights(cfg, 1)
    g = torch.Generator().manual_seed(5)
    drift = {k: 0.2 * v.std() * torch.randn(v.shape, generator=g) for k, v in base.items() if v.dim() == 2}

    def trained(seed: int, k: float):
        w, _ = add_noise(base, 0.25, seed)
        return {n: (v + k * drift[n]) if n in drift else v for n, v in w.items()}

    ft, sib = trained(2, 1.0), trained(3, 1.6)     # siblings that share the drift
    ftd, _ = residual_permutation(cfg, ft, 7)
    ftd_q, _ = quantise_int8_per_row(ftd)
    qk, _ = qk_scale(cfg, base, 8)
    models = {"base": base, "ft": ft, "sib": sib, "ftd": ftd, "ftd_q": ftd_q, "qk": qk}
    refs = [_write(tmp_path, n, cfg, w) for n, w in models.items()]
    t = family_tree(refs).tree
    assert t.roots == ("base",)
    parents = {e.child: e.parent for e in t.edges}
    assert parents == {"ft": "base", "sib": "base", "ftd": "ft", "ftd_q": "ftd", "qk": "base"}
    rel = {e.child: e.relation for e in t.edges}
    assert rel["ftd"] == "disguised copy" and rel["qk"] == "disguised copy"
    assert rel["ftd_q"] == "quantised copy"


def test_two_quantised_copies_of_one_model_are_siblings(tmp_path):
    """A 4-bit copy and an 8-bit copy of the 4-bit copy's grid are nearly equal, but both hang from
    the full-precision model (re-quantising cannot be told from quantising the source)."""
    from lineage.testing.derive import quantise_int4_per_group

    cfg = TinyConfig(family="llama", vocab=256, hidden=64, n_layers=2, intermediate=128)
    base = init_weights(cfg, 1)
    ft, _ = add_noise(base, 0.3, 2)
    q4, _ = quantise_int4_per_group(base)
    q8_of_q4, _ = quantise_int8_per_row(q4)
    models = {"base": base, "ft": ft, "q4": q4, "q8": q8_of_q4}
    refs = [_write(tmp_path, n, cfg, w) for n, w in models.items()]
    res = family_tree(refs)
    lk = {(x.a, x.b): x for x in res.links}[("q4", "q8")]
    assert lk.related and lk.distance < 0.5 * {(x.a, x.b): x for x in res.links}[("base", "q8")].distance
    parents = {e.child: e.parent for e in res.tree.edges}
    assert parents == {"ft": "base", "q4": "base", "q8": "base"}


def test_sibling_penalties_reject_chains_of_siblings_only():
    from lineage.family import SIBLING_PENALTY, sibling_penalties
    from lineage.tree import Link

    g = torch.Generator().manual_seed(9)
    p = {f"L{i}.mlp.up.weight": torch.randn(64, 32, generator=g) for i in range(2)}

    def update(m, k=0.3):
        return {n: v + k * torch.randn(v.shape, generator=g) for n, v in m.items()}

    x = update(p)
    roles = {"p": p, "x": x, "chain": update(x), "sib": update(p)}
    links = {}
    for a, b in (("p", "x"), ("p", "chain"), ("p", "sib"), ("x", "chain"), ("x", "sib")):
        links[(a, b)] = Link(a, b, True, 0.3, parent=a, confidence=0.9)
    pen = sibling_penalties(links, roles, set())
    assert pen == {("x", "sib"): SIBLING_PENALTY}
