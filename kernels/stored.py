"""Tensors in their storage format, and their dequantisation (float64 reference and float32 fast).

A :class:`Stored` operand is what a checkpoint holds for one tensor, before any
conversion: a dense tensor (``bfloat16``, ``float16``, ``float32``, ``float8_e4m3fn``,
``float8_e5m2``), an ``int8`` tensor with one scale per row or per column, or the raw
bytes of a GGUF tensor in ``Q8_0`` or ``Q4_K`` blocks.  The kernels of
:mod:`lineage_kernels.stored_moments` and :mod:`lineage_kernels.lattice` read these
bytes once and dequantise inside the kernel.

Layouts (llama.cpp's ``ggml-quants``), values in flat (row-major) order:

- **Q8_0** (34 bytes per 32 values): ``d`` fp16, then 32 int8 codes; value ``d·q``.
- **Q4_K** (144 bytes per 256 values): ``d`` fp16, ``dmin`` fp16, 12 bytes of 6-bit
  scales ``sc_j`` and mins ``m_j`` of 8 sub-blocks of 32, then 128 bytes of 4-bit codes
  (byte ``32g + l`` holds value ``64g + l`` in its low nibble and ``64g + 32 + l`` in its
  high one); value ``d·sc_j·q − dmin·m_j``.

``dequantise_reference`` returns float64 on the CPU; ``dequantise`` float32 on the
operand's device (torch ops; used by the CPU fast paths one chunk at a time through
:func:`dequantise_range`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: Values and bytes per block of the GGUF formats handled in-kernel.
GGUF_BLOCKS: dict[str, tuple[int, int]] = {"Q8_0": (32, 34), "Q4_K": (256, 144)}

#: Dense dtypes read natively (``float8`` included).
DENSE_DTYPES: tuple[torch.dtype, ...] = (
    torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2,
)


@dataclass(frozen=True)
class Stored:
    """One tensor in its storage format.

    ``kind`` is ``"dense"``, ``"int8"`` or a GGUF type in :data:`GGUF_BLOCKS`.
    ``data``: the dense tensor, the int8 codes, or the uint8 GGUF bytes (1-D).
    ``scale``: float scales for ``int8`` (length rows for ``axis=0``, columns for ``axis=1``).
    ``shape``: the logical shape of the values.
    """

    kind: str
    data: torch.Tensor
    shape: tuple[int, ...]
    scale: torch.Tensor | None = None
    axis: int = 0

    @staticmethod
    def dense(t: torch.Tensor) -> Stored:
        """A dense floating tensor (any of :data:`DENSE_DTYPES`)."""
        if t.dtype not in DENSE_DTYPES:
            raise ValueError(f"Stored.dense: unsupported dtype {t.dtype}")
        return Stored("dense", t, tuple(t.shape))

    @staticmethod
    def int8(q: torch.Tensor, scale: torch.Tensor, axis: int = 0) -> Stored:
        """Int8 codes ``q`` (rows, cols) with one scale per row (``axis=0``) or column (``axis=1``)."""
        if q.dtype != torch.int8 or q.dim() != 2:
            raise ValueError(f"Stored.int8: need a 2-D int8 tensor, got {q.dtype} {tuple(q.shape)}")
        if axis not in (0, 1) or scale.numel() != q.shape[axis]:
            raise ValueError(f"Stored.int8: {scale.numel()} scales for axis {axis} of {tuple(q.shape)}")
        return Stored("int8", q, tuple(q.shape), scale.reshape(-1), axis)

    @staticmethod
    def gguf(raw: torch.Tensor, ggml_type: str, shape: tuple[int, ...]) -> Stored:
        """Raw GGUF bytes (uint8, whole blocks) of ``ggml_type`` holding values of ``shape``."""
        if ggml_type not in GGUF_BLOCKS:
            raise ValueError(f"Stored.gguf: unsupported type {ggml_type!r} (have {sorted(GGUF_BLOCKS)})")
        per, nbytes = GGUF_BLOCKS[ggml_type]
        n = 1
        for s in shape:
            n *= int(s)
        if raw.dtype != torch.uint8 or n % per or raw.numel() != n // per * nbytes:
            raise ValueError(f"Stored.gguf: {raw.numel()} {raw.dtype} bytes do not hold {shape} in {ggml_type}")
        return Stored(ggml_type, raw.reshape(-1), tuple(int(s) for s in shape))

    @property
    def numel(self) -> int:
        """Number of logical values."""
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        """Bytes the kernel reads (data and scales)."""
        extra = 0 if self.scale is None else self.scale.numel() * self.scale.element_size()
        return self.data.numel() * self.data.element_size() + extra

    @property
    def device(self) -> torch.device:
        """Device of the stored bytes."""
        return self.data.device


def _fp16_at(raw: torch.Tensor, offset: int, nbytes: int) -> torch.Tensor:
    blocks = raw.reshape(-1, nbytes)
    return blocks[:, offset : offset + 2].contiguous().view(torch.float16).reshape(-1)


def _q8_0(raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    blocks = raw.reshape(-1, 34)
    d = _fp16_at(raw, 0, 34).to(dtype)
    q = blocks[:, 2:].contiguous().view(torch.int8).to(dtype)
    return q.mul_(d[:, None]).reshape(-1)


def _q4_k_scales(sc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """6-bit scales and mins (blocks, 8) from the 12 packed bytes (blocks, 12), as uint8."""
    lo_s = sc[:, 0:4] & 63
    lo_m = sc[:, 4:8] & 63
    hi_s = (sc[:, 8:12] & 15) | ((sc[:, 0:4] >> 6) << 4)
    hi_m = (sc[:, 8:12] >> 4) | ((sc[:, 4:8] >> 6) << 4)
    return torch.cat([lo_s, hi_s], dim=1), torch.cat([lo_m, hi_m], dim=1)


def _q4_k(raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    blocks = raw.reshape(-1, 144)
    d = _fp16_at(raw, 0, 144).to(dtype)
    dmin = _fp16_at(raw, 2, 144).to(dtype)
    sc, mn = _q4_k_scales(blocks[:, 4:16])
    qs = blocks[:, 16:].reshape(-1, 4, 1, 32)
    codes = torch.cat([qs & 15, qs >> 4], dim=2).reshape(-1, 8, 32).to(dtype)  # sub-block j = 2g + hi
    scale = (d[:, None] * sc.to(dtype))[:, :, None]
    offset = (dmin[:, None] * mn.to(dtype))[:, :, None]
    return codes.mul_(scale).sub_(offset).reshape(-1)


def _dequant_blocks(kind: str, raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return _q8_0(raw, dtype) if kind == "Q8_0" else _q4_k(raw, dtype)


def _int8_range(s: Stored, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
    """Whole rows scaled by broadcasting; the partial rows at either end by index."""
    cols = s.shape[1]
    flat = s.data.reshape(-1)
    r0, r1 = -(-start // cols), stop // cols
    if r1 <= r0:
        idx = torch.arange(start, stop, device=s.device)
        idx = idx // cols if s.axis == 0 else idx % cols
        return flat[start:stop].to(dtype) * s.scale.to(dtype)[idx]
    sc = s.scale.to(dtype)
    mid = flat[r0 * cols : r1 * cols].view(r1 - r0, cols).to(dtype)
    mid *= sc[r0:r1, None] if s.axis == 0 else sc[None, :]
    parts = [_int8_range(s, start, r0 * cols, dtype)] if start < r0 * cols else []
    parts.append(mid.reshape(-1))
    if r1 * cols < stop:
        parts.append(_int8_range(s, r1 * cols, stop, dtype))
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def dequantise_range(s: Stored, start: int, stop: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Flat values ``start:stop`` of ``s`` in ``dtype`` on its device.

    For GGUF operands ``start`` and ``stop`` must fall on block boundaries (or the end).
    """
    if s.kind == "dense":
        return s.data.reshape(-1)[start:stop].to(dtype)
    if s.kind == "int8":
        return _int8_range(s, start, stop, dtype)
    per, nbytes = GGUF_BLOCKS[s.kind]
    if start % per or (stop % per and stop != s.numel):
        raise ValueError(f"dequantise_range: {start}:{stop} is not on {s.kind} block boundaries")
    b0, b1 = start // per, -(-stop // per)
    return _dequant_blocks(s.kind, s.data[b0 * nbytes : b1 * nbytes], dtype)


def dequantise(s: Stored) -> torch.Tensor:
    """All values of ``s`` in float32 on its device, in ``s.shape``."""
    return dequantise_range(s, 0, s.numel).reshape(s.shape)


def dequantise_reference(s: Stored) -> torch.Tensor:
    """All values of ``s`` in float64 on the CPU, in ``s.shape``."""
    cpu = Stored(s.kind, s.data.detach().cpu(), s.shape,
                 None if s.scale is None else s.scale.detach().cpu(), s.axis)
    return dequantise_range(cpu, 0, cpu.numel, torch.float64).reshape(s.shape)


def chunk_bounds(s: Stored, chunk: int) -> int:
    """A chunk length near ``chunk`` that respects ``s``'s block size."""
    per = GGUF_BLOCKS[s.kind][0] if s.kind in GGUF_BLOCKS else 1
    return max(per, chunk // per * per)
