"""Per-module screening statistics gathered during the streaming pass.

The anatomy (:mod:`lineage.anatomy`) needs, per module, the pair's moments, whether the
child's change is only storage rounding, whether the child sits on a quantisation lattice,
and whether the delta ``Δ = B − A`` carries low-rank structure (a merged LoRA).  Exact
answers to the last two cost full passes and decompositions; the screen answers them from
what the one streaming read already holds, and only modules it cannot clear get exact work:

* **moments** — :mod:`lineage.stream.moments` (the direction signal's statistics);
* **changes** — exact-equality count, largest change, and per side whether every entry fits
  the bf16/fp16 grids (float grid) and whether the change stays within half a unit in the last
  place of the other side's grid (a pure re-encoding);
* **lattice samples** — the rows and columns that :func:`lineage.signals.quantgrid.detect_grid`
  examines (an evenly spaced sample), so the lattice test runs on the sample alone;
* **a sketch of the delta** — ``Y = Δ_S Ω`` for a strided row subset ``S`` and a seeded
  Gaussian ``Ω`` with ``k`` columns.  For Gaussian ``Ω`` the off-diagonal entries of ``YᵀY``
  have mean square exactly ``Σ s_i⁴`` (the fourth power sum of Δ_S's singular values), while
  a delta without spectral structure (independent entries, variance varying by row and
  column, e.g. noise, rounding, quantisation error) has ``Σ s_i⁴ ≈ Σ_j γ_j² + Σ_i ρ_i² − Σ d⁴``
  from its column and row energies ``γ``, ``ρ``.  A low-rank part concentrates energy in a
  few singular values and raises ``Σ s_i⁴`` far above that prediction; a noise-like delta
  stays at ratio 1 (flat spectrum).  Only modules whose ratio exceeds
  ``ScreenConfig.structure_ratio`` are low-rank candidates.

Modules smaller than ``ScreenConfig.min_elems`` are not screened (exact work is cheap there and
keeps small-model results exactly as the exact signals give them).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

import torch

from lineage.signals.floatgrid import half_ulp
from lineage.signals.lowrank import LowRank
from lineage.signals.pairstats import PairStats
from lineage.signals.quantgrid import QuantGrid
from lineage.stream.lattice import detect_both
from lineage.stream.moments import STREAM_CHUNK, BlockMoments, block_moments, block_reduce, merge_moments

_FINER = {"bf16": 0, "fp16": 1, "fp32": 2}


@dataclass(frozen=True)
class ScreenConfig:
    """Knobs of the screen (defaults checked by tests/test_screen.py)."""

    min_elems: int = 1 << 19       # modules below this size are not screened (exact work)
    sketch_k: int = 32             # sketch columns
    sketch_stride: int = 4         # every stride-th row enters the sketch
    sample_rows: int = 128         # lattice sample (detect_grid's max_rows, as the anatomy uses it)
    #: Σs⁴(sketch) / Σs⁴(noise prediction) above which a module is a low-rank candidate.  Pure noise
    #: gives 1 ± 2/√(k(k−1)) (k = 32: ± 0.064); 1.5 is about 8 standard deviations.
    structure_ratio: float = 1.5
    seed: int = 0


@dataclass(frozen=True)
class ModuleScreen:
    """Screening statistics of one module pair (A = x, B = y; see module docstring)."""

    role: str
    shape: tuple[int, ...]
    moments: BlockMoments
    changed: int
    max_abs_delta: float
    screened: bool
    grid_a: str | None                 # float grid of each side (None: not known)
    grid_b: str | None
    within_round_a: bool | None        # is A within half an ulp (of A's grid) of B? None: not known
    within_round_b: bool | None        # is B within half an ulp (of B's grid) of A?
    round_var_a: float | None = None   # mean rounding variance of each side's float grid (sample)
    round_var_b: float | None = None
    fourth_sketch: float | None = None
    fourth_noise: float | None = None
    quant_a: QuantGrid | None = None   # lattice of A with B as parent (sampled detection)
    quant_b: QuantGrid | None = None   # lattice of B with A as parent
    config: ScreenConfig = field(default_factory=ScreenConfig)

    @property
    def stats(self) -> PairStats:
        return self.moments.pair_stats()

    @property
    def structure_ratio(self) -> float | None:
        """Σs⁴ of the sketched delta over the noise prediction (None: not screened)."""
        if self.fourth_sketch is None or not self.fourth_noise:
            return None
        return self.fourth_sketch / self.fourth_noise

    @property
    def noise_like(self) -> bool:
        """No spectral structure beyond what independent entries give (not a low-rank candidate)."""
        r = self.structure_ratio
        return r is not None and r <= self.config.structure_ratio

    def quant(self, child: str) -> QuantGrid | None:
        return self.quant_b if child == "b" else self.quant_a

    def lowrank(self, child: str) -> LowRank | None:
        """The low-rank analysis's result for ``child`` ("a" or "b") when the screen settles it, else None.

        Settled: an unchanged module, a pure re-encoding (every change within the child's float
        rounding), and a noise-like delta (no decomposition would find structure).
        """
        m, n = (self.shape[0], int(math.prod(self.shape[1:]))) if len(self.shape) >= 2 else (1, self.shape[0])
        mo = self.moments
        px, cx = (mo.mean_x, mo.mean_y) if child == "b" else (mo.mean_y, mo.mean_x)
        psq = (mo.m2x + mo.n * mo.mean_x**2) if child == "b" else (mo.m2y + mo.n * mo.mean_y**2)
        total = max(mo.m2d + mo.n * (cx - px) ** 2, 0.0)
        base_norm = math.sqrt(max(psq, 0.0))
        grid = self.grid_b if child == "b" else self.grid_a
        rv = self.round_var_b if child == "b" else self.round_var_a
        common = dict(shape=(m, n), delta_norm=math.sqrt(total), base_norm=base_norm,
                      rel_delta=math.sqrt(total) / base_norm if base_norm else None,
                      frac_changed=self.changed / max(m * n, 1), max_abs_delta=self.max_abs_delta,
                      rank=0, rank_capped=False, gap=None, noise_floor=0.0, singular_values=(), spikes=0,
                      rank_source="stream screen")
        if self.changed == 0:
            return LowRank(status="unchanged", noise_sigma=0.0, rounding_sigma=None, child_float_grid=None,
                           energy_left={}, energy_left_exact_upto=0, **common)
        if not self.screened or grid is None:
            return None
        sig = math.sqrt(total / max(m * n, 1))
        rounding = math.sqrt(rv) if rv is not None else None
        within = self.within_round_b if child == "b" else self.within_round_a
        if within is None:
            return None
        if within:
            return LowRank(status="rounding", noise_sigma=sig, rounding_sigma=rounding, child_float_grid=grid,
                           energy_left={}, energy_left_exact_upto=0, **common)
        if self.noise_like:
            return LowRank(status="noise-like", noise_sigma=sig, rounding_sigma=rounding, child_float_grid=grid,
                           energy_left={}, energy_left_exact_upto=0, **common)
        return None


@dataclass(frozen=True)
class BlockPart:
    """What one block pair contributes to its module's screen (computed on a worker thread)."""

    r0: int
    rows: int
    moments: BlockMoments
    changed: int
    max_abs: float
    grids: tuple[str | None, str | None]
    within: tuple[bool | None, bool | None]
    gram: torch.Tensor | None = None        # k × k float64: (Δ_S Ω)ᵀ (Δ_S Ω) of this block
    row_fourth: float = 0.0                 # Σ_i ρ_i² over the block's sketched rows
    d4: float = 0.0                         # Σ d⁴ over the block's sketched rows
    col_sq: torch.Tensor | None = None      # column energies of the block's sketched rows (float64)
    rows_a: torch.Tensor | None = None      # the block's lattice-sample rows (float32, CPU)
    rows_b: torch.Tensor | None = None
    cols_a: torch.Tensor | None = None      # the block's entries in the lattice-sample columns
    cols_b: torch.Tensor | None = None


