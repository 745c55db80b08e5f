"""Truncated SVD: a randomized float32 kernel and an exact float64 reference.

``randomized_svd(A, k, oversample, n_iter, seed)`` returns ``(U, S, V)`` with
``U`` of shape ``(m, k')``, ``S`` of shape ``(k',)`` (descending) and ``V`` of
shape ``(n, k')`` such that ``A ≈ U @ diag(S) @ V.T``, where
``k' = min(k, m, n)``.  The fast kernel is the Halko–Martinsson–Tropp range
finder: multiply by a seeded Gaussian sketch, orthonormalise, refine with
``n_iter`` power iterations (re-orthonormalising after every product so float32
does not lose the small singular values), then take the exact SVD of the small
projected matrix.  It runs in float32 on the input's device (CPU or CUDA).

``randomized_svd_reference`` has the same signature and returns the exact SVD
truncated to ``k'`` in float64 on the CPU (``oversample``, ``n_iter`` and
``seed`` are accepted and ignored).

``randomized_svd_blocks(row_blocks, shape, k, ...)`` is the streaming variant:
``row_blocks()`` is called once per pass and yields ``(row_start, block)``
pairs covering the rows in order, so a delta ``child − base`` can be produced
block by block and never held whole.  Each pass holds one block plus the
``m × (k + oversample)`` sketch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from lineage_kernels.threads import single_threaded

RowBlocks = Callable[[], Iterable[tuple[int, torch.Tensor]]]


def _small_lapack(device: torch.device):
    """Run small CPU decompositions single-threaded (LAPACK on a few hundred rows gains nothing
    from threads and, on a loaded machine, loses 100x to thread start-up and contention)."""
    return single_threaded(device)


def _target_rank(shape: tuple[int, int], k: int) -> int:
    m, n = shape
    if k < 0:
        raise ValueError(f"randomized_svd: k must be >= 0, got {k}")
    return min(k, m, n)


def _empty(m: int, n: int, dtype: torch.dtype, device: torch.device):
    return (
        torch.zeros(m, 0, dtype=dtype, device=device),
        torch.zeros(0, dtype=dtype, device=device),
        torch.zeros(n, 0, dtype=dtype, device=device),
    )


def _check_matrix(A: torch.Tensor) -> None:
    if A.dim() != 2:
        raise ValueError(f"randomized_svd: expected a 2-D matrix, got shape {tuple(A.shape)}")


def randomized_svd_reference(
    A: torch.Tensor, k: int, oversample: int = 8, n_iter: int = 2, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact float64 SVD of ``A`` truncated to ``min(k, m, n)`` components (CPU)."""
    _check_matrix(A)
    m, n = A.shape
    kk = _target_rank((m, n), k)
    x = A.detach().to("cpu", torch.float64)
    if kk == 0:
        return _empty(m, n, torch.float64, torch.device("cpu"))
    with _small_lapack(x.device):
        U, S, Vh = torch.linalg.svd(x, full_matrices=False)
    return U[:, :kk], S[:kk], Vh[:kk].T.contiguous()


def _orth(Y: torch.Tensor, exact: bool = True) -> torch.Tensor:
    """Orthonormal basis of the columns of ``Y`` (float32), same shape.

    Eigen-decomposition of the float64 Gram matrix, applied twice (the second
    pass restores orthogonality lost to the squared condition number); this is
    matmul-bound and much faster than Householder QR on tall thin matrices on
    CPU.  ``exact=False`` (inside power iterations, where only the span matters)
    does one pass and skips the orthogonality check.  Directions with no numerical energy are filled by the second pass from
    round-off, so the result stays a full orthonormal set; if that fails the
    kernel falls back to Householder QR.
    """
    Q = Y
    for _ in range(2 if exact else 1):
        G = (Q.T @ Q).double()
        with _small_lapack(G.device):
            lam, W = torch.linalg.eigh(G)
        top = float(lam.max()) if lam.numel() else 0.0
        if not top > 0:
            break
        lam = lam.clamp_min(top * 1e-12)
        Q = Q @ (W / lam.sqrt()).to(Q.dtype)
    if not exact:  # inside power iterations only the span matters
        return Q if bool(torch.isfinite(Q[:1]).all()) else torch.linalg.qr(Y, mode="reduced")[0]
    p = Q.shape[1]
    E = Q.T @ Q
    E.diagonal().sub_(1.0)
    err = float(E.abs().max()) if p else 0.0
    if not err <= 1e-4:  # also catches NaN
        Q, _ = torch.linalg.qr(Y, mode="reduced")
    return Q


