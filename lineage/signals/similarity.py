"""Element-wise similarity of two aligned tensors: cosine, Pearson, relative L2.

Computed from the moment sums of :mod:`lineage_kernels.moments`, so a tensor
streamed in blocks gives the same answer as the whole tensor.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class Similarity:
    """Similarity of tensor ``a`` (reference) and ``b``.

    ``rel_l2`` is ‖a − b‖ / ‖a‖; ``pearson`` is the centred correlation;
    ``finite`` is False when either tensor holds NaN or Inf (then the other
    figures are None).
    """

    n: int
    cosine: float | None
    pearson: float | None
    rel_l2: float | None
    norm_a: float | None
    norm_b: float | None
    identical: bool
    finite: bool

    def to_dict(self) -> dict[str, object]:
        """Plain-JSON form."""
        return asdict(self)


def _clip(x: float) -> float:
    return max(-1.0, min(1.0, x))


def similarity_from_moments(m: torch.Tensor | list[float]) -> Similarity:
    """Turn the seven moment sums ``[n, Σa, Σb, Σa², Σb², Σab, Σ(a−b)²]`` into a :class:`Similarity`."""
    n, sa, sb, saa, sbb, sab, sdd = (float(v) for v in m)
    count = int(n)
    if not all(math.isfinite(v) for v in (sa, sb, saa, sbb, sab, sdd)):
        return Similarity(count, None, None, None, None, None, False, False)
    na, nb = math.sqrt(max(saa, 0.0)), math.sqrt(max(sbb, 0.0))
    cosine = _clip(sab / (na * nb)) if na > 0 and nb > 0 else None
    pearson = None
    if count > 1:
        va = saa - sa * sa / count
        vb = sbb - sb * sb / count
        cov = sab - sa * sb / count
        # Constant tensors (a norm gain of all ones) have no variance: no correlation.
        tol = 1e-12 * max(saa, sbb, 1e-300)
        if va > tol and vb > tol:
            pearson = _clip(cov / math.sqrt(va * vb))
    rel = math.sqrt(max(sdd, 0.0)) / na if na > 0 else (0.0 if sdd == 0 else None)
    return Similarity(count, cosine, pearson, rel, na, nb, sdd == 0.0, True)
