"""Sinkhorn balancing kernel against its float64 reference on awkward shapes."""

from __future__ import annotations

import pytest
import torch

from lineage_kernels.balance import balance, balance_reference


def _profile(m: int, n: int, seed: int) -> torch.Tensor:
    """A variance map like bf16 rounding: powers of 4 by entry, varying by row and column."""
    g = torch.Generator().manual_seed(seed)
    e = torch.randint(-3, 2, (m, n), generator=g).double()
    return (4.0 ** e) * torch.exp(torch.randn(m, 1, generator=g, dtype=torch.float64)) \
        * torch.exp(torch.randn(1, n, generator=g, dtype=torch.float64) * 0.5)


@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (3, 7), (1823, 781), (96, 384)])
def test_fast_matches_reference(shape):
    m, n = shape
    V = _profile(m, n, seed=m + 7 * n)
    a, b, dev = balance(V.float())
    ar, br, devr = balance_reference(V)
    assert dev <= 1e-4 and devr <= 1e-10
    B = a[:, None] * V * b[None, :]
    assert torch.allclose(B.sum(1), torch.full((m,), float(n), dtype=torch.float64), rtol=2e-4)
    assert torch.allclose(B.sum(0), torch.full((n,), float(m), dtype=torch.float64), rtol=2e-4)
    # the product a_i b_j is unique; both normalise it the same way
    assert torch.allclose(a[:, None] * b[None, :], ar[:, None] * br[None, :], rtol=1e-3)
    assert torch.allclose(torch.log(a).mean(), torch.log(b).mean(), atol=1e-6)


def test_separable_profile_is_exact_in_one_step():
    r = torch.tensor([1.0, 4.0, 0.25])
    c = torch.tensor([2.0, 0.5, 1.0, 8.0])
    V = r[:, None] * c[None, :]
    a, b, dev = balance(V)
    assert dev < 1e-5
    assert torch.allclose(a[:, None] * b[None, :] * V.double(), torch.ones(3, 4, dtype=torch.float64), rtol=1e-5)


def test_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        balance(torch.ones(3))
    with pytest.raises(ValueError, match="non-negative"):
        balance(-torch.ones(2, 2))
    with pytest.raises(ValueError, match="empty"):
        balance_reference(torch.ones(0, 3))
