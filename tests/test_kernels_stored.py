"""Storage-format pair moments and dequantisation (CPU torch path) against float64 references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from kernel_operands import FORMATS, gguf_bytes, make_operand

from lineage_kernels.moments import pair_moments_reference
from lineage_kernels.stored import GGUF_BLOCKS, Stored, dequantise, dequantise_reference
from lineage_kernels.stored_moments import (
    pair_moments_dense, pair_moments_stored, pair_moments_stored_reference, use_triton,
)


def _close(fast: torch.Tensor, ref: torch.Tensor) -> None:
    assert fast.dtype == torch.float64 and fast.shape == (7,)
    scale = max(1.0, float(ref[3] + ref[4]))
    assert fast[0] == ref[0]
    assert torch.allclose(fast, ref, rtol=1e-5, atol=1e-6 * scale), (fast, ref)


@pytest.mark.parametrize("kind", sorted(GGUF_BLOCKS))
def test_gguf_dequant_matches_gguf_package(kind: str) -> None:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    g = torch.Generator().manual_seed(5)
    per, nbytes = GGUF_BLOCKS[kind]
    raw = gguf_bytes(kind, 6, g)
    s = Stored.gguf(raw, kind, (2, 3 * per))
    theirs = dequantize(raw.numpy().reshape(6, nbytes), GGMLQuantizationType[kind]).astype(np.float64)
    ours = dequantise_reference(s)
    assert torch.equal(ours.reshape(-1), torch.from_numpy(theirs).reshape(-1))
    assert torch.allclose(dequantise(s).double(), ours, rtol=1e-6, atol=1e-9)


def test_int8_scales_follow_axis() -> None:
    q = torch.tensor([[1, 2], [3, 4]], dtype=torch.int8)
    rows = dequantise_reference(Stored.int8(q, torch.tensor([10.0, 100.0]), 0))
    cols = dequantise_reference(Stored.int8(q, torch.tensor([10.0, 100.0]), 1))
    assert rows.tolist() == [[10, 20], [300, 400]]
    assert cols.tolist() == [[10, 200], [30, 400]]


@pytest.mark.parametrize("fmt_b", FORMATS)
@pytest.mark.parametrize("fmt_a", ["bfloat16", "int8_col", "Q4_K"])
def test_cpu_moments_every_format_pair(fmt_a: str, fmt_b: str) -> None:
    g = torch.Generator().manual_seed(11)
    shape = (3, 512)
    a = make_operand(fmt_a, shape, g)
    b = make_operand(fmt_b, shape, g, like=dequantise_reference(a).float())
    ref = pair_moments_stored_reference(a, b)
    _close(pair_moments_stored(a, b, chunk_elems=300), ref)  # chunks cross blocks and rows
    _close(pair_moments_stored(a, b, backend="torch"), ref)


@pytest.mark.parametrize("shape", [(0, 4), (1, 1), (7, 3), (5, 33)])
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.float16])
def test_cpu_dense_awkward(shape: tuple[int, int], dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(2)
    a = torch.randn(shape, generator=g).to(dtype)
    b = torch.randn(shape[::-1], generator=g).to(dtype).T  # non-contiguous
    _close(pair_moments_dense(a, b), pair_moments_reference(a, b))


def test_mismatched_sizes_and_formats_are_refused() -> None:
    with pytest.raises(ValueError, match="values"):
        pair_moments_stored(Stored.dense(torch.zeros(3)), Stored.dense(torch.zeros(4)))
    with pytest.raises(ValueError, match="hold"):
        Stored.gguf(torch.zeros(33, dtype=torch.uint8), "Q8_0", (32,))
    with pytest.raises(ValueError, match="scales"):
        Stored.int8(torch.zeros(2, 3, dtype=torch.int8), torch.ones(2), 1)
    with pytest.raises(ValueError, match="backend"):
        use_triton("cuda-please", torch.zeros(1))
    assert not use_triton("auto", torch.zeros(1))
