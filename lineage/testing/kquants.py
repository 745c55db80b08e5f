"""llama.cpp K-quant writers (Q4_K, Q6_K) and the Q4_K_M tensor-type mix, in numpy.

The ``gguf`` package can read K-quants but not write them; the zoo needs
Q4_K_M files, so this module ports llama.cpp's reference quantisers
(``ggml-quants.c``: ``quantize_row_q4_K_ref`` with ``make_qkx2_quants``, and
``quantize_row_q6_K_ref`` with ``make_qx_quants``), vectorised over blocks.
The byte layout is llama.cpp's, so ``gguf.quants.dequantize`` (an independent
decoder) reads what is written here; the values are not guaranteed bit-identical
to llama.cpp's own quantiser (float summation order differs), only equivalent.

Layouts (one super-block = 256 values of a row):

- **Q4_K** (144 bytes): ``d`` fp16, ``dmin`` fp16, 12 bytes of packed 6-bit
  sub-block scales and mins (8 sub-blocks of 32), 128 bytes of 4-bit codes
  (byte ``32c + l`` holds value ``64c + l`` in the low nibble and ``64c + 32 + l``
  in the high one).  Value = ``d·sc_j·q − dmin·m_j``, ``q`` in 0…15.
- **Q6_K** (210 bytes): 128 bytes low nibbles ``ql``, 64 bytes high 2-bit pairs
  ``qh``, 16 int8 sub-block scales (16 sub-blocks of 16), ``d`` fp16.
  Value = ``d·sc_j·(q − 32)``, ``q`` in 0…63.

:func:`q4_k_m_type` picks the per-tensor type of llama.cpp's ``Q4_K_M`` file type
(``llama_tensor_get_type``): Q6_K for ``output.weight`` (or ``token_embd`` when the
model has no output matrix), Q6_K for ``attn_v`` and ``ffn_down`` on the layers
``use_more_bits`` selects (first and last eighth, and every third in between),
Q4_K for every other matrix, F32 for 1-D tensors.  A matrix whose row length is
not a multiple of 256 cannot hold K-quants; llama.cpp then falls back to Q5_0
(for Q4_K) or Q8_0 (for Q6_K), and so does this module.  Not modelled: the
mixture-of-experts, Falcon and GQA ≥ 8 special cases, and ``attn_qkv`` (Q5_K).
"""

from __future__ import annotations

import logging
import re

import numpy as np

log = logging.getLogger(__name__)

QK_K = 256
Q4_K_BLOCK_BYTES = 144
Q6_K_BLOCK_BYTES = 210
GROUP_MAX_EPS = 1e-15
#: llama.cpp's replacement types for rows that are not a multiple of 256.
K_FALLBACK = {"Q4_K": "Q5_0", "Q6_K": "Q8_0"}


def _rint(x: np.ndarray) -> np.ndarray:
    """llama.cpp's ``nearest_int`` (round half to even, as ``lrintf`` in the default mode)."""
    return np.rint(x)


def _fp16(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float32).astype(np.float16)


