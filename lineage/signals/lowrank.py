"""Low-rank structure of a module's delta ``child − base`` (merged-LoRA detection).

A merged LoRA of rank r makes the delta of every touched module exactly rank r;
casting the child to bf16 or quantising it afterwards adds a full-rank, noise-like
error on top.  This signal computes a randomized truncated SVD of the delta and
separates the two with a noise floor estimated *from the data*:

* After removing the top-r components, the residual's row energies ``ρ_i`` and
  column energies ``γ_j`` are known exactly from one pass over the delta
  (``ρ_i = ‖D_i‖² − ‖(U S)_i‖²``).  For a noise matrix with independent entries
  the largest singular value is at most about ``√max ρ_i + √max γ_j``
  (Bandeira–van Handel; for iid entries of variance σ² this is the
  Marchenko–Pastur edge ``σ(√m + √n)``, and it stays an upper bound when the
  variance differs by row, as int8-per-row rounding does, or by element, as
  bf16 rounding does).  The floor is that edge times ``margin``.
* The rank is the number of singular values above the floor, found by a fixed
  point (removing detected components lowers the residual and hence the floor).
* The *spectral gap* ``s_r / s_{r+1}`` tells a true low-rank update (large gap)
  from a dense update with a slowly decaying spectrum (gap near 1).

The computed rank grows adaptively (32, 128, 256 singular values) so an
unchanged or noise-like module costs one small sketch.  Matrices above
``stream_elems`` elements are processed in row blocks and the delta is never
materialised whole.

When the child's storage format has a known rounding (bf16/fp16, or a detected
quantisation lattice), a second reading counts components above that *known* noise
instead (:mod:`lineage.signals.roundnoise`: Sinkhorn-balanced delta, Marchenko–Pastur
edge plus Tracy–Widom margin, residual energy checked against the rounding's).  It is
exact where the estimated floor is not — ranks of half the width or more after bf16
or int8 — and replaces it whenever its residual check passes; ``rank_source`` says
which reading set the rank.

Status of one module: ``unchanged`` (delta exactly zero), ``rounding`` (every
entry within half a unit in the last place of the child's float format: a pure
re-encoding), ``noise-like`` (no component above the floor), ``low-rank`` (rank
1 ≤ r below the cap with a clear gap) and ``dense``.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field

import torch

from lineage.lazyroles import is_lazy, map_roles, recall
from lineage.signals.floatgrid import float_grid, half_ulp
from lineage.signals.memo import lowrank_key
from lineage.signals.quantgrid import QuantGrid
from lineage.signals.roundnoise import known_noise_rank, rounding_noise
from lineage_kernels.svd import randomized_svd, randomized_svd_blocks

log = logging.getLogger(__name__)

#: Ranks at which the left-over energy is reported.
LADDER: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class LowRankConfig:
    """Knobs of the low-rank analysis (defaults validated by tests/test_lowrank.py)."""

    k_max: int = 256          # largest rank examined
    k_start: int = 32         # first sketch size; grows ×4 while the spectrum stays above the floor
    oversample: int = 8
    n_iter: int = 2
    seed: int = 0
    margin: float = 1.05      # floor = margin × estimated noise edge
    gap_min: float = 1.2      # s_r / s_{r+1} needed to call the update low-rank
    trust_gap: float = 8.0    # a raw-spectrum gap this large is decisive (no whitening)
    override_gap: float = 3.0  # a gap this large in the first half outranks a sequential reading stopped early
    whiten: int = 1           # rounds of row/column noise whitening before the rank decision
    stream_elems: int = 1 << 25
    full_spectrum_elems: int = 1 << 18  # matrices up to this size get their whole spectrum at once
    block_rows: int = 1024
    known_noise: bool = True  # count the rank above the child format's known rounding noise when it has one
    #: residual / rounding energy accepted after the count: below, a wrong noise model; above, more than
    #: rounding under the counted part (noise, a dense update)
    known_noise_tail: tuple[float, float] = (0.7, 1.2)
    known_noise_excess: float = 2.0   # most residual energy beyond the rounding's, in edge² units (roundnoise)
    known_noise_lead: float = 1.1     # a low-rank count needs s_1 at least this far above the noise edge

    def __post_init__(self) -> None:
        if self.k_max < 1 or self.k_start < 1:
            raise ValueError("LowRankConfig: k_max and k_start must be >= 1")
        if self.margin <= 0 or self.gap_min < 1:
            raise ValueError("LowRankConfig: margin must be > 0 and gap_min >= 1")


@dataclass(frozen=True)
class LowRank:
    """Low-rank analysis of one module's delta (see module docstring)."""

    shape: tuple[int, int]
    status: str
    rank: int
    rank_capped: bool
    gap: float | None
    noise_floor: float
    noise_sigma: float
    rounding_sigma: float | None
    child_float_grid: str | None
    delta_norm: float
    base_norm: float | None
    rel_delta: float | None
    frac_changed: float
    max_abs_delta: float
    singular_values: tuple[float, ...]
    spikes: int
    energy_left: dict[int, float]
    energy_left_exact_upto: int
    #: the child format's rounding noise, when known, and the rank counted above it
    #: (:mod:`lineage.signals.roundnoise`); ``rank_source`` says which reading set ``rank``
    known_noise: dict[str, object] | None = None
    rank_source: str = "estimated floor"

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        d["energy_left"] = {str(k): v for k, v in self.energy_left.items()}
        if self.gap is not None and math.isinf(self.gap):
            d["gap"] = None
        return d


