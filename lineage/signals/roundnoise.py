"""Rank of a delta under the child format's *known* rounding noise.

When the child was cast to bf16/fp16 or quantised after a low-rank update, the
delta ``child − base`` is ``D + E``: the update ``D`` plus the child's storage
rounding ``E``.  The rounding is not unknown noise to be estimated from the data:
the child's own values fix its spacing entry by entry (half a unit in the last
place of bf16/fp16, half a lattice step of an int8/int4/GGUF group), and a
round-to-nearest error is uniform within it, with variance ``step² / 12``.

:func:`known_noise_rank` uses that variance map ``V``:

1. **Balance** ``V`` (:func:`lineage_kernels.balance.balance`): row and column scales
   ``a``, ``b`` give ``diag(√a) E diag(√b)`` unit average variance in every row and
   column, so its singular values follow the Marchenko–Pastur law of an iid
   unit-variance matrix; the scaling leaves the rank of ``D`` unchanged.
2. **Count** components sequentially: component ``j + 1`` is signal when its
   singular value exceeds the largest singular value that noise of the remaining
   ``(m − j) × (n − j)`` complement reaches, ``√(m−j) + √(n−j)`` plus ``t`` units of
   its Tracy–Widom fluctuation ``½ (1/√(m−j) + 1/√(n−j))^{1/3}`` (Johnstone 2001).
   ``t = 3`` keeps the chance that noise adds a component near 0.1 % per module
   (calibrated in tests/test_roundnoise.py on 420 planted cases: no over-count).
3. **Check** the model: the energy left after the counted components must be what
   the rounding of the complement carries, ``(m − r)(n − r)``; ``tail_ratio`` reports it.
   Energy beyond that is measured in components at the noise edge
   (``excess_components`` = excess / edge²): a few weak components of the update hidden
   under the edge (see below) account for one or two; noise or a dense update spread
   over the whole complement for many more, growing with the matrix.  A delta with too
   much energy (callers' ``known_noise_excess``) or too little (a wrong noise model) is
   not explained, and callers keep their own reading.  A low-rank reading also needs its
   strongest component clear of the bulk (``lead`` = s_1 / edge): noise slightly above the
   rounding lifts the top of the bulk just across the edge, a merged update stands well above it.

Components of ``D`` weaker than the noise edge cannot be seen by any spectral method
(they fall below the BBP transition): the count is then a lower bound on the rank,
with ``tail_ratio`` a little above 1.  :func:`lineage.signals.lowrank_summary.summarise`
pools modules, which a LoRA gives one common rank.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import torch

from lineage.signals.floatgrid import float_grid, half_ulp
from lineage.signals.quantgrid import QuantGrid, detect_grid, grid_steps
from lineage_kernels.balance import balance
from lineage_kernels.svd import randomized_svd

log = logging.getLogger(__name__)

#: Tracy–Widom units above the noise edge a component must reach to count.
EDGE_T = 3.0


@dataclass(frozen=True)
class RoundingNoise:
    """Per-entry variance of the child's storage rounding; ``name`` is its format (bf16, int8-per-row, Q4_K …)."""

    name: str
    variance: torch.Tensor  # float32, shape of the child

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "mean_sigma": float(self.variance.double().mean().sqrt())}


@dataclass(frozen=True)
class KnownNoiseRank:
    """Result of :func:`known_noise_rank` (see module docstring)."""

    noise: str
    rank: int
    tail_ratio: float          # energy after ``rank`` components / (m − rank)(n − rank)
    excess_components: float   # energy beyond the rounding's, in units of (noise edge)²
    lead: float                # s_1 / the m × n noise edge: how far the strongest component stands out
    edge_ratio: float | None   # s_{rank+1} / its noise edge (None when the rank is full)
    gap: float | None          # s_rank / s_{rank+1} of the balanced delta
    balance_deviation: float   # largest relative error of a balanced row or column sum
    computed: int              # singular values computed
    singular_values: tuple[float, ...]  # of the balanced delta, the first max(2·rank + 8, 16)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def rounding_noise(child: torch.Tensor, grid: QuantGrid | None = None) -> RoundingNoise | None:
    """The rounding-noise variance map of ``child``'s storage format (same shape), or None for full precision.

    ``grid`` is the child's detected quantisation grid (:func:`detect_grid`; detected here when not
    given): a lattice wins over the float format the lattice values are stored in.  A vector (norm
    gains, biases) is never taken as quantised: its few bf16 values near 1 can look like a lattice,
    so only its float format counts.
    """
    x = child.detach().to(torch.float32)
    vector = x.dim() == 1
    if vector:
        x = x.reshape(1, -1)
    if x.dim() != 2 or x.numel() == 0 or not bool(torch.isfinite(x).all()):
        return None
    if grid is None and not vector:
        grid = detect_grid(x, max_rows=128)
    var = None
    name = None
    if not vector and grid is not None and grid.on_grid:
        steps = grid_steps(x, grid)  # rows × groups of the layout the groups run along
        if steps is not None:
            var = (steps * steps / 12.0).repeat_interleave(grid.group_size, dim=1)
            var = var.T.contiguous() if grid.axis == 1 else var
            name = f"{grid.format} rounding"
    if var is None:
        fg = float_grid(x)
        if fg == "fp32":
            return None
        h = half_ulp(x, fg)
        var = (2.0 * h) ** 2 / 12.0
        name = f"{fg} rounding"
    pos = var[var > 0]
    if pos.numel() == 0:
        return None
    # exact zeros (and subnormals) of the child: no meaningful spacing; keep them from dominating the balance
    var = var.clamp_min(float(pos.median()) * 1e-4)
    return RoundingNoise(name=name, variance=var.reshape(child.shape))


