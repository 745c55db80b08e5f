"""CPU fast kernels for sketches, lattice checks and batched decompositions against float64 references."""

from __future__ import annotations

import pytest
import torch

from lineage_kernels.batched import (
    batched_eigh, batched_eigh_reference, batched_svdvals, batched_svdvals_reference,
)
from lineage_kernels.lattice import lattice_residual, lattice_residual_reference
from lineage_kernels.sketch import (
    gaussian_sketch, gram_rows, gram_rows_reference, project_diff, project_diff_reference,
)


@pytest.mark.parametrize("shape", [(0, 6, 2), (1, 1, 1), (1500, 33, 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float8_e5m2])
def test_project_diff_cpu(shape: tuple[int, int, int], dtype: torch.dtype) -> None:
    m, n, k = shape
    g = torch.Generator().manual_seed(1)
    A = torch.randn(m, n, generator=g).to(dtype)
    B = torch.randn(n, m, generator=g).to(dtype).T
    W = gaussian_sketch(n, k, seed=3)
    ref = project_diff_reference(A, B, W)
    out = project_diff(A, B, W)
    assert out.shape == (m, k)
    assert torch.allclose(out.double(), ref, rtol=1e-4, atol=1e-4 * max(1.0, float(ref.abs().max()) if m else 1.0))


def test_project_diff_sees_planted_low_rank_delta() -> None:
    g = torch.Generator().manual_seed(2)
    base = torch.randn(200, 120, generator=g)
    delta = torch.randn(200, 2, generator=g) @ torch.randn(2, 120, generator=g)
    Y = project_diff(base + delta, base, gaussian_sketch(120, 6, seed=0))
    s = torch.linalg.svdvals(Y.double())
    assert s[2] < 1e-4 * s[1]  # the sketch spans the rank-2 difference


def test_gram_rows() -> None:
    g = torch.Generator().manual_seed(3)
    A = torch.randn(50, 40, generator=g).to(torch.bfloat16)
    rows = torch.tensor([3, 49, 0, 3])
    ref = gram_rows_reference(A, rows)
    assert torch.allclose(gram_rows(A, rows).double(), ref, rtol=1e-5, atol=1e-4)
    assert gram_rows(A, torch.tensor([], dtype=torch.int64)).shape == (0, 0)


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float8_e4m3fn])
def test_lattice_cpu(axis: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(4)
    shape = (700, 9)
    step = torch.rand(shape[axis], generator=g) + 0.5
    on = torch.round(torch.randn(shape, generator=g) * 3) * (step[:, None] if axis == 0 else step[None, :])
    w = (on + 0.02 * torch.randn(shape, generator=g)).to(dtype)
    ref = lattice_residual_reference(w, step, axis)
    assert torch.allclose(lattice_residual(w, step, axis), ref, rtol=1e-4, atol=1e-5)


def test_lattice_tells_grid_from_noise() -> None:
    g = torch.Generator().manual_seed(5)
    step = torch.full((64,), 0.01)
    on = torch.round(torch.randn(64, 256, generator=g) / 0.01) * 0.01
    off = torch.randn(64, 256, generator=g)
    r_on = lattice_residual(on, step)
    r_off = lattice_residual(off, step)
    assert float(r_on[:, 1].max()) < 1e-3  # every entry on its grid point
    assert abs(float(r_off[:, 0].sum()) / off.numel() - 1 / 12) < 0.01  # uniform residual: mean square 1/12
    with pytest.raises(ValueError, match="positive"):
        lattice_residual(on, torch.zeros(64))


@pytest.mark.parametrize("shape", [(0, 3, 3), (1, 1, 1), (37, 9, 5), (4, 6, 11)])
def test_batched_svdvals(shape: tuple[int, int, int]) -> None:
    X = torch.randn(shape, generator=torch.Generator().manual_seed(6))
    ref = batched_svdvals_reference(X)
    out = batched_svdvals(X)
    assert out.shape == ref.shape
    assert torch.allclose(out.double(), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(0, 3, 3), (1, 1, 1), (3, 5, 8, 8)])
def test_batched_eigh(shape: tuple[int, ...]) -> None:
    X = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    S = X @ X.transpose(-1, -2)
    lam_ref, _ = batched_eigh_reference(S)
    lam, vec = batched_eigh(S)
    assert torch.allclose(lam.double(), lam_ref, rtol=1e-4, atol=1e-4)
    if S.numel():
        rebuilt = vec @ torch.diag_embed(lam) @ vec.transpose(-1, -2)
        assert torch.allclose(rebuilt, S, atol=1e-3)
    with pytest.raises(ValueError, match="square"):
        batched_eigh(torch.zeros(2, 3))
