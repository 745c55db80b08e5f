"""Canonicalisation: undo function-preserving transforms, then test lineage on aligned weights.

Everything here is a pure function over *role-keyed* tensors (layer dicts keyed
``"attn.q.weight"``, ``"mlp.up.weight"``, ``"norm.attn.weight"``…, globals
``"embed.weight"``, ``"lm_head.weight"``, ``"final_norm.weight"``; linear
weights in ``nn.Linear`` orientation ``(out, in)``) plus a :class:`CanonArch`.

Pipeline of :func:`canonical_compare`:

1. **Fold norm gains** (:func:`fold_layer`, :func:`fold_globals`) into the
   projections that read the normalised stream (q, k, v after ``norm.attn``;
   gate, up after ``norm.mlp``; lm_head after ``final_norm``).  A LayerNorm
   bias ``β`` becomes a bias ``Wβ`` of the projection (kept under
   ``*.bias_folded``, not used as evidence), and because LayerNorm output is
   orthogonal to the all-ones vector, the input weights' component along it is
   projected out (adding ``c·1ᵀ`` to a row is function-preserving there).
2. **Residual map** (:func:`fit_residual_map`) from token-anchored rows of the
   embedding (and the untied lm_head) on shared tokens: a signed assignment on
   the column correlations and an orthogonal Procrustes fit; the simpler
   signed permutation is chosen when it explains nearly as much.  ``E_b ≈ E_a M``
   with ``M`` ``(d_a, d_b)`` having orthonormal columns (``d_b < d_a``: width
   pruned).  B's input weights map into A's basis as ``W_b Mᵀ``, output
   weights as ``M W_b``.
3. **Per-layer alignment** (:func:`align_layer`): MLP neurons matched on the
   *input side* (directions of gate and up rows, per-neuron scale and up/down
   sign trading normalised away); attention heads matched on token-anchored
   ``X W_qᵀ W_k Xᵀ`` products (invariant to Q/K scale trading and to per-head
   rotations commuting with RoPE), kv groups first, then q heads within them.
4. **Held-out test**: the evidence is computed on parameters *not used* by the
   alignment — MLP ``down`` columns and the per-head value→output maps
   ``O_h V_g Xᵀ`` on probe tokens — with :func:`lineage.stattest.aligned_z`
   (learned spikes deflated, alignment-free null variance).  Under the null
   (independent initialisation) the searched alignment is a function of other
   parameters, so the LAP search does not inflate the statistic for randomly
   initialised pairs (exact there); independently *trained* pairs share some
   aligned structure, measured on the zoo and absorbed by :data:`Z_INFLATION`.
   For wide models the residual axis is compared through a fixed random
   ``K_TEST``-dimensional projection (:class:`Frame`).
5. **Depth**: per-layer transform-invariant sketches (:func:`layer_sketch`) give
   an all-pairs layer score matrix; :mod:`lineage.depth` turns it into a
   layer map.  When the map was searched, each layer's p-value is multiplied
   by the number of candidate source layers (Bonferroni).

Models are accessed lazily through :class:`LayeredModel` (one layer in memory
at a time).
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from lineage import depth as depth_mod
from lineage.errors import ArchitectureError, ShapeMismatchError
from lineage.roles import apply_view, assign_roles, layer_dict, read_role, roles_for
from lineage.stattest import MatrixStat, aligned_z, combine, deflate_spikes, log10_normal_sf
from lineage_kernels.assign import cosine_matrix, propose_match

log = logging.getLogger(__name__)

Tensor = torch.Tensor
LayerDict = dict[str, Tensor]
ProgressFn = Callable[[int, int, str], None]

#: Exact assignment (LAPJV) up to this many units; above it, :func:`propose_match`.
LAP_MAX_UNITS = 2048
#: Rows used for the residual fit (deterministic subsample above this).
MAX_FIT_ROWS = 16384
MIN_FIT_ROWS = 4096
FIT_ROWS_PER_DIM = 4
#: Probe tokens used for token-anchored products.
N_PROBES = 64
#: Empirical null calibration (genomic-control style): layer z-scores are divided by this.  The analytic
#: null is exact for randomly initialised pairs, but independently *trained* models share some aligned
#: structure the deflation does not remove: on the full zoo (≈420 independent trained pairs) raw
#: per-pair z had max 3.5 and gpt2 independent bases mean 1.1, sd 1.2; 1.5 brings them to uniform or
#: conservative.  Derived pairs sit at z ≳ 75, so the price in power is nil there.
Z_INFLATION = 1.5
#: Equal depths: the identity layer map stands when every layer pair (i, i) is at least this significant.
IDENTITY_LAYER_LOG10_P = -6.0
#: Transforms are named in the result only when lineage is at least this significant.
REPORT_TRANSFORMS_LOG10_P = -6.0


# --------------------------------------------------------------------------- architecture


@dataclass(frozen=True)
class CanonArch:
    """What canonicalisation needs to know about a model."""

    hidden: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    norm: str = "rms"  # "rms" | "layer"
    mlp: str = "glu"  # "glu" | "plain"
    tied: bool = False

    def __post_init__(self) -> None:
        if self.norm not in ("rms", "layer"):
            raise ArchitectureError(f"CanonArch.norm must be 'rms' or 'layer', not {self.norm!r}")
        if self.mlp not in ("glu", "plain"):
            raise ArchitectureError(f"CanonArch.mlp must be 'glu' or 'plain', not {self.mlp!r}")
        if self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads:
            raise ArchitectureError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")

    @property
    def group(self) -> int:
        """q heads per kv head."""
        return self.n_heads // self.n_kv_heads


def arch_from(obj: Any) -> CanonArch:
    """A :class:`CanonArch` from itself, from ``lineage.roles.ArchInfo``, or from a mapping."""
    if isinstance(obj, CanonArch):
        return obj
    get = obj.get if isinstance(obj, Mapping) else (lambda k, d=None: getattr(obj, k, d))
    hidden = get("hidden")
    n_heads = get("n_heads")
    n_layers = get("n_layers")
    if not hidden or not n_heads or n_layers is None:
        raise ArchitectureError(f"cannot canonicalise: hidden/n_heads/n_layers unknown ({hidden}, {n_heads}, {n_layers})")
    n_kv = get("n_kv_heads") or n_heads
    head_dim = get("head_dim") or hidden // n_heads
    norm = get("norm", "rms")
    mlp = get("mlp", "glu")
    return CanonArch(
        hidden=int(hidden), n_layers=int(n_layers), n_heads=int(n_heads), n_kv_heads=int(n_kv),
        head_dim=int(head_dim), norm="layer" if norm == "layer" else "rms",
        mlp="plain" if mlp == "plain" else "glu",
        tied=bool(get("tied_embeddings", False) or get("tied", False)),
    )


# --------------------------------------------------------------------------- lazy model access


@runtime_checkable
class LayeredModel(Protocol):
    """Lazy access to a model's role-keyed tensors (one layer in memory at a time)."""

    @property
    def n_layers(self) -> int: ...

    def global_tensor(self, role: str) -> Tensor | None:
        """A global role (``embed.weight``, ``lm_head.weight``, ``final_norm.weight``…) or None."""
        ...

    def layer(self, i: int) -> LayerDict:
        """Layer ``i``'s dict (role key after ``L{i}.`` → float tensor)."""
        ...


