"""Lattice checks: how far each entry lies from its nearest grid point, fused with the read.

A tensor quantised to a grid of step ``s`` (one step per row, e.g. int8 or a Q8
re-upload dequantised) has every entry at an integer multiple of ``s``.
``lattice_residual(w, step, axis)`` measures, per row (``axis=0``) or per column
(``axis=1``), the residual ``r = w/s − round(w/s)`` in units of the step
(``r ∈ [−½, ½]``; ``0`` on the grid, uniform with mean square 1/12 off it) and
returns a float64 ``(groups, 2)`` tensor ``[Σ r², max |r|]`` of each row or column.
``w`` is 2-D in any dense storage dtype (``float32``, ``float16``, ``bfloat16``,
``float8``); ``step`` holds one positive step per group.

On CUDA a Triton kernel decodes, divides, rounds and reduces in one read of ``w``;
on the CPU cache-sized row blocks are processed in float32 with torch, single-threaded.
``lattice_residual_reference`` does the same in float64 on the CPU.
"""

from __future__ import annotations

import torch

from lineage_kernels.stored_moments import use_triton
from lineage_kernels.threads import single_threaded

#: Elements processed at once on the CPU (whole rows; stays in cache).
CHUNK_ELEMS = 1 << 18


def _prepare(w: torch.Tensor, step: torch.Tensor, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    if w.dim() != 2 or axis not in (0, 1):
        raise ValueError(f"lattice_residual: need a 2-D tensor and axis 0 or 1, got {tuple(w.shape)}, axis={axis}")
    st = step.detach().reshape(-1)
    if st.numel() != w.shape[axis]:
        raise ValueError(f"lattice_residual: {st.numel()} steps for axis {axis} of {tuple(w.shape)}")
    if st.numel() and not bool((st > 0).all()):
        raise ValueError("lattice_residual: steps must be positive")
    x = w.detach() if axis == 0 else w.detach().T
    return x, st


def lattice_residual_reference(w: torch.Tensor, step: torch.Tensor, axis: int = 0, *,
                               backend: str = "auto") -> torch.Tensor:
    """Float64 ``[Σ r², max |r|]`` per group on the CPU (``backend`` ignored)."""
    x, st = _prepare(w, step, axis)
    t = x.to("cpu", torch.float64) / st.to("cpu", torch.float64)[:, None]
    r = t - torch.floor(t + 0.5)
    if r.shape[1] == 0:
        return torch.zeros(r.shape[0], 2, dtype=torch.float64)
    return torch.stack([(r * r).sum(dim=1), r.abs().amax(dim=1)], dim=1)


def lattice_residual(w: torch.Tensor, step: torch.Tensor, axis: int = 0, *, backend: str = "auto") -> torch.Tensor:
    """Float64 ``[Σ r², max |r|]`` per row or column (see module docstring), computed in float32."""
    x, st = _prepare(w, step, axis)
    if use_triton(backend, x):
        from lineage_kernels.triton_kernels import lattice_residual_triton

        return lattice_residual_triton(x, st.to(x.device))
    out = torch.zeros(x.shape[0], 2, dtype=torch.float64)
    if x.shape[1] == 0:
        return out
    s32 = st.to(x.device, torch.float32)
    rows = max(1, CHUNK_ELEMS // x.shape[1])
    with single_threaded(x.device):
        for r0 in range(0, x.shape[0], rows):
            t = x[r0 : r0 + rows].float().div_(s32[r0 : r0 + rows, None])
            r = t.sub_(torch.round(t))  # round-half-even vs floor(t + ½): same |r| at ties
            out[r0 : r0 + r.shape[0], 0] = torch.linalg.vector_norm(r, dim=1).double().square().cpu()
            out[r0 : r0 + r.shape[0], 1] = torch.linalg.vector_norm(r, ord=float("inf"), dim=1).double().cpu()
    return out
