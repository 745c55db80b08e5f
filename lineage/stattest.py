"""Statistical tests of lineage: per-matrix statistics, null variances, p-value combination.

The null hypothesis everywhere is *independent initialisation*: model B's
weights were drawn (and trained) independently of model A's.  Every p-value is
reported as ``log10 p`` computed in log space, so a derived pair's
``p = 10^-5000`` does not underflow to 0.

Building blocks
---------------
* :func:`aligned_z` — correlation of two aligned matrices (residual axis first)
  turned into a z-score with a null variance that does not depend on the
  alignment that was searched for (see its docstring).
* :func:`log10_normal_sf` — ``log10 P(Z > z)`` without underflow.
* :func:`combine` — Stouffer (default), Fisher, or Cauchy (ACAT, valid under
  arbitrary dependence) combination of per-layer results, in log space.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy import special, stats

from lineage_kernels.svd import randomized_svd

LN10 = math.log(10.0)

#: Combination methods understood by :func:`combine`.
METHODS = ("stouffer", "fisher", "cauchy", "bonferroni")


def log10_normal_sf(z: float) -> float:
    """``log10 P(Z > z)`` for a standard normal ``Z`` (exact far into the tail)."""
    if not math.isfinite(z):
        return 0.0 if z < 0 else -math.inf
    return float(special.log_ndtr(-z)) / LN10


def z_from_log10_p(log10_p: float) -> float:
    """Inverse of :func:`log10_normal_sf` (one-sided z of a p-value given in log10)."""
    if log10_p >= 0:
        return -math.inf
    lp = log10_p * LN10
    if lp > -700:
        return float(-special.ndtri(math.exp(lp)))
    # Asymptotic inversion of log Φ(-z) ≈ -z²/2 - log(z) - log√(2π), refined by Newton steps.
    z = math.sqrt(-2.0 * lp)
    for _ in range(50):
        f = float(special.log_ndtr(-z)) - lp
        # d/dz log Φ(-z) = -φ(z)/Φ(-z) ≈ -(z + 1/z) in the tail
        step = f / (z + 1.0 / z)
        z += step
        if abs(step) < 1e-12 * z:
            break
    return z


def _centre(x: torch.Tensor) -> torch.Tensor:
    return x - x.mean()


def _perm_mean_trace_from_sums(diag_x: float, total_x: float, diag_y: float, total_y: float, m: int) -> float:
    """``E_P tr(X Pᵀ Y P)`` from the diagonal sums and total sums of X and Y (m × m)."""
    if m == 1:
        return diag_x * diag_y
    return diag_x * diag_y / m + (total_x - diag_x) * (total_y - diag_y) / (m * (m - 1))


def _perm_mean_trace(X: torch.Tensor, Y: torch.Tensor) -> float:
    """``E_P tr(X Pᵀ Y P)`` over uniformly random permutations ``P`` (X, Y symmetric m×m)."""
    return _perm_mean_trace_from_sums(float(torch.diagonal(X).sum()), float(X.sum()),
                                      float(torch.diagonal(Y).sum()), float(Y.sum()), X.shape[0])


def null_var_inner(A: torch.Tensor, B: torch.Tensor) -> float:
    """Null variance of ``<A, B>`` that ignores how B's rows and columns were aligned to A's.

    ``A`` and ``B`` are ``(d, m)``: ``d`` residual channels by ``m`` units.  Two
    randomisations are averaged over, each in both orientations, and the larger
    is returned:

    * a Haar-random rotation of one axis, which gives ``tr(XᵀX · YᵀY) / d`` with
      the Grams of the *other* axis, and
    * a uniformly random permutation of that other axis, averaged in closed form
      (:func:`_perm_mean_trace`; only the Grams' diagonal and total sums enter,
      i.e. squared norms and squared norms of row/column sums),

    and, third, the Haar-residual variance with the units *as aligned*,
    ``tr(AᵀA · BᵀB) / d = ‖A Bᵀ‖² / d`` — exact when B's residual axis is
    rotation-invariant and the unit axes share structure by construction (probe
    tokens used on both sides).  This last term grows under the alternative (it
    caps z near ``√(d · effective rank)``), the price of validity for
    shared-probe matrices.
    """
    A = A.double()
    B = B.double()
    d, m = A.shape
    na, nb = float((A * A).sum()), float((B * B).sum())
    row_a, row_b = float(A.sum(1).pow(2).sum()), float(B.sum(1).pow(2).sum())  # 1ᵀ AᵀA 1
    col_a, col_b = float(A.sum(0).pow(2).sum()), float(B.sum(0).pow(2).sum())  # 1ᵀ AAᵀ 1
    v_rot_res = _perm_mean_trace_from_sums(na, row_a, nb, row_b, m) / d  # rotate residual axis, permute units
    v_rot_unit = _perm_mean_trace_from_sums(na, col_a, nb, col_b, d) / m  # rotate unit axis, permute residual
    v_rot_fixed = float((A.float() @ B.float().T).double().pow(2).sum()) / d  # rotate residual axis, units as aligned
    return max(v_rot_res, v_rot_unit, v_rot_fixed)


@dataclass(frozen=True)
class MatrixStat:
    """Correlation of an aligned matrix pair and its null z-score."""

    name: str
    n: int
    r: float
    z: float
    log10_p: float
    spikes_a: int = 0
    spikes_b: int = 0

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


#: Most spikes removed per matrix by :func:`deflate_spikes`.
MAX_SPIKES = 32
#: A singular value counts as a spike above this multiple of the Marchenko–Pastur edge.
SPIKE_MARGIN = 1.1


def deflate_spikes(A: torch.Tensor, max_k: int = MAX_SPIKES, margin: float = SPIKE_MARGIN) -> tuple[torch.Tensor, int]:
    """Remove the singular components of ``A`` that stand above a random matrix's bulk.

    The bulk is modelled as i.i.d. noise of variance ``σ²`` (estimated from the
    energy left after the candidate spikes); its largest singular value is
    ``σ(√d + √m)`` (Marchenko–Pastur edge).  Components above ``margin`` times
    that edge are *learned structure*, which independently trained models share
    after alignment (a common written direction, the embedding mean…); lineage
    lives in the bulk, which fine-tuning leaves in place.  Returns the deflated
    matrix and the number of components removed.  Depends on ``A`` alone.
    """
    d, m = A.shape
    k_try = min(max_k, max(0, min(d, m) // 4))
    if k_try == 0:
        return A, 0
    x = A.float()
    if min(d, m) <= 1024:
        # top singular triplets from the eigendecomposition of the smaller Gram
        small_left = d <= m
        G = (x @ x.T) if small_left else (x.T @ x)
        lam, vecs = torch.linalg.eigh(G.double())
        lam, vecs = lam.flip(0)[:k_try].clamp_min(0.0), vecs.flip(1)[:, :k_try]
        S = lam.sqrt()
        inv = torch.where(S > 0, 1.0 / S.clamp_min(1e-300), torch.zeros_like(S))
        if small_left:
            U, V = vecs, (x.double().T @ vecs) * inv
        else:
            V, U = vecs, (x.double() @ vecs) * inv
        U, S, V = U.float(), S.float(), V.float()
    else:
        U, S, V = randomized_svd(x, k_try, oversample=8, n_iter=3, seed=0)
    total = float((x.double() ** 2).sum())
    k = 0
    for k_cand in range(k_try, -1, -1):
        rest = total - float((S[:k_cand].double() ** 2).sum())
        sigma = math.sqrt(max(rest, 0.0) / max(1, (d - k_cand) * (m - k_cand)))
        edge = sigma * (math.sqrt(d) + math.sqrt(m))
        k = int((S[:k_cand].double() > margin * edge).sum()) if k_cand else 0
        if k == k_cand or k_cand == 0:
            break
        # fewer spikes than assumed: re-estimate with that many
        rest = total - float((S[:k].double() ** 2).sum())
        sigma = math.sqrt(max(rest, 0.0) / max(1, (d - k) * (m - k)))
        edge = sigma * (math.sqrt(d) + math.sqrt(m))
        k = int((S[:k].double() > margin * edge).sum())
        break
    if k == 0:
        return A, 0
    out = x - (U[:, :k] * S[:k]) @ V[:, :k].T
    return out.to(A.dtype), k


def aligned_z(name: str, A: torch.Tensor, B: torch.Tensor, deflate: bool = True) -> MatrixStat:
    """Pearson correlation of aligned ``A`` and ``B`` (both ``(d, m)``) with a conservative null.

    Both matrices are centred and (``deflate``) stripped of their own spikes
    (:func:`deflate_spikes`); then every residual row is scaled to unit norm
    (so a few outlier channels cannot dominate).  The z-score divides the inner
    product by the square root of :func:`null_var_inner`, floored at the
    i.i.d. value ``‖A‖²‖B‖²/n``.
    """
    if A.shape != B.shape:
        raise ValueError(f"aligned_z({name}): shapes differ {tuple(A.shape)} vs {tuple(B.shape)}")
    a = _centre(A.double())
    b = _centre(B.double())
    ka = kb = 0
    if deflate:
        a, ka = deflate_spikes(a)
        b, kb = deflate_spikes(b)
        a, b = a.double(), b.double()
    a = a / a.norm(dim=1, keepdim=True).clamp_min(1e-30)
    b = b / b.norm(dim=1, keepdim=True).clamp_min(1e-30)
    a, b = _centre(a), _centre(b)
    n = a.numel()
    na2, nb2 = float((a * a).sum()), float((b * b).sum())
    if na2 <= 0 or nb2 <= 0 or n < 3:
        return MatrixStat(name, n, 0.0, 0.0, 0.0, ka, kb)
    inner = float((a * b).sum())
    r = inner / math.sqrt(na2 * nb2)
    var = max(null_var_inner(a, b), na2 * nb2 / n)
    z = inner / math.sqrt(var)
    return MatrixStat(name, n, r, z, log10_normal_sf(z), ka, kb)


@dataclass(frozen=True)
class Combined:
    """A combined p-value: ``log10_p`` and the z it corresponds to."""

    method: str
    k: int
    log10_p: float
    z: float

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _stouffer(zs: np.ndarray) -> float:
    return float(zs.sum() / math.sqrt(len(zs)))


def combine(log10_ps: Sequence[float], method: str = "stouffer", zs: Sequence[float] | None = None) -> Combined:
    """Combine one-sided p-values (given as log10) into one.

    * ``stouffer``: ``Σz/√k`` (uses ``zs`` when given, else inverts the p-values);
      valid for independent tests.
    * ``fisher``: ``-2 Σ ln p ~ χ²(2k)``; valid for independent tests.
    * ``cauchy``: ACAT (Liu & Xie 2020), ``T = mean tan((½ - p)π)``; valid
      under arbitrary dependence for small p.  Computed in log space.
    * ``bonferroni``: ``k · min p``; valid under any dependence.
    """
    if method not in METHODS:
        raise ValueError(f"combine: method must be one of {METHODS}, not {method!r}")
    lps = np.asarray([min(0.0, float(x)) for x in log10_ps], dtype=np.float64)
    k = len(lps)
    if k == 0:
        return Combined(method, 0, 0.0, -math.inf)
    if method == "stouffer":
        z_arr = np.asarray(zs, dtype=np.float64) if zs is not None else np.asarray([z_from_log10_p(x) for x in lps])
        z_arr = np.clip(z_arr, -40.0, None)
        z = _stouffer(z_arr)
        return Combined(method, k, log10_normal_sf(z), z)
    if method == "fisher":
        stat = -2.0 * LN10 * float(lps.sum())
        lp = float(stats.chi2.logsf(stat, 2 * k)) / LN10
        if not math.isfinite(lp):  # deep tail: log of the Gamma upper tail by asymptotics
            lp = _log10_gamma_tail(k, stat / 2)
        return Combined(method, k, lp, z_from_log10_p(lp))
    if method == "bonferroni":
        lp = min(0.0, float(lps.min()) + math.log10(k))
        return Combined(method, k, lp, z_from_log10_p(lp))
    # cauchy
    ln_p = lps * LN10
    # tan((0.5 - p)π) = cot(pπ); for small p ≈ 1/(pπ).  Work with log T when T is huge.
    small = ln_p < math.log(1e-8)
    terms_big = -ln_p[small] - math.log(math.pi)  # log of 1/(pπ)
    regular = np.tan((0.5 - np.exp(ln_p[~small])) * math.pi)
    if small.any():
        log_big = special.logsumexp(terms_big) - math.log(k)
        t = math.exp(min(log_big, 700.0)) + float(regular.sum()) / k
        if log_big > 700 or t > 1e15:
            # p ≈ 1/(πT)
            lp = (-(log_big) - math.log(math.pi)) / LN10
            return Combined(method, k, min(0.0, lp), z_from_log10_p(lp))
    else:
        t = float(regular.sum()) / k
    p = 0.5 - math.atan(t) / math.pi
    lp = math.log10(max(p, 1e-300)) if p > 0 else -300.0
    return Combined(method, k, min(0.0, lp), z_from_log10_p(lp))


def _log10_gamma_tail(a: int, x: float) -> float:
    """``log10 Q(a, x)`` (regularised upper incomplete gamma) for large x, by the leading asymptotic term."""
    # Q(a, x) ≈ x^(a-1) e^-x / Γ(a) · (1 + (a-1)/x + ...)
    s = 1.0
    term = 1.0
    for j in range(1, min(a, 30)):
        term *= (a - j) / x
        s += term
    ln_q = (a - 1) * math.log(x) - x - special.gammaln(a) + math.log(s)
    return ln_q / LN10


def ks_uniform(pvalues: Sequence[float]) -> float:
    """Kolmogorov–Smirnov p-value of ``pvalues`` against Uniform(0, 1)."""
    return float(stats.kstest(np.asarray(pvalues, dtype=np.float64), "uniform").pvalue)
