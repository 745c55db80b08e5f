"""Numba device functions that read one value of a storage format (the CPU twin of ``triton_decode``).

Imported only when numba is (``import numba`` must succeed); the fused kernel lives in
:mod:`lineage_kernels.cpu_moments`.  Every format is a pair ``(seg, val)`` of functions
inlined into the kernel, so one compiled loop reads both operands' bytes once:

- ``seg(D, S, c, i) -> (end, base, shift, scale, offset, cbase)``: for flat value index
  ``i``, the end of the run of values that share one decode rule (a row of an ``int8``
  tensor, a 32-value sub-block of a GGUF tensor; dense formats never end one), the index
  of ``i``'s code in ``D``, and the run's constants.
- ``val(D, S, k, ck, shift, scale, offset) -> float32``: the value whose code is ``D[k]``
  (``ck``: its column, for per-column scales).

``D`` is the data as a 1-D numpy array (``uint16`` for ``bfloat16``/``float16``, ``uint8``
for ``float8_e5m2`` and ``Q4_K``, ``int8`` for ``float8_e4m3fn``, ``int8`` and ``Q8_0``), ``S`` float32 scales
(``int8`` only), ``c`` the number of columns (``int8`` only).  Indices are made unsigned at
the load, which lets LLVM vectorise the loop (numba's negative-index wrap-around does not).
Decoding is exact: ``float16``/``float8`` subnormals, infinities and NaNs included.
"""

from __future__ import annotations

import llvmlite.ir as ir
import numpy as np
from numba import njit, types
from numba.extending import intrinsic, overload

#: Longer than any tensor: the end of a run of a dense format.
NO_END = 1 << 62

_U = np.uint64
_F = np.float32


def _bitcast(src: types.Type, dst: types.Type, width: int):  # type: ignore[no-untyped-def]
    """An intrinsic reinterpreting a value of ``src`` (integers: their low 32 bits) as ``dst``."""

    @intrinsic
    def cast(typingctx, x):  # type: ignore[no-untyped-def]
        if not isinstance(x, src):
            return None

        def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
            v = args[0]
            if isinstance(v.type, ir.IntType) and v.type.width > width:
                v = builder.trunc(v, ir.IntType(width))
            elif isinstance(v.type, ir.IntType) and v.type.width < width:
                v = builder.zext(v, ir.IntType(width))
            return builder.bitcast(v, context.get_value_type(dst))

        return dst(x), codegen

    return cast


#: Low 32 bits of an integer as a float32, and a float32's bits as a uint32.
as_float32 = _bitcast(types.Integer, types.float32, 32)
as_uint32 = _bitcast(types.Float, types.uint32, 32)
_TWO_120 = _F(2.0**120)
_NAN = _F(np.nan)


@intrinsic
def half_bits(typingctx, h):  # type: ignore[no-untyped-def]
    """float16 bits (the low 16 bits of an integer) to float32: LLVM's ``fpext half``, exact for
    every code (subnormals, infinities, NaNs) and one vector instruction (``vcvtph2ps``) on x86."""
    if not isinstance(h, types.Integer):
        return None

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        v = args[0]
        i16 = ir.IntType(16)
        v = builder.trunc(v, i16) if v.type.width > 16 else (builder.zext(v, i16) if v.type.width < 16 else v)
        return builder.fpext(builder.bitcast(v, ir.HalfType()), ir.FloatType())

    return types.float32(h), codegen


# ---- runs: dense formats (one endless run), int8 rows, GGUF sub-blocks -------------------------

@njit
def seg_dense(D, S, c, i):  # type: ignore[no-untyped-def]
    return NO_END, i, 0, _F(1.0), _F(0.0), 0


@njit
def seg_int8_row(D, S, c, i):  # type: ignore[no-untyped-def]
    r = i // c
    return (r + 1) * c, i, 0, S[r], _F(0.0), 0


@njit
def seg_int8_col(D, S, c, i):  # type: ignore[no-untyped-def]
    r = i // c
    return (r + 1) * c, i, 0, _F(1.0), _F(0.0), i - r * c


@njit
def _le16(D, k):  # type: ignore[no-untyped-def]
    return (np.uint32(D[k]) & np.uint32(0xFF)) | ((np.uint32(D[k + 1]) & np.uint32(0xFF)) << np.uint32(8))


@njit
def seg_q8_0(D, S, c, i):  # type: ignore[no-untyped-def]
    blk = i // 32
    l0 = i - blk * 32
    return i - l0 + 32, blk * 34 + 2 + l0, 0, half_bits(_le16(D, blk * 34)), _F(0.0), 0


@njit
def _q4_k_scale_min(D, p, j):  # type: ignore[no-untyped-def]
    """6-bit scale and min of sub-block ``j`` from the 12 packed bytes at ``D[p:p+12]``."""
    if j < 4:
        return np.uint32(D[p + j]) & np.uint32(63), np.uint32(D[p + j + 4]) & np.uint32(63)
    lo, mid, hi = np.uint32(D[p + j - 4]), np.uint32(D[p + j]), np.uint32(D[p + j + 4])
    return (hi & np.uint32(15)) | ((lo >> np.uint32(6)) << np.uint32(4)), \
        (hi >> np.uint32(4)) | ((mid >> np.uint32(6)) << np.uint32(4))


