"""Matrix balancing (Sinkhorn scaling) of a non-negative variance map.

Given per-entry noise variances ``V`` (m × n, non-negative, every row and column
with some positive entry), find positive ``a`` (m) and ``b`` (n) such that
``diag(a) · V · diag(b)`` has every row sum equal to ``n`` and every column sum
equal to ``m``: a noise matrix with that variance profile, scaled entry-wise by
``sqrt(a_i · b_j)``, then has average entry variance 1 in every row and every
column, and its singular values follow the Marchenko–Pastur law of an iid
unit-variance matrix (Landa, Zhang & Kluger, "Biwhitening reveals the rank of a
count matrix", 2022).  Row/column scaling does not change the rank of the signal
underneath, so the whitened matrix can be tested against the known edge
``√m + √n``.

``balance`` runs alternating row/column updates in float32 on the input's device
until the largest relative deviation of a row or column sum is below ``tol``
(default 1e-4) or ``max_iter`` is reached; ``balance_reference`` is the plain
float64 CPU loop run to 1e-10.  Both return ``(a, b, deviation)``; the scale is
fixed by making ``a`` and ``b`` have the same geometric mean.
"""

from __future__ import annotations

import torch

from lineage_kernels.threads import single_threaded


def _check(V: torch.Tensor) -> None:
    if V.dim() != 2:
        raise ValueError(f"balance: expected a 2-D variance map, got shape {tuple(V.shape)}")
    if V.numel() == 0:
        raise ValueError("balance: empty variance map")


def _normalise(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # a·b is what matters; split the common factor evenly (geometric means equal)
    c = torch.exp(0.5 * (torch.log(b).mean() - torch.log(a).mean()))
    return a * c, b / c


def _deviation(V: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> float:
    m, n = V.shape
    rows = a * (V @ b)
    cols = b * (V.T @ a)
    return max(float((rows / n - 1).abs().max()), float((cols / m - 1).abs().max()))


def _loop(V: torch.Tensor, max_iter: int, tol: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    m, n = V.shape
    Vt = V.T
    a = torch.ones(m, dtype=V.dtype, device=V.device)
    b = torch.ones(n, dtype=V.dtype, device=V.device)
    floor = torch.finfo(V.dtype).tiny
    dev = float("inf")
    for it in range(max_iter):
        a = n / (V @ b).clamp_min(floor)
        cs = Vt @ a
        b = m / cs.clamp_min(floor)
        if it % 4 == 3 or it == max_iter - 1:
            dev = _deviation(V, a, b)
            if dev <= tol:
                break
    a, b = _normalise(a, b)
    return a, b, dev


def balance(V: torch.Tensor, *, max_iter: int = 200, tol: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Row and column scales ``(a, b)`` balancing ``V`` (see module docstring), and the final deviation."""
    _check(V)
    if bool((V < 0).any()):
        raise ValueError("balance: variances must be non-negative")
    with single_threaded(V.device):
        a, b, dev = _loop(V.to(torch.float32), max_iter, tol)
    return a.double(), b.double(), dev


def balance_reference(V: torch.Tensor, *, max_iter: int = 20000, tol: float = 1e-10
                      ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Float64 CPU reference of :func:`balance` (same result, run to a tight tolerance)."""
    _check(V)
    if bool((V < 0).any()):
        raise ValueError("balance: variances must be non-negative")
    return _loop(V.detach().to("cpu", torch.float64), max_iter, tol)
