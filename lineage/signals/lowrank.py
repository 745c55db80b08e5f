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

import dataclasses
import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace

import torch

from lineage.lazyroles import is_lazy, map_roles, recall
from lineage.signals.floatgrid import float_grid
from lineage.signals.lowrank_summary import LowRankSummary, summarise
from lineage.signals.memo import lowrank_key
from lineage.signals.quantgrid import QuantGrid
from lineage.signals.roundnoise import known_noise_rank, rounding_noise
from lineage.signals.spectrum import DeltaPass, DeltaSource, SpectrumReading, adaptive_svd, measure, whitened

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


# ----------------------------------------------------------------------------- one module


@dataclass(frozen=True)
class _DeltaFacts:
    """The fields of :class:`LowRank` that one pass over the delta settles (shared by every status)."""

    shape: tuple[int, int]
    delta_norm: float
    base_norm: float | None
    rel_delta: float | None
    frac_changed: float
    max_abs_delta: float
    rounding_sigma: float | None
    child_float_grid: str | None

    @classmethod
    def of(cls, dp: DeltaPass, shape: tuple[int, int], base_given: bool, grid: str | None) -> _DeltaFacts:
        m, n = shape
        total = dp.total
        base_norm = math.sqrt(dp.base_sq) if base_given else None
        return cls(shape=shape, delta_norm=math.sqrt(total), base_norm=base_norm,
                   rel_delta=(math.sqrt(total) / base_norm) if base_norm else None,
                   frac_changed=dp.changed / max(m * n, 1), max_abs_delta=dp.max_abs,
                   rounding_sigma=math.sqrt(dp.round_var / max(m * n, 1)) if grid is not None else None,
                   child_float_grid=grid)

    def result(self, **fields: object) -> LowRank:
        return LowRank(**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, **fields)


@dataclass(frozen=True)
class _RankReading:
    """The rank decision on one module: from the estimated floor, possibly replaced by the known-noise count."""

    status: str
    rank: int
    spikes: int
    capped: bool
    gap: float | None
    floor: float
    sigma: float
    source: str = "estimated floor"
    known: dict[str, object] | None = None


