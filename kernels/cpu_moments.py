"""Fused CPU pair moments over two operands in their storage format (numba).

One compiled loop per pair of formats reads each byte of both operands once, decodes in
registers (:mod:`lineage_kernels.numba_decode`) and accumulates the six sums of
:data:`lineage_kernels.moments.MOMENT_FIELDS` (after ``n``) in float32 over runs of at most
:data:`BLOCK` values, then in float64 across runs: no float32 copy of either operand is
ever made, so the kernel runs at the speed of reading the bytes (measured 0.2–0.6× a
memcpy of the same bytes on one core; ``lineage bench --device cpu --kernel moments``).
The loop releases the GIL, so the compare's reducer threads run it in parallel.

:func:`stored_moments` and :func:`dense_moments` return ``None`` when the fused kernel
cannot run (numba not installed, data not on the CPU, a dtype it does not read, or
``LINEAGE_CPU_KERNEL=torch`` in the environment); callers then take the torch path.
Each format pair is compiled on first use (about a second; cached on disk by numba
where the package directory is writable) and reused.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import threading
from collections.abc import Callable

import numpy as np
import torch

from lineage_kernels.stored import Stored

log = logging.getLogger(__name__)

#: Values summed in float32 (in :data:`LANES` interleaved partial sums) before they are added in float64.
BLOCK = 4096
LANES = 32

#: Stored-operand format name of each dense torch dtype the fused kernel reads.
DENSE_FORMATS: dict[torch.dtype, str] = {
    torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16",
    torch.float8_e4m3fn: "float8_e4m3fn", torch.float8_e5m2: "float8_e5m2",
}
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.float32}

_kernels: dict[tuple[str, str], Callable[..., None]] = {}
_lock = threading.Lock()


def available() -> bool:
    """Whether the fused kernel can run: numba importable and not switched off by ``LINEAGE_CPU_KERNEL=torch``."""
    if os.environ.get("LINEAGE_CPU_KERNEL", "").lower() == "torch":
        return False
    return _numba_works()


@functools.cache
def _numba_works() -> bool:
    if importlib.util.find_spec("numba") is None:
        return False
    try:  # an installed numba can still fail to import (a numpy it does not support)
        import numba  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the environment
        log.warning("numba does not import (%s): CPU pair moments take the slower torch path", e)
        return False
    return True


def _decoders_digest() -> str:
    from lineage_kernels import numba_decode

    with open(numba_decode.__file__, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def _build(fmt_a: str, fmt_b: str) -> Callable[..., None]:
    from numba import njit

    from lineage_kernels.numba_decode import CODES, seg, val

    fa, fb = CODES[fmt_a], CODES[fmt_b]  # plain ints: numba's on-disk cache can key on them
    block, lanes = BLOCK, LANES
    # numba's cache checks this file's time stamp only: key the cache on the decoders' source too
    decoders = _decoders_digest()

    @njit(fastmath={"reassoc", "contract", "nsz"}, nogil=True, cache=True)
    def kernel(A, SA, ca, B, SB, cb, start, stop, out):  # type: ignore[no-untyped-def]
        acc = np.zeros((6, lanes), dtype=np.float32)  # per-lane float32 sums of the current block
        if len(decoders) == 0:  # never true; makes the digest part of the cache key
            return
        i = start
        while i < stop:
            e = min(stop, i + block)
            while i < e:
                ea, ba, sha, sca, ofa, cba = seg(fa, A, SA, ca, i)
                eb, bb, shb, scb, ofb, cbb = seg(fb, B, SB, cb, i)
                m = min(e, ea, eb) - i
                full = m - m % lanes
                for t0 in range(0, full, lanes):  # whole groups of lanes: vector registers, no reduction
                    for lane in range(lanes):
                        t = t0 + lane
                        x = val(fa, A, SA, ba + t, cba + t, sha, sca, ofa)
                        y = val(fb, B, SB, bb + t, cbb + t, shb, scb, ofb)
                        d = x - y
                        acc[0, lane] += x
                        acc[1, lane] += y
                        acc[2, lane] += x * x
                        acc[3, lane] += y * y
                        acc[4, lane] += x * y
                        acc[5, lane] += d * d
                for t in range(full, m):  # the rest of the run, into lane 0
                    x = val(fa, A, SA, ba + t, cba + t, sha, sca, ofa)
                    y = val(fb, B, SB, bb + t, cbb + t, shb, scb, ofb)
                    d = x - y
                    acc[0, 0] += x
                    acc[1, 0] += y
                    acc[2, 0] += x * x
                    acc[3, 0] += y * y
                    acc[4, 0] += x * y
                    acc[5, 0] += d * d
                i += m
            for k in range(6):
                out[k] += np.float64(acc[k].sum())
            acc[:] = 0.0

    return kernel


def kernel_for(fmt_a: str, fmt_b: str) -> Callable[..., None]:
    """The compiled loop for a pair of formats (built once per process)."""
    key = (fmt_a, fmt_b)
    with _lock:
        if key not in _kernels:
            log.debug("building fused CPU moments kernel for %s x %s", fmt_a, fmt_b)
            _kernels[key] = _build(fmt_a, fmt_b)
        return _kernels[key]


def _build_decoder(fmt: str) -> Callable[..., None]:
    from numba import njit

    from lineage_kernels.numba_decode import CODES, seg, val

    f = CODES[fmt]
    decoders = _decoders_digest()

    @njit(nogil=True, cache=True)
    def decode(D, S, c, out):  # type: ignore[no-untyped-def]
        if len(decoders) == 0:  # never true; keys numba's cache on the decoders' source
            return
        i, n = 0, out.size
        while i < n:
            e, base, shift, scale, offset, cbase = seg(f, D, S, c, i)
            for t in range(min(n, e) - i):
                out[i + t] = val(f, D, S, base + t, cbase + t, shift, scale, offset)
            i = min(n, e)

    return decode


def dequantise_fused(s: Stored) -> torch.Tensor | None:
    """All values of ``s`` (flat, float32) decoded by the fused kernel's own decoders, or None.

    For tests: the values the kernel sums, to compare code by code with
    :func:`lineage_kernels.stored.dequantise_reference`.
    """
    if s.device.type != "cpu" or not available():
        return None
    op = _operand(s)
    if op is None:
        return None
    key = (op[0], "")
    with _lock:
        if key not in _kernels:
            _kernels[key] = _build_decoder(op[0])
        decode = _kernels[key]
    out = np.empty(s.numel, dtype=np.float32)
    decode(op[1], op[2], op[3], out)
    return torch.from_numpy(out)


def _dense_array(t: torch.Tensor) -> np.ndarray:
    flat = t.detach().reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    return flat.view(_INT_VIEW[flat.element_size()]).numpy()


def _operand(s: Stored) -> tuple[str, np.ndarray, np.ndarray, int] | None:
    """(format, data, float32 scales, columns) of ``s`` as the kernel reads them, or None."""
    from lineage_kernels.numba_decode import FORMATS

    none = np.zeros(1, dtype=np.float32)
    if s.kind == "dense":
        fmt = DENSE_FORMATS.get(s.data.dtype)
        return None if fmt is None else (fmt, _dense_array(s.data).view(FORMATS[fmt][2]), none, 1)
    if s.kind == "int8":
        fmt = "int8_row" if s.axis == 0 else "int8_col"
        scale = s.scale.detach().to(torch.float32).contiguous().numpy()
        return fmt, _dense_array(s.data).view(np.int8), scale, max(1, s.shape[1])
    if s.kind in ("Q8_0", "Q4_K"):
        return s.kind, s.data.detach().contiguous().numpy().view(FORMATS[s.kind][2]), none, 1
    return None


def stored_moments(a: Stored, b: Stored, chunk_elems: int = 1 << 22) -> torch.Tensor | None:
    """The seven moment sums (float64 CPU tensor) of two stored operands of equal size, or None.

    ``chunk_elems`` is the span of one kernel call (the result does not depend on it).
    """
    if a.device.type != "cpu" or b.device.type != "cpu" or not available():
        return None
    oa, ob = _operand(a), _operand(b)
    if oa is None or ob is None:
        return None
    n = a.numel
    kernel = kernel_for(oa[0], ob[0])
    out = np.zeros(6, dtype=np.float64)
    step = max(1, chunk_elems)
    for s in range(0, n, step):
        kernel(oa[1], oa[2], oa[3], ob[1], ob[2], ob[3], s, min(n, s + step), out)
    return torch.from_numpy(np.concatenate([[float(n)], out]))


def dense_moments(a: torch.Tensor, b: torch.Tensor, chunk_elems: int = 1 << 22) -> torch.Tensor | None:
    """:func:`stored_moments` of two dense tensors of equal size, or None (another dtype or device)."""
    if a.dtype not in DENSE_FORMATS or b.dtype not in DENSE_FORMATS:
        return None
    return stored_moments(Stored.dense(a), Stored.dense(b), chunk_elems)
