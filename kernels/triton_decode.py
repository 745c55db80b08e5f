"""Triton device functions that read one value per lane from a storage format.

Imported only when Triton is (``import triton`` must succeed); the launchers live in
:mod:`lineage_kernels.triton_kernels`.  Format codes (``FMT``, compile-time):

====  =======================================================================
0     native load, converted to float32 (``float32``, ``float16``, ``bfloat16``, ``int8``)
1     ``float8_e4m3fn`` read as its bytes and decoded bit by bit
2     ``float8_e5m2`` read as its bytes (the top byte of a float16)
3     GGUF ``Q8_0`` blocks (raw bytes, flat value index)
4     GGUF ``Q4_K`` blocks (raw bytes, flat value index)
====  =======================================================================

Float8 goes through its bytes because Triton's interpreter cannot convert float8
tensors, and the decode costs a few integer operations per byte on the GPU.
``SCALE`` (compile-time): 0 none, 1 one scale per row, 2 one scale per column.
"""

from __future__ import annotations

import triton
import triton.language as tl

FMT_NATIVE, FMT_E4M3, FMT_E5M2, FMT_Q8_0, FMT_Q4_K = 0, 1, 2, 3, 4


@triton.jit
def decode_e4m3(raw):
    """float8_e4m3fn bytes (uint8) to float32: bias 7, no infinities, NaN at S.1111.111."""
    u = raw.to(tl.uint32)
    sign = (u >> 7) & 1
    e = (u >> 3) & 15
    m = u & 7
    normal = ((sign << 31) | ((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
    sub = m.to(tl.float32) * 0.001953125  # m · 2^-9
    sub = tl.where(sign == 1, -sub, sub)
    x = tl.where(e == 0, sub, normal)
    nan = (u * 0 + 0x7FC00000).to(tl.float32, bitcast=True)  # a quiet NaN, built from bits
    return tl.where((e == 15) & (m == 7), nan, x)


@triton.jit
def decode_e5m2(raw):
    """float8_e5m2 bytes (uint8) to float32: the byte is the high half of a float16."""
    return (raw.to(tl.uint16) << 8).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _fp16_le(ptr, mask):
    lo = tl.load(ptr, mask=mask, other=0).to(tl.uint16)
    hi = tl.load(ptr + 1, mask=mask, other=0).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _q8_0(ptr, idx, mask):
    base = (idx // 32) * 34
    d = _fp16_le(ptr + base, mask)
    q = tl.load(ptr + base + 2 + idx % 32, mask=mask, other=0).to(tl.int8, bitcast=True)
    return d * q.to(tl.float32)


@triton.jit
def _q4_k(ptr, idx, mask):
    base = (idx // 256) * 144
    e = idx % 256
    j = e // 32
    jl = j % 4
    d = _fp16_le(ptr + base, mask)
    dmin = _fp16_le(ptr + base + 2, mask)
    a = tl.load(ptr + base + 4 + jl, mask=mask, other=0).to(tl.int32)
    b = tl.load(ptr + base + 8 + jl, mask=mask, other=0).to(tl.int32)
    c = tl.load(ptr + base + 12 + jl, mask=mask, other=0).to(tl.int32)
    upper = j >= 4
    sc = tl.where(upper, (c & 15) | ((a >> 6) << 4), a & 63)
    mn = tl.where(upper, (c >> 4) | ((b >> 6) << 4), b & 63)
    byte = tl.load(ptr + base + 16 + 32 * (e // 64) + e % 32, mask=mask, other=0).to(tl.int32)
    q = tl.where(j % 2 == 1, byte >> 4, byte & 15)
    return d * sc.to(tl.float32) * q.to(tl.float32) - dmin * mn.to(tl.float32)


@triton.jit
def decode_raw(raw, FMT: tl.constexpr):
    """Loaded dense values (native or float8 bytes) to float32."""
    if FMT == 1:
        x = decode_e4m3(raw)
    elif FMT == 2:
        x = decode_e5m2(raw)
    else:
        x = raw.to(tl.float32)
    return x


@triton.jit
def load_values(ptr, sptr, idx, mask, cols, s0, s1, FMT: tl.constexpr, SCALE: tl.constexpr, FLAT: tl.constexpr):
    """Float32 values at flat indices ``idx`` of one operand (0 where ``mask`` is false).

    Dense operands are a strided 2-D view (``cols`` columns, strides ``s0``, ``s1``), or
    contiguous (``FLAT``: addressed by ``idx`` directly, no integer division unless a
    scale needs the row or column); GGUF operands are flat bytes.
    """
    if FMT == 3:
        x = _q8_0(ptr, idx, mask)
    elif FMT == 4:
        x = _q4_k(ptr, idx, mask)
    else:
        row = idx // cols
        col = idx % cols
        if FLAT:
            off = idx
        else:
            off = row * s0 + col * s1
        raw = tl.load(ptr + off, mask=mask, other=0)
        x = decode_raw(raw, FMT)
        if SCALE == 1:
            x = x * tl.load(sptr + row, mask=mask, other=0).to(tl.float32)
        elif SCALE == 2:
            x = x * tl.load(sptr + col, mask=mask, other=0).to(tl.float32)
    return tl.where(mask, x, 0.0)
