"""The fast moment kernel agrees with its float64 reference on awkward shapes and dtypes."""

from __future__ import annotations

import math

import pytest
import torch

from lineage.signals.similarity import similarity_from_moments
from lineage_kernels.moments import pair_moments, pair_moments_reference


@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (1823, 781), (5,), (0, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fast_matches_reference(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    a = torch.randn(shape, generator=g).to(dtype)
    b = (a.float() * 0.7 + 0.3 * torch.randn(shape, generator=g)).to(dtype)
    ref = pair_moments_reference(a, b)
    fast = pair_moments(a, b, chunk_elems=1000)
    assert fast.dtype == torch.float64 and fast.shape == (7,)
    assert torch.allclose(fast, ref, rtol=1e-5, atol=1e-6 * max(1.0, float(ref[3])))


def test_blocks_add_up() -> None:
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(100, 30, generator=g), torch.randn(100, 30, generator=g)
    whole = pair_moments(a, b)
    parts = pair_moments(a[:37], b[:37]) + pair_moments(a[37:], b[37:])
    # float32 chunk sums: compare against the scale of the sums, not each (possibly near-zero) entry
    scale = float(whole[3] + whole[4])
    assert torch.allclose(whole, parts, rtol=1e-6, atol=1e-6 * scale)
    assert torch.allclose(whole, pair_moments_reference(a, b), rtol=1e-6, atol=1e-6 * scale)


def test_similarity_figures() -> None:
    torch.manual_seed(0)
    a = torch.randn(300, 200)
    s = similarity_from_moments(pair_moments(a, a))
    assert s.identical and s.rel_l2 == 0.0 and abs(s.cosine - 1) < 1e-6 and abs(s.pearson - 1) < 1e-6
    s = similarity_from_moments(pair_moments(a, -a))
    assert abs(s.pearson + 1) < 1e-6 and not s.identical
    s = similarity_from_moments(pair_moments(a, torch.randn(300, 200)))
    assert abs(s.pearson) < 0.02
    b = a + 0.1 * torch.randn(300, 200)
    s = similarity_from_moments(pair_moments(a, b))
    assert abs(s.rel_l2 - 0.1) < 0.01


def test_constant_vectors_have_no_pearson() -> None:
    s = similarity_from_moments(pair_moments(torch.ones(64), torch.ones(64) * 1.01))
    assert s.pearson is None and s.cosine is not None and s.cosine > 0.999


def test_nonfinite_detected() -> None:
    torch.manual_seed(0)
    a = torch.randn(10, 10)
    b = a.clone()
    b[3, 3] = math.nan
    s = similarity_from_moments(pair_moments(a, b))
    assert not s.finite and s.pearson is None
    m = pair_moments(a, b)
    assert math.isfinite(float(m[3])) and not math.isfinite(float(m[4]))