class DictModel:
    """:class:`LayeredModel` over an in-memory dict keyed by full role keys (``L3.attn.q.weight``)."""

    def __init__(self, tensors: Mapping[str, Tensor]) -> None:
        self._t = dict(tensors)
        layers = {int(k.split(".", 1)[0][1:]) for k in self._t if k.startswith("L") and k.split(".", 1)[0][1:].isdigit()}
        self._n = (max(layers) + 1) if layers else 0

    @property
    def n_layers(self) -> int:
        return self._n

    def global_tensor(self, role: str) -> Tensor | None:
        t = self._t.get(role)
        return None if t is None else t.float()

    def layer(self, i: int) -> LayerDict:
        p = f"L{i}."
        return {k[len(p):]: v.float() for k, v in self._t.items() if k.startswith(p)}


class WeightsModel:
    """:class:`LayeredModel` over in-memory tensors with stored (e.g. Hugging Face) names.

    Roles come from :func:`lineage.roles.assign_roles`; ``arch`` is the
    resulting :class:`~lineage.roles.ArchInfo`.
    """

    def __init__(self, weights: Mapping[str, Tensor], config: Mapping[str, Any] | None = None) -> None:
        self._w = dict(weights)
        self.rolemap = assign_roles({k: tuple(v.shape) for k, v in self._w.items()}, config)
        self.arch = self.rolemap.arch

    @property
    def n_layers(self) -> int:
        return self.rolemap.n_layers

    def global_tensor(self, role: str) -> Tensor | None:
        v = self.rolemap.roles.get(role)
        return None if v is None else apply_view(self._w[v.tensor], v).float()

    def layer(self, i: int) -> LayerDict:
        return {k: apply_view(self._w[v.tensor], v).float() for k, v in self.rolemap.layer_roles(i).items()}


