"""Streamed per-module statistics (lineage.stream): exact moments across blocks, and screens that settle
noise, re-encodings and lattices without exact work while flagging low-rank deltas for it."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from lineage.compare import CompareOptions, compare
from lineage.signals.lowrank import lowrank
from lineage.signals.pairstats import pair_stats
from lineage.signals.quantgrid import detect_grid
from lineage.stream.moments import block_moments, block_moments_reference, merge_moments
from lineage.stream.screen import ScreenBuilder, ScreenConfig


def _screen(a: torch.Tensor, b: torch.Tensor, block: int = 300, cfg: ScreenConfig | None = None):
    sb = ScreenBuilder("L0.attn.q.weight", tuple(a.shape), cfg or ScreenConfig(min_elems=1))
    for r0 in range(0, a.shape[0], block):
        sb.add(sb.part(r0, a[r0 : r0 + block], b[r0 : r0 + block]))
    return sb.finish()


def test_block_moments_merge_to_whole_tensor_reference() -> None:
    g = torch.Generator().manual_seed(0)
    x = 1.0 + 0.1 * torch.randn(300, 257, generator=g)  # a mean far from zero: shifts and merges must hold
    y = x + 0.01 * torch.randn(300, 257, generator=g)
    x[0, :5] = 0.0
    acc = None
    for r0 in range(0, 300, 70):
        acc = merge_moments(acc, block_moments(x[r0 : r0 + 70], y[r0 : r0 + 70], chunk=1000))
    ref = block_moments_reference(x, y)
    for f in dataclasses.fields(ref):
        got, want = getattr(acc, f.name), getattr(ref, f.name)
        assert got == pytest.approx(want, rel=1e-5, abs=1e-6 * abs(ref.m2x)), f.name
    st, ps = acc.pair_stats(), pair_stats(x, y)
    assert st.pearson == pytest.approx(ref.pair_stats().pearson, rel=1e-6)
    assert st.pearson == pytest.approx(ps.pearson, rel=1e-6)
    assert st.kurtosis("x") == pytest.approx(ps.kurtosis("x"), rel=1e-4)
    assert (st.zeros_only_x, st.zeros_only_y) == (5, 0)


def _base(m: int = 1024, n: int = 768, seed: int = 0) -> torch.Tensor:
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed)) / math.sqrt(n)


@pytest.mark.parametrize("hetero", [False, True])
def test_noise_delta_is_settled_without_exact_work(hetero: bool) -> None:
    w = _base()
    g = torch.Generator().manual_seed(1)
    d = 0.01 * torch.randn(w.shape, generator=g) / math.sqrt(w.shape[1])
    if hetero:  # variance varying by row and column (quantisation-like) is still noise
        d = d * torch.exp(torch.randn(w.shape[0], 1, generator=g)) * torch.exp(0.5 * torch.randn(1, w.shape[1], generator=g))
    sc = _screen(w.bfloat16(), (w + d).bfloat16())
    assert sc.noise_like and sc.structure_ratio < 1.3
    lr = sc.lowrank("b")
    assert lr is not None and lr.status == "noise-like" and lr.rank_source == "stream screen"
    exact = lowrank(w.bfloat16().float(), (w + d).bfloat16().float())
    assert exact.status == "noise-like"
    assert lr.rel_delta == pytest.approx(exact.rel_delta, rel=1e-5)
    assert sc.grid_b == "bf16" and sc.quant_b is not None and not sc.quant_b.on_grid


def test_low_rank_delta_is_flagged_for_exact_work() -> None:
    w = _base()
    g = torch.Generator().manual_seed(2)
    noise = 1e-3 * torch.randn(w.shape, generator=g) / math.sqrt(w.shape[1])
    low = (torch.randn(w.shape[0], 16, generator=g) @ torch.randn(16, w.shape[1], generator=g)) * 1e-5
    sc = _screen(w, w + noise + low)
    assert not sc.noise_like and sc.structure_ratio > 1.5
    assert sc.lowrank("b") is None  # exact decomposition needed
    assert lowrank(w, w + noise + low).status == "low-rank"  # what that exact work then finds


def test_reencoding_and_unchanged_modules_are_settled() -> None:
    w = _base()
    sc = _screen(w, w.bfloat16().float())
    assert sc.within_round_b and sc.grid_b == "bf16" and sc.lowrank("b").status == "rounding"
    assert lowrank(w, w.bfloat16().float()).status == "rounding"
    same = _screen(w, w.clone())
    assert same.changed == 0 and same.lowrank("b").status == "unchanged" and same.lowrank("a").status == "unchanged"


def test_lattice_detection_on_the_streamed_sample_matches_detect_grid() -> None:
    w = _base()
    s = w.abs().amax(1, keepdim=True) / 127
    q = torch.round(w / s) * s
    sc = _screen(w, q)
    want = detect_grid(q, w, max_rows=128)
    assert sc.quant_b == want and want.on_grid and want.consistent_with_parent
    assert sc.noise_like  # quantisation error has no spectral structure
    assert _screen(w, q.T.contiguous().T.contiguous()).quant_b.format == "int8-per-row"
    qt = (torch.round(w.T / (w.T.abs().amax(1, keepdim=True) / 127)) * (w.T.abs().amax(1, keepdim=True) / 127)).T
    sct = _screen(w, qt.contiguous())
    assert sct.quant_b == detect_grid(qt.contiguous(), w, max_rows=128) and sct.quant_b.axis == 1


def test_forced_screening_keeps_the_anatomy_outcome(tiny_models) -> None:
    """The tiny models are below the screening size; forcing every module through the screen must not change
    what the anatomy reports, and settled modules are not read again."""
    exact = compare(tiny_models["base"], tiny_models["derived"])
    forced = compare(tiny_models["base"], tiny_models["derived"], options=CompareOptions(screen=ScreenConfig(min_elems=1)))
    assert exact.anatomy and forced.anatomy
    for k in ("relation", "parent"):
        assert forced.anatomy[k] == exact.anatomy[k]
    assert forced.verdict.relation == exact.verdict.relation
    assert forced.verdict.log10_p == pytest.approx(exact.verdict.log10_p, rel=1e-6)


def test_no_canon_is_elementwise_only(tiny_models) -> None:
    r = compare(tiny_models["base"], tiny_models["derived"], options=CompareOptions(canonicalise=False))
    assert r.anatomy is None and r.canon is None and r.verdict.derived is True
    assert r.a.bytes_read == r.a.total_bytes or r.a.bytes_read > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_and_cpu_reports_agree(tiny_models) -> None:
    for other in ("derived", "bf16", "unrelated"):
        c = compare(tiny_models["base"], tiny_models[other], options=CompareOptions(device="cpu"))
        g = compare(tiny_models["base"], tiny_models[other], options=CompareOptions(device="cuda"))
        assert (g.verdict.relation, g.verdict.derived) == (c.verdict.relation, c.verdict.derived)
        assert (g.anatomy or {}).get("relation") == (c.anatomy or {}).get("relation")
        for rc, rg in zip(c.layers, g.layers):
            for f in ("cosine", "pearson", "rel_l2"):
                x, y = getattr(rc, f), getattr(rg, f)
                if x is not None:
                    assert y == pytest.approx(x, rel=1e-5, abs=1e-9), (rc.role, f)
