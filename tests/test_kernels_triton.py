"""Every Triton kernel against its float64 reference, on awkward shapes and every storage format.

Without a GPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set
here before Triton is imported), on tiny inputs because the interpreter is slow.
``LINEAGE_TEST_DEVICE=cuda`` runs the same tests compiled on the GPU
(benchmarks/gpu_kernels.sh).
"""

from __future__ import annotations

import os

import pytest
import torch

ON_CUDA = os.environ.get("LINEAGE_TEST_DEVICE") == "cuda" and torch.cuda.is_available()
if not ON_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from kernel_operands import DENSE, FORMATS, make_operand  # noqa: E402

from lineage_kernels.lattice import lattice_residual, lattice_residual_reference  # noqa: E402
from lineage_kernels.sketch import gaussian_sketch, project_diff, project_diff_reference  # noqa: E402
from lineage_kernels.stored import Stored, dequantise_reference  # noqa: E402
from lineage_kernels.stored_moments import pair_moments_stored, pair_moments_stored_reference  # noqa: E402

DEV = "cuda" if ON_CUDA else "cpu"


def _to_dev(s: Stored) -> Stored:
    return Stored(s.kind, s.data.to(DEV), s.shape, None if s.scale is None else s.scale.to(DEV), s.axis)


def _close_moments(a: Stored, b: Stored) -> None:
    ref = pair_moments_stored_reference(a, b)
    fast = pair_moments_stored(_to_dev(a), _to_dev(b), backend="triton")
    scale = max(1.0, float(ref[3] + ref[4]))
    assert fast[0] == ref[0]
    assert torch.allclose(fast, ref, rtol=1e-5, atol=1e-6 * scale), (fast, ref)


@pytest.mark.parametrize("fmt", FORMATS)
def test_moments_each_format_against_bf16(fmt: str) -> None:
    g = torch.Generator().manual_seed(3)
    shape = (3, 256) if fmt in ("Q8_0", "Q4_K") else (5, 37)
    a = make_operand(fmt, shape, g)
    b = Stored.dense((dequantise_reference(a) + 0.05 * torch.randn(shape, generator=g)).to(torch.bfloat16))
    _close_moments(a, b)
    _close_moments(b, a)


def test_moments_gguf_against_gguf_and_int8() -> None:
    g = torch.Generator().manual_seed(4)
    _close_moments(make_operand("Q4_K", (2, 256), g), make_operand("Q8_0", (2, 256), g))
    _close_moments(make_operand("int8_row", (9, 7), g), make_operand("int8_col", (9, 7), g))


@pytest.mark.parametrize("shape", [(0, 5), (1, 1), (1, 300), (13, 7)])
@pytest.mark.parametrize("dtype", DENSE)
def test_moments_awkward_shapes(shape: tuple[int, int], dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(5)
    a = torch.randn(shape, generator=g).to(dtype)
    b = torch.randn(shape[::-1], generator=g).to(dtype).T  # non-contiguous
    _close_moments(Stored.dense(a), Stored.dense(b))


def test_moments_strided_and_3d() -> None:
    g = torch.Generator().manual_seed(6)
    a = torch.randn(4, 6, 10, generator=g).to(torch.float16)[:, 1:5, ::3]  # no 2-D view without a copy
    b = torch.randn(4, 4, 4, generator=g).to(torch.float16)
    _close_moments(Stored.dense(a), Stored.dense(b))


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the interpreter's numpy on inf - inf
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_float8_decode_every_byte(dtype: torch.dtype) -> None:
    raw = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype)
    vals = raw.float()
    keep = torch.isfinite(vals)
    a = raw.reshape(16, 16).clone()
    a.view(torch.uint8).reshape(-1)[~keep] = 0  # NaN / inf bytes -> +0
    out = project_diff(a.to(DEV), torch.zeros(16, 16, dtype=dtype, device=DEV),
                       torch.eye(16, device=DEV), backend="triton").cpu()
    assert torch.equal(out.reshape(-1)[keep], vals[keep])
    bad = raw[~keep][:1].reshape(1, 1)  # a NaN (e4m3: S.1111.111) or infinity (e5m2) byte
    sums = pair_moments_stored(Stored.dense(bad.to(DEV)), Stored.dense(torch.zeros(1, 1, dtype=dtype, device=DEV)),
                               backend="triton")
    assert not torch.isfinite(sums[1]) and torch.isnan(sums[1]) == torch.isnan(vals[~keep][0])


@pytest.mark.parametrize("shape", [(0, 8, 3), (1, 1, 1), (19, 37, 5), (33, 20, 17)])
@pytest.mark.parametrize("dtype", DENSE)
def test_project_diff(shape: tuple[int, int, int], dtype: torch.dtype) -> None:
    m, n, k = shape
    g = torch.Generator().manual_seed(7)
    A = torch.randn(m, n, generator=g).to(dtype)
    B = torch.randn(n, m, generator=g).to(dtype).T
    W = gaussian_sketch(n, k, seed=1)
    ref = project_diff_reference(A, B, W)
    out = project_diff(A.to(DEV), B.to(DEV), W.to(DEV), backend="triton").cpu()
    assert out.shape == (m, k) and out.dtype == torch.float32
    assert torch.allclose(out.double(), ref, rtol=1e-4, atol=1e-4 * max(1.0, float(ref.abs().max()) if ref.numel() else 1.0))


@pytest.mark.parametrize("shape", [(0, 4), (1, 1), (7, 45)])
@pytest.mark.parametrize("dtype", DENSE)
@pytest.mark.parametrize("axis", [0, 1])
def test_lattice_residual(shape: tuple[int, int], dtype: torch.dtype, axis: int) -> None:
    g = torch.Generator().manual_seed(8)
    step = torch.rand(shape[axis], generator=g) * 0.2 + 0.05
    grid = torch.round(torch.randn(shape, generator=g) * 4) * (step[:, None] if axis == 0 else step[None, :])
    w = (grid + 0.01 * torch.randn(shape, generator=g)).to(dtype)
    ref = lattice_residual_reference(w, step, axis)
    out = lattice_residual(w.to(DEV), step.to(DEV), axis, backend="triton")
    assert out.shape == (shape[axis], 2)
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-5)
