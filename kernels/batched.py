"""Batched decompositions of many small matrices (per-head blocks, sketched cores).

``batched_svdvals(X)`` returns the singular values (descending) of every matrix of
a ``(..., m, n)`` batch; ``batched_eigh(X)`` the eigenvalues (ascending) and
eigenvectors of every symmetric ``(..., n, n)`` matrix.  The fast versions call
``torch.linalg``'s batched solvers in float32 on the batch's device (cuSOLVER's
batched Jacobi on CUDA, LAPACK looped in C++ on the CPU): for thousands of
matrices under a few hundred rows this beats any hand-written kernel.  On the
CPU they run single-threaded (many small LAPACK calls gain nothing from threads).
The ``*_reference`` versions loop over the matrices in float64 on the CPU.
"""

from __future__ import annotations

import torch

from lineage_kernels.threads import single_threaded


def _check(X: torch.Tensor, square: bool) -> None:
    if X.dim() < 2 or (square and X.shape[-1] != X.shape[-2]):
        raise ValueError(f"batched: need (..., m, n){' square' if square else ''} matrices, got {tuple(X.shape)}")


def batched_svdvals_reference(X: torch.Tensor) -> torch.Tensor:
    """Float64 singular values of each matrix, one LAPACK call per matrix."""
    _check(X, False)
    x = X.detach().to("cpu", torch.float64)
    flat = x.reshape(-1, *x.shape[-2:])
    k = min(x.shape[-2:])
    out = [torch.linalg.svdvals(m) for m in flat]
    return (torch.stack(out) if out else torch.zeros(0, k, dtype=torch.float64)).reshape(*x.shape[:-2], k)


def batched_svdvals(X: torch.Tensor) -> torch.Tensor:
    """Float32 singular values of each matrix of the batch, on its device."""
    _check(X, False)
    x = X.detach().float()
    if x.numel() == 0:
        return torch.zeros(*x.shape[:-2], min(x.shape[-2:]), device=x.device)
    with single_threaded(x.device):
        return torch.linalg.svdvals(x)


def batched_eigh_reference(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 eigenvalues and eigenvectors of each symmetric matrix, one call per matrix."""
    _check(X, True)
    x = X.detach().to("cpu", torch.float64)
    flat = x.reshape(-1, *x.shape[-2:])
    n = x.shape[-1]
    if flat.shape[0] == 0:
        return torch.zeros(*x.shape[:-1], dtype=torch.float64), torch.zeros(x.shape, dtype=torch.float64)
    pairs = [torch.linalg.eigh(m) for m in flat]
    lam = torch.stack([p[0] for p in pairs]).reshape(*x.shape[:-2], n)
    vec = torch.stack([p[1] for p in pairs]).reshape(x.shape)
    return lam, vec


def batched_eigh(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 eigenvalues (ascending) and eigenvectors of each symmetric matrix, on its device."""
    _check(X, True)
    x = X.detach().float()
    if x.numel() == 0:
        return torch.zeros(*x.shape[:-1], device=x.device), torch.zeros(x.shape, device=x.device)
    with single_threaded(x.device):
        lam, vec = torch.linalg.eigh(x)
    return lam, vec
