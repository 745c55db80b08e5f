"""Does a tensor sit on a quantisation grid, and which one?

Quantised weights, once dequantised to float, keep a tell-tale structure: inside
each group (a row, or a block of 32/64/128/256 consecutive values of a row) every
value is ``offset + step · q`` for small integers ``q``.  From the child's values
alone this module finds, per group, the coarsest step that puts every value on
an integer lattice, trying the steps the common formats imply
(``absmax/127`` int8 symmetric, ``absmax/7`` int4 symmetric, ``absmax/8`` GGUF
Q4_0, ``(max−min)/15`` and ``(max−min)/255`` with a zero point) and, as a
fallback, the smallest gap between sorted distinct values divided by 1…4.  The
largest group size on which ≥ 99 % of groups are on a lattice with few levels
wins, and the format is named from the group size, the number of levels, whether
zero is on the lattice and how the extreme value maps (Q8_0, Q5_0, Q4_0, Q4_1,
Q5_1, int8-per-row, int4-g128-sym, …); the K-quants (Q4_K, Q5_K, Q6_K) are told
from their single-block cousins by the sub-block steps being integer multiples
of one scale per 256-value super-block.  A float32 tensor that is merely stored in bf16
or fp16 is reported as that float grid.

Given the parent, ``error_ratio`` is the RMS of ``child − parent`` divided by
the RMS a round-to-nearest quantiser of that step produces (``step/√12``), and
``frac_within_half_step`` the fraction of entries whose error is at most half a
step: about 1 and 1 for a quantised copy, well above 1 for a quantised fine-tune.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace

import torch

from lineage.io.dtypes import FLOAT_FORMATS
from lineage.lazyroles import is_lazy, map_roles, recall, shape_of
from lineage.signals.floatgrid import float_grid
from lineage.signals.memo import DETECT_ROWS, detect_key

log = logging.getLogger(__name__)

#: Group sizes tried (besides the whole row), largest first.
GROUP_SIZES: tuple[int, ...] = (256, 128, 64, 32, 16)
PASS_RATE = 0.99


@dataclass(frozen=True)
class QuantGrid:
    """Result for one tensor (see module docstring)."""

    on_grid: bool
    format: str | None
    bits: int | None
    group_size: int | None
    symmetric: bool | None
    float_grid: str
    pass_rate: float
    levels_mean: float | None
    rows_examined: int
    error_ratio: float | None = None
    frac_within_half_step: float | None = None
    consistent_with_parent: bool | None = None
    #: 0: groups run along rows (the usual ``nn.Linear`` layout); 1: along columns (a tensor quantised in
    #: its transposed layout, e.g. a GPT-2 Conv1D weight quantised per stored row)
    axis: int = 0

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _candidates(v: torch.Tensor, s: torch.Tensor | None = None) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, step, offset) per group for every candidate lattice; v is (groups, g), ``s`` v sorted along rows."""
    if s is None:
        s, _ = torch.sort(v, dim=1)
    vmin = s[:, 0]
    vmax = s[:, -1]
    amax = torch.maximum(vmax.abs(), vmin.abs())
    zero = torch.zeros_like(amax)
    out = [
        ("sym127", amax / 127, zero),
        ("sym7", amax / 7, zero),
        ("q4_0", amax / 8, zero),
        ("asym15", (vmax - vmin) / 15, vmin),
        ("asym255", (vmax - vmin) / 255, vmin),
    ]
    gaps = s[:, 1:] - s[:, :-1]
    tol = 1e-5 * amax.clamp_min(1e-30)
    big = torch.where(gaps > tol[:, None], gaps, torch.full_like(gaps, math.inf))
    g0 = big.amin(1)
    g0 = torch.where(torch.isfinite(g0), g0, amax)
    for k in (1, 2, 3, 4):
        out.append((f"gap/{k}", g0 / k, vmin))
    return out


def _on_lattice(v: torch.Tensor, step: torch.Tensor, offset: torch.Tensor, rel_tol: float):
    """Per group: every value within tolerance of offset + step·integer; also the level span."""
    safe = step.clamp_min(1e-30)[:, None]
    q = (v - offset[:, None]) / safe
    err = (q - torch.round(q)).abs()
    tol = (2e-3 + rel_tol * q.abs()).clamp_max(0.05)
    ok = (err <= tol).all(1) & (step > 0)
    span = torch.round(q.amax(1) - q.amin(1)) + 1
    return ok, span, q