class CheckpointModel:
    """:class:`LayeredModel` over an open :class:`~lineage.io.checkpoint.Checkpoint` (reads one layer at a time)."""

    def __init__(self, ckpt: Any, rolemap: Any | None = None) -> None:
        self.ckpt = ckpt
        self.rolemap = rolemap if rolemap is not None else roles_for(ckpt)
        self.arch = self.rolemap.arch

    @property
    def n_layers(self) -> int:
        return self.rolemap.n_layers

    def global_tensor(self, role: str) -> Tensor | None:
        v = self.rolemap.roles.get(role)
        return None if v is None else read_role(self.ckpt, v)

    def layer(self, i: int) -> LayerDict:
        return layer_dict(self.ckpt, self.rolemap, i)


# --------------------------------------------------------------------------- norm folding

_ATTN_IN = ("attn.q", "attn.k", "attn.v")
_MLP_IN = ("mlp.gate", "mlp.up")


def _fold_into(out: LayerDict, names: Sequence[str], gain: Tensor | None, bias: Tensor | None, layer_norm: bool) -> None:
    for nm in names:
        w = out.get(nm + ".weight")
        if w is None:
            continue
        w = w.float()
        if bias is not None:
            out[nm + ".bias_folded"] = w @ bias.float()
        if gain is not None:
            w = w * gain.float()[None, :]
        if layer_norm:
            w = w - w.mean(dim=1, keepdim=True)
        out[nm + ".weight"] = w


def fold_layer(ld: Mapping[str, Tensor], arch: CanonArch) -> LayerDict:
    """Fold ``norm.attn`` / ``norm.mlp`` gains (and LayerNorm biases) into the next projections.

    Returns a new dict without the norm entries; the folded weights are exactly
    what a model with unit gains would hold.
    """
    out: LayerDict = {k: v for k, v in ld.items() if not k.startswith("norm.attn") and not k.startswith("norm.mlp")}
    ln = arch.norm == "layer"
    _fold_into(out, _ATTN_IN, ld.get("norm.attn.weight"), ld.get("norm.attn.bias"), ln)
    _fold_into(out, _MLP_IN, ld.get("norm.mlp.weight"), ld.get("norm.mlp.bias"), ln)
    return out


def fold_globals(embed: Tensor, lm_head: Tensor | None, final_norm: Tensor | None, final_bias: Tensor | None,
                 arch: CanonArch) -> tuple[Tensor, Tensor | None]:
    """``(embed, lm_head)`` with the final norm folded into the head (embed is never scaled)."""
    if lm_head is None:
        return embed.float(), None
    h = lm_head.float()
    if final_norm is not None:
        h = h * final_norm.float()[None, :]
    if arch.norm == "layer":
        h = h - h.mean(dim=1, keepdim=True)
    return embed.float(), h


# --------------------------------------------------------------------------- shared tokens


def _stable_key(s: str) -> bytes:
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
        pairs.sort(key=lambda x: _stable_key(x[0]))
        return [(i, j) for _, i, j in pairs]
    n = min(n_a, n_b)
    return sorted(((i, i) for i in range(n)), key=lambda p: _stable_key(f"#{p[0]}"))


def probe_rows(embed: Tensor, idx: Sequence[int] | Tensor, arch: CanonArch) -> Tensor:
    """Embedding rows as a norm layer would see them: (centred for LayerNorm and) unit-normalised."""
    x = embed[torch.as_tensor(list(idx) if not isinstance(idx, Tensor) else idx, dtype=torch.int64)].float()
    if arch.norm == "layer":
        x = x - x.mean(dim=1, keepdim=True)
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


