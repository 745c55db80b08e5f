"""Fast randomized SVD against the float64 reference on awkward shapes and dtypes."""

from __future__ import annotations

import functools

import pytest
import torch

from lineage_kernels.svd import randomized_svd, randomized_svd_blocks, randomized_svd_reference


@functools.lru_cache(maxsize=None)
def _decaying(m: int, n: int, seed: int, decay: float = 0.8) -> torch.Tensor:
    """A matrix with singular values 10·decay^i (only the first ~60 matter)."""
    g = torch.Generator().manual_seed(seed)
    r = min(m, n, 64)
    U, _ = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))
    s = decay ** torch.arange(r, dtype=torch.float64) * 10.0
    return (U * s) @ V.T


def _rel_recon_err(A: torch.Tensor, U, S, V) -> float:
    A64 = A.to(torch.float64)
    R = A64 - (U.to(torch.float64) * S.to(torch.float64)) @ V.to(torch.float64).T
    return float(R.norm() / A64.norm())


@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (3, 7), (1823, 781), (300, 1500)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fast_matches_reference(shape, dtype):
    m, n = shape
    A = _decaying(m, n, seed=m * 31 + n).to(dtype)
    k = 10
    U, S, V = randomized_svd(A, k, oversample=8, n_iter=2, seed=1)
    Ur, Sr, Vr = randomized_svd_reference(A, k)
    kk = min(k, m, n)
    assert U.shape == (m, kk) and S.shape == (kk,) and V.shape == (n, kk)
    assert Ur.shape == (m, kk) and Sr.dtype == torch.float64
    assert U.dtype == torch.float32
    # Singular values agree to float32 accuracy (relative to the largest one).
    assert torch.allclose(S.double(), Sr, rtol=0, atol=2e-5 * float(Sr[0]))
    # Columns are orthonormal.
    assert torch.allclose(U.T.double() @ U.double(), torch.eye(kk, dtype=torch.float64), atol=1e-4)
    assert torch.allclose(V.T.double() @ V.double(), torch.eye(kk, dtype=torch.float64), atol=1e-4)
    # Same rank-k reconstruction error as the exact truncation.
    e_fast = _rel_recon_err(A, U, S, V)
    e_ref = _rel_recon_err(A, Ur, Sr, Vr)
    assert e_fast <= e_ref + 1e-4


def test_k_larger_than_shape_and_zero():
    A = torch.randn(5, 4)
    U, S, V = randomized_svd(A, 50)
    assert S.shape == (4,)
    U, S, V = randomized_svd(A, 0)
    assert S.shape == (0,) and U.shape == (5, 0) and V.shape == (4, 0)
    with pytest.raises(ValueError):
        randomized_svd(torch.randn(3), 1)


def test_flat_tail_low_rank_recovered_exactly():
    # rank-5 matrix: the randomized kernel must find it to float32 accuracy.
    g = torch.Generator().manual_seed(0)
    A = torch.randn(900, 5, generator=g) @ torch.randn(5, 700, generator=g)
    U, S, V = randomized_svd(A, 8, n_iter=1, seed=3)
    Sr = randomized_svd_reference(A, 8)[1]
    assert torch.allclose(S[:5].double(), Sr[:5], rtol=1e-4)
    assert float(S[5]) < 1e-4 * float(S[0])


@functools.lru_cache(maxsize=None)
def _streaming_case():
    A = _decaying(1823, 781, seed=5).float()
    return A, randomized_svd_reference(A, 12)


@pytest.mark.parametrize("block", [1, 97, 4096])
def test_streaming_matches_dense(block):
    A, (Ur, Sr, Vr) = _streaming_case()

    def blocks():
        for r in range(0, A.shape[0], block):
            yield r, A[r : r + block]

    U, S, V = randomized_svd_blocks(blocks, A.shape, 12, seed=2)
    assert torch.allclose(S.double(), Sr, rtol=0, atol=2e-5 * float(Sr[0]))
    assert _rel_recon_err(A, U, S, V) <= _rel_recon_err(A, Ur, Sr, Vr) + 1e-4


def test_streaming_rejects_incomplete_blocks():
    A = torch.randn(100, 80)

    def blocks():
        yield 0, A[:50]

    with pytest.raises(ValueError):
        randomized_svd_blocks(blocks, A.shape, 4)
