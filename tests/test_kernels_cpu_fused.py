"""The fused CPU pair-moments kernel (numba): every format's decoder code by code, every format pair,
awkward shapes and chunkings against the float64 references, NaN/inf, the torch fallback, threads."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from kernel_operands import FORMATS, make_operand

from lineage_kernels import cpu_moments
from lineage_kernels.moments import pair_moments, pair_moments_reference, pair_moments_torch
from lineage_kernels.stored import Stored, dequantise_reference
from lineage_kernels.stored_moments import pair_moments_stored, pair_moments_stored_reference

pytest.importorskip("numba")


def _close(fast: torch.Tensor | None, ref: torch.Tensor) -> None:
    assert fast is not None and fast.dtype == torch.float64 and fast.shape == (7,)
    assert fast[0] == ref[0]
    scale = max(1.0, float(ref[3] + ref[4]))
    assert torch.allclose(fast, ref, rtol=1e-5, atol=1e-6 * scale), (fast, ref)


@pytest.mark.parametrize("fmt", FORMATS)
def test_decoders_match_the_reference_value_by_value(fmt: str) -> None:
    g = torch.Generator().manual_seed(4)
    s = make_operand(fmt, (3, 512), g)
    ours = cpu_moments.dequantise_fused(s)
    ref = dequantise_reference(s).reshape(-1)
    assert ours is not None and ours.dtype == torch.float32
    assert torch.allclose(ours.double(), ref, rtol=1e-6, atol=1e-30)  # float32 rounding of scale products only
    if fmt in ("float32", "bfloat16", "float16", "float8_e4m3fn", "float8_e5m2"):
        assert torch.equal(ours.double(), ref)  # dense decodes are exact


@pytest.mark.parametrize("dtype, nbits", [(torch.float16, 16), (torch.float8_e4m3fn, 8), (torch.float8_e5m2, 8)])
def test_every_code_decodes_exactly(dtype: torch.dtype, nbits: int) -> None:
    """Subnormals, infinities and NaNs included (float8_e4m3fn: S.1111.111 is NaN, no infinities)."""
    codes = torch.arange(1 << nbits, dtype=torch.int32)
    raw = (codes.to(torch.int16) if nbits == 16 else codes.to(torch.uint8)).view(dtype)
    ours = cpu_moments.dequantise_fused(Stored.dense(raw))
    theirs = raw.float()
    assert ours is not None
    assert torch.equal(torch.isnan(ours), torch.isnan(theirs))
    keep = ~torch.isnan(theirs)
    assert torch.equal(ours[keep], theirs[keep])
    assert int((theirs[keep] != 0).sum()) > 0 and bool(torch.isinf(theirs).any()) == (dtype != torch.float8_e4m3fn)


@pytest.mark.parametrize("fmt_b", FORMATS)
@pytest.mark.parametrize("fmt_a", ["int8_col", "Q4_K"])  # the pairs test_kernels_stored compiles already
def test_every_format_pair_and_chunking(fmt_a: str, fmt_b: str) -> None:
    g = torch.Generator().manual_seed(12)
    a = make_operand(fmt_a, (3, 512), g)
    b = make_operand(fmt_b, (3, 512), g, like=dequantise_reference(a).float())
    ref = pair_moments_stored_reference(a, b)
    for chunk in (1 << 22, 300, 37):  # calls that start inside rows, GGUF blocks and sub-blocks
        _close(cpu_moments.stored_moments(a, b, chunk), ref)
    _close(pair_moments_stored(a, b, backend="numba"), ref)


@pytest.mark.parametrize("shape", [(0, 5), (1, 1), (1, 7), (7, 33), (5, 97)])
@pytest.mark.parametrize("fmt", ["float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2", "int8_row", "int8_col"])
def test_awkward_shapes(shape: tuple[int, int], fmt: str) -> None:
    """Empty, one value, rows shorter and longer than the 32 lanes, runs that do not fill a lane group."""
    g = torch.Generator().manual_seed(3)
    a = make_operand(fmt, shape, g)
    b = make_operand("bfloat16", shape, g, like=dequantise_reference(a).float())
    _close(cpu_moments.stored_moments(b, a), pair_moments_stored_reference(b, a))
    if fmt.startswith("int8"):  # the run of the second operand ends rows too
        _close(cpu_moments.stored_moments(a, b), pair_moments_stored_reference(a, b))


def test_non_contiguous_and_3d_dense_through_pair_moments() -> None:
    g = torch.Generator().manual_seed(6)
    a = torch.randn(4, 6, 10, generator=g).to(torch.bfloat16)[:, 1:5, ::3]
    b = torch.randn(4, 4, 4, generator=g).to(torch.bfloat16).transpose(0, 2)
    fused = pair_moments(a, b)
    assert torch.equal(fused, cpu_moments.dense_moments(a, b))  # pair_moments runs the fused kernel
    _close(fused, pair_moments_reference(a, b))
    _close(pair_moments(a.double(), b.double()), pair_moments_reference(a, b))  # float64: the torch path


def test_long_blocks_sum_in_float64() -> None:
    """A million values with a large common offset: float32 sums over the whole would lose digits."""
    g = torch.Generator().manual_seed(8)
    a = (torch.randn(1000, 1024, generator=g) + 100.0)
    b = a + 1e-3 * torch.randn(1000, 1024, generator=g)
    fused, ref = pair_moments(a, b), pair_moments_reference(a, b)
    assert torch.allclose(fused, ref, rtol=2e-6, atol=0), (fused, ref)


def test_nan_and_inf_propagate_like_the_reference() -> None:
    a = torch.tensor([1.0, 2.0, 3.0]).to(torch.float8_e4m3fn)
    a.view(torch.uint8)[1] = 0x7F  # NaN
    b = torch.tensor([1.0, float("inf"), 0.5], dtype=torch.float16)
    out = cpu_moments.dense_moments(a, b)
    ref = pair_moments_reference(a, b)
    assert out is not None and torch.equal(torch.isnan(out), torch.isnan(ref))


def test_switched_off_falls_back_to_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(9)
    a, b = make_operand("Q4_K", (2, 256), g), make_operand("bfloat16", (2, 256), g)
    monkeypatch.setenv("LINEAGE_CPU_KERNEL", "torch")
    assert not cpu_moments.available() and cpu_moments.stored_moments(a, b) is None
    x, y = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    assert torch.equal(pair_moments(x, y), pair_moments_torch(x, y))
    _close(pair_moments_stored(a, b), pair_moments_stored_reference(a, b))
    with pytest.raises(ValueError, match="numba"):
        pair_moments_stored(a, b, backend="numba")


def test_threads_run_it_concurrently_with_equal_results() -> None:
    g = torch.Generator().manual_seed(10)
    pairs = [(torch.randn(300, 257, generator=g).half(), torch.randn(300, 257, generator=g).half()) for _ in range(4)]
    want = [pair_moments(a, b) for a, b in pairs]
    got: list[torch.Tensor | None] = [None] * len(pairs)

    def work(k: int) -> None:
        got[k] = pair_moments(*pairs[k])

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(pairs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(w, o) for w, o in zip(want, got))


def test_unsupported_operands_decline() -> None:
    x = torch.zeros(3, dtype=torch.float64)
    assert cpu_moments.dense_moments(x, x) is None
    assert np.isclose(float(pair_moments(x + 1, x)[1]), 3.0)