@njit
def seg_q4_k(D, S, c, i):  # type: ignore[no-untyped-def]
    blk = i // 256
    j = (i - blk * 256) // 32
    l0 = i % 32
    p = blk * 144
    sc, mn = _q4_k_scale_min(D, p + 4, j)
    scale = half_bits(_le16(D, p)) * _F(sc)
    offset = -(half_bits(_le16(D, p + 2)) * _F(mn))
    return i - l0 + 32, p + 16 + 32 * (j // 2) + l0, 4 * (j % 2), scale, offset, 0


# ---- values -------------------------------------------------------------------------------------

@njit
def val_float32(D, S, k, ck, shift, scale, offset):  # type: ignore[no-untyped-def]
    return D[_U(k)]


@njit
def val_bfloat16(D, S, k, ck, shift, scale, offset):  # type: ignore[no-untyped-def]
    return as_float32(np.uint32(D[_U(k)]) << np.uint32(16))


@njit
def val_float16(D, S, k, ck, shift, scale, offset):  # type: ignore[no-untyped-def]
    return half_bits(D[_U(k)])


@njit
def val_e5m2(D, S, k, ck, shift, scale, offset):  # type: ignore[no-untyped-def]
    return half_bits(np.uint32(D[_U(k)]) << np.uint32(8))


@njit
def val_e4m3(D, S, k, ck, shift, scale, offset):  # type: ignore[no-untyped-def]
    """The byte (read as int8) sign-extended and shifted puts sign and magnitude in float32's
    places; times 2^120 rebiases the exponent (subnormals stay exact).  S.1111.111 is NaN."""
    bits = np.uint32(np.int32(D[_U(k)]) << np.int32(20)) & np.uint32(0x87F00000)
    x = as_float32(bits) * _TWO_120
    return _NAN if (bits & np.uint32(0x07F00000)) == np.uint32(0x07F00000) else x


@njit
def val_int8_row(D, S, k, ck, shift, scale, offset):  # type: ignore[no-untyped-def]
    return _F(D[_U(k)]) * scale


@njit
def val_int8_col(D, S, k, ck, shift, scale, offset):  # type: ignore[no-untyped-def]
    return _F(D[_U(k)]) * S[_U(ck)]


@njit
def val_q8_0(D, S, k, ck, shift, scale, offset):  # type: ignore[no-untyped-def]
    return _F(D[_U(k)]) * scale


@njit
def val_q4_k(D, S, k, ck, shift, scale, offset):  # type: ignore[no-untyped-def]
    return _F((np.uint32(D[_U(k)]) >> np.uint32(shift)) & np.uint32(15)) * scale + offset


#: Format name -> (seg, val, numpy dtype of D); its code for :func:`seg` and :func:`val` is its position.
FORMATS = {
    "float32": (seg_dense, val_float32, np.float32),
    "bfloat16": (seg_dense, val_bfloat16, np.uint16),
    "float16": (seg_dense, val_float16, np.uint16),
    "float8_e4m3fn": (seg_dense, val_e4m3, np.int8),
    "float8_e5m2": (seg_dense, val_e5m2, np.uint8),
    "int8_row": (seg_int8_row, val_int8_row, np.int8),
    "int8_col": (seg_int8_col, val_int8_col, np.int8),
    "Q8_0": (seg_q8_0, val_q8_0, np.int8),
    "Q4_K": (seg_q4_k, val_q4_k, np.uint8),
}

#: Format name -> code (a compile-time constant of the kernel).
CODES = {name: k for k, name in enumerate(FORMATS)}
_SEGS = tuple(f[0] for f in FORMATS.values())
_VALS = tuple(f[1] for f in FORMATS.values())


def seg(code, D, S, c, i):  # type: ignore[no-untyped-def]
    """``seg`` of the format whose code is the compile-time constant ``code``."""
    raise NotImplementedError("only callable from numba-compiled code")


def val(code, D, S, k, ck, shift, scale, offset):  # type: ignore[no-untyped-def]
    """``val`` of the format whose code is the compile-time constant ``code``."""
    raise NotImplementedError("only callable from numba-compiled code")


@overload(seg)
def _seg_impl(code, D, S, c, i):  # type: ignore[no-untyped-def]
    if not isinstance(code, types.IntegerLiteral):  # None: numba then retries with the literal
        return None
    f = _SEGS[code.literal_value]

    def impl(code, D, S, c, i):  # type: ignore[no-untyped-def]
        return f(D, S, c, i)
    return impl


@overload(val)
def _val_impl(code, D, S, k, ck, shift, scale, offset):  # type: ignore[no-untyped-def]
    if not isinstance(code, types.IntegerLiteral):
        return None
    f = _VALS[code.literal_value]

    def impl(code, D, S, k, ck, shift, scale, offset):  # type: ignore[no-untyped-def]
        return f(D, S, k, ck, shift, scale, offset)
    return impl
