"""Safetensors dtype names, their sizes and their torch equivalents."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DType:
    """A storage dtype: its safetensors name, bytes per element and torch dtype."""

    name: str
    itemsize: int
    torch_dtype: torch.dtype | None
    is_float: bool


def _fp8(name: str) -> torch.dtype | None:
    return getattr(torch, name, None)


DTYPES: dict[str, DType] = {
    d.name: d
    for d in (
        DType("F64", 8, torch.float64, True),
        DType("F32", 4, torch.float32, True),
        DType("F16", 2, torch.float16, True),
        DType("BF16", 2, torch.bfloat16, True),
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
