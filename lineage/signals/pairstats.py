"""Centred moments of a pair of equally shaped tensors, at memory speed.

``pair_stats(x, y)`` returns, for ``d = y − x``: the element count, the means, the
centred second moments of x, y and d, their cross moment, the centred fourth moments
of x and y, and how many elements are exactly zero on one side only.  From these follow
the Pearson correlation, variances (unbiased, as ``torch.var``) and excess kurtosis that
the direction and anatomy stages use.

Means are float64 sums; the centred sums are taken over cache-sized float32 chunks and
accumulated in float64 (like ``lineage_kernels.moments.pair_moments``), which keeps the
relative error near 1e-6 while avoiding the whole-tensor float64 copies that made these
statistics the slowest part of the anatomy on billion-parameter models.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from lineage.signals.memo import pair_stats_key

#: Elements per float32 chunk (256 KiB per operand: float32 dot products over short chunks stay accurate).
CHUNK = 1 << 16


@dataclass(frozen=True)
class PairStats:
    """Sums over all elements; ``c`` means centred on the tensor's own mean."""

    n: int
    mean_x: float
    mean_y: float
    sxx: float      # Σ (x − x̄)²
    syy: float      # Σ (y − ȳ)²
    sxy: float      # Σ (x − x̄)(y − ȳ)
    sdd: float      # Σ (d − d̄)², d = y − x
    sx4: float      # Σ (x − x̄)⁴
    sy4: float      # Σ (y − ȳ)⁴
    zeros_only_x: int   # x == 0 and y != 0
    zeros_only_y: int   # y == 0 and x != 0

    @property
    def pearson(self) -> float | None:
        den = math.sqrt(self.sxx * self.syy)
        return self.sxy / den if den > 0 else None

    def var(self, which: str) -> float:
        """Unbiased variance of ``x``, ``y`` or ``d`` (``torch.var`` convention)."""
        s = {"x": self.sxx, "y": self.syy, "d": self.sdd}[which]
        return s / (self.n - 1) if self.n > 1 else float("nan")

    def kurtosis(self, which: str) -> float:
        """Excess kurtosis of ``x`` or ``y`` (population moments); 0 for a constant tensor."""
        s2, s4 = (self.sxx, self.sx4) if which == "x" else (self.syy, self.sy4)
        v = s2 / self.n if self.n else 0.0
        return (s4 / self.n) / (v * v) - 3.0 if v > 0 else 0.0


def pair_stats(x: torch.Tensor, y: torch.Tensor, chunk: int = CHUNK) -> PairStats:
    """Centred moments of ``x`` and ``y`` (same shape; any float dtype; see module docstring)."""
    if x.shape != y.shape:
        raise ValueError(f"pair_stats: shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
    a = x.detach().reshape(-1)
    b = y.detach().reshape(-1)
    n = a.numel()
    if n == 0:
        return PairStats(0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0, 0)
    mx = float(a.sum(dtype=torch.float64)) / n
    my = float(b.sum(dtype=torch.float64)) / n
    acc = torch.zeros(6, dtype=torch.float64)
    part = torch.empty(6, dtype=torch.float32)
    zx = zy = 0
    step = min(chunk, n)
    xa = torch.empty(step, dtype=torch.float32)
    ya = torch.empty(step, dtype=torch.float32)
    da = torch.empty(step, dtype=torch.float32)
    sq = torch.empty(step, dtype=torch.float32)
    for s in range(0, n, step):
        m = min(step, n - s)
        xs, ys = a[s : s + m], b[s : s + m]
        nzx, nzy = int(torch.count_nonzero(xs)), int(torch.count_nonzero(ys))
        if nzx < m or nzy < m:  # exact zeros are rare: count them only when present
            zx += int(((xs == 0) & (ys != 0)).sum())
            zy += int(((ys == 0) & (xs != 0)).sum())
        xc, yc, dc, q = xa[:m], ya[:m], da[:m], sq[:m]
        torch.sub(xs, mx, out=xc)
        torch.sub(ys, my, out=yc)
        torch.sub(yc, xc, out=dc)
        part[0] = torch.dot(xc, xc)
        part[1] = torch.dot(yc, yc)
        part[2] = torch.dot(xc, yc)
        part[3] = torch.dot(dc, dc)
        torch.mul(xc, xc, out=q)
        part[4] = torch.dot(q, q)
        torch.mul(yc, yc, out=q)
        part[5] = torch.dot(q, q)
        acc += part.double()
    v = acc.tolist()
    return PairStats(n, mx, my, v[0], v[1], v[2], v[3], v[4], v[5], zx, zy)


def memo_pair_stats(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], role: str) -> PairStats:
    """``pair_stats(a[role], b[role])``, remembered on ``a`` when it offers a ``memo`` dict.

    Read-on-access mappings (:class:`lineage.lazyroles.LazyRoles`) do, so the anatomy's
    relatedness check and the direction signal share one read of every module.
    """
    memo = getattr(a, "memo", None)
    if not isinstance(memo, dict):
        return pair_stats(a[role], b[role])
    key = pair_stats_key(b, role)
    st = memo.get(key)
    if st is None:
        st = pair_stats(a[role], b[role])
        memo[key] = st
    return st
