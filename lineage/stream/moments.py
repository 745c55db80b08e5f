"""Centred moments of a pair of row blocks, merged exactly across blocks.

:func:`block_moments` reduces one block pair ``(x, y)`` (any float dtype, any device) to
its count, means and centred sums — second, third and fourth moments of ``x`` and ``y``,
their cross moment, the second moment of ``d = y − x`` — and the counts of entries that
are exactly zero on one side only.  :func:`merge_moments` combines two such results with
the pairwise update formulas of Chan et al. and Pébay (2008), so a tensor streamed in
blocks gives, to rounding, the statistics of the whole tensor
(:class:`lineage.signals.pairstats.PairStats`) without a second read.

Centred sums are taken over float32 rows of :data:`CHUNK` elements and accumulated in
float64 (relative error near 1e-6, like :func:`lineage.signals.pairstats.pair_stats`);
:func:`block_moments_reference` is the plain float64 version the tests compare against.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lineage.signals.pairstats import CHUNK, PairStats  # CHUNK: elements per float32 partial sum


@dataclass(frozen=True)
class BlockMoments:
    """Count, means and centred sums of a block pair (``c``: centred on the block's own means)."""

    n: int
    mean_x: float
    mean_y: float
    m2x: float
    m3x: float
    m4x: float
    m2y: float
    m3y: float
    m4y: float
    cxy: float
    m2d: float
    zeros_only_x: int
    zeros_only_y: int

    def pair_moments(self) -> torch.Tensor:
        """The seven sums of :func:`lineage_kernels.moments.pair_moments` (float64; ``d = a − b`` there)."""
        n = self.n
        return torch.tensor([float(n), n * self.mean_x, n * self.mean_y, self.m2x + n * self.mean_x**2,
                             self.m2y + n * self.mean_y**2, self.cxy + n * self.mean_x * self.mean_y,
                             self.m2d + n * (self.mean_y - self.mean_x) ** 2], dtype=torch.float64)

    def pair_stats(self) -> PairStats:
        """As :class:`~lineage.signals.pairstats.PairStats` (``d = y − x``)."""
        return PairStats(self.n, self.mean_x, self.mean_y, self.m2x, self.m2y, self.cxy, self.m2d,
                         self.m4x, self.m4y, self.zeros_only_x, self.zeros_only_y)


def block_moments(x: torch.Tensor, y: torch.Tensor, chunk: int = CHUNK) -> BlockMoments:
    """Moments of one block pair (same shape; see module docstring)."""
    return block_reduce(x, y, chunk)[0]


#: Elements per float32 chunk of the streaming pass (whole rows): large enough that the per-operation cost of
#: torch's dispatch stays small beside the arithmetic (the screen runs ~20 operations per chunk), small enough
#: that the chunk's four float32 buffers stay in the last-level cache (a 1.1B-shaped bf16 module on the
#: 2-core machine: 2^16 → 20 ms, 2^18 → 13 ms, 2^19 → 13 ms per 4 M-element block).
STREAM_CHUNK = 1 << 18

#: Receives ``(first_row, d)`` for each row-aligned chunk of a 2-D block that holds a change:
#: ``d`` is ``y − x`` of those rows in float32 (valid only during the call).
RowsHook = Callable[[int, torch.Tensor], None]


def _step(x: torch.Tensor, chunk: int, on_device: bool) -> tuple[int, int]:
    """``(elements per chunk, row width)``: whole rows of a 2-D block (width 0: flat chunks)."""
    n = x.numel()
    if x.dim() == 2 and x.shape[1] > 0:
        width = x.shape[1]
        return (n if on_device else max(1, chunk // width) * width), width
    return (n if on_device else min(chunk, n)), 0


def block_reduce(x: torch.Tensor, y: torch.Tensor, chunk: int = CHUNK,
                 rows_hook: RowsHook | None = None) -> tuple[BlockMoments, int, float]:
    """:func:`block_moments`, plus the number of changed entries (``x != y``) and the largest ``|y − x|``.

    One pass over cache-sized float32 chunks (whole rows of a 2-D block, so ``rows_hook`` can reuse the
    chunk's difference for a sketch): power sums of ``x − c_x`` and ``y − c_y`` with shifts ``c`` taken
    from the first chunk (close to the means, so converting to centred sums loses nothing material),
    accumulated in float64.  Exact-zero and change counts take a mask pass only where a chunk holds
    zeros or a mix of changed and unchanged entries.
    """
    if x.shape != y.shape:
        raise ValueError(f"block_moments: shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
    a = x.detach().reshape(-1)
    b = y.detach().reshape(-1)
    n = a.numel()
    if n == 0:
        return BlockMoments(0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0, 0), 0, 0.0
    dev = a.device
    # on an accelerator one chunk is the block (tree reductions keep float32 sums accurate; fewer launches)
    step, width = _step(x, max(chunk, 1), dev.type != "cpu")
    cx, cy = _shift(a[: min(step, n)]), _shift(b[: min(step, n)])
    xa, ya, da, qa = (torch.empty(min(step, n), dtype=torch.float32, device=dev) for _ in range(4))
    acc = torch.zeros(11, dtype=torch.float64, device=dev)
    p = torch.empty(11, dtype=torch.float64, device=dev)
    changed = zx = zy = 0
    big = 0.0
    for s in range(0, n, step):
        m = min(step, n - s)
        u, v, d, q = xa[:m], ya[:m], da[:m], qa[:m]
        u.copy_(a[s : s + m])
        v.copy_(b[s : s + m])
        torch.sub(v, u, out=d)
        lo, hi = (float(t) for t in torch.aminmax(d))
        big = max(big, hi, -lo) if not (math.isnan(lo) or math.isnan(hi)) else math.nan
        if lo != 0 or hi != 0:
            finite = math.isfinite(lo) and math.isfinite(hi)
            changed += _count_nonzero(d, q) if finite else int(torch.count_nonzero(d))
            if rows_hook is not None and width:
                rows_hook(s // width, d.view(-1, width))
        p[0] = d.sum()
        p[1] = torch.dot(d, d)
        if _centred_sums(u, v, q, cx, cy, p):  # a zero on either side (or an underflow): count exactly
            u.add_(cx)
            v.add_(cy)
            zx += int(((u == 0) & (v != 0)).sum())
            zy += int(((v == 0) & (u != 0)).sum())
        acc += p
    sd, sdd, su, su2, su3, su4, sv, sv2, sv3, sv4, _ = acc.tolist()
    # Σuv from the squares (Σu² + Σv² − Σ(v − u)²)/2: cascaded sums and the small Σd² keep it to about
    # 1e-7 relative, where a float32 dot product of u and v drifts by 1e-6 (too much for 1 − Pearson)
    shift = cy - cx
    suv = 0.5 * (su2 + sv2 - (sdd - 2.0 * shift * sd + n * shift * shift))
    mu, mv = su / n, sv / n
    m2x = su2 - n * mu * mu
    m3x = su3 - 3 * mu * su2 + 2 * n * mu**3
    m4x = su4 - 4 * mu * su3 + 6 * mu * mu * su2 - 3 * n * mu**4
    m2y = sv2 - n * mv * mv
    m3y = sv3 - 3 * mv * sv2 + 2 * n * mv**3
    m4y = sv4 - 4 * mv * sv3 + 6 * mv * mv * sv2 - 3 * n * mv**4
    mom = BlockMoments(n, cx + mu, cy + mv, max(m2x, 0.0), m3x, max(m4x, 0.0), max(m2y, 0.0), m3y, max(m4y, 0.0),
                       suv - n * mu * mv, max(sdd - sd * sd / n, 0.0), zx, zy)
    return mom, changed, big


def _count_nonzero(d: torch.Tensor, scratch: torch.Tensor) -> int:
    """Entries of the finite ``d`` that are not zero: ``sign(d)·sign(d)`` summed (exact in float32 below 2^24
    entries; about twice as fast as ``torch.count_nonzero`` on the CPU; ``sign`` maps NaN to 0)."""
    if d.numel() >= 1 << 24:
        return int(torch.count_nonzero(d))
    s = torch.sign(d, out=scratch)
    c = float(torch.dot(s, s))
    return int(c) if math.isfinite(c) else int(torch.count_nonzero(d))


def _shift(a: torch.Tensor) -> float:
    """The shift that centres a tensor's power sums: 0 when its mean is small beside its spread
    (weight matrices: no pass is spent on shifting), else the mean of its first chunk."""
    f = a.float()
    mean = float(f.mean())
    if not math.isfinite(mean):
        return 0.0
    return 0.0 if mean * mean <= 0.01 * float(f.var(correction=0)) else mean


def _centred_sums(u: torch.Tensor, v: torch.Tensor, q: torch.Tensor, cx: float, cy: float, p: torch.Tensor) -> bool:
    """``p[2:10]``: Σu, Σu², Σu³, Σu⁴ and the same of v, after shifting u by cx and v by cy (in place).

    Returns whether either side may hold an exact zero (a zero square; with a shift, always checked).
    """
    zero = False
    if cx:
        u.sub_(cx)
    if cy:
        v.sub_(cy)
    for i, w, c in ((2, u, cx), (6, v, cy)):
        torch.mul(w, w, out=q)
        p[i] = w.sum()
        p[i + 1] = q.sum()
        p[i + 2] = torch.dot(q, w)
        p[i + 3] = torch.dot(q, q)
        zero = zero or bool(c) or float(q.amin()) == 0.0
    return zero


def block_moments_reference(x: torch.Tensor, y: torch.Tensor) -> BlockMoments:
    """Float64 reference of :func:`block_moments`."""
    a = x.detach().reshape(-1).to("cpu", torch.float64)
    b = y.detach().reshape(-1).to("cpu", torch.float64)
    n = a.numel()
    if n == 0:
        return BlockMoments(0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0, 0)
    u, v = a - a.mean(), b - b.mean()
    d = v - u
    return BlockMoments(n, float(a.mean()), float(b.mean()), float((u**2).sum()), float((u**3).sum()),
                        float((u**4).sum()), float((v**2).sum()), float((v**3).sum()), float((v**4).sum()),
                        float((u * v).sum()), float((d * d).sum()), int(((a == 0) & (b != 0)).sum()),
                        int(((b == 0) & (a != 0)).sum()))


def _merge1(na: int, nb: int, delta: float, m2a: float, m3a: float, m4a: float, m2b: float, m3b: float,
            m4b: float) -> tuple[float, float, float]:
    n = na + nb
    m2 = m2a + m2b + delta * delta * na * nb / n
    m3 = (m3a + m3b + delta**3 * na * nb * (na - nb) / n**2 + 3.0 * delta * (na * m2b - nb * m2a) / n)
    m4 = (m4a + m4b + delta**4 * na * nb * (na * na - na * nb + nb * nb) / n**3
          + 6.0 * delta * delta * (na * na * m2b + nb * nb * m2a) / n**2 + 4.0 * delta * (na * m3b - nb * m3a) / n)
    return m2, m3, m4


def merge_moments(p: BlockMoments | None, q: BlockMoments) -> BlockMoments:
    """Moments of the union of two disjoint sets of entries (Pébay's pairwise update)."""
    if p is None or p.n == 0:
        return q
    if q.n == 0:
        return p
    na, nb = p.n, q.n
    n = na + nb
    dx, dy = q.mean_x - p.mean_x, q.mean_y - p.mean_y
    m2x, m3x, m4x = _merge1(na, nb, dx, p.m2x, p.m3x, p.m4x, q.m2x, q.m3x, q.m4x)
    m2y, m3y, m4y = _merge1(na, nb, dy, p.m2y, p.m3y, p.m4y, q.m2y, q.m3y, q.m4y)
    cxy = p.cxy + q.cxy + dx * dy * na * nb / n
    dd = dy - dx
    m2d = p.m2d + q.m2d + dd * dd * na * nb / n
    return BlockMoments(n, p.mean_x + dx * nb / n, p.mean_y + dy * nb / n, m2x, m3x, m4x, m2y, m3y, m4y, cxy, m2d,
                        p.zeros_only_x + q.zeros_only_x, p.zeros_only_y + q.zeros_only_y)
