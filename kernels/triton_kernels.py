"""Triton kernels: pair moments over stored operands, projections of A − B, lattice residuals.

Each launcher here has the contract of the torch function that dispatches to it
(:mod:`lineage_kernels.stored_moments`, :mod:`lineage_kernels.sketch`,
:mod:`lineage_kernels.lattice`).  They run on CUDA tensors, or on CPU tensors
under Triton's interpreter (``TRITON_INTERPRET=1`` set before this module is
imported), which is how the test-suite checks them without a GPU.

Every kernel reads each stored byte once, decodes it in registers
(:mod:`lineage_kernels.triton_decode`) and accumulates in float32 per lane; the
per-program partial sums are added in float64 on the host.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from lineage_kernels.stored import Stored
from lineage_kernels.triton_decode import (
    FMT_E4M3, FMT_E5M2, FMT_NATIVE, FMT_Q4_K, FMT_Q8_0, decode_raw, load_values,
)

#: True when kernels run in Triton's interpreter (tile sizes shrink to keep tests fast).
INTERPRET = os.environ.get("TRITON_INTERPRET", "") not in ("", "0")
_MAX_ELEMS = (1 << 31) - 1


def _dense_format(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    if t.dtype == torch.float8_e4m3fn:
        return t.view(torch.uint8), FMT_E4M3
    if t.dtype == torch.float8_e5m2:
        return t.view(torch.uint8), FMT_E5M2
    return t, FMT_NATIVE


def _as_2d(t: torch.Tensor) -> torch.Tensor:
    if t.dim() == 2:
        return t
    if t.dim() < 2:
        return t.reshape(1, -1)
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:  # leading dims do not collapse: one copy
        return t.reshape(-1, t.shape[-1])


def operand_args(s: Stored) -> tuple:
    """``(ptr, scale_ptr, cols, s0, s1, FMT, SCALE, FLAT)`` for :func:`load_values`."""
    if s.kind in ("Q8_0", "Q4_K"):
        fmt = FMT_Q8_0 if s.kind == "Q8_0" else FMT_Q4_K
        return s.data, s.data, 1, 0, 0, fmt, 0, True
    t = _as_2d(s.data)
    if t.shape[1] == 0:
        t = t.reshape(0, 1)
    t, fmt = _dense_format(t)
    scale = 0 if s.kind == "dense" else 1 + s.axis
    sptr = s.scale if s.scale is not None else t
    flat = t.is_contiguous()
    return t, sptr, t.shape[1], t.stride(0), t.stride(1), fmt, scale, flat


def _tiles(n: int) -> tuple[int, int, int]:
    """``(BLOCK, ITERS, grid)``: lanes per program, blocks per program, programs."""
    block = 64 if INTERPRET else 1024
    nblocks = triton.cdiv(n, block)
    iters = 1
    target = 4 if INTERPRET else 1024  # programs in flight
    while nblocks > target * iters * 2 and iters < (16 if INTERPRET else 256):
        iters *= 2
    return block, iters, triton.cdiv(nblocks, iters)


@triton.jit
def _moments_kernel(a_ptr, as_ptr, a_cols, a_s0, a_s1, b_ptr, bs_ptr, b_cols, b_s0, b_s1, part_ptr, n,
                    FMT_A: tl.constexpr, SCALE_A: tl.constexpr, FLAT_A: tl.constexpr,
                    FMT_B: tl.constexpr, SCALE_B: tl.constexpr, FLAT_B: tl.constexpr,
                    BLOCK: tl.constexpr, ITERS: tl.constexpr):
    pid = tl.program_id(0)
    lanes = tl.arange(0, BLOCK)
    s_a = tl.zeros([BLOCK], dtype=tl.float32)
    s_b = tl.zeros([BLOCK], dtype=tl.float32)
    s_aa = tl.zeros([BLOCK], dtype=tl.float32)
    s_bb = tl.zeros([BLOCK], dtype=tl.float32)
    s_ab = tl.zeros([BLOCK], dtype=tl.float32)
    s_dd = tl.zeros([BLOCK], dtype=tl.float32)
    for it in tl.range(0, ITERS):
        idx = (pid * ITERS + it) * BLOCK + lanes
        mask = idx < n
        x = load_values(a_ptr, as_ptr, idx, mask, a_cols, a_s0, a_s1, FMT_A, SCALE_A, FLAT_A)
        y = load_values(b_ptr, bs_ptr, idx, mask, b_cols, b_s0, b_s1, FMT_B, SCALE_B, FLAT_B)
        d = x - y
        s_a += x
        s_b += y
        s_aa += x * x
        s_bb += y * y
        s_ab += x * y
        s_dd += d * d
    out = part_ptr + pid * 6
    tl.store(out, tl.sum(s_a, axis=0))
    tl.store(out + 1, tl.sum(s_b, axis=0))
    tl.store(out + 2, tl.sum(s_aa, axis=0))
    tl.store(out + 3, tl.sum(s_bb, axis=0))
    tl.store(out + 4, tl.sum(s_ab, axis=0))
    tl.store(out + 5, tl.sum(s_dd, axis=0))


def pair_moments_stored_triton(a: Stored, b: Stored) -> torch.Tensor:
    """Seven moment sums of two stored operands (float64 CPU tensor), in one Triton pass."""
    n = a.numel
    if n == 0:
        return torch.zeros(7, dtype=torch.float64)
    if n > _MAX_ELEMS:
        raise ValueError(f"pair_moments (triton): {n} values exceed one launch; split the tensor")
    block, iters, grid = _tiles(n)
    part = torch.empty(grid, 6, dtype=torch.float32, device=a.device)
    pa, sa, ca, a0, a1, fa, ka, la = operand_args(a)
    pb, sb, cb, b0, b1, fb, kb, lb = operand_args(b)
    _moments_kernel[(grid,)](pa, sa, ca, a0, a1, pb, sb, cb, b0, b1, part, n,
                             FMT_A=fa, SCALE_A=ka, FLAT_A=la, FMT_B=fb, SCALE_B=kb, FLAT_B=lb,
                             BLOCK=block, ITERS=iters)
    sums = part.double().sum(dim=0).cpu()
    return torch.cat([torch.tensor([float(n)], dtype=torch.float64), sums])


@triton.jit
def _project_kernel(a_ptr, b_ptr, w_ptr, out_ptr, M, N, K, sa0, sa1, sb0, sb1, sw0, sw1,
                    FMT_A: tl.constexpr, FMT_B: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rk = tl.program_id(1) * BK + tl.arange(0, BK)
    acc = tl.zeros([BM, BK], dtype=tl.float32)
    for n0 in tl.range(0, N, BN):
        rn = n0 + tl.arange(0, BN)
        m2 = (rm[:, None] < M) & (rn[None, :] < N)
        x = decode_raw(tl.load(a_ptr + rm[:, None] * sa0 + rn[None, :] * sa1, mask=m2, other=0), FMT_A)
        y = decode_raw(tl.load(b_ptr + rm[:, None] * sb0 + rn[None, :] * sb1, mask=m2, other=0), FMT_B)
        d = tl.where(m2, x - y, 0.0)
        mw = (rn[:, None] < N) & (rk[None, :] < K)
        w = tl.load(w_ptr + rn[:, None] * sw0 + rk[None, :] * sw1, mask=mw, other=0).to(tl.float32)
        acc += tl.dot(d, w, input_precision="ieee")
    mo = (rm[:, None] < M) & (rk[None, :] < K)
    tl.store(out_ptr + rm[:, None] * K + rk[None, :], acc, mask=mo)


def project_diff_triton(A: torch.Tensor, B: torch.Tensor, omega: torch.Tensor) -> torch.Tensor:
    """``(A − B) @ Ω`` in float32 with the difference formed in registers (one read of A and B)."""
    M, N = A.shape
    K = omega.shape[1]
    out = torch.empty(M, K, dtype=torch.float32, device=A.device)
    if M == 0 or K == 0:
        return out
    if N == 0:
        return out.zero_()
    a, fa = _dense_format(A)
    b, fb = _dense_format(B)
    w = omega if omega.dtype in (torch.float32, torch.float16, torch.bfloat16) else omega.float()
    bm, bn, bk = (16, 16, 16) if INTERPRET else (64, 64, min(128, max(16, triton.next_power_of_2(K))))
    grid = (triton.cdiv(M, bm), triton.cdiv(K, bk))
    _project_kernel[grid](a, b, w, out, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                          w.stride(0), w.stride(1), FMT_A=fa, FMT_B=fb, BM=bm, BN=bn, BK=bk)
    return out


@triton.jit
def _lattice_kernel(x_ptr, st_ptr, out_ptr, R, C, s0, s1, FMT: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    rr = tl.program_id(0) * BR + tl.arange(0, BR)
    rmask = rr < R
    step = tl.load(st_ptr + rr, mask=rmask, other=1.0).to(tl.float32)
    sq = tl.zeros([BR], dtype=tl.float32)
    top = tl.zeros([BR], dtype=tl.float32)
    for c0 in tl.range(0, C, BC):
        cc = c0 + tl.arange(0, BC)
        m2 = rmask[:, None] & (cc[None, :] < C)
        x = decode_raw(tl.load(x_ptr + rr[:, None] * s0 + cc[None, :] * s1, mask=m2, other=0), FMT)
        t = x / step[:, None]
        r = tl.where(m2, t - tl.floor(t + 0.5), 0.0)
        sq += tl.sum(r * r, axis=1)
        top = tl.maximum(top, tl.max(tl.abs(r), axis=1))
    tl.store(out_ptr + rr * 2, sq, mask=rmask)
    tl.store(out_ptr + rr * 2 + 1, top, mask=rmask)


def lattice_residual_triton(w: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """Per-row ``[Σ r², max |r|]`` (float64, rows × 2) of a 2-D ``w`` against per-row steps."""
    R, C = w.shape
    out = torch.zeros(R, 2, dtype=torch.float32, device=w.device)
    if R == 0 or C == 0:
        return out.double().cpu()
    x, fmt = _dense_format(w)
    br, bc = (4, 32) if INTERPRET else (4, 1024)
    _lattice_kernel[(triton.cdiv(R, br),)](x, step.float().contiguous(), out, R, C, x.stride(0), x.stride(1),
                                            FMT=fmt, BR=br, BC=bc)
    return out.double().cpu()
