"""Stage 3 — the comparison frame and per-layer unit matching (MLP neurons, kv groups, q heads).

MLP neurons are matched on the *input side* (directions of gate and up rows, per-neuron scale and
up/down sign trading normalised away); attention heads on token-anchored ``X W_qᵀ W_k Xᵀ``
products (invariant to Q/K scale trading and to per-head rotations commuting with RoPE), kv groups
first, then q heads within them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from lineage.canon.arch import CanonArch, LayerDict, Tensor
from lineage.canon.config import K_MATCH, K_TEST, LAP_MAX_UNITS
from lineage_kernels.assign import cosine_matrix, propose_match

@dataclass(frozen=True)
class Frame:
    """Where the two models' residual streams are compared.

    ``Pa`` ``(d_a, k)`` and ``Pb = Mᵀ P`` ``(d_b, k)`` with ``Pa = M Mᵀ P`` (A's
    part that B kept, all of it when the widths agree), so that for derived
    models ``W_a Pa ≈ W_b Pb`` (input side) and ``Paᵀ W_a ≈ Pbᵀ W_b`` (output
    side).  ``P`` is the identity up to ``K_TEST`` dimensions, a fixed random
    orthonormal projection above (a fixed linear map applied to both sides, so
    the null is unchanged); the first ``k_match`` columns serve neuron matching.
    ``XaM`` are A's probe rows expressed in B's basis (``X_a M``).
    """

    Pa: Tensor
    Pb: Tensor
    k_match: int
    XaM: Tensor

    @classmethod
    def build(cls, M: Tensor, X_a: Tensor, k_test: int = K_TEST, k_match: int = K_MATCH, seed: int = 0) -> "Frame":
        d_a = M.shape[0]
        if d_a <= k_test:
            P = torch.eye(d_a)
        else:
            g = torch.Generator().manual_seed(seed)
            P, _ = torch.linalg.qr(torch.randn(d_a, k_test, generator=g))
        Pb = M.T @ P
        Pa = M @ Pb if M.shape[1] < M.shape[0] else P
        return cls(Pa.float().contiguous(), Pb.float().contiguous(), min(k_match, Pa.shape[1]), (X_a @ M).float())

    def inp(self, W: Tensor, side: str, match: bool = False) -> Tensor:
        """Input-side weight ``(out, d)`` → ``(out, k)``."""
        P = self.Pa if side == "a" else self.Pb
        return W @ (P[:, : self.k_match] if match else P)

    def out(self, W: Tensor, side: str) -> Tensor:
        """Output-side weight ``(d, in)`` → ``(k, in)``."""
        P = self.Pa if side == "a" else self.Pb
        return P.T @ W


def _match(S: Tensor) -> tuple[Tensor, Tensor]:
    """Maximum-score matching of rows to columns (exact up to LAP_MAX_UNITS)."""
    if max(S.shape) <= LAP_MAX_UNITS:
        r, c = linear_sum_assignment(S.double().numpy(), maximize=True)
        return torch.as_tensor(r, dtype=torch.int64), torch.as_tensor(c, dtype=torch.int64)
    return propose_match(S)


@dataclass(frozen=True)
class UnitAlignment:
    """A matching of B's units (neurons or heads) to A's."""

    idx_a: Tensor
    idx_b: Tensor
    signs: Tensor  # ±1 per matched pair
    mean_score: float
    moved: int

    def summary(self, what: str) -> dict[str, Any]:
        return {"what": what, "matched": int(self.idx_a.numel()), "moved": self.moved,
                "sign_flips": int((self.signs < 0).sum()), "mean_score": self.mean_score}


def align_mlp(la: LayerDict, lb: LayerDict, arch_a: CanonArch, frame: Frame) -> UnitAlignment | None:
    """Match MLP neurons on input-side directions (gate rows, up rows) seen through ``frame``."""
    up_a, up_b = la.get("mlp.up.weight"), lb.get("mlp.up.weight")
    if up_a is None or up_b is None:
        return None
    S_up = cosine_matrix(frame.inp(up_a, "a", True), frame.inp(up_b, "b", True))
    glu = arch_a.mlp == "glu" and "mlp.gate.weight" in la and "mlp.gate.weight" in lb
    if glu:
        S = cosine_matrix(frame.inp(la["mlp.gate.weight"], "a", True), frame.inp(lb["mlp.gate.weight"], "b", True))
        S += S_up.abs()
    else:
        S = S_up
    ia, ib = _match(S)
    signs = torch.sign(S_up[ia, ib]) if glu else torch.ones(ia.numel())
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    moved = int(((ia != ib) | (signs < 0)).sum())
    return UnitAlignment(ia, ib, signs.float(), float(S[ia, ib].mean()), moved)


def head_products(l: LayerDict, X: Tensor, arch: CanonArch) -> Tensor | None:
    """``(n_heads, m, m)``: token-anchored attention logits ``X W_q,hᵀ W_k,g(h) X`` per q head."""
    q, k = l.get("attn.q.weight"), l.get("attn.k.weight")
    if q is None or k is None:
        return None
    hd = arch.head_dim
    if q.shape[0] != arch.n_heads * hd or k.shape[0] != arch.n_kv_heads * hd:
        return None
    xq = (X @ q.T).reshape(X.shape[0], arch.n_heads, hd).permute(1, 0, 2)  # (H, m, hd)
    xk = (X @ k.T).reshape(X.shape[0], arch.n_kv_heads, hd).permute(1, 0, 2)  # (KV, m, hd)
    xk = xk.repeat_interleave(arch.group, dim=0)
    return xq @ xk.transpose(1, 2)


def _corr_rows(P: Tensor, Q: Tensor) -> Tensor:
    """Pearson correlation between the flattened items of ``P`` (n_p, …) and ``Q`` (n_q, …)."""
    p = P.reshape(P.shape[0], -1).double()
    q = Q.reshape(Q.shape[0], -1).double()
    p = p - p.mean(1, keepdim=True)
    q = q - q.mean(1, keepdim=True)
    p = p / p.norm(dim=1, keepdim=True).clamp_min(1e-300)
    q = q / q.norm(dim=1, keepdim=True).clamp_min(1e-300)
    return p @ q.T


def align_heads(la: LayerDict, lb: LayerDict, X_a: Tensor, X_b: Tensor, arch_a: CanonArch,
                arch_b: CanonArch) -> tuple[UnitAlignment, UnitAlignment] | None:
    """Match kv groups, then q heads within matched groups, on token-anchored q·k products.

    Each model uses its own probe rows (``X_a``, ``X_b``: the same tokens), so no
    residual map is needed.  Returns ``(kv_alignment, q_alignment)``.
    """
    if arch_a.head_dim != arch_b.head_dim:
        return None
    Pa, Pb = head_products(la, X_a, arch_a), head_products(lb, X_b, arch_b)
    if Pa is None or Pb is None:
        return None
    C = _corr_rows(Pa, Pb)  # (H_a, H_b)
    ga, gb = arch_a.group, arch_b.group
    G = torch.zeros(arch_a.n_kv_heads, arch_b.n_kv_heads, dtype=torch.float64)
    inner: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
    for i in range(arch_a.n_kv_heads):
        for j in range(arch_b.n_kv_heads):
            sub = C[i * ga:(i + 1) * ga, j * gb:(j + 1) * gb].numpy()
            r, c = linear_sum_assignment(sub, maximize=True)
            inner[(i, j)] = (r, c)
            G[i, j] = float(sub[r, c].sum())
    gi, gj = linear_sum_assignment(G.numpy(), maximize=True)
    kv = UnitAlignment(torch.as_tensor(gi), torch.as_tensor(gj), torch.ones(len(gi)),
                       float(G[gi, gj].mean()) / max(1, min(ga, gb)), int((gi != gj).sum()))
    qa, qb = [], []
    for i, j in zip(gi, gj):
        r, c = inner[(int(i), int(j))]
        qa.extend(int(i) * ga + r)
        qb.extend(int(j) * gb + c)
    qa_t, qb_t = torch.as_tensor(qa, dtype=torch.int64), torch.as_tensor(qb, dtype=torch.int64)
    qh = UnitAlignment(qa_t, qb_t, torch.ones(len(qa)), float(C[qa_t, qb_t].mean()), int((qa_t != qb_t).sum()))
    return kv, qh
