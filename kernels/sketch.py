"""Sketches for the anatomy and the fingerprints: projections of A − B and Gram blocks of sampled rows.

``project_diff(A, B, omega)`` returns ``(A − B) @ Ω`` (float32, ``(m, k)``) for two
equally shaped ``(m, n)`` matrices in any dense storage dtype (``float32``,
``float16``, ``bfloat16``, ``float8``) and a seeded ``(n, k)`` sketch ``Ω``
(:func:`gaussian_sketch`).  On CUDA a Triton kernel forms the difference in
registers, so A and B are each read once and ``A − B`` never exists in memory; on
the CPU row blocks of the difference are formed in float32 and multiplied.

``gram_rows(A, rows)`` returns the float32 Gram block ``A[rows] @ A[rows].T`` of the
sampled rows (a single matmul: cuBLAS / the CPU BLAS are the best tool, on every
device).  The ``*_reference`` functions do the same in float64 on the CPU.
"""

from __future__ import annotations

import torch

from lineage_kernels.stored_moments import use_triton

#: Rows of the difference formed at once on the CPU (bounded memory).
ROW_BLOCK = 1024


def gaussian_sketch(n: int, k: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Seeded standard normal ``(n, k)`` float32 matrix, identical on every device."""
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randn(n, k, generator=gen, dtype=torch.float32).to(device)


def _check(A: torch.Tensor, B: torch.Tensor, omega: torch.Tensor) -> None:
    if A.dim() != 2 or A.shape != B.shape or omega.dim() != 2 or omega.shape[0] != A.shape[1]:
        raise ValueError(f"project_diff: need A, B (m, n) and Ω (n, k); got {tuple(A.shape)}, "
                         f"{tuple(B.shape)}, {tuple(omega.shape)}")


def project_diff_reference(A: torch.Tensor, B: torch.Tensor, omega: torch.Tensor, *,
                           backend: str = "auto") -> torch.Tensor:
    """Float64 ``(A − B) @ Ω`` on the CPU (``backend`` ignored)."""
    _check(A, B, omega)
    a = A.detach().to("cpu", torch.float64)
    b = B.detach().to("cpu", torch.float64)
    return (a - b) @ omega.detach().to("cpu", torch.float64)


def project_diff(A: torch.Tensor, B: torch.Tensor, omega: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Float32 ``(A − B) @ Ω`` on the operands' device (see module docstring)."""
    _check(A, B, omega)
    if use_triton(backend, A, B):
        from lineage_kernels.triton_kernels import project_diff_triton

        return project_diff_triton(A.detach(), B.detach(), omega.detach())
    w = omega.detach().to(A.device, torch.float32)
    out = torch.empty(A.shape[0], w.shape[1], dtype=torch.float32, device=A.device)
    for r in range(0, A.shape[0], ROW_BLOCK):
        d = A[r : r + ROW_BLOCK].detach().float() - B[r : r + ROW_BLOCK].detach().float()
        torch.mm(d, w, out=out[r : r + d.shape[0]])
    return out


def _rows(A: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    if A.dim() != 2:
        raise ValueError(f"gram_rows: expected a 2-D matrix, got shape {tuple(A.shape)}")
    return rows.to(device=A.device, dtype=torch.int64).reshape(-1)


def gram_rows_reference(A: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Float64 Gram block of the sampled rows (CPU)."""
    idx = _rows(A, rows).cpu()
    x = A.detach().cpu().index_select(0, idx).to(torch.float64)
    return x @ x.T


def gram_rows(A: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Float32 Gram block ``A[rows] @ A[rows].T`` on ``A``'s device."""
    x = A.detach().index_select(0, _rows(A, rows)).float()
    return x @ x.T