def _sample_rows(x: torch.Tensor, max_rows: int) -> torch.Tensor:
    if x.shape[0] <= max_rows:
        return x
    idx = torch.linspace(0, x.shape[0] - 1, max_rows).round().long()
    return x[idx]


def _name(g: int | None, row: bool, bits: int, scheme: str, superblock_ok: bool) -> str:
    if row:
        base = f"int{bits}-per-row"
        return base if scheme != "asym" else base + "-asym"
    if g == 32 and bits == 8 and scheme == "sym":
        return "Q8_0"
    if g == 32 and bits == 4 and scheme == "q4_0":
        return "Q4_0"
    if g == 32 and bits == 5 and scheme in ("sym", "q4_0"):
        return "Q5_0"
    if g == 32 and bits in (4, 5) and scheme == "asym":
        return f"Q{bits}_K" if superblock_ok else f"Q{bits}_1"
    if g == 16 and bits == 6 and scheme == "sym" and superblock_ok:
        return "Q6_K"
    return f"int{bits}-g{g}-{'sym' if scheme in ('sym', 'q4_0') else 'asym'}"


#: K-quant super-blocks: (sub-block size, scheme) -> largest integer sub-block scale code
#: (6-bit unsigned for Q4_K/Q5_K, where the largest sub-block gets 63; int8 for Q6_K,
#: where the largest gets magnitude 128).
_K_SCALE_CODE = {(32, "asym"): 63, (16, "sym"): 128}


