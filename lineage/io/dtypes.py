"""Storage formats in one table: safetensors dtype names, sizes, torch equivalents and float-format facts.

Everything the package knows about a storage format lives here: bytes per element, the float
format's mantissa bits and smallest normal exponent (its lattice: :mod:`lineage.signals.floatgrid`
reads them for rounding steps), its unit roundoff, and bits per weight, GGUF block formats included
(scales counted).  Float formats are also named by the short grid names the signals use
("bf16", "fp16", "fp32", "fp64"): :data:`FLOAT_FORMATS`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FloatFormat:
    """An IEEE-style binary float format: ``mantissa_bits`` stored fraction bits, normals from 2**``min_exponent``."""

    grid: str
    mantissa_bits: int
    min_exponent: int

    @property
    def roundoff(self) -> float:
        """Unit roundoff: the largest relative rounding error, 2**-(mantissa_bits + 1)."""
        return 2.0 ** -(self.mantissa_bits + 1)


FP64 = FloatFormat("fp64", 52, -1022)
FP32 = FloatFormat("fp32", 23, -126)
FP16 = FloatFormat("fp16", 10, -14)
BF16 = FloatFormat("bf16", 7, -126)

#: Float formats by their grid name (as :func:`lineage.signals.floatgrid.float_grid` returns them).
FLOAT_FORMATS: dict[str, FloatFormat] = {f.grid: f for f in (FP64, FP32, FP16, BF16)}


@dataclass(frozen=True)
class DType:
    """A storage dtype: its safetensors name, bytes per element and torch dtype.

    ``float_format`` is set for the formats whose rounding the signals model (fp8 is stored and
    read, but no signal treats it as a rounding lattice, and its unit roundoff is taken as 0).
    """

    name: str
    itemsize: int
    torch_dtype: torch.dtype | None
    is_float: bool
    float_format: FloatFormat | None = None


def _fp8(name: str) -> torch.dtype | None:
    return getattr(torch, name, None)


DTYPES: dict[str, DType] = {
    d.name: d
    for d in (
        DType("F64", 8, torch.float64, True, FP64),
        DType("F32", 4, torch.float32, True, FP32),
        DType("F16", 2, torch.float16, True, FP16),
        DType("BF16", 2, torch.bfloat16, True, BF16),
        DType("F8_E4M3", 1, _fp8("float8_e4m3fn"), True),
        DType("F8_E5M2", 1, _fp8("float8_e5m2"), True),
        DType("I64", 8, torch.int64, False),
        DType("I32", 4, torch.int32, False),
        DType("I16", 2, torch.int16, False),
        DType("I8", 1, torch.int8, False),
        DType("U8", 1, torch.uint8, False),
        DType("BOOL", 1, torch.bool, False),
    )
}

TORCH_TO_NAME: dict[torch.dtype, str] = {
    d.torch_dtype: d.name for d in DTYPES.values() if d.torch_dtype is not None
}

#: GGUF block formats the reader dequantises: name -> (elements per block, bytes per block, scales
#: included); the same figures as the gguf package's ``GGML_QUANT_SIZES`` (tests/test_dtypes.py checks).
GGUF_BLOCKS: dict[str, tuple[int, int]] = {
    "Q8_0": (32, 34), "Q6_K": (256, 210), "Q5_0": (32, 22), "Q5_1": (32, 24), "Q5_K": (256, 176),
    "Q4_0": (32, 18), "Q4_1": (32, 20), "Q4_K": (256, 144), "Q3_K": (256, 110), "Q2_K": (256, 84),
}

#: Storage formats with a bits-per-weight figure (the plain dtypes that hold weights, and GGUF blocks).
_WEIGHT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "I8")


def unit_roundoff(name: str) -> float:
    """Unit roundoff of storage format ``name`` (safetensors or GGUF name, any case); 0.0 when it has none."""
    d = DTYPES.get(name.upper())
    return d.float_format.roundoff if d is not None and d.float_format is not None else 0.0


def bits_per_weight(name: str) -> float | None:
    """Bits per weight of storage format ``name`` (GGUF block formats include their scales); None if unknown."""
    key = name.upper()
    if key in GGUF_BLOCKS:
        elems, nbytes = GGUF_BLOCKS[key]
        return 8.0 * nbytes / elems
    return 8.0 * DTYPES[key].itemsize if key in _WEIGHT_DTYPES else None