def _operands(base: torch.Tensor | None, child: torch.Tensor | None, delta: torch.Tensor | None
              ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Check the inputs and make a 1-D module a one-row matrix."""
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
    return base, child, delta


def _unchanged(m: int, n: int, cfg: LowRankConfig) -> dict[str, object]:
    """The spectral fields of an unchanged module."""
    return dict(status="unchanged", rank=0, rank_capped=False, gap=None, noise_floor=0.0, noise_sigma=0.0,
                singular_values=(), spikes=0, energy_left={k: 0.0 for k in LADDER if k <= min(m, n)},
                energy_left_exact_upto=min(cfg.k_max, m, n))


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
    base, child, delta = _operands(base, child, delta)
    m, n = (delta if delta is not None else child).shape
    if child is not None and child.dtype == base.dtype and torch.equal(base, child):
        # fast path: bitwise equal (the common case for modules a LoRA did not touch)
        bn = float(base.to(torch.float32).norm())
        return LowRank(shape=(m, n), rounding_sigma=None, child_float_grid=None, delta_norm=0.0, base_norm=bn,
                       rel_delta=0.0, frac_changed=0.0, max_abs_delta=0.0, **_unchanged(m, n, cfg))
    grid = float_grid(child) if child is not None else None
    stream = m * n > cfg.stream_elems
    dense = None
    if not stream:  # the delta is formed once and shared by every step below
        dense = delta.to(torch.float32) if delta is not None else (child.to(torch.float32) - base.to(torch.float32))
    src = DeltaSource(base, child, delta, dense, cfg.block_rows if stream else max(m, 1))
    dp = measure(src, grid)
    facts = _DeltaFacts.of(dp, (m, n), base is not None, grid)
    total = dp.total
    if dp.changed == 0 or total == 0.0:
        return facts.result(**_unchanged(m, n, cfg))
    if quantised_only or (dp.within_round and grid is not None):
        return facts.result(status="noise-like" if quantised_only else "rounding", rank=0, rank_capped=False,
                            gap=None, noise_floor=0.0, noise_sigma=math.sqrt(total / (m * n)), singular_values=(),
                            spikes=0, energy_left={}, energy_left_exact_upto=0)
    reading, s_raw = _read_spectrum(src, cfg, dp)
    dec = _decide(reading, m, n, cfg)
    dec = _known_noise_reading(dec, src, cfg, quant_grid)
    log.debug("lowrank %sx%s: status=%s rank=%d gap=%s", m, n, dec.status, dec.rank, dec.gap)
    return facts.result(status=dec.status, rank=dec.rank, rank_capped=bool(dec.capped), gap=dec.gap,
                        noise_floor=dec.floor, noise_sigma=math.sqrt(total / (m * n)) if dec.rank == 0 else dec.sigma,
                        singular_values=tuple(s_raw[: max(2 * dec.rank + 8, 16)]), spikes=dec.spikes,
                        energy_left=_energy_ladder(s_raw, total), energy_left_exact_upto=len(s_raw),
                        known_noise=dec.known, rank_source=dec.source)


def _read_spectrum(src: DeltaSource, cfg: LowRankConfig, dp: DeltaPass) -> tuple[SpectrumReading, list[float]]:
    """The reading that sets the rank, and the raw delta's singular values (reported as they are).

    Pass 0 reads the raw delta.  A clear gap in the raw spectrum is trusted as is; otherwise the
    delta is whitened (:func:`lineage.signals.spectrum.whitened`).  A rank beyond half the width
    comes from the deep reading (a clear drop to the noise edge); whitening's floors say nothing
    there, so that reading is kept as is.
    """
    m, n = src.shape
    raw = adaptive_svd(src.blocks, src.dense, m, n, cfg, dp.row_sq, dp.col_sq)
    s_raw = [float(x) for x in raw.S]
    gap_raw = raw.gap
    deep_raw = raw.rank > max(1, min(m, n) // 2) and gap_raw >= cfg.override_gap
    rounds = 0 if gap_raw >= cfg.trust_gap or deep_raw else cfg.whiten
    if not rounds:
        return raw, s_raw
    white = whitened(raw, src, cfg, dp.row_sq, dp.col_sq, rounds)
    if raw.rank and gap_raw > white.gap:
        # the raw spectrum drops more clearly at its rank than the whitened one does at its own:
        # whitening (scales from a residual still holding the update) blurred it; keep the raw reading
        return raw, s_raw
    return white, s_raw


def _decide(reading: SpectrumReading, m: int, n: int, cfg: LowRankConfig) -> _RankReading:
    """Status and rank from a reading, single-entry spikes left out.

    Single-entry outliers (one huge rounding error) make a component localised in both u and v;
    a low-rank update does not.  They are not counted in the rank.
    """
    U, ws, V, r = reading.U, reading.S, reading.V, reading.rank
    spikes = 0
    if r:
        loc = ((U[:, :r] ** 2).amax(0) > 0.5) & ((V[:, :r] ** 2).amax(0) > 0.5)
        spikes = int(loc.sum())
        keep = (~loc).nonzero().flatten()
        ws = torch.cat([ws[keep], ws[r:]])
        r -= spikes
    capped = r > 0 and reading.k >= reading.cap and r >= reading.k - 2
    w = [float(x) for x in ws]
    gap = (w[r - 1] / w[r] if r < len(w) and w[r] > 0 else math.inf) if r >= 1 else None
    if r == 0:
        status = "noise-like"
    elif capped or (gap is not None and gap < cfg.gap_min) or (
            r > max(1, min(m, n) // 2) and not (gap is not None and gap >= cfg.override_gap and r < min(m, n))):
        # above half the width only the deep reading's clear drop (the spectrum falling to the
        # noise edge, see lineage.signals.spectrum) is low-rank
        status = "dense"
    else:
        status = "low-rank"
    return _RankReading(status, r, spikes, capped, gap, reading.floor, reading.sigma)


def _energy_ladder(s_raw: list[float], total: float) -> dict[int, float]:
    """Fraction of the delta's energy left after the top k components, k on :data:`LADDER`."""
    cum = 0.0
    energy: dict[int, float] = {}
    for i, v in enumerate(s_raw, start=1):
        cum += v * v
        if i in LADDER:
            energy[i] = max(total - cum, 0.0) / total
    return energy


def _known_noise_reading(dec: _RankReading, src: DeltaSource, cfg: LowRankConfig,
                         quant_grid: QuantGrid | None) -> _RankReading:
    """The rank counted above the child format's known rounding noise, when it applies and its check passes.

    Matrices beyond the exact-spectrum size need sketches, whose cost grows with the count: there the
    known-noise count only refines a low-rank reading without a decisive gap.  (Where the estimated
    floor sees noise or a dense spectrum up to the sketch cap, the count would run into the bulk or
    the cap and fail its check; ranks of a third of the width or more, where the estimated floor
    misses, do not occur at these widths.)
    """
    m, n = src.shape
    decisive = dec.status == "low-rank" and dec.gap is not None and dec.gap >= cfg.trust_gap \
        and dec.rank <= min(m, n) // 4
    worth = m * n <= cfg.full_spectrum_elems or (dec.status == "low-rank" and not dec.capped)
    if not (cfg.known_noise and src.dense is not None and src.child is not None and not decisive and worth):
        return dec
    noise = rounding_noise(src.child, quant_grid)
    if noise is None:
        return dec
    kn = known_noise_rank(src.dense, noise, exact_elems=cfg.full_spectrum_elems, k_max=cfg.k_max,
                          oversample=cfg.oversample, seed=cfg.seed)
    known = {**kn.to_dict(), **noise.to_dict()}
    room = min(m, n) - max(4, min(m, n) // 16)  # the count must leave a noise subspace to test against
    lo, hi = cfg.known_noise_tail
    clear = kn.rank == 0 or kn.lead >= cfg.known_noise_lead
    if not (lo <= kn.tail_ratio <= hi and kn.excess_components <= cfg.known_noise_excess and kn.rank <= room
            and clear):
        return replace(dec, known=known)
    mean_var = float(noise.variance.double().mean())
    return _RankReading(status="low-rank" if kn.rank else "noise-like", rank=kn.rank, spikes=0, capped=False,
                        gap=kn.gap if kn.rank else None,
                        floor=math.sqrt(mean_var) * (math.sqrt(m) + math.sqrt(n)),
                        sigma=math.sqrt(kn.tail_ratio * mean_var) if kn.rank else dec.sigma,
                        source="known rounding noise", known=known)


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
