"""Stage 2 — shared tokens and the residual map ``E_b ≈ E_a M`` fitted on token-anchored rows.

A signed assignment on the column correlations and an orthogonal Procrustes fit share one
cross product; the simpler signed permutation is chosen when it explains nearly as much.
``M`` ``(d_a, d_b)`` has orthonormal columns (``d_b < d_a``: width pruned).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from scipy.optimize import linear_sum_assignment

from lineage.canon.arch import CanonArch, Tensor
from lineage.errors import ShapeMismatchError

def stable_key(s: str) -> bytes:
    return hashlib.sha1(s.encode("utf-8", "surrogatepass")).digest()


def token_pairs(vocab_a: Sequence[str] | None, vocab_b: Sequence[str] | None, n_a: int, n_b: int) -> list[tuple[int, int]]:
    """Row pairs ``(i_a, i_b)`` of shared tokens, ordered by a hash of the token string.

    Matched by string when both vocabularies are given (first id wins for
    duplicated strings, empty strings skipped), else by row index.  The hash
    order makes any prefix a deterministic, tokenizer-independent sample.
    """
    if vocab_a is not None and vocab_b is not None:
        ia: dict[str, int] = {}
        for i, t in enumerate(vocab_a[:n_a]):
            if t and t not in ia:
                ia[t] = i
        pairs = []
        seen: set[str] = set()
        for j, t in enumerate(vocab_b[:n_b]):
            if t and t in ia and t not in seen:
                seen.add(t)
                pairs.append((t, ia[t], j))
        pairs.sort(key=lambda x: stable_key(x[0]))
        return [(i, j) for _, i, j in pairs]
    n = min(n_a, n_b)
    return sorted(((i, i) for i in range(n)), key=lambda p: stable_key(f"#{p[0]}"))


def probe_rows(embed: Tensor, idx: Sequence[int] | Tensor, arch: CanonArch) -> Tensor:
    """Embedding rows as a norm layer would see them: (centred for LayerNorm and) unit-normalised."""
    x = embed[torch.as_tensor(list(idx) if not isinstance(idx, Tensor) else idx, dtype=torch.int64)].float()
    if arch.norm == "layer":
        x = x - x.mean(dim=1, keepdim=True)
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


@dataclass(frozen=True)
class ResidualMap:
    """``E_b ≈ E_a M``: ``M`` ``(d_a, d_b)`` with orthonormal columns."""

    kind: str  # "identity" | "signed_permutation" | "rotation"
    M: Tensor
    residual: float  # relative unexplained energy of the chosen fit on the fit rows
    residual_perm: float
    residual_rot: float
    n_rows: int
    moved: int  # channels whose matched index or sign differs from identity (permutation part)
    off_identity: float  # 1 - Σ M_ii² / ‖M‖²

    def describe(self) -> str:
        d_a, d_b = self.M.shape
        width = f" onto {d_b} of {d_a} channels" if d_b < d_a else ""
        if self.kind == "identity":
            return f"residual stream: identity{width}"
        if self.kind == "signed_permutation":
            return f"residual signed permutation, {self.moved} of {d_b} channels moved{width}"
        return f"residual rotation, {100 * self.off_identity:.0f}% of energy off the identity{width}"

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "M"}
        d["shape"] = list(self.M.shape)
        d["description"] = self.describe()
        return d


def _cross(X_a: Tensor, X_b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(XᵀY, column sums of X, column sums of Y)`` in float64 from one float32 product."""
    xa, xb = X_a.float(), X_b.float()
    return (xa.T @ xb).double(), xa.sum(0, dtype=torch.float64), xb.sum(0, dtype=torch.float64)


def _col_corr(X_a: Tensor, X_b: Tensor, C: Tensor | None = None) -> Tensor:
    """Pearson correlation between every column of ``X_a`` and every column of ``X_b``."""
    n = X_a.shape[0]
    if C is None:
        C, sa, sb = _cross(X_a, X_b)
    else:
        sa, sb = X_a.float().sum(0, dtype=torch.float64), X_b.float().sum(0, dtype=torch.float64)
    cov = C - torch.outer(sa, sb) / n
    va = (X_a.float().pow(2).sum(0, dtype=torch.float64) - sa * sa / n).clamp_min(1e-300)
    vb = (X_b.float().pow(2).sum(0, dtype=torch.float64) - sb * sb / n).clamp_min(1e-300)
    return cov / torch.sqrt(torch.outer(va, vb))


