"""The screen's lattice test: :func:`lineage.signals.quantgrid.detect_grid_sampled` for both sides of a
module, with the probe that rejects off-lattice data run once for both sides.

:func:`lineage.signals.quantgrid.detect_grid_sampled` examines, for each group size in turn, a two-row
probe of the sample before its full test; data off any lattice (a float-stored fine-tune or noise child,
the common case) is rejected by the probe at every group size, in both orientations (rows, then
columns).  Its cost is then some twenty small torch operations per group size and orientation and side,
a few milliseconds per module side.  The probe decision depends on each group alone, so the probe rows
of both sides go through :func:`lineage.signals.quantgrid._analyse_groups` together, once per group
size, on a prefix of each probe row for the block group sizes (see :func:`probe_rejects`); a side
rejected in both orientations gets the result ``detect_grid_sampled`` returns for off-lattice data,
any other side the full ``detect_grid_sampled``.  ``tests/test_screen.py`` checks the two agree on
off-lattice data and on every lattice format the detection names.
"""

from __future__ import annotations

import torch

from lineage.signals.quantgrid import GROUP_SIZES, QuantGrid, _analyse_groups, detect_grid_sampled

_REL_TOL = {"bf16": 2.0**-7, "fp16": 2.0**-10}
_PROBE_ROWS = 2


#: Elements of each probe row examined for group sizes below the row length (whole groups of every size).
_PROBE_PREFIX = 1024


def _probe(x: torch.Tensor) -> torch.Tensor | None:
    """The probe rows of a sample (None: the detection returns "not on a grid" before probing)."""
    m, n = x.shape
    if n < 16 or x.numel() < 64:
        return None
    p = x[:: max(1, m // _PROBE_ROWS)].contiguous()
    return p if bool(torch.isfinite(p).all()) else None


def probe_rejects(samples: list[torch.Tensor], grids: list[str]) -> list[bool]:
    """Per sample (rows × length, float32, all the same length): does every group size fail the probe?

    The probe is the detection's own (its two probe rows, the same pass rule), except that for group
    sizes below the row length only the first :data:`_PROBE_PREFIX` entries of each probe row are
    examined: a lattice holds on every group, so on those; off-lattice data fails there as everywhere.
    A sample with a non-finite probe entry is not rejected here (the full detection decides).
    """
    out = [True] * len(samples)
    probes = [_probe(x) for x in samples]
    for i, x in enumerate(samples):
        if probes[i] is None and x.shape[1] >= 16 and x.numel() >= 64:
            out[i] = False  # non-finite probe: leave it to the full detection
    n = samples[0].shape[1]
    sizes = [n] + [g for g in GROUP_SIZES if g < n and n % g == 0]
    live = [i for i, p in enumerate(probes) if p is not None]
    for tol in {_REL_TOL.get(grids[i], 2.0**-20) for i in live}:
        idx = [i for i in live if _REL_TOL.get(grids[i], 2.0**-20) == tol]
        rows = torch.cat([probes[i] for i in idx])  # type: ignore[misc]
        bounds = torch.tensor([0] + [probes[i].shape[0] for i in idx]).cumsum(0).tolist()  # type: ignore[union-attr]
        for g in sizes:
            w = n if g == n else min(n, _PROBE_PREFIX)
            pok, _, pspan, _, _, pinf, _ = _analyse_groups(rows[:, :w].contiguous(), g, tol)
            per = w // g
            for k, i in enumerate(idx):
                if not out[i]:
                    continue
                sl = slice(bounds[k] * per, bounds[k + 1] * per)
                ok, inf, span = pok[sl], pinf[sl], pspan[sl]
                if int(inf.sum()) == 0 or float(ok[inf].float().mean()) < 0.5:
                    continue
                if float(span[inf & ok].float().median()) > 2 * 256:
                    continue
                out[i] = False  # the full test may pass
    return out


def _off_grid(rows: torch.Tensor, grid: str) -> QuantGrid:
    return QuantGrid(False, grid if grid != "fp32" else None, None, None, None, grid, 0.0, None, rows.shape[0])


def detect_both(rows: tuple[torch.Tensor, torch.Tensor], cols: tuple[torch.Tensor, torch.Tensor],
                grids: tuple[str | None, str | None], shape: tuple[int, int],
                max_rows: int) -> tuple[QuantGrid, QuantGrid]:
    """``(lattice of A with B as parent, lattice of B with A as parent)`` from the streamed samples.

    ``rows``/``cols``: the sampled rows and columns of A and B (float32), ``grids`` each side's float grid.
    """
    known = [i for i in (0, 1) if grids[i] is not None]
    rej = {i: False for i in (0, 1)}
    if known and shape[0] >= 16 and shape[1] >= 2:
        r_rows = probe_rejects([rows[i].float() for i in known], [str(grids[i]) for i in known])
        r_cols = probe_rejects([cols[i].float().T for i in known], [str(grids[i]) for i in known])
        for k, i in enumerate(known):
            rej[i] = r_rows[k] and r_cols[k]
    out: list[QuantGrid] = []
    for i in (0, 1):
        j = 1 - i
        if rej[i]:
            out.append(_off_grid(rows[i], str(grids[i])))
        else:
            out.append(detect_grid_sampled(rows[i], rows[j], cols[i], cols[j], shape=shape,
                                           float_grid_name=grids[i], max_rows=max_rows, probe_rows=_PROBE_ROWS))
    return out[0], out[1]
