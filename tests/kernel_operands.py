"""Stored operands of every format for the kernel tests (deterministic, tiny)."""

from __future__ import annotations

import torch

from lineage_kernels.stored import GGUF_BLOCKS, Stored

DENSE = (torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2)
#: Every operand format: dense dtypes, int8 per row / per column, GGUF blocks.
FORMATS = tuple(str(d).removeprefix("torch.") for d in DENSE) + ("int8_row", "int8_col", "Q8_0", "Q4_K")


def gguf_bytes(kind: str, n_blocks: int, g: torch.Generator) -> torch.Tensor:
    """Random GGUF blocks with finite, small fp16 ``d`` (and ``dmin``)."""
    _, nbytes = GGUF_BLOCKS[kind]
    raw = torch.randint(0, 256, (n_blocks, nbytes), generator=g, dtype=torch.uint8)
    heads = 2 if kind == "Q4_K" else 1
    d = (torch.rand(n_blocks, heads, generator=g) * 0.02 + 1e-3).half().view(torch.uint8)
    raw[:, : 2 * heads] = d.reshape(n_blocks, 2 * heads)
    return raw.reshape(-1)


def make_operand(fmt: str, shape: tuple[int, int], g: torch.Generator, like: torch.Tensor | None = None) -> Stored:
    """A stored operand of ``fmt`` and ``shape``; dense ones follow ``like`` (float32) plus noise when given."""
    rows, cols = shape
    base = like if like is not None else torch.randn(shape, generator=g)
    if fmt in GGUF_BLOCKS:
        per, _ = GGUF_BLOCKS[fmt]
        n = rows * cols
        assert n % per == 0, (fmt, shape)
        return Stored.gguf(gguf_bytes(fmt, n // per, g), fmt, shape)
    if fmt.startswith("int8"):
        axis = 0 if fmt == "int8_row" else 1
        q = torch.randint(-127, 128, shape, generator=g, dtype=torch.int8)
        return Stored.int8(q, torch.rand(shape[axis], generator=g) * 0.05 + 0.01, axis)
    val = base + 0.1 * torch.randn(shape, generator=g)
    return Stored.dense(val.to(getattr(torch, fmt)))