def randomized_svd(
    A: torch.Tensor, k: int, oversample: int = 8, n_iter: int = 2, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Randomized truncated SVD in float32 on ``A``'s device (see module docstring)."""
    _check_matrix(A)
    m, n = A.shape
    kk = _target_rank((m, n), k)
    dev = A.device
    if kk == 0:
        return _empty(m, n, torch.float32, dev)
    x = A.detach().to(torch.float32)
    p = min(kk + max(oversample, 0), m, n)
    if p >= min(m, n) or min(m, n) <= 64:
        # The sketch would be as large as the matrix: the exact SVD is cheaper and exact.
        with _small_lapack(x.device):
            U, S, Vh = torch.linalg.svd(x, full_matrices=False)
        return U[:, :kk], S[:kk], Vh[:kk].T.contiguous()
    # Work on the orientation with the smaller inner dimension for the sketch.
    transpose = m < n
    if transpose:
        x = x.T
    rows, cols = x.shape
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    omega = torch.randn(cols, p, generator=gen, dtype=torch.float32).to(dev)
    Q = _orth(x @ omega, exact=n_iter <= 0)
    for i in range(max(n_iter, 0)):
        Z = _orth(x.T @ Q, exact=False)
        Q = _orth(x @ Z, exact=i == n_iter - 1)
    B = Q.T @ x  # p × cols
    with _small_lapack(B.device):
        Ub, S, Vh = torch.linalg.svd(B, full_matrices=False)
    U = Q @ Ub[:, :kk]
    V = Vh[:kk].T.contiguous()
    S = S[:kk]
    if transpose:
        U, V = V, U
    return U.contiguous(), S.contiguous(), V


def randomized_svd_blocks(
    row_blocks: RowBlocks,
    shape: tuple[int, int],
    k: int,
    oversample: int = 8,
    n_iter: int = 2,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Randomized SVD of a matrix given as row blocks (streaming; float32).

    ``row_blocks()`` must yield ``(row_start, block)`` with blocks of shape
    ``(rows, n)`` that together cover all ``m`` rows exactly once; it is called
    ``2 + 2 * n_iter`` times.  Results match :func:`randomized_svd` up to the
    randomness of the sketch.
    """
    m, n = int(shape[0]), int(shape[1])
    kk = _target_rank((m, n), k)
    dev = torch.device(device)
    if kk == 0:
        return _empty(m, n, torch.float32, dev)
    p = min(kk + max(oversample, 0), m, n)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    omega = torch.randn(n, p, generator=gen, dtype=torch.float32).to(dev)

    def times(right: torch.Tensor) -> torch.Tensor:  # A @ right  (m × p)
        out = torch.empty(m, right.shape[1], dtype=torch.float32, device=dev)
        seen = 0
        for r0, blk in row_blocks():
            b = blk.to(dev, torch.float32)
            out[r0 : r0 + b.shape[0]] = b @ right
            seen += b.shape[0]
        if seen != m:
            raise ValueError(f"randomized_svd_blocks: blocks covered {seen} rows, expected {m}")
        return out

    def t_times(left: torch.Tensor) -> torch.Tensor:  # A.T @ left  (n × p)
        out = torch.zeros(n, left.shape[1], dtype=torch.float32, device=dev)
        for r0, blk in row_blocks():
            b = blk.to(dev, torch.float32)
            out += b.T @ left[r0 : r0 + b.shape[0]]
        return out

    Q = _orth(times(omega), exact=n_iter <= 0)
    for i in range(max(n_iter, 0)):
        Z = _orth(t_times(Q), exact=False)
        Q = _orth(times(Z), exact=i == n_iter - 1)
    Bt = t_times(Q)  # = (Q.T A).T, n × p
    with _small_lapack(Bt.device):
        Vb, S, Uh = torch.linalg.svd(Bt, full_matrices=False)  # Bt = Vb S Uh  ⇒  B = Uh.T S Vb.T
    U = Q @ Uh[:kk].T
    V = Vb[:, :kk].contiguous()
    return U.contiguous(), S[:kk].contiguous(), V