def _edge(m: int, n: int, t: float) -> float:
    """Largest singular value an m × n unit-variance noise matrix reaches, plus t Tracy–Widom units."""
    return math.sqrt(m) + math.sqrt(n) + 0.5 * (1.0 / math.sqrt(m) + 1.0 / math.sqrt(n)) ** (1.0 / 3.0) * t


def _count(s: torch.Tensor, m: int, n: int, t: float, limit: int) -> int:
    k = 0
    while k < min(limit, s.numel()) and float(s[k]) > _edge(m - k, n - k, t):
        k += 1
    return k


def known_noise_rank(delta: torch.Tensor, noise: RoundingNoise, *, t: float = EDGE_T,
                     exact_elems: int = 1 << 18, k_start: int = 32, k_max: int = 256, oversample: int = 8,
                     n_iter: int = 4, seed: int = 0) -> KnownNoiseRank:
    """Count the components of ``delta`` above the known rounding noise (see module docstring).

    Matrices up to ``exact_elems`` entries get their exact spectrum (float64 LAPACK); larger ones a randomized truncated SVD of growing size
    (``k_start`` ×4 up to ``k_max``), whose singular values never exceed the true ones, so the
    sketch can only under-count.
    """
    if delta.dim() != 2 or delta.shape != noise.variance.shape:
        raise ValueError(f"known_noise_rank: delta {tuple(delta.shape)} and noise map "
                         f"{tuple(noise.variance.shape)} must be equal 2-D shapes")
    m, n = delta.shape
    a, b, dev = balance(noise.variance)
    ra, rb = a.sqrt(), b.sqrt()
    limit = min(m, n) - 1
    if m * n <= exact_elems:
        X = delta.double() * ra[:, None] * rb[None, :]
        total = float((X * X).sum())
        s = torch.linalg.svdvals(X)
        k = _count(s, m, n, t, limit)
    else:
        X = delta.to(torch.float32) * ra.float()[:, None] * rb.float()[None, :]
        total = float((X.double() ** 2).sum())
        kk = min(k_start, limit + 1, k_max)
        while True:
            _, s, _ = randomized_svd(X, kk, oversample, n_iter, seed)
            s = s.double()
            k = _count(s, m, n, t, limit)
            if k < kk - 1 or kk >= min(k_max, limit + 1):
                break
            kk = min(4 * kk, k_max, limit + 1)
    del X
    tail = max(total - float((s[:k] ** 2).sum()), 0.0)
    tail_ratio = tail / max((m - k) * (n - k), 1)
    excess = (tail - (m - k) * (n - k)) / _edge(m - k, n - k, 0.0) ** 2 if k < min(m, n) else 0.0
    nxt = float(s[k]) if k < s.numel() else None
    edge_ratio = nxt / _edge(m - k, n - k, 0.0) if nxt is not None else None
    gap = (float(s[k - 1]) / nxt if nxt else math.inf) if k else None
    lead = float(s[0]) / _edge(m, n, 0.0) if s.numel() else 0.0
    log.debug("known-noise rank %dx%d (%s): %d, tail %.3f", m, n, noise.name, k, tail_ratio)
    return KnownNoiseRank(noise=noise.name, rank=k, tail_ratio=tail_ratio, excess_components=excess, lead=lead,
                          edge_ratio=edge_ratio,
                          gap=gap if gap is None or math.isfinite(gap) else None, balance_deviation=dev,
                          computed=int(s.numel()), singular_values=tuple(float(v) for v in s[: max(2 * k + 8, 16)]))