_OMEGA: dict[tuple[int, int, int, str], torch.Tensor] = {}
_OMEGA_LOCK = threading.Lock()


def _omega(n: int, k: int, seed: int, device: torch.device) -> torch.Tensor:
    key = (n, k, seed, str(device))
    with _OMEGA_LOCK:
        om = _OMEGA.get(key)
        if om is None:
            g = torch.Generator().manual_seed(seed * 1_000_003 + n)
            om = torch.randn(n, k, generator=g).to(device)
            _OMEGA[key] = om
    return om


def _block_grid(x: torch.Tensor) -> str:
    """Float grid of one block (see :func:`lineage.signals.floatgrid.float_grid`), from its storage dtype first."""
    if x.dtype == torch.bfloat16:
        return "bf16"
    f = x.float()
    probe = f[:: max(1, f.shape[0] // 32)] if f.dim() >= 2 and f.shape[0] > 64 else f
    for t in ((probe, f) if probe is not f else (f,)):
        if not bool(((t.contiguous().view(torch.int32) & 0xFFFF) == 0).all()):
            break
    else:
        return "bf16"
    if x.dtype == torch.float16:
        return "fp16"
    if float(f.abs().max()) <= 65504.0 and bool((f.half().float() == f).all()):
        return "fp16"
    return "fp32"


def _within(other: torch.Tensor, child: torch.Tensor, grid: str) -> bool:
    """Is every ``|child − other|`` within half an ulp of ``child``'s grid (a few rows first, then all)?"""
    if child.dim() == 2 and child.shape[0] > 8:
        step = child.shape[0] // 4
        c = child[::step].float()
        if not bool(((c - other[::step].float()).abs() <= half_ulp(c, grid) * (1 + 1e-6)).all()):
            return False
    c = child.float()
    return bool(((c - other.float()).abs() <= half_ulp(c, grid) * (1 + 1e-6)).all())


class _SketchRows:
    """Sketch statistics of every ``stride``-th row of a block's delta, fed chunk by chunk.

    :func:`lineage.stream.moments.block_reduce` hands each float32 chunk of ``Δ = y − x`` (whole rows)
    to :meth:`__call__`; the rows whose module row index is a multiple of ``stride`` enter ``Y = Δ_S Ω``,
    their row and column energies and ``Σ d⁴``.  Unchanged chunks are never handed over (they add zero).
    """

    def __init__(self, r0: int, stride: int, omega: torch.Tensor) -> None:
        self.r0, self.stride, self.omega = r0, stride, omega
        self.ys: list[torch.Tensor] = []
        self.row4 = torch.zeros((), dtype=torch.float64, device=omega.device)
        self.d4 = torch.zeros((), dtype=torch.float64, device=omega.device)
        self.col_sq: torch.Tensor | None = None

    def __call__(self, row0: int, d: torch.Tensor) -> None:
        sel = d[(-(self.r0 + row0)) % self.stride :: self.stride]
        if sel.shape[0] == 0:
            return
        self.ys.append(sel @ self.omega)
        d2 = sel * sel
        rs = d2.sum(1, dtype=torch.float64)
        self.row4 += torch.dot(rs, rs)
        self.d4 += torch.dot(d2.view(-1), d2.view(-1)).double()
        cs = d2.sum(0, dtype=torch.float64)
        self.col_sq = cs if self.col_sq is None else self.col_sq.add_(cs)

    def result(self) -> tuple[torch.Tensor | None, float, float, torch.Tensor | None]:
        """``(YᵀY in float64 on the CPU, Σ_i ρ_i², Σ d⁴, column energies)``; None when no row was fed."""
        if not self.ys:
            return None, 0.0, 0.0, None
        y = torch.cat(self.ys).double()
        return (y.T @ y).cpu(), float(self.row4), float(self.d4), self.col_sq.cpu()  # type: ignore[union-attr]


class ScreenBuilder:
    """Accumulates one module's :class:`ModuleScreen` from its row blocks.

    :meth:`part` is pure (safe on worker threads, any device); :meth:`add` must see the parts in
    row order (it merges moments in order, so the result does not depend on the worker count).
    """

    def __init__(self, role: str, shape: tuple[int, ...], config: ScreenConfig | None = None) -> None:
        self.role = role
        self.shape = tuple(int(s) for s in shape)
        self.cfg = config or ScreenConfig()
        m = self.shape[0] if len(self.shape) >= 2 else 1
        n = int(math.prod(self.shape[1:])) if len(self.shape) >= 2 else (self.shape[0] if self.shape else 1)
        self.m, self.n = m, n
        self.screened = len(self.shape) == 2 and m * n >= self.cfg.min_elems and m >= 16 and n >= 16
        k = self.cfg.sample_rows
        self.row_idx = torch.linspace(0, m - 1, min(k, m)).round().long() if self.screened else None
        self.col_idx = torch.linspace(0, n - 1, min(k, n)).round().long().unique() if self.screened else None
        self._moments: BlockMoments | None = None
        self._changed = 0
        self._max_abs = 0.0
        self._grids: tuple[set[str | None], set[str | None]] = (set(), set())
        self._within = [True, True]
        self._gram: torch.Tensor | None = None
        self._row4 = self._d4 = 0.0
        self._col_sq: torch.Tensor | None = None
        self._rows: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        self._cols: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])

    # -- worker side
    def part(self, r0: int, xa: torch.Tensor, xb: torch.Tensor) -> BlockPart:
        """Reduce the block of rows ``[r0, r0 + len)`` (storage dtypes, any device).

        One pass: the moments' float32 chunks of ``Δ`` feed the sketch (:class:`_SketchRows`); the
        lattice samples are gathered from the stored block, and the re-encoding test reads a few rows first.
        """
        sketch = _SketchRows(r0, self.cfg.sketch_stride, _omega(self.n, self.cfg.sketch_k, self.cfg.seed, xa.device)) \
            if self.screened else None
        mom, changed, max_abs = block_reduce(xa, xb, STREAM_CHUNK, rows_hook=sketch)
        rows = xa.shape[0] if xa.dim() == 2 else 1
        if not self.screened or sketch is None:
            return BlockPart(r0, rows, mom, changed, max_abs, (None, None), (None, None))
        ga, gb = _block_grid(xa), _block_grid(xb)
        sel = (self.row_idx[(self.row_idx >= r0) & (self.row_idx < r0 + rows)] - r0).to(xa.device)
        cidx = self.col_idx.to(xa.device)
        samples = (xa[sel].float().cpu(), xb[sel].float().cpu(), xa[:, cidx].float().cpu(), xb[:, cidx].float().cpu())
        if changed == 0:
            return BlockPart(r0, rows, mom, 0, 0.0, (ga, gb), (True, True), None, 0.0, 0.0, None, *samples)
        within = (_within(xb, xa, ga), _within(xa, xb, gb))
        gram, row4, d4, col_sq = sketch.result()
        return BlockPart(r0, rows, mom, changed, max_abs, (ga, gb), within, gram, row4, d4, col_sq, *samples)

    # -- in-order side
    def add(self, p: BlockPart) -> None:
        """Merge a block's part (parts must come in row order)."""
        self._moments = merge_moments(self._moments, p.moments)
        self._changed += p.changed
        self._max_abs = max(self._max_abs, p.max_abs)
        if not self.screened:
            return
        for i in range(2):
            self._grids[i].add(p.grids[i])
            self._within[i] = self._within[i] and (p.within[i] is not False)
        if p.gram is not None:
            self._gram = p.gram if self._gram is None else self._gram + p.gram
            self._row4 += p.row_fourth
            self._d4 += p.d4
            self._col_sq = p.col_sq if self._col_sq is None else self._col_sq + p.col_sq
        for i, (r, c) in enumerate(((p.rows_a, p.cols_a), (p.rows_b, p.cols_b))):
            self._rows[i].append(r)
            self._cols[i].append(c)

    def finish(self) -> ModuleScreen:
        """The module's screen once every block was added."""
        mom = self._moments or block_moments(torch.zeros(0), torch.zeros(0))
        base = dict(role=self.role, shape=self.shape, moments=mom, changed=self._changed,
                    max_abs_delta=self._max_abs, config=self.cfg)
        if not self.screened:
            return ModuleScreen(screened=False, grid_a=None, grid_b=None, within_round_a=None, within_round_b=None,
                                **base)
        grids: list[str | None] = []
        within: list[bool | None] = []
        for i in range(2):
            gs = self._grids[i] - {None}
            g = max(gs, key=lambda x: _FINER[x]) if gs else None
            grids.append(g)
            # a block checked against a coarser grid than the tensor's own used a looser bound: unknown
            within.append(self._within[i] if len(gs) == 1 else (False if not self._within[i] else None))
        rows = [torch.cat(r) if r and r[0] is not None else None for r in self._rows]
        cols = [torch.cat(c) if c and c[0] is not None else None for c in self._cols]
        rvar: list[float | None] = [None, None]
        quant: list[QuantGrid | None] = [None, None]
        if rows[0] is not None and rows[1] is not None:
            for i in range(2):
                if grids[i] is not None:
                    hs = half_ulp(rows[i][:: max(1, rows[i].shape[0] // 16)], grids[i]).double()  # 16 rows
                    rvar[i] = float((hs * hs).mean()) * 4.0 / 12.0
            qa, qb = detect_both((rows[0], rows[1]), (cols[0], cols[1]), (grids[0], grids[1]), (self.m, self.n),
                                 self.cfg.sample_rows)
            quant = [qa, qb]
        f4 = f4n = None
        if self._gram is not None and self._col_sq is not None:
            k = self._gram.shape[0]
            off = self._gram - torch.diag(torch.diag(self._gram))
            f4 = float((off * off).sum()) / (k * (k - 1))
            f4n = float((self._col_sq * self._col_sq).sum()) + self._row4 - self._d4
        return ModuleScreen(screened=True, grid_a=grids[0], grid_b=grids[1], within_round_a=within[0],
                            within_round_b=within[1], round_var_a=rvar[0], round_var_b=rvar[1], fourth_sketch=f4,
                            fourth_noise=f4n, quant_a=quant[0], quant_b=quant[1], **base)