def _blocks(x: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(x, dtype=np.float32)
    if a.ndim == 0 or a.shape[-1] % QK_K:
        raise ValueError(f"K-quants need rows that are a multiple of {QK_K} values, got shape {a.shape}")
    return a.reshape(-1, QK_K)


# --------------------------------------------------------------------------- Q4_K

def make_qkx2_quants(x: np.ndarray, w: np.ndarray, nmax: int = 15, rmin: float = -1.0, rdelta: float = 0.1,
                     nstep: int = 20) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Affine ``nmax+1``-level fit of every group (rows of ``x``), weighted by ``w``.

    Returns ``(scale, the_min, L)``: value ≈ ``scale·L − the_min`` with ``the_min ≥ 0``
    (the lattice always reaches down to zero or below) and ``L`` in ``0…nmax``.
    The scale search tries ``nstep+1`` inverse scales ``(rmin + rdelta·k + nmax)/range``
    and keeps the weighted least-squares (scale, min) of the best assignment.
    """
    x = x.astype(np.float32)
    w = w.astype(np.float32)
    mn = np.minimum(x.min(1), 0.0).astype(np.float32)
    mx = x.max(1)
    rng = mx - mn
    flat = rng == 0
    safe = np.where(flat, 1.0, rng).astype(np.float32)
    sum_w = w.sum(1)
    sum_x = (w * x).sum(1)

    iscale = nmax / safe
    scale = 1.0 / iscale
    L = np.clip(_rint(iscale[:, None] * (x - mn[:, None])), 0, nmax)
    best = (w * (scale[:, None] * L + mn[:, None] - x) ** 2).sum(1)
    the_min = mn.copy()
    for k in range(nstep + 1):
        isc = (rmin + rdelta * k + nmax) / safe
        La = np.clip(_rint(isc[:, None] * (x - mn[:, None])), 0, nmax)
        sl = (w * La).sum(1)
        sl2 = (w * La * La).sum(1)
        sxl = (w * La * x).sum(1)
        D = sum_w * sl2 - sl * sl
        ok = D > 0
        Ds = np.where(ok, D, 1.0)
        this_scale = (sum_w * sxl - sum_x * sl) / Ds
        this_min = (sl2 * sum_x - sl * sxl) / Ds
        pos = this_min > 0
        this_min = np.where(pos, 0.0, this_min)
        this_scale = np.where(pos, sxl / np.where(sl2 > 0, sl2, 1.0), this_scale)
        err = (w * (this_scale[:, None] * La + this_min[:, None] - x) ** 2).sum(1)
        better = ok & (err < best)
        L = np.where(better[:, None], La, L)
        best = np.where(better, err, best)
        scale = np.where(better, this_scale, scale)
        the_min = np.where(better, this_min, the_min)
    scale = np.where(flat, 0.0, scale).astype(np.float32)
    L = np.where(flat[:, None], 0, L)
    return scale, (-the_min).astype(np.float32), L.astype(np.uint8)


def pack_q4_k_scales(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Pack 6-bit scales and mins ``(nb, 8)`` into llama.cpp's 12-byte ``scales`` field."""
    ls = ls.astype(np.uint8)
    lm = lm.astype(np.uint8)
    out = np.zeros((ls.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    out[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    return out


def unpack_q4_k_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`pack_q4_k_scales` (llama.cpp's ``get_scale_min_k4``)."""
    s = s.astype(np.uint8)
    sc = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)], axis=1)
    mn = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1)
    return sc, mn


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """Q4_K bytes of ``x`` (last dimension a multiple of 256): shape ``(..., n/256·144)`` uint8."""
    shape = np.shape(x)
    b = _blocks(x)
    nb = b.shape[0]
    sub = b.reshape(nb * 8, 32)
    av = np.sqrt((sub * sub).mean(1, dtype=np.float32))
    weights = av[:, None] + np.abs(sub)
    scales, mins, L = make_qkx2_quants(sub, weights)
    scales = scales.reshape(nb, 8)
    mins = mins.reshape(nb, 8)
    L = L.reshape(nb, 8, 32)
    # llama.cpp starts both maxima at +0 (so a -0.0 min of an all-zero block stores +0)
    max_scale = np.maximum(scales.max(1), 0.0)
    max_min = np.maximum(mins.max(1), 0.0)
    inv_scale = np.where(max_scale > 0, 63.0 / np.where(max_scale > 0, max_scale, 1.0), 0.0)
    inv_min = np.where(max_min > 0, 63.0 / np.where(max_min > 0, max_min, 1.0), 0.0)
    ls = np.clip(_rint(inv_scale[:, None] * scales), 0, 63).astype(np.uint8)
    lm = np.clip(_rint(inv_min[:, None] * mins), 0, 63).astype(np.uint8)
    d16 = _fp16(max_scale / 63.0)
    dmin16 = _fp16(max_min / 63.0)
    d = d16.astype(np.float32)[:, None] * ls.astype(np.float32)
    dm = dmin16.astype(np.float32)[:, None] * lm.astype(np.float32)
    nz = d != 0
    dsafe = np.where(nz, d, 1.0)
    Lq = np.clip(_rint((b.reshape(nb, 8, 32) + dm[:, :, None]) / dsafe[:, :, None]), 0, 15).astype(np.uint8)
    L = np.where(nz[:, :, None], Lq, L).reshape(nb, 4, 2, 32)
    qs = (L[:, :, 0, :] | (L[:, :, 1, :] << 4)).reshape(nb, 128)
    out = np.concatenate([d16.view(np.uint8).reshape(nb, 2), dmin16.view(np.uint8).reshape(nb, 2),
                          pack_q4_k_scales(ls, lm), qs], axis=1)
    return out.reshape(*shape[:-1], shape[-1] // QK_K * Q4_K_BLOCK_BYTES)


def dequantize_q4_k(q: np.ndarray) -> np.ndarray:
    """Our own decoder (tests compare it with ``gguf.quants.dequantize``)."""
    shape = np.shape(q)
    b = np.ascontiguousarray(q, dtype=np.uint8).reshape(-1, Q4_K_BLOCK_BYTES)
    nb = b.shape[0]
    d = b[:, 0:2].copy().view(np.float16).astype(np.float32)
    dmin = b[:, 2:4].copy().view(np.float16).astype(np.float32)
    sc, mn = unpack_q4_k_scales(b[:, 4:16])
    qs = b[:, 16:].reshape(nb, 4, 32)
    L = np.stack([qs & 0xF, qs >> 4], axis=2).reshape(nb, 8, 32).astype(np.float32)
    y = (d * sc)[:, :, None] * L - (dmin * mn)[:, :, None]
    return y.reshape(*shape[:-1], shape[-1] // Q4_K_BLOCK_BYTES * QK_K).astype(np.float32)


# --------------------------------------------------------------------------- Q6_K

def make_qx_quants(x: np.ndarray, nmax: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric ``2·nmax``-level fit of every group (rows of ``x``), weights ``x²`` (rmse_type 1).

    Returns ``(scale, L)`` with value ≈ ``scale·(L − nmax)``; the scale is signed (its
    sign is opposite to the group's largest-magnitude value, as in llama.cpp).
    """
    x = x.astype(np.float32)
    w = x * x
    idx = np.abs(x).argmax(1)
    mx = np.take_along_axis(x, idx[:, None], 1)[:, 0]
    zero = np.abs(mx) < GROUP_MAX_EPS
    safe = np.where(zero, 1.0, mx).astype(np.float32)

    def trial(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        lv = np.clip(_rint(iscale[:, None] * x), -nmax, nmax - 1)
        return lv, (w * x * lv).sum(1), (w * lv * lv).sum(1)

    lv, sumlx, suml2 = trial(-nmax / safe)
    scale = np.where(suml2 > 0, sumlx / np.where(suml2 > 0, suml2, 1.0), 0.0)
    best = scale * sumlx
    L = lv
    for k in range(-9, 10):
        if k == 0:
            continue
        lv, sumlx, suml2 = trial(-(nmax + 0.1 * k) / safe)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        s2 = sumlx / np.where(suml2 > 0, suml2, 1.0)
        L = np.where(better[:, None], lv, L)
        scale = np.where(better, s2, scale)
        best = np.where(better, s2 * sumlx, best)
    scale = np.where(zero, 0.0, scale).astype(np.float32)
    L = np.where(zero[:, None], 0, L + nmax).astype(np.uint8)
    return scale, L


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """Q6_K bytes of ``x`` (last dimension a multiple of 256): shape ``(..., n/256·210)`` uint8."""
    shape = np.shape(x)
    b = _blocks(x)
    nb = b.shape[0]
    scales, L = make_qx_quants(b.reshape(nb * 16, 16))
    scales = scales.reshape(nb, 16)
    L = L.reshape(nb, 16, 16)
    imax = np.abs(scales).argmax(1)
    max_scale = np.take_along_axis(scales, imax[:, None], 1)[:, 0]
    empty = np.abs(max_scale) < GROUP_MAX_EPS
    iscale = np.where(empty, 0.0, -128.0 / np.where(empty, 1.0, max_scale)).astype(np.float32)
    d16 = _fp16(np.where(empty, 0.0, 1.0 / np.where(empty, 1.0, iscale)))
    sc = np.minimum(127, _rint(iscale[:, None] * scales)).astype(np.int8)
    dd = d16.astype(np.float32)[:, None] * sc.astype(np.float32)
    nz = dd != 0
    dsafe = np.where(nz, dd, 1.0)
    Lq = (np.clip(_rint(b.reshape(nb, 16, 16) / dsafe[:, :, None]), -32, 31) + 32).astype(np.uint8)
    L = np.where(nz[:, :, None], Lq, L).reshape(nb, 2, 4, 32)  # halves of 128, quarters of 32
    ql = np.concatenate([L[:, :, 0] & 0xF | ((L[:, :, 2] & 0xF) << 4),
                         L[:, :, 1] & 0xF | ((L[:, :, 3] & 0xF) << 4)], axis=2).reshape(nb, 128)
    qh = ((L[:, :, 0] >> 4) | ((L[:, :, 1] >> 4) << 2) | ((L[:, :, 2] >> 4) << 4)
          | ((L[:, :, 3] >> 4) << 6)).reshape(nb, 64)
    out = np.concatenate([ql, qh, sc.view(np.uint8), d16.view(np.uint8).reshape(nb, 2)], axis=1)
    out[empty] = 0
    return out.reshape(*shape[:-1], shape[-1] // QK_K * Q6_K_BLOCK_BYTES)


def dequantize_q6_k(q: np.ndarray) -> np.ndarray:
    """Our own decoder (tests compare it with ``gguf.quants.dequantize``)."""
    shape = np.shape(q)
    b = np.ascontiguousarray(q, dtype=np.uint8).reshape(-1, Q6_K_BLOCK_BYTES)
    nb = b.shape[0]
    ql = b[:, :128].reshape(nb, 2, 2, 32)
    qh = b[:, 128:192].reshape(nb, 2, 32)
    sc = b[:, 192:208].copy().view(np.int8).astype(np.float32)
    d = b[:, 208:210].copy().view(np.float16).astype(np.float32)
    lo = np.stack([ql[:, :, 0] & 0xF, ql[:, :, 1] & 0xF, ql[:, :, 0] >> 4, ql[:, :, 1] >> 4], axis=2)
    hi = np.stack([(qh >> s) & 3 for s in (0, 2, 4, 6)], axis=2)
    L = (lo | (hi << 4)).astype(np.float32).reshape(nb, 16, 16) - 32
    y = (d * sc)[:, :, None] * L
    return y.reshape(*shape[:-1], shape[-1] // Q6_K_BLOCK_BYTES * QK_K).astype(np.float32)


# --------------------------------------------------------------------------- the Q4_K_M mix

QUANTIZERS = {"Q4_K": quantize_q4_k, "Q6_K": quantize_q6_k}
DEQUANTIZERS = {"Q4_K": dequantize_q4_k, "Q6_K": dequantize_q6_k}

_LAYER = re.compile(r"blk\.(\d+)\.")


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of layers that get the larger type in the ``_M`` mixes."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def q4_k_m_type(name: str, shape: tuple[int, ...], n_layers: int, has_output: bool) -> str:
    """GGML type of tensor ``name`` (GGUF name, torch-order ``shape``) in a Q4_K_M file.

    See the module docstring for the rules and the fallbacks for short rows.
    """
    if len(shape) < 2:
        return "F32"
    kind = "Q4_K"
    m = _LAYER.match(name)
    if name == "output.weight" or (not has_output and name == "token_embd.weight"):
        kind = "Q6_K"
    elif m and (".attn_v." in name or ".ffn_down." in name) and use_more_bits(int(m.group(1)), n_layers):
        kind = "Q6_K"
    row = shape[-1]
    if row % QK_K:
        kind = K_FALLBACK[kind]
        if row % 32:
            return "F32"
    return kind


def quantize(x: np.ndarray, qtype: str) -> np.ndarray:
    """Bytes of ``x`` in ``qtype`` (Q4_K and Q6_K here; other types through ``gguf.quants``)."""
    if qtype in QUANTIZERS:
        return QUANTIZERS[qtype](x)
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize as gq

    return gq(np.asarray(x, dtype=np.float32), GGMLQuantizationType[qtype])
