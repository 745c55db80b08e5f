"""Float storage grids: which float format a tensor's values fit, and its rounding step.

A checkpoint saved in bf16 or fp16 carries one rounding per value; the spacing of the
format at each value (its unit in the last place) bounds that rounding; the formats' mantissa bits
and exponent range come from :data:`lineage.io.dtypes.FLOAT_FORMATS`.  These helpers
are shared by the signals that must tell rounding from real change
(:mod:`lineage.signals.lowrank`, :mod:`lineage.signals.quantgrid`,
:mod:`lineage.signals.roundnoise`, :mod:`lineage.signals.merge`).
"""

from __future__ import annotations

import torch

from lineage.io.dtypes import FLOAT_FORMATS


def float_grid(x: torch.Tensor) -> str:
    """The narrowest float format ("bf16", "fp16" or "fp32") that represents every value of ``x`` exactly."""
    if x.numel() == 0:
        return "bf16"
    x = x.detach().to(torch.float32)
    if x.dim() >= 2 and x.shape[0] > 64:
        # a row sample first: most tensors are settled by it
        probe = x[:: max(1, x.shape[0] // 32)]
        if float_grid(probe) == "fp32":
            return "fp32"
    if not bool(torch.isfinite(x).all()):
        return "fp32"
    if bool(((x.contiguous().view(torch.int32) & 0xFFFF) == 0).all()):
        return "bf16"
    if float(x.abs().max()) <= 65504.0 and bool((x.to(torch.float16).to(torch.float32) == x).all()):
        return "fp16"
    return "fp32"


def half_ulp(x: torch.Tensor, grid: str) -> torch.Tensor:
    """Half the spacing of ``grid`` at each value of ``x`` (the worst rounding error)."""
    fmt = FLOAT_FORMATS[grid]
    _, e = torch.frexp(x.to(torch.float32))
    e = torch.clamp(e - 1, min=fmt.min_exponent)
    return torch.ldexp(torch.full_like(x, 0.5, dtype=torch.float32), e - fmt.mantissa_bits)
