"""Stage 5 — transform-invariant per-layer sketches: the score matrix the depth map (:mod:`lineage.depth`) reads."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from lineage.canon.align import head_products
from lineage.canon.arch import CanonArch, LayerDict, Tensor
from lineage.stattest import deflate_spikes

SKETCH_KINDS = ("qk", "ov", "ud", "gg")


def layer_sketch(l: LayerDict, X: Tensor, arch: CanonArch) -> dict[str, Tensor]:
    """Token-anchored ``(m, m)`` products of a *folded* layer, invariant to every disguise handled here.

    * ``qk``: ``Σ_h X W_q,hᵀ W_k,h Xᵀ`` (head permutation, Q/K scale trading, RoPE-commuting rotations)
    * ``ov``: ``Σ_h X W_v,hᵀ W_o,hᵀ Xᵀ`` (head permutation, any per-head V/O transform)
    * ``ud``: ``X W_upᵀ W_downᵀ Xᵀ`` (neuron permutation, up/down scale and sign trading)
    * ``gg``: Gram of unit gate rows ``X Ĝᵀ Ĝ Xᵀ`` (GLU only; neuron permutation)

    All are also invariant to residual rotations / signed permutations because
    ``X`` is the model's own (folded, normalised) embedding of fixed tokens.
    """
    out: dict[str, Tensor] = {}
    P = head_products(l, X, arch)
    if P is not None:
        out["qk"] = P.sum(0)
    v, o = l.get("attn.v.weight"), l.get("attn.o.weight")
    hd = arch.head_dim
    if v is not None and o is not None and v.shape[0] == arch.n_kv_heads * hd and o.shape[1] == arch.n_heads * hd:
        xv = (X @ v.T).reshape(X.shape[0], arch.n_kv_heads, hd).repeat_interleave(arch.group, dim=1)
        xo = (X @ o).reshape(X.shape[0], arch.n_heads, hd)
        out["ov"] = torch.einsum("shd,thd->st", xv, xo)
    up, down = l.get("mlp.up.weight"), l.get("mlp.down.weight")
    if up is not None and down is not None and up.shape[0] == down.shape[1]:
        out["ud"] = (X @ up.T) @ (X @ down).T
    g = l.get("mlp.gate.weight")
    if g is not None and arch.mlp == "glu":
        gx = X @ (g / g.norm(dim=1, keepdim=True).clamp_min(1e-12)).T
        out["gg"] = gx @ gx.T
    return {k: v.float() for k, v in out.items()}


def _offdiag(P: Tensor) -> Tensor:
    m = P.shape[-1]
    mask = ~torch.eye(m, dtype=torch.bool)
    return P[..., mask]


def sketch_residuals(sk: Mapping[str, Tensor], K: Tensor, deflate: bool = True) -> dict[str, Tensor]:
    """Off-diagonal sketch entries with shared structure removed, as unit vectors.

    The model's own embedding Gram ``K = X Xᵀ`` (and its square) is regressed
    out, then (``deflate``) the matrix's spikes above the random bulk
    (:func:`lineage.stattest.deflate_spikes`): independently trained models
    share low-rank token structure (semantic clusters), lineage lives in the bulk.
    """
    m = K.shape[0]
    mask = ~torch.eye(m, dtype=torch.bool)
    k = _offdiag(K).double()
    D = torch.stack([torch.ones_like(k), k, k * k], dim=1)
    out = {}
    for name, P in sk.items():
        y = _offdiag(P).double()
        beta = torch.linalg.lstsq(D, y[:, None]).solution
        r = y - (D @ beta).flatten()
        if deflate:
            full = torch.zeros(m, m, dtype=torch.float64)
            full[mask] = r
            full, _ = deflate_spikes(full)
            r = full.double()[mask]
        out[name] = (r - r.mean()) / (r - r.mean()).norm().clamp_min(1e-300)
    return out


def sketch_scores(ra: Mapping[str, Tensor], rb: Mapping[str, Tensor]) -> dict[str, float]:
    """Correlation of residualised sketches of the same kinds (unit-norm vectors → dot product)."""
    return {k: float((ra[k] * rb[k]).sum()) for k in ra if k in rb}


def sketch_null_sd(ra: Mapping[str, Tensor], rb: Mapping[str, Tensor], m: int, n_perm: int = 32,
                   seed: int = 0) -> dict[str, float]:
    """Standard deviation of the sketch correlation under a joint random relabelling of B's probe tokens (Mantel).

    Floored at the i.i.d. value ``1/√n``.
    """
    g = torch.Generator().manual_seed(seed)
    mask = ~torch.eye(m, dtype=torch.bool)
    n = int(mask.sum())
    P = torch.stack([torch.randperm(m, generator=g) for _ in range(n_perm)])  # (n_perm, m)
    out = {}
    for k in ra:
        if k not in rb:
            continue
        full = torch.zeros(m, m, dtype=torch.float64)
        full[mask] = rb[k]
        pb = full[P[:, :, None], P[:, None, :]][:, mask]  # (n_perm, n)
        pb = pb - pb.mean(1, keepdim=True)
        pb = pb / pb.norm(dim=1, keepdim=True).clamp_min(1e-300)
        vals = pb @ ra[k]
        out[k] = max(float(vals.std()), 1.0 / math.sqrt(n))
    return out