def _superblock_ok(step: torch.Tensor, g: int, scheme: str, n: int) -> bool:
    """Are the sub-block steps integer multiples of one scale per 256-value super-block?"""
    code = _K_SCALE_CODE.get((g, scheme))
    if code is None or n % 256:
        return False
    sub = step.reshape(-1, 256 // g)
    dsc = sub / sub.amax(1, keepdim=True).clamp_min(1e-30) * code
    return float(((dsc - dsc.round()).abs() < 2e-2).float().mean()) >= PASS_RATE


def _analyse_groups(x: torch.Tensor, g: int, rel_tol: float):
    v = x.reshape(-1, g)
    srt, _ = torch.sort(v, dim=1)
    cands = _candidates(v, srt)
    # every candidate lattice at once: (candidates, groups, g)
    steps = torch.stack([c[1] for c in cands])
    offs = torch.stack([c[2] for c in cands])
    q = (v[None] - offs[..., None]) / steps.clamp_min(1e-30)[..., None]
    err = (q - torch.round(q)).abs_()
    tol = (2e-3 + rel_tol * q.abs()).clamp_max_(0.05)
    oks = (err <= tol).all(2) & (steps > 0)
    spans = torch.round(q.amax(2) - q.amin(2)) + 1
    del q, err, tol
    best_ok = torch.zeros(v.shape[0], dtype=torch.bool)
    best_step = torch.zeros(v.shape[0])
    best_span = torch.full((v.shape[0],), math.inf)
    kinds = torch.full((v.shape[0],), -1, dtype=torch.long)
    for ci in range(len(cands)):
        ok, step = oks[ci], steps[ci]
        better = ok & (~best_ok | (step > best_step * (1 + 1e-4)))
        best_ok |= ok
        best_step = torch.where(better, step, best_step)
        best_span = torch.where(better, spans[ci], best_span)
        kinds = torch.where(better, torch.full_like(kinds, ci), kinds)
    names = [c[0] for c in cands]
    # Groups need at least 3 distinct levels to count as evidence of a lattice.
    distinct = (srt.diff(dim=1).abs() > 1e-7 * v.abs().amax(1, keepdim=True)).sum(1) + 1
    informative = distinct >= 3
    return best_ok, best_step, best_span, kinds, names, informative, distinct


def detect_grid(
    child: torch.Tensor,
    parent: torch.Tensor | None = None,
    *,
    max_rows: int = 256,
) -> QuantGrid:
    """Detect the quantisation grid of ``child`` (2-D, float) and compare with ``parent``.

    Groups are looked for along rows first, then along columns (``axis`` 1, named "… along columns").
    """
    x = child.detach().to(torch.float32)
    if x.dim() == 1:
        x = x.reshape(1, -1)
    if x.dim() != 2:
        x = x.reshape(x.shape[0], -1)
    res = _detect_rows(x, parent, max_rows)
    if res.on_grid or x.shape[0] < 16 or x.shape[1] < 2:
        return res
    # only the sampled columns are transposed (the detection looks at max_rows rows of the transpose)
    idx = torch.linspace(0, x.shape[1] - 1, min(max_rows, x.shape[1])).round().long().unique()
    pt = parent.detach().to(torch.float32).reshape(x.shape)[:, idx].T.contiguous() if parent is not None else None
    cols = _detect_rows(x[:, idx].T.contiguous(), pt, max_rows)
    if not cols.on_grid:
        return res
    return replace(cols, axis=1, format=f"{cols.format} along columns")


def detect_grid_sampled(rows_child: torch.Tensor, rows_parent: torch.Tensor | None, cols_child: torch.Tensor,
                        cols_parent: torch.Tensor | None, *, shape: tuple[int, int], float_grid_name: str | None,
                        max_rows: int = 256, probe_rows: int = 8) -> QuantGrid:
    """:func:`detect_grid` from the sample it examines, gathered elsewhere (e.g. while streaming).

    ``rows_*`` are the rows ``linspace(0, m − 1, max_rows).round()`` of the ``shape``-shaped child and
    parent (all rows when ``m ≤ max_rows``), ``cols_*`` the columns ``linspace(0, n − 1, max_rows).round()``
    (unique) over all rows; ``float_grid_name`` is the child's whole-tensor float grid.  Same result as
    ``detect_grid(child, parent, max_rows=max_rows)`` (``probe_rows``: rows of the quick screen run before each
    group size's full test; fewer rows screen faster, and a lattice passes on any of its rows).
    """
    x = rows_child.detach().to(torch.float32)
    p = rows_parent.detach().to(torch.float32) if rows_parent is not None else None
    res = _detect_rows(x, p, max_rows, float_grid_name, probe_rows)
    if res.on_grid or shape[0] < 16 or shape[1] < 2:
        return res
    pt = cols_parent.detach().to(torch.float32).T.contiguous() if cols_parent is not None else None
    cols = _detect_rows(cols_child.detach().to(torch.float32).T.contiguous(), pt, max_rows, float_grid_name,
                        probe_rows)
    if not cols.on_grid:
        return res
    return replace(cols, axis=1, format=f"{cols.format} along columns")


#: Relative tolerance on an fp32 (or unknown) grid: wider than its ulp, for steps inferred in float32 arithmetic.
_FP32_REL_TOL = 2.0**-20


def _rel_tol(fg: str | None) -> float:
    """One ulp of the half-precision grid ``fg`` relative to the value (2**-mantissa bits), else the fp32 tolerance."""
    return 2.0 ** -FLOAT_FORMATS[fg].mantissa_bits if fg in ("bf16", "fp16") else _FP32_REL_TOL


def _detect_rows(x: torch.Tensor, parent: torch.Tensor | None, max_rows: int, fg: str | None = None,
                 probe_rows: int = 8) -> QuantGrid:
    """:func:`detect_grid` along the rows of the 2-D float32 ``x`` (``fg``: its float grid, when known)."""
    fg = fg or float_grid(x)
    xs = _sample_rows(x, max_rows)
    m, n = xs.shape
    # stored values and the inferred step each carry one rounding of the float format
    rel_tol = _rel_tol(fg)
    none = QuantGrid(False, fg if fg != "fp32" else None, None, None, None, fg, 0.0, None, m)
    if n < 16 or x.numel() < 64 or not bool(torch.isfinite(xs).all()):
        return none
    sizes = [n] + [g for g in GROUP_SIZES if g < n and n % g == 0]
    chosen = None
    probe = xs[:: max(1, m // probe_rows)]
    for g in sizes:
        # cheap screen on a few rows before the full test
        pok, _, pspan, _, _, pinf, _ = _analyse_groups(probe, g, rel_tol)
        if int(pinf.sum()) == 0 or float(pok[pinf].float().mean()) < 0.5:
            continue
        # the full test accepts at most 256 levels in 99 % of groups: a probe whose typical group needs far
        # more (a float format's own fine spacing, e.g. bf16 values) cannot pass it
        if float(pspan[pinf & pok].float().median()) > 2 * 256:
            continue
        ok, step, span, kinds, names, informative, distinct = _analyse_groups(xs, g, rel_tol)
        if int(informative.sum()) < max(1, informative.numel() // 2):
            continue
        okf = ok[informative]
        rate = float(okf.float().mean())
        spans = span[informative & ok]
        if rate >= PASS_RATE and spans.numel():
            levels = float(torch.quantile(spans.float(), 0.99)) if spans.numel() > 1 else float(spans[0])
            if levels <= 256:
                chosen = (g, rate, step, span, kinds, names, informative, distinct, levels)
                break
    if chosen is None:
        return none
    g, rate, step, span, kinds, names, informative, distinct, levels = chosen
    bits = 8 if levels > 64 else 6 if levels > 32 else 5 if levels > 16 else 4 if levels > 8 else 3 if levels > 4 else 2
    sel = kinds[informative & (kinds >= 0)].tolist()
    top = Counter(names[i] for i in sel).most_common(1)[0][0] if sel else "gap/1"
    if top in ("sym127", "sym7"):
        scheme = "sym"
    elif top == "q4_0":
        scheme = "q4_0"
    else:
        # Zero on the lattice with a symmetric range still counts as symmetric.
        v = xs.reshape(-1, g)
        q0 = v / step.clamp_min(1e-30)[:, None]
        on0 = ((q0 - q0.round()).abs() <= (2e-3 + rel_tol * q0.abs()).clamp_max(0.05)).all(1)
        scheme = "sym" if float(on0[informative].float().mean()) >= PASS_RATE else "asym"
    # A row as short as a standard block (32, 64, …) cannot be told from one block
    # per row; name it as the block format (what such checkpoints almost always are).
    row = g == n and n not in GROUP_SIZES
    superblock_ok = not row and _superblock_ok(step, g, scheme, n)
    fmt = _name(g, row, bits, scheme, superblock_ok)
    if row:
        per_row_step = step
        if float((per_row_step.max() - per_row_step.min()) / per_row_step.max().clamp_min(1e-30)) < 1e-5 \
                and x.shape[0] > 1:
            fmt = fmt.replace("per-row", "per-tensor")
    res = dict(on_grid=True, format=fmt, bits=bits, group_size=g, symmetric=scheme != "asym",
               float_grid=fg, pass_rate=rate, levels_mean=float(distinct[informative].float().mean()),
               rows_examined=m)
    if parent is not None:
        res.update(_parent_error(x, parent.detach().to(torch.float32).reshape(x.shape), g, max_rows,
                                 rel_tol))
    return QuantGrid(**res)


def grid_steps(child: torch.Tensor, grid: QuantGrid, *, block_rows: int = 512) -> torch.Tensor | None:
    """Lattice step of every group of ``child`` (shape ``rows × n/group_size``) on the detected ``grid``.

    For a grid along columns (``grid.axis == 1``) the steps are those of ``child.T`` (``cols × m/group_size``).

    Every row is examined (the detection samples rows), in blocks of ``block_rows``.  A group not on a
    lattice (or with fewer than three levels) gets the median step of its row's other groups.  None when
    ``grid`` is not a quantisation grid or does not fit ``child``'s width.
    """
    if not (grid.on_grid and grid.group_size):
        return None
    x = child.detach().to(torch.float32)
    if x.dim() == 1:
        x = x.reshape(1, -1)
    if grid.axis == 1:  # groups along columns: the steps of the transposed tensor
        x = x.T.contiguous()
    m, n = x.shape
    g = grid.group_size
    if n % g:
        return None
    rel_tol = _rel_tol(grid.float_grid)
    out = torch.empty(m, n // g, dtype=torch.float32)
    for r0 in range(0, m, block_rows):
        xb = x[r0 : r0 + block_rows]
        ok, step, _, _, _, informative, _ = _analyse_groups(xb, g, rel_tol)
        good = (ok & informative).reshape(xb.shape[0], -1)
        st = step.reshape(xb.shape[0], -1).clone()
        if not bool(good.all()):
            masked = torch.where(good, st, torch.full_like(st, float("nan")))
            med = torch.nanmedian(masked, dim=1, keepdim=True).values
            fallback = torch.nan_to_num(med, nan=float(st[good].median()) if bool(good.any()) else 0.0)
            st = torch.where(good, st, fallback.expand_as(st))
        out[r0 : r0 + xb.shape[0]] = st
    return out


def _parent_error(x: torch.Tensor, p: torch.Tensor, g: int, max_rows: int, rel_tol: float):
    xs = _sample_rows(x, max_rows)
    ps = _sample_rows(p, max_rows)
    ok, step, _, _, _, informative, _ = _analyse_groups(xs, g, rel_tol)
    err = (xs - ps).reshape(-1, g)
    st = step[:, None].expand_as(err)
    expected = float((st.double() ** 2).sum() / 12.0)
    ratio = math.sqrt(float((err.double() ** 2).sum()) / expected) if expected > 0 else None
    within = float((err.abs() <= st * 0.5 * (1 + 1e-3) + 1e-7 * xs.reshape(-1, g).abs()).float().mean())
    consistent = ratio is not None and ratio <= 1.5 and within >= 0.99
    return dict(error_ratio=ratio, frac_within_half_step=within, consistent_with_parent=consistent)


def rounds_exactly(child: torch.Tensor, parent: torch.Tensor, grid: QuantGrid) -> bool:
    """Is every entry of ``child`` within half a step of ``parent`` on ``grid`` (symmetric formats:
    step = group absmax / 127, / 7, or / 8 for Q4_0)?  Then ``child`` is ``parent`` quantised and
    nothing else: any further change to that module lies below the rounding and cannot be seen.
    Checked on every entry (the detection itself samples rows); False when the format is not one
    whose step follows from the values alone."""
    if not (grid.on_grid and grid.symmetric and grid.consistent_with_parent and grid.group_size and grid.format):
        return False
    fmt = grid.format.lower()
    levels = 8.0 if fmt.startswith("q4_0") else 127.0 if grid.bits == 8 else 7.0 if grid.bits == 4 else None
    if levels is None or fmt.startswith(("q4_k", "q5_k", "q6_k", "q4_1", "q5_1")):
        return False
    x = child.detach().to(torch.float32)
    p = parent.detach().to(torch.float32).reshape(x.shape)
    if x.dim() == 2 and grid.axis == 1:
        x, p = x.T.contiguous(), p.T.contiguous()
    if x.dim() != 2 or x.shape[1] % grid.group_size:
        return False
    xg = x.reshape(-1, grid.group_size)
    half = xg.abs().amax(1, keepdim=True) * (0.5 * (1 + 2e-3) / levels)
    return bool(((xg - p.reshape(-1, grid.group_size)).abs_() <= half).all())


@dataclass(frozen=True)
class QuantSummary:
    """Across modules: the majority format and how many modules carry it."""

    format: str | None
    fraction_on_grid: float
    fraction_consistent: float | None
    formats: dict[str, str | None]

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def detect_modules(pairs: Mapping[str, tuple[torch.Tensor | None, torch.Tensor]],
                   max_rows: int = DETECT_ROWS) -> tuple[dict[str, QuantGrid], QuantSummary]:
    """Run :func:`detect_grid` on ``role -> (parent or None, child)`` (2-D tensors only).

    Modules are visited one at a time (``pairs`` may read on access, see :mod:`lineage.lazyroles`).
    """
    sample_rows = getattr(pairs, "rows", None)
    px, py = getattr(pairs, "x", None), getattr(pairs, "y", None)

    def one(k: str) -> tuple[QuantGrid, int] | None:
        shape = shape_of(pairs, k)
        if len(shape) != 2:
            return None
        if px is not None:  # a PairView: an earlier pass over the module may have left the result
            hit = recall(px, detect_key(py, k, max_rows))
            if isinstance(hit, QuantGrid):
                return hit, shape[-1] * shape[0]
        if callable(sample_rows) and shape[0] > max_rows:
            # detect_grid looks at max_rows rows only: read just those (same rows as _sample_rows)
            p, c = sample_rows(k, torch.linspace(0, shape[0] - 1, max_rows).round().long())
        else:
            p, c = pairs[k]
        return detect_grid(c, p, max_rows=max_rows), shape[-1] * shape[0]

    visited = {k: v for k, v in map_roles(one, list(pairs), workers=None if is_lazy(pairs) else 1) if v is not None}
    res = {k: v[0] for k, v in visited.items()}
    if not res:
        return res, QuantSummary(None, 0.0, None, {})
    on = [r for r in res.values() if r.on_grid]
    # weight by row length: long rows tell block formats from per-row ones
    votes: Counter = Counter()
    for k, r in res.items():
        if r.on_grid:
            votes[r.format] += visited[k][1]
    fmt = votes.most_common(1)[0][0] if on else None
    cons = [r.consistent_with_parent for r in res.values() if r.consistent_with_parent is not None]
    return res, QuantSummary(
        format=fmt,
        fraction_on_grid=len(on) / len(res),
        fraction_consistent=(sum(cons) / len(cons)) if cons else None,
        formats={k: (r.format if r.on_grid else None) for k, r in res.items()},
    )