# --------------------------------------------------------------------------- residual map


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


# --------------------------------------------------------------------------- comparison frame

#: Residual dimensions kept for the evidence (random orthonormal projection above this width).
K_TEST = 256
#: Residual dimensions used to match MLP neurons (random projection above this width).
K_MATCH = 128


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


# --------------------------------------------------------------------------- per-layer alignment


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


def _head_products(l: LayerDict, X: Tensor, arch: CanonArch) -> Tensor | None:
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
    Pa, Pb = _head_products(la, X_a, arch_a), _head_products(lb, X_b, arch_b)
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


# --------------------------------------------------------------------------- sketches (transform-invariant)

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
    P = _head_products(l, X, arch)
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


# --------------------------------------------------------------------------- per-layer test


@dataclass(frozen=True)
class LayerUnits:
    """The unit matchings found for one layer pair (B's units onto A's), for :mod:`lineage.realign`."""

    mlp: UnitAlignment | None = None
    kv: UnitAlignment | None = None
    q: UnitAlignment | None = None


@dataclass(frozen=True)
class LayerRow:
    """Evidence for one aligned layer pair."""

    layer_a: int
    layer_b: int
    stats: tuple[MatrixStat, ...]
    z: float
    log10_p: float  # after any depth-search correction
    sketch_r: float | None
    transforms: dict[str, Any]
    units: LayerUnits | None = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"layer_a": self.layer_a, "layer_b": self.layer_b, "stats": [s.to_dict() for s in self.stats],
                "z": self.z, "log10_p": self.log10_p, "sketch_r": self.sketch_r, "transforms": self.transforms}


def _unit_cols(W: Tensor) -> Tensor:
    return W / W.norm(dim=0, keepdim=True).clamp_min(1e-12)


def evaluate_layer(la: LayerDict, lb: LayerDict, X_a: Tensor, X_b: Tensor, arch_a: CanonArch,
                   arch_b: CanonArch, frame: Frame) -> tuple[list[MatrixStat], dict[str, Any], LayerUnits]:
    """Align one folded layer pair and compute the held-out statistics (both layers in their own basis).

    Returns the statistics, a JSON summary of the transforms found, and the unit matchings.
    """
    stats: list[MatrixStat] = []
    found: dict[str, Any] = {}
    mlp = align_mlp(la, lb, arch_a, frame)
    if mlp is not None and "mlp.down.weight" in la and "mlp.down.weight" in lb:
        A = _unit_cols(frame.out(la["mlp.down.weight"][:, mlp.idx_a], "a"))
        B = _unit_cols(frame.out(lb["mlp.down.weight"][:, mlp.idx_b], "b")) * mlp.signs[None, :]
        stats.append(aligned_z("mlp.down", A, B))
        s = mlp.summary("mlp neurons")
        na = la["mlp.up.weight"][mlp.idx_a].norm(dim=1)
        nb = lb["mlp.up.weight"][mlp.idx_b].norm(dim=1)
        ratio = (nb / na.clamp_min(1e-12)).clamp_min(1e-12).log()
        s["log_scale_spread"] = float(ratio.std()) if ratio.numel() > 1 else 0.0
        found["mlp"] = s
    heads = align_heads(la, lb, X_a, X_b, arch_a, arch_b)
    units = LayerUnits(mlp, *(heads or (None, None)))
    if heads is not None:
        kv, qh = heads
        hd = arch_a.head_dim
        found["kv_groups"] = kv.summary("kv groups")
        found["q_heads"] = qh.summary("q heads")
        # Evidence: per-head value→output maps read on A's probe tokens, O_h V_g(h) Xᵀ (k × m per head),
        # invariant to any per-head invertible V/O transform.
        va, vb = la.get("attn.v.weight"), lb.get("attn.v.weight")
        oa, ob = la.get("attn.o.weight"), lb.get("attn.o.weight")
        if va is not None and vb is not None and oa is not None and ob is not None:
            pa, pb = frame.out(oa, "a"), frame.out(ob, "b")  # (k, H·hd)
            xva, xvb = va @ X_a.T, vb @ frame.XaM.T  # (KV·hd, m): values of A's probe tokens
            ga, gb = arch_a.group, arch_b.group
            blocks_a, blocks_b = [], []
            for i, j in zip(qh.idx_a.tolist(), qh.idx_b.tolist()):
                ka, kb = i // ga, j // gb
                blocks_a.append(pa[:, i * hd:(i + 1) * hd] @ xva[ka * hd:(ka + 1) * hd])
                blocks_b.append(pb[:, j * hd:(j + 1) * hd] @ xvb[kb * hd:(kb + 1) * hd])
            if blocks_a:
                stats.append(aligned_z("attn.ov", torch.cat(blocks_a, 1), torch.cat(blocks_b, 1)))
    return stats, found, units