# ----------------------------------------------------------------------------- core


def _blocks(base: torch.Tensor | None, child: torch.Tensor | None, delta: torch.Tensor | None,
            rows: int, inv_a: torch.Tensor | None = None,
            inv_b: torch.Tensor | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """Row blocks of the delta, optionally whitened as ``diag(inv_a) · D · diag(inv_b)``."""
    m = (delta if delta is not None else child).shape[0]
    for r0 in range(0, m, rows):
        if delta is not None:
            d = delta[r0 : r0 + rows].to(torch.float32)
        else:
            d = child[r0 : r0 + rows].to(torch.float32) - base[r0 : r0 + rows].to(torch.float32)
        if inv_a is not None:
            d = d * inv_a[r0 : r0 + d.shape[0], None] * inv_b[None, :]
        yield r0, d


def _first_pass(base, child, delta, rows, grid):
    m, n = (delta if delta is not None else child).shape
    row_sq = torch.zeros(m, dtype=torch.float64)
    col_sq = torch.zeros(n, dtype=torch.float64)
    changed = 0
    max_abs = 0.0
    within_round = True
    round_var = 0.0
    base_sq = 0.0
    for r0, d in _blocks(base, child, delta, rows):
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
    return row_sq, col_sq, changed, max_abs, within_round, round_var, base_sq


def _energies(blocks, m: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    row_sq = torch.zeros(m, dtype=torch.float64)
    col_sq = torch.zeros(n, dtype=torch.float64)
    for r0, d in blocks:
        d2 = d * d
        row_sq[r0 : r0 + d.shape[0]] = d2.sum(1).double()
        col_sq += d2.sum(0).double()
    return row_sq, col_sq


def _residual_energies(S, U, V, row_sq, col_sq, r):
    s = S[:r].double()
    rres = (row_sq - ((U[:, :r].double() * s) ** 2).sum(1)).clamp_min(0)
    cres = (col_sq - ((V[:, :r].double() * s) ** 2).sum(1)).clamp_min(0)
    return rres, cres


def _rank_at_floor(S: torch.Tensor, U: torch.Tensor, V: torch.Tensor, row_sq: torch.Tensor,
                   col_sq: torch.Tensor, margin: float, gap_min: float = 1.2,
                   trust_gap: float = 8.0, override_gap: float = 3.0) -> tuple[int, float, float]:
    """Rank from the floors floor(j): the noise edge of the residual after j components.

    Returns (r, floor(r), per-element residual sigma).  Components below 1e-5·s_1
    are beyond float32 resolution and never counted.
    """
    m, n = row_sq.numel(), col_sq.numel()
    total = float(row_sq.sum())
    s = S.double()
    K = s.numel()
    US2 = torch.cumsum((U.double() * s) ** 2, dim=1)  # m × K: energy removed from each row
    VS2 = torch.cumsum((V.double() * s) ** 2, dim=1)
    rres = torch.cat([row_sq[:, None], (row_sq[:, None] - US2).clamp_min(0)], dim=1)
    cres = torch.cat([col_sq[:, None], (col_sq[:, None] - VS2).clamp_min(0)], dim=1)
    floors = margin * (rres.max(0).values.sqrt() + cres.max(0).values.sqrt())  # floor(j), j=0..K
    tiny = 1e-5 * float(s[0]) if K else 0.0
    floors = floors.clamp_min(tiny)
    # Only the first half of the spectrum is searched: near full rank the residual is
    # itself low-rank and its row/column energies no longer bound its spectrum.
    # Two readings, the larger wins:
    #  * sequential: component j+1 counts while it is above the floor of the
    #    residual left after the j before it (never counts noise, but a strong
    #    high-rank signal can hide behind floor(0));
    #  * gap: the last j (in the first half of the spectrum) above its own floor
    #    with a drop s_j / s_{j+1} ≥ gap_min right after it.  Noise components
    #    removed from the residual lower its floor, so this reading is only
    #    trusted at a gap.
    half = max(1, min(m, n) // 2)
    r_seq = 0
    while r_seq < min(K, max(1, 3 * min(m, n) // 4)) and float(s[r_seq]) > float(floors[r_seq]):
        r_seq += 1
    nxt = torch.cat([s[1:], s.new_zeros(1)])
    ok = (s > floors[1:]) & (s >= gap_min * nxt)
    above = ok[:half].nonzero()
    r_gap = int(above.max()) + 1 if above.numel() else 0
    r = r_seq
    if r_gap and float(s[r_gap - 1]) >= override_gap * float(nxt[r_gap - 1]) and (r_gap > r_seq or r_seq > half):
        # a clear gap (noise spectra have none: consecutive ratios stay near 1) overrides a
        # sequential reading stopped early by floors that the remaining signal still inflates,
        # or one that ran past half the width where the floors no longer bound the noise
        r = r_gap
    # Beyond the first half the row/column floors no longer bound a noise residual, but an
    # exact low-rank part still shows: a clear drop (>= override_gap) down to the noise, i.e.
    # s_r above and s_{r+1} at or below the edge σ̂(√m + √n) of noise at the residual's own
    # per-element level σ̂² = E_r / ((m − r)(n − r)).  A spectrum that falls to the noise
    # floor at r < min(m, n) is low-rank whatever r is.  A square noise spectrum ends in a few
    # tiny singular values with large ratios between them (the smallest singular value of a
    # square random matrix has a density near 0), so the residual must keep at least
    # max(4, min(m, n) / 16) dimensions for its level to count as a floor.
    lim = min(K - 1, min(m, n) - max(4, min(m, n) // 16))  # s[j] must have a computed successor
    if lim > half:
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
        # s_r clearly above s_{r+1}, which sits within the noise bulk (at or below the edge),
        # and s_r itself above the edge
        deep = (s[j] >= override_gap * s[j + 1]) & (s[j + 1] <= edge) & (s[j] > edge) & (s[j] > tiny)
        hit = j[deep]
        if hit.numel() and (int(hit.min()) + 1 > r or r > half):  # beyond half r_seq is no bound
            r = int(hit.min()) + 1
    resid = max(total - float((s[:r] ** 2).sum()), 0.0)
    return r, float(floors[r]), math.sqrt(resid / max((m - r) * (n - r), 1))


def _adaptive_svd(make_blocks, dense: torch.Tensor | None, m: int, n: int, cfg: LowRankConfig,
                  row_sq: torch.Tensor, col_sq: torch.Tensor):
    cap = min(cfg.k_max, m, n)
    k = min(cfg.k_start, cap)
    if m * n <= cfg.full_spectrum_elems:
        k = cap  # the exact SVD costs no more than a sketch: the rank is never limited by the sketch size
    while True:
        if dense is not None:
            U, S, V = randomized_svd(dense, k, cfg.oversample, cfg.n_iter, cfg.seed)
        else:
            U, S, V = randomized_svd_blocks(make_blocks, (m, n), k, cfg.oversample, cfg.n_iter,
                                            cfg.seed)
        r, floor, sigma = _rank_at_floor(S, U, V, row_sq, col_sq, cfg.margin, cfg.gap_min,
                                         cfg.trust_gap, cfg.override_gap)
        if r < k - 2 or k >= cap:
            return U, S, V, r, floor, sigma, k, cap
        k = min(4 * k, cap)


def _gap_at(s: torch.Tensor, r: int) -> float:
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


def lowrank(
    base: torch.Tensor | None = None,
    child: torch.Tensor | None = None,
    *,
    delta: torch.Tensor | None = None,
    config: LowRankConfig | None = None,
    quantised_only: bool = False,
    quant_grid: QuantGrid | None = None,
) -> LowRank:
    """Analyse ``child − base`` (or a given ``delta``) of one aligned 2-D module.

    Give either ``base`` and ``child`` (preferred: the child's float format then
    sets the rounding level and the "rounding only" test) or ``delta``.

    The rank is decided on the delta whitened by row and column noise scales
    (``diag(1/a) D diag(1/b)`` has the same rank as ``D``): the scales are the
    residual row and column energies after removing the detected components,
    refined ``cfg.whiten`` times.  This matters when the noise differs by row,
    e.g. int8-per-row rounding of rows with very different absmax.  The
    reported singular values and energy ladder are those of the raw delta.

    When the child's storage format has a known rounding (bf16/fp16, or a quantisation lattice:
    ``quant_grid`` is the child's detected grid, detected here when needed and not given), the rank is
    then counted above that known noise (:func:`lineage.signals.roundnoise.known_noise_rank`) and
    that count replaces the estimated-floor reading when the residual it leaves is the rounding's
    energy.  The estimated-floor reading is kept as is when it already shows a decisive gap
    (``cfg.trust_gap``) well below half the width, for matrices streamed in blocks, and, on matrices
    beyond the exact-spectrum size (``cfg.full_spectrum_elems``), unless it reads
    low-rank (see the comment at the call).

    ``quantised_only``: the caller has established that the child is the base quantised and
    nothing else (:func:`lineage.signals.quantgrid.rounds_exactly`); the delta's statistics are
    reported with status "noise-like" (quantisation noise, what the decomposition would find)
    and no decomposition runs.
    """
    cfg = config or LowRankConfig()
    if delta is None:
        if base is None or child is None:
            raise ValueError("lowrank: give base and child, or delta")
        if base.shape != child.shape:
            raise ValueError(f"lowrank: shapes differ: {tuple(base.shape)} vs {tuple(child.shape)}")
    mat = delta if delta is not None else child
    if mat.dim() == 1:
        if delta is not None:
            delta = delta.reshape(1, -1)
        else:
            base, child = base.reshape(1, -1), child.reshape(1, -1)
        mat = delta if delta is not None else child
    if mat.dim() != 2:
        raise ValueError(f"lowrank: expected a matrix, got shape {tuple(mat.shape)}")
    m, n = mat.shape
    if child is not None and child.dtype == base.dtype and torch.equal(base, child):
        # fast path: bitwise equal (the common case for modules a LoRA did not touch)
        bn = float(base.to(torch.float32).norm())
        return LowRank(shape=(m, n), status="unchanged", rank=0, rank_capped=False, gap=None,
                       noise_floor=0.0, noise_sigma=0.0, rounding_sigma=None, child_float_grid=None,
                       delta_norm=0.0, base_norm=bn, rel_delta=0.0, frac_changed=0.0,
                       max_abs_delta=0.0, singular_values=(), spikes=0,
                       energy_left={k: 0.0 for k in LADDER if k <= min(m, n)},
                       energy_left_exact_upto=min(cfg.k_max, m, n))
    grid = float_grid(child) if child is not None else None
    stream = m * n > cfg.stream_elems
    rows = cfg.block_rows if stream else max(m, 1)
    dense = None
    if not stream:  # the delta is formed once and shared by every step below
        dense = delta.to(torch.float32) if delta is not None else (
            child.to(torch.float32) - base.to(torch.float32))
    row_sq, col_sq, changed, max_abs, within_round, round_var, base_sq = _first_pass(
        base, child, dense if dense is not None else delta, rows, grid
    )
    total = float(row_sq.sum())
    base_norm = math.sqrt(base_sq) if base is not None else None
    rel = (math.sqrt(total) / base_norm) if base_norm else None
    rounding_sigma = math.sqrt(round_var / max(m * n, 1)) if grid is not None else None
    common = dict(
        shape=(m, n), delta_norm=math.sqrt(total), base_norm=base_norm, rel_delta=rel,
        frac_changed=changed / max(m * n, 1), max_abs_delta=max_abs,
        rounding_sigma=rounding_sigma, child_float_grid=grid,
    )
    if changed == 0 or total == 0.0:
        return LowRank(status="unchanged", rank=0, rank_capped=False, gap=None, noise_floor=0.0,
                       noise_sigma=0.0, singular_values=(), spikes=0,
                       energy_left={k: 0.0 for k in LADDER if k <= min(m, n)},
                       energy_left_exact_upto=min(cfg.k_max, m, n), **common)
    if quantised_only:
        return LowRank(status="noise-like", rank=0, rank_capped=False, gap=None, noise_floor=0.0,
                       noise_sigma=math.sqrt(total / (m * n)), singular_values=(), spikes=0,
                       energy_left={}, energy_left_exact_upto=0, **common)
    if within_round and grid is not None:
        return LowRank(status="rounding", rank=0, rank_capped=False, gap=None, noise_floor=0.0,
                       noise_sigma=math.sqrt(total / (m * n)), singular_values=(), spikes=0,
                       energy_left={}, energy_left_exact_upto=0, **common)
    # Pass 0: the raw delta (singular values and energy ladder as reported).
    U, S, V, r, floor, sigma, k, cap = _adaptive_svd(
        lambda: _blocks(base, child, delta, rows), dense, m, n, cfg, row_sq, col_sq)
    s_raw = [float(x) for x in S]
    ws, wsq_r, wsq_c = S, row_sq, col_sq
    inv_a = torch.ones(m, dtype=torch.float64)
    inv_b = torch.ones(n, dtype=torch.float64)
    gap_raw = (s_raw[r - 1] / s_raw[r] if r < len(s_raw) and s_raw[r] > 0 else math.inf) if r else 0.0
    # A clear gap in the raw spectrum is trusted as is; otherwise whiten, starting
    # from the whole delta (no component trusted yet).
    # A rank beyond half the width comes from the deep reading (a clear drop to the noise edge);
    # whitening's floors say nothing there, so that reading is kept as is.
    deep_raw = r > max(1, min(m, n) // 2) and gap_raw >= cfg.override_gap
    rounds = 0 if gap_raw >= cfg.trust_gap or deep_raw else cfg.whiten
    r_raw, raw = r, (U, S, V, r, floor, sigma, k, cap)
    if rounds:
        r = 0
    for _ in range(rounds):
        if r == 0 and wsq_r is row_sq:
            # nothing removed yet and no scaling: the residual energies are the delta's own
            rres, cres = row_sq, col_sq
        elif dense is not None:
            wd = dense * inv_a.float()[:, None] * inv_b.float()[None, :]
            R = wd - (U[:, :r] * ws[:r]) @ V[:, :r].T if r else wd
            R2 = R * R
            rres, cres = R2.sum(1).double(), R2.sum(0).double()
            del R, R2, wd
        else:
            rres, cres = _residual_energies(ws, U, V, wsq_r, wsq_c, r)
        inv_a = inv_a / _norm_scale(rres / max(n - r, 1))
        inv_b = inv_b / _norm_scale(cres / max(m - r, 1))
        fa, fb = inv_a.float(), inv_b.float()
        wblocks = lambda fa=fa, fb=fb: _blocks(base, child, delta, rows, fa, fb)
        wdense = dense * fa[:, None] * fb[None, :] if dense is not None else None
        wsq_r, wsq_c = _energies(wblocks() if wdense is None else [(0, wdense)], m, n)
        U, ws, V, r, floor, sigma, k, cap = _adaptive_svd(wblocks, wdense, m, n, cfg, wsq_r, wsq_c)
    if rounds and r_raw and gap_raw > _gap_at(ws, r):
        # the raw spectrum drops more clearly at its rank than the whitened one does at its own:
        # whitening (scales from a residual still holding the update) blurred it; keep the raw reading
        U, ws, V, r, floor, sigma, k, cap = raw
    # Single-entry outliers (one huge rounding error) make a component localised in
    # both u and v; a low-rank update does not.  They are not counted in the rank.
    if r:
        loc = ((U[:, :r] ** 2).amax(0) > 0.5) & ((V[:, :r] ** 2).amax(0) > 0.5)
        spikes = int(loc.sum())
        keep = (~loc).nonzero().flatten()
        ws = torch.cat([ws[keep], ws[r:]])
        r -= spikes
    else:
        spikes = 0
    capped = r > 0 and k >= cap and r >= k - 2
    w = [float(x) for x in ws]
    gap = (w[r - 1] / w[r] if r < len(w) and w[r] > 0 else math.inf) if r >= 1 else None
    cum = 0.0
    energy: dict[int, float] = {}
    for i, v in enumerate(s_raw, start=1):
        cum += v * v
        if i in LADDER:
            energy[i] = max(total - cum, 0.0) / total
    if r == 0:
        status = "noise-like"
    elif capped or (gap is not None and gap < cfg.gap_min) or (
            r > max(1, min(m, n) // 2) and not (gap is not None and gap >= cfg.override_gap and r < min(m, n))):
        # above half the width only the deep reading's clear drop (the spectrum falling to the
        # noise edge, see _rank_at_floor) is low-rank
        status = "dense"
    else:
        status = "low-rank"
    known = None
    source = "estimated floor"
    decisive = status == "low-rank" and gap is not None and gap >= cfg.trust_gap and r <= min(m, n) // 4
    # Matrices beyond the exact-spectrum size need sketches, whose cost grows with the count: there the
    # known-noise count only refines a low-rank reading without a decisive gap.  (Where the estimated
    # floor sees noise or a dense spectrum up to the sketch cap, the count would run into the bulk or
    # the cap and fail its check; ranks of a third of the width or more, where the estimated floor
    # misses, do not occur at these widths.)
    worth = m * n <= cfg.full_spectrum_elems or (status == "low-rank" and not capped)
    if cfg.known_noise and dense is not None and child is not None and not decisive and worth:
        noise = rounding_noise(child, quant_grid)
        if noise is not None:
            kn = known_noise_rank(dense, noise, exact_elems=cfg.full_spectrum_elems, k_max=cfg.k_max,
                                  oversample=cfg.oversample, seed=cfg.seed)
            known = {**kn.to_dict(), **noise.to_dict()}
            room = min(m, n) - max(4, min(m, n) // 16)  # the count must leave a noise subspace to test against
            lo, hi = cfg.known_noise_tail
            clear = kn.rank == 0 or kn.lead >= cfg.known_noise_lead
            if lo <= kn.tail_ratio <= hi and kn.excess_components <= cfg.known_noise_excess and kn.rank <= room \
                    and clear:
                source = "known rounding noise"
                status, r, spikes, capped = ("low-rank" if kn.rank else "noise-like"), kn.rank, 0, False
                gap = kn.gap if kn.rank else None
                mean_var = float(noise.variance.double().mean())
                floor = math.sqrt(mean_var) * (math.sqrt(m) + math.sqrt(n))
                if r:
                    sigma = math.sqrt(kn.tail_ratio * mean_var)
    log.debug("lowrank %sx%s: status=%s rank=%d gap=%s", m, n, status, r, gap)
    return LowRank(status=status, rank=r, rank_capped=bool(capped), gap=gap,
                   noise_floor=floor, noise_sigma=math.sqrt(total / (m * n)) if r == 0 else sigma,
                   singular_values=tuple(s_raw[: max(2 * r + 8, 16)]), spikes=spikes,
                   energy_left=energy, energy_left_exact_upto=len(s_raw), known_noise=known,
                   rank_source=source, **common)


# ----------------------------------------------------------------------------- summary


@dataclass(frozen=True)
class LowRankSummary:
    """Across modules: ``kind`` in unchanged / rounding / low-rank / dense / noise-like."""

    kind: str
    rank: int | None
    modules: tuple[str, ...]
    ranks: dict[str, int] = field(default_factory=dict)
    statuses: dict[str, str] = field(default_factory=dict)
    description: str = ""
    #: changed modules no wider than the rank (a rank-r update of them is full rank)
    full_rank_modules: tuple[str, ...] = ()
    #: how the low-rank modules' ranks were read: module count per ``LowRank.rank_source``
    rank_sources: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


_LAYER = re.compile(r"^L(\d+)\.(.+)$")


def compress_modules(names: list[str] | tuple[str, ...]) -> str:
    """``L0.attn.q.weight, L1.attn.q.weight`` → ``attn.q in layers 0-1``."""
    by_suffix: dict[str, list[int]] = {}
    others: list[str] = []
    for nm in names:
        mt = _LAYER.match(nm)
        if mt:
            suffix = mt.group(2).removesuffix(".weight")
            by_suffix.setdefault(suffix, []).append(int(mt.group(1)))
        else:
            others.append(nm)
    parts = []
    for suffix, layers in sorted(by_suffix.items()):
        layers = sorted(set(layers))
        runs, start, prev = [], layers[0], layers[0]
        for x in layers[1:] + [None]:
            if x is not None and x == prev + 1:
                prev = x
                continue
            runs.append(f"{start}" if start == prev else f"{start}-{prev}")
            if x is not None:
                start = prev = x
        parts.append((suffix, ",".join(runs)))
    # modules sharing one layer set are written once: "attn.o, attn.q in layers 0-1"
    grouped: dict[str, list[str]] = {}
    for suffix, runs_text in parts:
        grouped.setdefault(runs_text, []).append(suffix)
    text = [f"{', '.join(sfx)} in layer{'s' if ('-' in r or ',' in r) else ''} {r}" for r, sfx in grouped.items()]
    return "; ".join(text + sorted(others))


def summarise(results: Mapping[str, LowRank], *, noise_is_untouched: bool = False) -> LowRankSummary:
    """Combine per-module results into one statement.

    ``noise_is_untouched``: count noise-like modules as untouched (set it when the
    child is known to be quantised, so untouched modules carry only rounding noise).
    """
    statuses = {k: v.status for k, v in results.items()}
    ranks = {k: v.rank for k, v in results.items() if v.status == "low-rank"}
    dense = tuple(sorted(k for k, s in statuses.items() if s == "dense"))
    lowr = tuple(sorted(ranks))
    noise = tuple(sorted(k for k, s in statuses.items() if s == "noise-like"))
    if not results or all(s == "unchanged" for s in statuses.values()):
        return LowRankSummary("unchanged", None, (), {}, statuses, "no module changed")
    if all(s in ("unchanged", "rounding") for s in statuses.values()):
        return LowRankSummary("rounding", None, (), {}, statuses,
                              "every change is float re-encoding rounding")
    # a dense module no wider than the largest low-rank rank may be a LoRA of that rank at full rank
    r_top = max(ranks.values()) if ranks else 0
    dense_wide = tuple(k for k in dense if min(results[k].shape) > r_top)
    if dense and len(dense_wide) >= len(lowr):
        return LowRankSummary("dense", None, dense, ranks, statuses,
                              f"dense update on {len(dense)} modules")
    if lowr:
        # A merged LoRA has one rank r in every touched module (or the full rank of a
        # module narrower than r) and leaves other modules alone; a trained dense
        # update of a small model can look low-rank module by module, but with
        # ranks that differ and every module changed.
        counts = Counter(ranks.values())
        r_mode = max(counts, key=lambda x: (counts[x], x))
        consistent = sum(1 for k in lowr if ranks[k] == r_mode or ranks[k] == min(results[k].shape)
                         ) >= 0.75 * len(lowr)
        untouched = any(s in ("unchanged", "rounding") for s in statuses.values()) or (
            noise_is_untouched and bool(noise))
        gaps = sorted(results[k].gap for k in lowr if results[k].gap is not None)
        clear = bool(gaps) and gaps[len(gaps) // 2] >= 3.0
        if not untouched and not (consistent and clear):
            return LowRankSummary("dense", None, lowr, ranks, statuses,
                                  f"structured update of every module ({len(lowr)} modules, ranks "
                                  f"{min(ranks.values())}-{max(ranks.values())})")
        r = r_mode if consistent else max(ranks.values())
        # A module no wider than the rank takes the update at full rank: it is changed, but nothing
        # tells that change from a dense one, so it is listed apart (when wider modules carry the rank).
        narrow = tuple(sorted(k for k in lowr + dense if min(results[k].shape) <= r))
        if narrow and len(set(lowr) - set(narrow)):
            lowr = tuple(k for k in lowr if k not in narrow)
        else:
            narrow = ()
        desc = f"low-rank update, rank {r} on {compress_modules(lowr)}"
        if narrow:
            desc += f"; at full rank (no wider than the rank) on {compress_modules(narrow)}"
        sources = dict(Counter(results[k].rank_source for k in lowr))
        return LowRankSummary("low-rank", r, lowr, ranks, statuses, desc, full_rank_modules=narrow,
                              rank_sources=sources)
    return LowRankSummary("noise-like", None, noise, {}, statuses,
                          f"noise-like change on {len(noise)} modules (no low-rank structure)")


def lowrank_modules(pairs: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                    config: LowRankConfig | None = None, *,
                    workers: int | None = None) -> tuple[dict[str, LowRank], LowRankSummary]:
    """Run :func:`lowrank` on every 2-D ``role -> (base, child)`` pair and summarise.

    Modules are visited one at a time (``pairs`` may read on access, see
    :mod:`lineage.lazyroles`), on ``workers`` single-threaded threads (default: one per
    core for a lazy mapping, inline otherwise); results do not depend on the worker count.
    """
    cfg = config or LowRankConfig()
    px, py = getattr(pairs, "x", None), getattr(pairs, "y", None)

    def one(role: str) -> LowRank | None:
        if px is not None:  # a PairView: a pass that already ran this module may have left the result
            hit = recall(px, lowrank_key(py, role, cfg))
            if hit is not None:
                return hit if isinstance(hit, LowRank) else None
        b, c = pairs[role]
        if b.dim() == 2 and b.shape == c.shape:
            return lowrank(b, c, config=cfg)
        return None

    if workers is None and not is_lazy(pairs):
        workers = 1
    out = {r: x for r, x in map_roles(one, list(pairs), workers=workers) if x is not None}
    return out, summarise(out)
