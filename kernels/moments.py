"""Pair moments: the sums from which cosine, Pearson correlation and relative L2 follow.

For two equally shaped tensors ``a`` and ``b`` the kernel returns, in float64::

    [n, Σa, Σb, Σa², Σb², Σab, Σ(a−b)²]

Sums add across blocks, so a tensor streamed in row blocks gives the same result
as the whole tensor.  ``pair_moments_reference`` is the obvious float64
implementation; ``pair_moments`` runs the fused CPU kernel of
:mod:`lineage_kernels.cpu_moments` for CPU tensors it reads (float32, float16,
bfloat16, float8: one read of each byte, float32 sums over 4096 values added in
float64), otherwise converts cache-sized chunks to float32 with torch and accumulates
each chunk's dot products in float64; either keeps the relative error near 1e-7.
Both accept any floating dtype and any device (the fast path runs on the tensors'
device).
"""

from __future__ import annotations

import torch

from lineage_kernels.cpu_moments import dense_moments

#: Names of the seven entries returned by the moment kernels, in order.
MOMENT_FIELDS: tuple[str, ...] = ("n", "sum_a", "sum_b", "sum_aa", "sum_bb", "sum_ab", "sum_dd")

#: Elements per float32 chunk in the fast kernel (2 MiB per operand: stays in cache; measured best of 256K–1M).
CHUNK_ELEMS = 1 << 19


def _check(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"pair_moments: shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")


def pair_moments_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Float64 reference: the seven moment sums of ``a`` and ``b``."""
    _check(a, b)
    x = a.detach().reshape(-1).to("cpu", torch.float64)
    y = b.detach().reshape(-1).to("cpu", torch.float64)
    d = x - y
    return torch.stack(
        [
            torch.tensor(float(x.numel()), dtype=torch.float64),
            x.sum(),
            y.sum(),
            (x * x).sum(),
            (y * y).sum(),
            (x * y).sum(),
            (d * d).sum(),
        ]
    )


def pair_moments(
    a: torch.Tensor, b: torch.Tensor, chunk_elems: int = CHUNK_ELEMS
) -> torch.Tensor:
    """Fast moment sums (same contract as :func:`pair_moments_reference`).

    The result is a float64 CPU tensor of length 7.  CPU tensors of the dtypes the fused
    kernel reads take it (``chunk_elems`` does not apply there); others the torch path.
    """
    _check(a, b)
    if a.device.type == "cpu" and b.device.type == "cpu":
        fused = dense_moments(a, b)
        if fused is not None:
            return fused
    return pair_moments_torch(a, b, chunk_elems)


def pair_moments_torch(
    a: torch.Tensor, b: torch.Tensor, chunk_elems: int = CHUNK_ELEMS
) -> torch.Tensor:
    """:func:`pair_moments` through torch ops on float32 chunks (any device, any floating dtype)."""
    _check(a, b)
    x = a.detach().reshape(-1)
    y = b.detach().reshape(-1)
    n = x.numel()
    dev = x.device
    acc = torch.zeros(6, dtype=torch.float64, device=dev)
    if n == 0:
        return torch.cat([torch.zeros(1, dtype=torch.float64), acc.cpu()])
    chunk = min(chunk_elems, n)
    fa = torch.empty(chunk, dtype=torch.float32, device=dev)
    fb = torch.empty(chunk, dtype=torch.float32, device=dev)
    fd = torch.empty(chunk, dtype=torch.float32, device=dev)
    part = torch.empty(6, dtype=torch.float32, device=dev)
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        xa, xb, xd = fa[:m], fb[:m], fd[:m]
        xa.copy_(x[s : s + m])
        xb.copy_(y[s : s + m])
        torch.sub(xa, xb, out=xd)
        part[0] = xa.sum()
        part[1] = xb.sum()
        part[2] = torch.dot(xa, xa)
        part[3] = torch.dot(xb, xb)
        part[4] = torch.dot(xa, xb)
        part[5] = torch.dot(xd, xd)
        acc += part.double()
    return torch.cat([torch.tensor([float(n)], dtype=torch.float64), acc.cpu()])
