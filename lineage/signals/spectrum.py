"""The spectrum of one module's delta, read against a noise floor estimated from the data.

The machinery behind :func:`lineage.signals.lowrank.lowrank` (its module docstring has the
method): the delta in row blocks (:class:`DeltaSource`), one pass of exact row and column
energies (:func:`measure`), the rank at the estimated floor (:func:`rank_at_floor`), the
adaptive truncated SVD that grows the sketch until the rank fits (:func:`adaptive_svd`, a typed
:class:`SpectrumReading`), and noise whitening by row and column scales (:func:`whitened`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Protocol

import torch

from lineage.signals.floatgrid import half_ulp
from lineage_kernels.svd import randomized_svd, randomized_svd_blocks

Blocks = Iterable[tuple[int, torch.Tensor]]


class SpectrumSettings(Protocol):
    """What the spectrum reading needs of :class:`lineage.signals.lowrank.LowRankConfig` (field meanings there)."""

    k_max: int
    k_start: int
    oversample: int
    n_iter: int
    seed: int
    margin: float
    gap_min: float
    override_gap: float
    full_spectrum_elems: int


@dataclass(frozen=True, eq=False)
class DeltaSource:
    """The delta ``child − base`` of one module, or a given ``delta``; ``dense`` when formed whole.

    Matrices above the streaming size are never formed whole: :meth:`blocks` yields row blocks
    of ``rows`` rows.
    """

    base: torch.Tensor | None
    child: torch.Tensor | None
    delta: torch.Tensor | None
    dense: torch.Tensor | None
    rows: int

    @property
    def shape(self) -> tuple[int, int]:
        m, n = (self.delta if self.delta is not None else self.child).shape
        return int(m), int(n)

    def blocks(self, inv_a: torch.Tensor | None = None,
               inv_b: torch.Tensor | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """Row blocks of the delta, optionally whitened as ``diag(inv_a) · D · diag(inv_b)``."""
        return _blocks(self.base, self.child, self.delta, self.rows, inv_a, inv_b)


def _blocks(base: torch.Tensor | None, child: torch.Tensor | None, delta: torch.Tensor | None,
            rows: int, inv_a: torch.Tensor | None = None,
            inv_b: torch.Tensor | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    m = (delta if delta is not None else child).shape[0]
    for r0 in range(0, m, rows):
        if delta is not None:
            d = delta[r0 : r0 + rows].to(torch.float32)
        else:
            d = child[r0 : r0 + rows].to(torch.float32) - base[r0 : r0 + rows].to(torch.float32)
        if inv_a is not None:
            d = d * inv_a[r0 : r0 + d.shape[0], None] * inv_b[None, :]
        yield r0, d


@dataclass(frozen=True, eq=False)
class DeltaPass:
    """One pass over the delta: exact row/column energies and the statistics the status needs."""

    row_sq: torch.Tensor
    col_sq: torch.Tensor
    changed: int
    max_abs: float
    #: every entry within half a unit in the last place of the child's float format
    within_round: bool
    #: sum of the child format's rounding variance (from a row sample), 0 without a float grid
    round_var: float
    base_sq: float

    @property
    def total(self) -> float:
        return float(self.row_sq.sum())


def measure(src: DeltaSource, grid: str | None) -> DeltaPass:
    """Row and column energies of the delta, its changed count, largest entry, and whether it is
    pure rounding of the child's float format ``grid`` (checked on a row sample first)."""
    m, n = src.shape
    base, child = src.base, src.child
    row_sq = torch.zeros(m, dtype=torch.float64)
    col_sq = torch.zeros(n, dtype=torch.float64)
    changed, max_abs, within_round, round_var, base_sq = 0, 0.0, True, 0.0, 0.0
    data = src.dense if src.dense is not None else src.delta
    for r0, d in _blocks(base, child, data, src.rows):
        d2 = d * d
        row_sq[r0 : r0 + d.shape[0]] = d2.sum(1).double()
        col_sq += d2.sum(0).double()
        changed += int(torch.count_nonzero(d))
        if d.numel():
            max_abs = max(max_abs, float(d.abs().max()))
        if base is not None:
            bb = base[r0 : r0 + d.shape[0]].to(torch.float32)
            base_sq += float((bb * bb).sum(dtype=torch.float64))
        if grid is not None:
            c = child[r0 : r0 + d.shape[0]]
            step = max(1, d.shape[0] // 64)  # rounding level from a row sample (cheap)
            hs = half_ulp(c[::step], grid)
            round_var += float((hs * hs).sum(dtype=torch.float64)) * step * 4.0 / 12.0
            if within_round:
                # a quick sample first: most changed modules fail it at once
                if not bool((d[::step].abs() <= hs * (1 + 1e-6)).all()):
                    within_round = False
                elif not bool((d.abs() <= half_ulp(c, grid) * (1 + 1e-6)).all()):
                    within_round = False
    return DeltaPass(row_sq, col_sq, changed, max_abs, within_round, round_var, base_sq)


def energies(blocks: Blocks, m: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column energies (float64) of a matrix given in row blocks."""
    row_sq = torch.zeros(m, dtype=torch.float64)
    col_sq = torch.zeros(n, dtype=torch.float64)
    for r0, d in blocks:
        d2 = d * d
        row_sq[r0 : r0 + d.shape[0]] = d2.sum(1).double()
        col_sq += d2.sum(0).double()
    return row_sq, col_sq


def residual_energies(S: torch.Tensor, U: torch.Tensor, V: torch.Tensor, row_sq: torch.Tensor, col_sq: torch.Tensor,
                      r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column energies left after removing the top ``r`` components."""
    s = S[:r].double()
    rres = (row_sq - ((U[:, :r].double() * s) ** 2).sum(1)).clamp_min(0)
    cres = (col_sq - ((V[:, :r].double() * s) ** 2).sum(1)).clamp_min(0)
    return rres, cres


def _floors(s: torch.Tensor, U: torch.Tensor, V: torch.Tensor, row_sq: torch.Tensor, col_sq: torch.Tensor,
            margin: float) -> torch.Tensor:
    """floor(j), j = 0..K: the noise edge of the residual after j components (at least 1e-5·s_1)."""
    US2 = torch.cumsum((U.double() * s) ** 2, dim=1)  # m × K: energy removed from each row
    VS2 = torch.cumsum((V.double() * s) ** 2, dim=1)
    rres = torch.cat([row_sq[:, None], (row_sq[:, None] - US2).clamp_min(0)], dim=1)
    cres = torch.cat([col_sq[:, None], (col_sq[:, None] - VS2).clamp_min(0)], dim=1)
    floors = margin * (rres.max(0).values.sqrt() + cres.max(0).values.sqrt())
    tiny = 1e-5 * float(s[0]) if s.numel() else 0.0
    return floors.clamp_min(tiny)


def _first_half_rank(s: torch.Tensor, floors: torch.Tensor, m: int, n: int, gap_min: float,
                     override_gap: float) -> int:
    """The rank read in the first half of the spectrum.

    Only the first half is searched: near full rank the residual is itself low-rank and its
    row/column energies no longer bound its spectrum.  Two readings, the larger wins:

    * sequential: component j+1 counts while it is above the floor of the residual left after
      the j before it (never counts noise, but a strong high-rank signal can hide behind floor(0));
    * gap: the last j (in the first half of the spectrum) above its own floor with a drop
      s_j / s_{j+1} ≥ gap_min right after it.  Noise components removed from the residual lower
      its floor, so this reading is only trusted at a gap.
    """
    K = s.numel()
    half = max(1, min(m, n) // 2)
    r_seq = 0
    while r_seq < min(K, max(1, 3 * min(m, n) // 4)) and float(s[r_seq]) > float(floors[r_seq]):
        r_seq += 1
    nxt = torch.cat([s[1:], s.new_zeros(1)])
    ok = (s > floors[1:]) & (s >= gap_min * nxt)
    above = ok[:half].nonzero()
    r_gap = int(above.max()) + 1 if above.numel() else 0
    if r_gap and float(s[r_gap - 1]) >= override_gap * float(nxt[r_gap - 1]) and (r_gap > r_seq or r_seq > half):
        # a clear gap (noise spectra have none: consecutive ratios stay near 1) overrides a
        # sequential reading stopped early by floors that the remaining signal still inflates,
        # or one that ran past half the width where the floors no longer bound the noise
        return r_gap
    return r_seq


def _deep_rank(s: torch.Tensor, total: float, m: int, n: int, margin: float, override_gap: float, r: int) -> int:
    """The rank beyond the first half of the spectrum, where only a clear drop to the noise shows.

    Beyond the first half the row/column floors no longer bound a noise residual, but an exact
    low-rank part still shows: a clear drop (>= override_gap) down to the noise, i.e. s_r above
    and s_{r+1} at or below the edge σ̂(√m + √n) of noise at the residual's own per-element level
    σ̂² = E_r / ((m − r)(n − r)).  A spectrum that falls to the noise floor at r < min(m, n) is
    low-rank whatever r is.  A square noise spectrum ends in a few tiny singular values with large
    ratios between them (the smallest singular value of a square random matrix has a density
    near 0), so the residual must keep at least max(4, min(m, n) / 16) dimensions for its level to
    count as a floor.  Returns ``r`` (the first-half reading) when no such drop is found.
    """
    K = s.numel()
    half = max(1, min(m, n) // 2)
    tiny = 1e-5 * float(s[0]) if K else 0.0
    lim = min(K - 1, min(m, n) - max(4, min(m, n) // 16))  # s[j] must have a computed successor
    if lim <= half:
        return r
    sq = s * s
    if K >= min(m, n):  # whole spectrum: residual energies from tail sums (no cancellation)
        tail = torch.flip(torch.cumsum(torch.flip(sq, [0]), 0), [0])  # tail[j] = Σ_{l>=j} s_l²
        e_after = torch.cat([tail[1:], sq.new_zeros(1)])
    else:
        e_after = (total - torch.cumsum(sq, 0)).clamp_min(0)
    j = torch.arange(half, lim)
    rr = (j + 1).double()
    sig = (e_after[j] / ((m - rr) * (n - rr)).clamp_min(1)).sqrt()
    edge = margin * sig * (math.sqrt(m) + math.sqrt(n))
    # s_r clearly above s_{r+1}, which sits within the noise bulk (at or below the edge), and s_r above the edge
    deep = (s[j] >= override_gap * s[j + 1]) & (s[j + 1] <= edge) & (s[j] > edge) & (s[j] > tiny)
    hit = j[deep]
    if hit.numel() and (int(hit.min()) + 1 > r or r > half):  # beyond half r_seq is no bound
        return int(hit.min()) + 1
    return r


def rank_at_floor(S: torch.Tensor, U: torch.Tensor, V: torch.Tensor, row_sq: torch.Tensor,
                  col_sq: torch.Tensor, margin: float, gap_min: float = 1.2,
                  override_gap: float = 3.0) -> tuple[int, float, float]:
    """Rank from the floors floor(j): the noise edge of the residual after j components.

    Returns (r, floor(r), per-element residual sigma).  Components below 1e-5·s_1
    are beyond float32 resolution and never counted.
    """
    m, n = row_sq.numel(), col_sq.numel()
    total = float(row_sq.sum())
    s = S.double()
    floors = _floors(s, U, V, row_sq, col_sq, margin)
    r = _first_half_rank(s, floors, m, n, gap_min, override_gap)
    r = _deep_rank(s, total, m, n, margin, override_gap, r)
    resid = max(total - float((s[:r] ** 2).sum()), 0.0)
    return r, float(floors[r]), math.sqrt(resid / max((m - r) * (n - r), 1))


@dataclass(frozen=True, eq=False)
class SpectrumReading:
    """A truncated SVD ``U diag(S) Vᵀ`` of (a whitening of) the delta and the rank read from it.

    ``floor`` is the estimated noise edge at ``rank``, ``sigma`` the residual's per-element
    level, ``k`` the number of singular values computed and ``cap`` the most that could be.
    """

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor
    rank: int
    floor: float
    sigma: float
    k: int
    cap: int

    @property
    def gap(self) -> float:
        """s_r / s_{r+1} at the reading's rank (see :func:`gap_at`)."""
        return gap_at(self.S, self.rank)


def adaptive_svd(make_blocks: Callable[[], Blocks], dense: torch.Tensor | None, m: int, n: int, cfg: SpectrumSettings,
                 row_sq: torch.Tensor, col_sq: torch.Tensor) -> SpectrumReading:
    """Truncated SVD with the sketch grown (×4 from ``cfg.k_start``) until the rank read fits in it."""
    cap = min(cfg.k_max, m, n)
    k = min(cfg.k_start, cap)
    if m * n <= cfg.full_spectrum_elems:
        k = cap  # the exact SVD costs no more than a sketch: the rank is never limited by the sketch size
    while True:
        if dense is not None:
            U, S, V = randomized_svd(dense, k, cfg.oversample, cfg.n_iter, cfg.seed)
        else:
            U, S, V = randomized_svd_blocks(make_blocks, (m, n), k, cfg.oversample, cfg.n_iter, cfg.seed)
        r, floor, sigma = rank_at_floor(S, U, V, row_sq, col_sq, cfg.margin, cfg.gap_min, cfg.override_gap)
        if r < k - 2 or k >= cap:
            return SpectrumReading(U, S, V, r, floor, sigma, k, cap)
        k = min(4 * k, cap)


def gap_at(s: torch.Tensor, r: int) -> float:
    """s_r / s_{r+1} (1-based r; inf past the computed values, 0 for r = 0)."""
    if r <= 0:
        return 0.0
    if r >= s.numel() or float(s[r]) <= 0:
        return math.inf
    return float(s[r - 1]) / float(s[r])


def _norm_scale(x: torch.Tensor) -> torch.Tensor:
    """Positive scales with geometric mean 1; zeros lifted to a small floor."""
    x = x.double().clamp_min(0).sqrt()
    pos = x[x > 0]
    if pos.numel() == 0:
        return torch.ones_like(x)
    x = x.clamp_min(float(pos.max()) * 1e-6)
    x = x / torch.exp(torch.log(x).mean())
    return x.clamp(1e-2, 1e2)


def whitened(raw: SpectrumReading, src: DeltaSource, cfg: SpectrumSettings, row_sq: torch.Tensor,
             col_sq: torch.Tensor, rounds: int) -> SpectrumReading:
    """The reading of ``diag(1/a) D diag(1/b)`` (same rank as D) after ``rounds`` of whitening.

    The scales are the residual row and column energies after removing the detected components,
    starting from the whole delta (no component trusted yet).  This matters when the noise differs
    by row, e.g. int8-per-row rounding of rows with very different absmax.
    """
    m, n = src.shape
    dense = src.dense
    cur = replace(raw, rank=0)
    wsq_r, wsq_c = row_sq, col_sq
    inv_a = torch.ones(m, dtype=torch.float64)
    inv_b = torch.ones(n, dtype=torch.float64)
    for i in range(rounds):
        r = cur.rank
        if i == 0:
            # nothing removed yet and no scaling: the residual energies are the delta's own
            rres, cres = row_sq, col_sq
        elif dense is not None:
            wd = dense * inv_a.float()[:, None] * inv_b.float()[None, :]
            R = wd - (cur.U[:, :r] * cur.S[:r]) @ cur.V[:, :r].T if r else wd
            R2 = R * R
            rres, cres = R2.sum(1).double(), R2.sum(0).double()
            del R, R2, wd
        else:
            rres, cres = residual_energies(cur.S, cur.U, cur.V, wsq_r, wsq_c, r)
        inv_a = inv_a / _norm_scale(rres / max(n - r, 1))
        inv_b = inv_b / _norm_scale(cres / max(m - r, 1))
        fa, fb = inv_a.float(), inv_b.float()

        def wblocks(fa: torch.Tensor = fa, fb: torch.Tensor = fb) -> Blocks:
            return src.blocks(fa, fb)

        wdense = dense * fa[:, None] * fb[None, :] if dense is not None else None
        wsq_r, wsq_c = energies(wblocks() if wdense is None else [(0, wdense)], m, n)
        cur = adaptive_svd(wblocks, wdense, m, n, cfg, wsq_r, wsq_c)
    return cur