def _layer_z(stats: Sequence[MatrixStat]) -> float:
    if not stats:
        return 0.0
    return float(sum(s.z for s in stats) / math.sqrt(len(stats)))


# --------------------------------------------------------------------------- result


@dataclass(frozen=True)
class CanonResult:
    """Outcome of :func:`canonical_compare`."""

    log10_p: float
    z: float
    method: str
    residual: ResidualMap | None
    layers: tuple[LayerRow, ...]
    layer_map: depth_mod.LayerMap | None
    transforms: tuple[str, ...]
    n_shared_tokens: int
    notes: tuple[str, ...] = ()
    combined: dict[str, float] = field(default_factory=dict)

    @property
    def p_value(self) -> float:
        """The p-value as a float (0.0 when below ~1e-308; use ``log10_p``)."""
        return 10.0 ** self.log10_p if self.log10_p > -308 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "p_value": self.p_value, "log10_p": self.log10_p, "z": self.z, "method": self.method,
            "null": "independent initialisation",
            "residual": self.residual.to_dict() if self.residual is not None else None,
            "layers": [r.to_dict() for r in self.layers],
            "layer_map": self.layer_map.to_dict() if self.layer_map is not None else None,
            "transforms": list(self.transforms), "n_shared_tokens": self.n_shared_tokens,
            "notes": list(self.notes), "combined": dict(self.combined),
        }


# --------------------------------------------------------------------------- entry point


def _embed(model: LayeredModel) -> Tensor:
    embed = model.global_tensor("embed.weight")
    if embed is None:
        raise ArchitectureError("canonical comparison needs the token embedding (embed.weight)")
    return embed.float()


def _head_rows(model: LayeredModel, arch: CanonArch, n_vocab: int, idx: Tensor) -> Tensor | None:
    """Rows ``idx`` of the folded output head (None when tied or absent); the full head is freed at once."""
    if arch.tied:
        return None
    head = model.global_tensor("lm_head.weight")
    if head is None or head.shape[0] != n_vocab:
        return None
    _, h = fold_globals(head[:1], head, model.global_tensor("final_norm.weight"),
                        model.global_tensor("final_norm.bias"), arch)
    return None if h is None else h[idx].float().clone()


def _anchor_rows(e: Tensor, h: Tensor | None) -> Tensor:
    if h is None:
        return e
    # give the head the same total weight as the embedding rows
    return torch.cat([e, h * (e.norm() / h.norm().clamp_min(1e-12))], 0)


#: Spread of log(up-row norm ratios) of matched neurons above which B traded per-neuron up/down scales.
SCALE_TRADING_SPREAD = 0.05


def scale_spread(layers: Sequence[LayerRow]) -> float:
    """Largest per-layer spread of matched neurons' log up-row norm ratios (0 without MLP matchings)."""
    return max((r.transforms.get("mlp", {}).get("log_scale_spread", 0.0) for r in layers), default=0.0)


def _transform_notes(rm: ResidualMap | None, layers: Sequence[LayerRow], arch_a: CanonArch) -> list[str]:
    out = []
    if rm is not None:
        out.append(rm.describe())
    if not layers:
        return out
    tot_n = sum(r.transforms.get("mlp", {}).get("matched", 0) for r in layers)
    moved = sum(r.transforms.get("mlp", {}).get("moved", 0) for r in layers)
    flips = sum(r.transforms.get("mlp", {}).get("sign_flips", 0) for r in layers)
    spread = scale_spread(layers)
    if tot_n:
        out.append(f"MLP neuron permutation, {moved} of {tot_n} neurons moved" + (f", {flips} sign flips" if flips else ""))
        if spread > SCALE_TRADING_SPREAD:
            out.append(f"per-neuron up/down scale trading (log-scale spread {spread:.2f})")
    hm = sum(r.transforms.get("q_heads", {}).get("moved", 0) for r in layers)
    gm = sum(r.transforms.get("kv_groups", {}).get("moved", 0) for r in layers)
    hn = sum(r.transforms.get("q_heads", {}).get("matched", 0) for r in layers)
    if hn:
        out.append(f"attention head permutation, {hm} of {hn} q heads moved ({gm} kv groups moved)")
    return out