def signed_permutation_fit(X_a: Tensor, X_b: Tensor, C: Tensor | None = None) -> Tensor:
    """``M`` (d_a, d_b): each B channel ← one A channel with a sign, by assignment on |column correlation|."""
    R = _col_corr(X_a, X_b, C)
    ra, cb = linear_sum_assignment(R.abs().numpy(), maximize=True)
    ra_t, cb_t = torch.as_tensor(ra), torch.as_tensor(cb)
    sg = torch.sign(R[ra_t, cb_t])
    M = torch.zeros(R.shape, dtype=torch.float64)
    M[ra_t, cb_t] = torch.where(sg == 0, torch.ones_like(sg), sg)
    return M


def procrustes_fit(X_a: Tensor, X_b: Tensor, C: Tensor | None = None) -> Tensor:
    """Orthogonal Procrustes: ``argmin ‖X_a M − X_b‖`` over ``M`` with orthonormal columns."""
    if C is None:
        C = _cross(X_a, X_b)[0]
    return polar_factor(C)


def polar_factor(C: Tensor) -> Tensor:
    """``U Vᵀ`` of ``C = U S Vᵀ`` (``d_a ≥ d_b``) via the eigendecomposition of ``CᵀC``.

    Float64 up to 512 columns; above, the eigendecomposition runs in float32
    (several times faster than an SVD on CPU) and the products in float64.
    """
    G = C.T @ C
    if G.shape[0] <= 512:
        lam, V = torch.linalg.eigh(G)
    else:
        scale = float(G.diagonal().abs().max().clamp_min(1e-300))
        lam, V = torch.linalg.eigh((G / scale).float())
        lam, V = lam.double() * scale, V.double()
    lam = lam.clamp_min(float(lam.max()) * 1e-12 if lam.numel() else 0.0)
    return (C @ V) @ (V / lam.sqrt()).T


def _rel_residual(X_a: Tensor, X_b: Tensor, M: Tensor, C: Tensor, G_a: Tensor | None) -> float:
    """``‖X_a M − X_b‖² / ‖X_b‖²`` from ``C = X_aᵀX_b`` (and ``G_a = X_aᵀX_a`` when M is not square)."""
    yy = float(X_b.float().pow(2).sum(dtype=torch.float64))
    if M.shape[0] == M.shape[1]:
        xm = float(X_a.float().pow(2).sum(dtype=torch.float64))
    else:
        xm = float((M * (G_a @ M)).sum())
    return (xm - 2.0 * float((M * C).sum()) + yy) / max(yy, 1e-300)


def fit_residual_map(X_a: Tensor, X_b: Tensor, perm_tolerance: float = 0.1) -> ResidualMap:
    """Fit ``X_b ≈ X_a M`` on token-anchored rows; prefer a signed permutation when it explains nearly as much.

    The signed permutation is chosen when its unexplained energy exceeds the
    rotation's by at most ``perm_tolerance`` of the energy the rotation explains.
    One ``d_a × d_b`` cross product feeds both fits.
    """
    if X_a.shape[0] != X_b.shape[0]:
        raise ShapeMismatchError(f"residual fit: row counts differ ({X_a.shape[0]} vs {X_b.shape[0]})")
    if X_b.shape[1] > X_a.shape[1]:
        raise ShapeMismatchError(
            f"residual fit: model B is wider than A ({X_b.shape[1]} > {X_a.shape[1]}); pass the wider model as A")
    C = _cross(X_a, X_b)[0]
    G_a = None if X_a.shape[1] == X_b.shape[1] else (X_a.float().T @ X_a.float()).double()
    Mp = signed_permutation_fit(X_a, X_b, C)
    Mr = procrustes_fit(X_a, X_b, C)
    rp, rr = _rel_residual(X_a, X_b, Mp, C, G_a), _rel_residual(X_a, X_b, Mr, C, G_a)
    d_b = X_b.shape[1]
    idx_a = Mp.abs().argmax(dim=0)
    sgn = Mp[idx_a, torch.arange(d_b)]
    moved = int(((idx_a != torch.arange(d_b)) | (sgn < 0)).sum())
    if rp <= rr + perm_tolerance * max(0.0, 1.0 - rr) + 1e-9:
        kind = "identity" if moved == 0 else "signed_permutation"
        M, res = Mp, rp
    else:
        kind, M, res = "rotation", Mr, rr
    k = min(M.shape)
    diag = torch.diagonal(M[:k, :k])
    off = float(1.0 - diag.pow(2).sum() / M.pow(2).sum().clamp_min(1e-300))
    return ResidualMap(kind, M.float(), max(0.0, res), max(0.0, rp), max(0.0, rr), X_a.shape[0], moved, off)
