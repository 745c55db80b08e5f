"""The lineage test's statistics: tails in log space, combinations, aligned z-scores and their null."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from lineage.stattest import (
    aligned_z,
    combine,
    deflate_spikes,
    ks_uniform,
    log10_normal_sf,
    null_var_inner,
    z_from_log10_p,
)


def test_normal_tail_matches_scipy_and_does_not_underflow() -> None:
    for z in (-3.0, 0.0, 1.5, 6.0, 30.0):
        assert log10_normal_sf(z) == pytest.approx(math.log10(stats.norm.sf(z)), rel=1e-9, abs=1e-12)
    deep = log10_normal_sf(1000.0)
    assert math.isfinite(deep)
    # log10 Φ(-z) ≈ -z²/(2 ln 10) - log10(z √(2π))
    assert deep == pytest.approx(-1000.0**2 / (2 * math.log(10)) - math.log10(1000.0 * math.sqrt(2 * math.pi)), rel=1e-6)


@pytest.mark.parametrize("z", [0.3, 2.0, 8.0, 40.0, 400.0])
def test_z_from_log10_p_inverts(z: float) -> None:
    assert z_from_log10_p(log10_normal_sf(z)) == pytest.approx(z, rel=1e-7)


def test_fisher_and_stouffer_match_textbook_values() -> None:
    lps = [math.log10(0.01), math.log10(0.2), math.log10(0.5)]
    stat = -2 * sum(math.log(10**lp) for lp in lps)
    assert combine(lps, "fisher").log10_p == pytest.approx(math.log10(stats.chi2.sf(stat, 6)), rel=1e-9)
    zs = [stats.norm.isf(10**lp) for lp in lps]
    expect = math.log10(stats.norm.sf(sum(zs) / math.sqrt(3)))
    assert combine(lps, "stouffer").log10_p == pytest.approx(expect, rel=1e-7)
    assert combine(lps, "bonferroni").log10_p == pytest.approx(math.log10(0.03), rel=1e-9)


def test_combinations_stay_finite_for_huge_evidence() -> None:
    lps = [-5000.0, -12000.0, -1.0]
    for method in ("stouffer", "fisher", "cauchy", "bonferroni"):
        c = combine(lps, method)
        assert math.isfinite(c.log10_p) and c.log10_p < -4000, (method, c)
    # Cauchy ≈ mean of 1/p: dominated by the smallest p divided by k
    # T = mean 1/(π p_i) ≈ 1/(3π p_min), p ≈ 1/(πT) = 3 p_min
    assert combine(lps, "cauchy").log10_p == pytest.approx(-12000 + math.log10(3), abs=1e-6)


def test_cauchy_matches_direct_formula_for_moderate_p() -> None:
    ps = [0.02, 0.3, 0.7]
    t = np.mean([math.tan((0.5 - p) * math.pi) for p in ps])
    expect = 0.5 - math.atan(t) / math.pi
    assert 10 ** combine([math.log10(p) for p in ps], "cauchy").log10_p == pytest.approx(expect, rel=1e-6)


def test_combine_rejects_unknown_method() -> None:
    with pytest.raises(ValueError):
        combine([-1.0], "median")


def test_deflate_finds_planted_spikes_and_leaves_noise() -> None:
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(96, 200, generator=g)
    _, k0 = deflate_spikes(noise)
    assert k0 == 0
    u = torch.linalg.qr(torch.randn(96, 2, generator=g))[0]
    v = torch.linalg.qr(torch.randn(200, 2, generator=g))[0]
    spiked = noise + (u * torch.tensor([300.0, 150.0])) @ v.T
    out, k = deflate_spikes(spiked)
    assert k == 2
    assert float((out - noise).norm() / noise.norm()) < 0.2


def _shared_structure_pair(g: torch.Generator, d: int = 48, m: int = 120) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent bulks plus one strong shared direction (what trained, unrelated models share)."""
    u = torch.randn(d, 1, generator=g)
    v = torch.randn(1, m, generator=g)
    a = torch.randn(d, m, generator=g) + 3.0 * u @ v / math.sqrt(m) * math.sqrt(d)
    b = torch.randn(d, m, generator=g) + 3.0 * u @ v / math.sqrt(m) * math.sqrt(d)
    return a, b


def test_aligned_z_null_is_calibrated_even_with_shared_structure() -> None:
    g = torch.Generator().manual_seed(1)
    zs, zs_raw = [], []
    for _ in range(80):
        a, b = _shared_structure_pair(g, d=40, m=100)
        zs.append(aligned_z("x", a, b).z)
        zs_raw.append(aligned_z("x", a, b, deflate=False).z)
    zs_arr = np.asarray(zs)
    assert abs(zs_arr.mean()) < 0.35 and 0.7 < zs_arr.std() < 1.3, (zs_arr.mean(), zs_arr.std())
    assert np.abs(zs_arr).max() < 4.5
    # without deflation the shared direction makes unrelated matrices look related
    assert np.mean(zs_raw) > 3.0


def test_aligned_z_detects_a_noisy_copy() -> None:
    g = torch.Generator().manual_seed(2)
    a = torch.randn(64, 150, generator=g)
    st = aligned_z("x", a, a + 1.5 * torch.randn(64, 150, generator=g))
    assert st.r > 0.4 and st.z > 10 and st.log10_p < -20


def test_permutation_mean_trace_is_exact() -> None:
    from itertools import permutations

    from lineage.stattest import _perm_mean_trace

    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(5, 5, generator=g, dtype=torch.float64), torch.randn(5, 5, generator=g, dtype=torch.float64)
    X, Y = x @ x.T, y @ y.T + 1.0
    vals = []
    for p in permutations(range(5)):
        P = torch.eye(5, dtype=torch.float64)[list(p)]
        vals.append(float(torch.trace(X @ P.T @ Y @ P)))
    assert _perm_mean_trace(X, Y) == pytest.approx(np.mean(vals), rel=1e-10)


def test_null_variance_matches_monte_carlo_rotation_and_permutation() -> None:
    g = torch.Generator().manual_seed(4)
    d, m = 6, 9
    a = torch.randn(d, m, generator=g, dtype=torch.float64) + 2.0  # a shared mean makes naive 1/n wrong
    b = torch.randn(d, m, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3.0, m, dtype=torch.float64)
    n = 3000
    q, _ = torch.linalg.qr(torch.randn(n, d, d, generator=g, dtype=torch.float64))  # batched Haar-ish rotations
    perms = torch.argsort(torch.rand(n, m, generator=g), dim=1)
    bp = b[:, perms].permute(1, 0, 2)  # (n, d, m): b with columns permuted
    vals = (a[None] * (q @ bp)).sum((1, 2)).numpy()
    mc = float(np.mean(np.square(vals)))
    assert null_var_inner(a, b) >= 0.9 * mc
    assert null_var_inner(a, b) <= 3.0 * mc


def test_ks_uniform_flags_non_uniform() -> None:
    rng = np.random.default_rng(0)
    assert ks_uniform(rng.uniform(size=200)) > 0.01
    assert ks_uniform(rng.uniform(size=200) ** 3) < 1e-6