def canonical_compare(
    model_a: LayeredModel, model_b: LayeredModel, arch_a: Any, arch_b: Any,
    vocab_a: Sequence[str] | None = None, vocab_b: Sequence[str] | None = None,
    *, progress: ProgressFn | None = None, method: str = "stouffer", n_probes: int = N_PROBES,
    depth: str = "auto", z_inflation: float | None = None,
) -> CanonResult:
    """Canonicalise B onto A and test lineage under the independent-initialisation null.

    ``z_inflation`` divides every layer's z-score before combination
    (default :data:`Z_INFLATION`, measured on independently trained zoo
    pairs; ``1.0`` gives the analytic null, exact for randomly initialised pairs).

    ``depth``: ``"identity"`` pairs layer i with layer i; ``"search"`` always
    builds the layer map from sketches; ``"auto"`` searches when the layer
    counts differ or the identity map is contradicted by the sketches.
    A must be at least as wide as B (swap otherwise).
    """
    aa, ab = arch_from(arch_a), arch_from(arch_b)
    notes: list[str] = []
    infl = Z_INFLATION if z_inflation is None else float(z_inflation)
    if infl <= 0:
        raise ValueError(f"z_inflation must be positive, got {infl}")
    if ab.hidden > aa.hidden:
        raise ShapeMismatchError(f"model B is wider than A ({ab.hidden} > {aa.hidden}); pass the wider model as A")
    # Peak memory: the two embeddings; each head is loaded, sliced and freed in turn.
    Ea, Eb = _embed(model_a), _embed(model_b)
    n_va, n_vb = Ea.shape[0], Eb.shape[0]
    pairs = token_pairs(vocab_a, vocab_b, n_va, n_vb)
    if len(pairs) < max(8, 2 * ab.hidden) and len(pairs) < 64:
        raise ArchitectureError(f"only {len(pairs)} shared tokens: cannot anchor the residual stream")
    if len(pairs) < 2 * ab.hidden:
        notes.append(f"only {len(pairs)} shared tokens for a {ab.hidden}-wide residual: map is under-determined")
    fit = pairs[:min(MAX_FIT_ROWS, max(MIN_FIT_ROWS, FIT_ROWS_PER_DIM * ab.hidden))]
    ia = torch.as_tensor([p[0] for p in fit])
    ib = torch.as_tensor([p[1] for p in fit])
    probes = pairs[:n_probes]
    Xa = probe_rows(Ea, [p[0] for p in probes], aa)
    Xb = probe_rows(Eb, [p[1] for p in probes], ab)
    ea, eb = Ea[ia].clone(), Eb[ib].clone()
    del Ea, Eb
    ha = _head_rows(model_a, aa, n_va, ia)
    hb = _head_rows(model_b, ab, n_vb, ib) if ha is not None else None
    use_head = ha is not None and hb is not None
    rm = fit_residual_map(_anchor_rows(ea, ha if use_head else None), _anchor_rows(eb, hb if use_head else None))
    log.info("%s (unexplained %.3f; perm %.3f, rotation %.3f)", rm.describe(), rm.residual, rm.residual_perm, rm.residual_rot)
    Ka, Kb = Xa @ Xa.T, Xb @ Xb.T
    del ea, eb, ha, hb

    La, Lb = model_a.n_layers, model_b.n_layers
    total = La + Lb if (depth == "search" or La != Lb) else La
    step = 0

    def tick(label: str) -> None:
        nonlocal step
        step += 1
        if progress is not None:
            progress(step, total, label)

    rows: dict[tuple[int, int], LayerRow] = {}
    sk_a: list[dict[str, Tensor]] = [{} for _ in range(La)]
    sk_b: list[dict[str, Tensor]] = [{} for _ in range(Lb)]

    frame = Frame.build(rm.M, Xa)

    def run_pair(i: int, j: int, la: LayerDict, lb: LayerDict) -> LayerRow:
        stats, found, units = evaluate_layer(la, lb, Xa, Xb, aa, ab, frame)
        z = _layer_z(stats) / infl
        return LayerRow(i, j, tuple(stats), z, log10_normal_sf(z), None, found, units)

    if depth != "search" and La == Lb:
        for i in range(La):
            la, lb = fold_layer(model_a.layer(i), aa), fold_layer(model_b.layer(i), ab)
            sk_a[i] = sketch_residuals(layer_sketch(la, Xa, aa), Ka)
            sk_b[i] = sketch_residuals(layer_sketch(lb, Xb, ab), Kb)
            rows[(i, i)] = run_pair(i, i, la, lb)
            tick(f"layer {i}")
    else:
        for i in range(La):
            sk_a[i] = sketch_residuals(layer_sketch(fold_layer(model_a.layer(i), aa), Xa, aa), Ka)
            tick(f"A layer {i}")
        for j in range(Lb):
            sk_b[j] = sketch_residuals(layer_sketch(fold_layer(model_b.layer(j), ab), Xb, ab), Kb)
            tick(f"B layer {j}")

    S = np.zeros((La, Lb))
    for i in range(La):
        for j in range(Lb):
            sc = sketch_scores(sk_a[i], sk_b[j])
            S[i, j] = float(np.mean(list(sc.values()))) if sc else 0.0
    m = Xa.shape[0]
    n_entries = m * (m - 1)
    lmap = depth_mod.layer_map(S, n_entries=n_entries)
    if depth != "search" and La == Lb and not lmap.is_identity and all(
            rows[(i, i)].log10_p <= IDENTITY_LAYER_LOG10_P for i in range(La)):
        # Sketch correlations are a coarse search signal (weak after long training); every layer already
        # passing its own canonical test against the same index is far stronger evidence for the identity.
        notes.append(f"sketches suggested {lmap.describe()}; kept the identity: every layer matches its own "
                     f"index (per-layer p ≤ 1e{IDENTITY_LAYER_LOG10_P:.0f})")
        lmap = depth_mod.LayerMap(tuple(range(La)), La, "identity", lmap.threshold,
                                  tuple(float(S[i, i]) for i in range(La)))
    searched = depth == "search" or La != Lb or not lmap.is_identity
    if searched:
        notes.append(f"layer map searched over {La} candidate source layers: per-layer p-values Bonferroni-corrected")
    pairs_ab = [(src, j) for j, src in enumerate(lmap.source) if src is not None] if searched else [(i, i) for i in range(La)]
    final_rows: list[LayerRow] = []
    for i, j in pairs_ab:
        row = rows.get((i, j))
        if row is None:
            row = run_pair(i, j, fold_layer(model_a.layer(i), aa), fold_layer(model_b.layer(j), ab))
        lp = row.log10_p + (math.log10(La) if searched else 0.0)
        final_rows.append(LayerRow(row.layer_a, row.layer_b, row.stats, row.z, min(0.0, lp), float(S[i, j]),
                                   row.transforms, row.units))
    if not final_rows:
        notes.append("no layer of B could be paired with a layer of A")
    comb = {}
    for meth in ("stouffer", "fisher", "cauchy", "bonferroni"):
        c = combine([r.log10_p for r in final_rows], meth, zs=None if searched else [r.z for r in final_rows])
        comb[meth] = float(c.log10_p)
    chosen = combine([r.log10_p for r in final_rows], method, zs=None if searched else [r.z for r in final_rows])
    if chosen.log10_p <= REPORT_TRANSFORMS_LOG10_P:
        transforms = _transform_notes(rm, final_rows, aa)
        if lmap is not None and not lmap.is_identity:
            transforms.append(lmap.describe())
    else:
        transforms = []
        notes.append("no significant lineage: the best alignments found are not reported as transforms")
    return CanonResult(float(chosen.log10_p), float(chosen.z), method, rm, tuple(final_rows), lmap,
                       tuple(transforms), len(pairs), tuple(notes), comb)
