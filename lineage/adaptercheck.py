"""Adapter check: is CHILD exactly BASE plus a given PEFT LoRA adapter (B·A per module, scaled)?

Streams each adapted tensor in row blocks; memory stays at a few blocks plus the
adapter's factors.  The residual ‖C − B − s·B_lora·A_lora‖ is compared with the
adapter's own update ‖s·B_lora·A_lora‖ and with the rounding the child's storage
implies (bf16/fp16 spacing or a quantisation lattice, :mod:`lineage.signals.roundnoise`):
a module is verified when the residual is small against the update or is no more than
that rounding, so a merge saved in bf16 or quantised afterwards still verifies, and a
tensor outside the adapter counts as changed only beyond its own re-encoding.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import torch

from lineage.errors import CheckpointError
from lineage.io.adapter import read_adapter
from lineage.io.checkpoint import Checkpoint, open_checkpoint
from lineage.signals.roundnoise import rounding_noise

log = logging.getLogger(__name__)

#: Largest residual, relative to the adapter's update, for a module to count as verified.
VERIFY_REL_RESIDUAL = 0.1
#: Relative change above which a tensor outside the adapter counts as modified …
CHANGED_OUTSIDE = 1e-3
#: … and, when the child's storage rounding is known, residual energy / rounding energy at most this
#: is that rounding (uniform rounding of a block measures 1 ± a few %).
ROUNDING_RESIDUAL = 1.5


@dataclass(frozen=True)
class ModuleCheck:
    """One adapted module: how much of the child's change the adapter explains."""

    module: str
    tensor: str
    rank: int
    scale: float
    rel_update: float  # ‖s·BA‖ / ‖base‖
    rel_residual: float  # ‖child − base − s·BA‖ / ‖s·BA‖
    verified: bool
    #: ‖child − base − s·BA‖² / the energy of the child's storage rounding (None: full precision)
    rounding_ratio: float | None = None


@dataclass(frozen=True)
class AdapterCheck:
    """Outcome of :func:`check_adapter`."""

    adapter: str
    base: str
    child: str
    modules: tuple[ModuleCheck, ...]
    changed_outside: tuple[str, ...]
    missing: tuple[str, ...]
    verified: bool
    summary: str

    def to_dict(self) -> dict[str, object]:
        """Plain-JSON form."""
        return asdict(self)


def _rounding_energy(c: torch.Tensor) -> float | None:
    """Expected energy of the storage rounding of the child block ``c`` (None: full precision)."""
    nz = rounding_noise(c) if c.dim() in (1, 2) else None
    return None if nz is None else float(nz.variance.double().sum())


def _norms(base: Checkpoint, child: Checkpoint, name: str, delta_rows,
           block_rows: int = 4096) -> tuple[float, float, float, float | None]:
    """(‖base‖², ‖update‖², ‖child − base − update‖², rounding energy of the child or None), over row blocks."""
    n_rows = base.tensors[name].n_rows
    sb = su = sr = 0.0
    sv: float | None = 0.0
    for s in range(0, n_rows, block_rows):
        e = min(n_rows, s + block_rows)
        b = base.read(name, s, e).double()
        c = child.read(name, s, e).double()
        u = delta_rows(s, e).double().reshape(b.shape)
        sb += float((b * b).sum())
        su += float((u * u).sum())
        r = c - b - u
        sr += float((r * r).sum())
        if sv is not None:
            v = _rounding_energy(c)
            sv = None if v is None else sv + v
    return sb, su, sr, sv


def _within_rounding(residual: float, rounding: float | None) -> bool:
    return rounding is not None and rounding > 0 and residual <= ROUNDING_RESIDUAL * rounding


def check_adapter(base: str | Checkpoint, child: str | Checkpoint, adapter: str) -> AdapterCheck:
    """Verify ``child ≈ base + adapter`` per module and list tensors changed outside the adapter."""
    factors = read_adapter(adapter)
    cb = base if isinstance(base, Checkpoint) else open_checkpoint(base)
    cc = child if isinstance(child, Checkpoint) else open_checkpoint(child)
    try:
        checks: list[ModuleCheck] = []
        missing: list[str] = []
        adapted: set[str] = set()
        for module, lora in sorted(factors.modules.items()):
            name = module + ".weight"
            if name not in cb.tensors or name not in cc.tensors:
                missing.append(name)
                continue
            if cb.tensors[name].shape != cc.tensors[name].shape:
                raise CheckpointError(
                    f"tensor {name!r} has shape {cc.tensors[name].shape} in the child but "
                    f"{cb.tensors[name].shape} in the base", path=cc.ref)
            adapted.add(name)
            sb, su, sr, sv = _norms(cb, cc, name, lora.delta_rows)
            rel_update = math.sqrt(su / sb) if sb > 0 else math.inf
            rel_res = math.sqrt(sr / su) if su > 0 else (0.0 if sr == 0 else math.inf)
            checks.append(ModuleCheck(module, name, lora.rank, lora.scale, rel_update, rel_res,
                                      rel_res <= VERIFY_REL_RESIDUAL or _within_rounding(sr, sv),
                                      sr / sv if sv else None))
        changed: list[str] = []
        for name, meta in cb.tensors.items():
            if name in adapted or name not in cc.tensors or cc.tensors[name].shape != meta.shape:
                continue
            sb = sd = 0.0
            sv: float | None = 0.0
            for s, blk in cb.iter_blocks(name):
                b = blk.double()
                c = cc.read(name, s, s + (b.shape[0] if b.dim() >= 2 else 1)).double().reshape(b.shape)
                sb += float((b * b).sum())
                sd += float(((c - b) ** 2).sum())
                if sv is not None:
                    v = _rounding_energy(c)
                    sv = None if v is None else sv + v
            if sd > (CHANGED_OUTSIDE**2) * max(sb, 1e-30) and not _within_rounding(sd, sv):
                changed.append(name)
    finally:
        if not isinstance(base, Checkpoint):
            cb.close()
        if not isinstance(child, Checkpoint):
            cc.close()
    ok = bool(checks) and all(c.verified for c in checks) and not missing and not changed
    worst = max((c.rel_residual for c in checks), default=math.nan)
    ratios = [c.rounding_ratio for c in checks if c.rounding_ratio is not None]
    rounding = f"; residual energy ≤ {max(ratios):.2f}× the child's storage rounding" if ratios else ""
    summary = (
        f"{sum(c.verified for c in checks)}/{len(checks)} adapted modules match base + adapter "
        f"(worst residual {worst:.3g} of the update{rounding})"
        + (f"; {len(changed)} tensors changed outside the adapter, e.g. {changed[0]}" if changed else "")
        + (f"; {len(missing)} adapted tensors not found" if missing else "")
    )
    return AdapterCheck(adapter, cb.ref, cc.ref, tuple(checks), tuple(changed), tuple(missing), ok, summary)
