"""Function-preserving disguises of tiny models (the cheapest lineage evasions).

Every disguise is ``f(cfg, weights, seed) -> (new_weights, info)`` on a dict of
Hugging Face-named tensors (see :mod:`lineage.testing.models`).  The returned
model computes the same logits as the input (up to rounding); ``tests/
test_transforms.py`` checks this in float64.  ``info`` is JSON-serialisable and
names the transform and its parameters (permutations as lists).  When a
disguise has to change the configuration (untying the embeddings so a rotation
can pass through a tied head), ``info["config"]`` holds the new
:class:`~lineage.testing.models.TinyConfig`; use :func:`config_after`.

Computation is done in float64 and cast back to the input dtype.

Families: the residual *signed* permutation and the orthogonal rotation need an
RMSNorm (LayerNorm subtracts the channel mean, which only commutes with
unsigned permutations), so for GPT-2 :func:`residual_permutation` is unsigned
and :func:`residual_rotation` raises.  GELU is not positively homogeneous, so
the GPT-2 MLP gets a neuron permutation without scale trading.

Non-preserving derivations (noise, quantisation, LoRA, depth/width/vocabulary
changes, merges) live in :mod:`lineage.testing.derive` and are re-exported here.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch

from lineage.testing.models import (
    TinyConfig,
    embed_name,
    gpt2_layer_names,
    llama_layer_names,
)

log = logging.getLogger(__name__)

Weights = dict[str, torch.Tensor]
Disguise = Callable[[TinyConfig, Weights, int], tuple[Weights, dict[str, Any]]]


# --------------------------------------------------------------------------- helpers

def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) & 0x7FFF_FFFF_FFFF_FFFF)


def _f64(weights: Weights) -> tuple[Weights, dict[str, torch.dtype]]:
    return {k: v.detach().to(torch.float64).clone() for k, v in weights.items()}, {
        k: v.dtype for k, v in weights.items()
    }


def _back(weights: Weights, dtypes: dict[str, torch.dtype]) -> Weights:
    return {k: v.to(dtypes.get(k, torch.float32)) for k, v in weights.items()}


def _rand_orthogonal(n: int, g: torch.Generator) -> torch.Tensor:
    """Haar-random orthogonal matrix (QR of a Gaussian with the sign fix)."""
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    return q * torch.sign(torch.diagonal(r))[None, :]


def config_after(cfg: TinyConfig, info: dict[str, Any]) -> TinyConfig:
    """The configuration of a transformed model (changed only by some disguises)."""
    new = info.get("config")
    if isinstance(new, TinyConfig):
        return new
    if isinstance(new, dict):
        return TinyConfig(**new)
    return cfg


def _untie(cfg: TinyConfig, w: Weights) -> TinyConfig:
    """Give a tied model an explicit ``lm_head.weight`` (same function)."""
    if cfg.tie_embeddings:
        w["lm_head.weight"] = w[embed_name(cfg)].clone()
        return cfg.with_(tie_embeddings=False)
    return cfg


def _info(name: str, cfg: TinyConfig, new_cfg: TinyConfig, **params: Any) -> dict[str, Any]:
    info: dict[str, Any] = {"transform": name, **params}
    if new_cfg != cfg:
        info["config"] = new_cfg
    return info


# --------------------------------------------------------------------------- norm folding

def fold_norms(cfg: TinyConfig, weights: Weights, *, untie: bool = True) -> tuple[Weights, TinyConfig]:
    """Fold every norm gain (and LayerNorm bias) into the following projections.

    Afterwards every folded gain is 1 (bias 0).  Llama: the final norm folds into
    ``lm_head`` (a tied model is untied first unless ``untie=False``, in which case
    the final gain stays).  GPT-2: ``ln_f`` has a bias the head cannot absorb, so it
    stays.  Returns float64 weights and the (possibly untied) config.
    """
    w, _ = _f64(weights)
    if cfg.family == "llama":
        for i in range(cfg.n_layers):
            n = llama_layer_names(i)
            for norm, outs in ((n["norm_attn"], ("q", "k", "v")), (n["norm_mlp"], ("gate", "up"))):
                g = w[norm]
                for o in outs:
                    w[n[o]] = w[n[o]] * g[None, :]
                w[norm] = torch.ones_like(g)
        if cfg.tie_embeddings and not untie:
            return w, cfg
        cfg = _untie(cfg, w)
        w["lm_head.weight"] = w["lm_head.weight"] * w["model.norm.weight"][None, :]
        w["model.norm.weight"] = torch.ones_like(w["model.norm.weight"])
        return w, cfg
    for i in range(cfg.n_layers):
        n = gpt2_layer_names(i)
        for gw, gb, ww, wb in (("ln1_w", "ln1_b", "attn_w", "attn_b"), ("ln2_w", "ln2_b", "fc_w", "fc_b")):
            g, b = w[n[gw]], w[n[gb]]
            w[n[wb]] = w[n[wb]] + b @ w[n[ww]]
            w[n[ww]] = g[:, None] * w[n[ww]]
            w[n[gw]] = torch.ones_like(g)
            w[n[gb]] = torch.zeros_like(b)
    return w, cfg


# --------------------------------------------------------------------------- residual basis

def _apply_residual(cfg: TinyConfig, w: Weights, M: torch.Tensor, gain_map: torch.Tensor | None) -> None:
    """Change the residual basis h -> M h in place (float64 weights).

    ``gain_map`` maps old norm vectors to new ones (``|M|`` for signed
    permutations); ``None`` requires all (RMSNorm) gains to have been folded.
    """
    Mt = M.T
    if cfg.family == "llama":
        w["model.embed_tokens.weight"] = w["model.embed_tokens.weight"] @ Mt
        for i in range(cfg.n_layers):
            n = llama_layer_names(i)
            for o in ("q", "k", "v", "gate", "up"):
                w[n[o]] = w[n[o]] @ Mt
            for o in ("o", "down"):
                w[n[o]] = M @ w[n[o]]
            for norm in ("norm_attn", "norm_mlp"):
                if gain_map is not None:
                    w[n[norm]] = gain_map @ w[n[norm]]
        if gain_map is not None:
            w["model.norm.weight"] = gain_map @ w["model.norm.weight"]
        if not cfg.tie_embeddings:
            w["lm_head.weight"] = w["lm_head.weight"] @ Mt
        return
    assert gain_map is not None
    w["transformer.wte.weight"] = w["transformer.wte.weight"] @ Mt
    w["transformer.wpe.weight"] = w["transformer.wpe.weight"] @ Mt
    for i in range(cfg.n_layers):
        n = gpt2_layer_names(i)
        for k in ("ln1_w", "ln1_b", "ln2_w", "ln2_b"):
            w[n[k]] = gain_map @ w[n[k]]
        for k in ("attn_w", "fc_w"):  # Conv1D (in, out): input side is rows
            w[n[k]] = M @ w[n[k]]
        for k in ("proj_w", "mproj_w"):  # output side is columns
            w[n[k]] = w[n[k]] @ Mt
        for k in ("proj_b", "mproj_b"):
            w[n[k]] = M @ w[n[k]]
    for k in ("transformer.ln_f.weight", "transformer.ln_f.bias"):
        w[k] = gain_map @ w[k]
    if not cfg.tie_embeddings:
        w["lm_head.weight"] = w["lm_head.weight"] @ Mt


def residual_permutation(cfg: TinyConfig, weights: Weights, seed: int) -> tuple[Weights, dict[str, Any]]:
    """Permute (and, for RMSNorm models, sign-flip) the residual channels."""
    g = _gen(seed)
    w, dt = _f64(weights)
    H = cfg.hidden
    perm = torch.randperm(H, generator=g)
    signed = cfg.family == "llama"
    signs = (torch.randint(0, 2, (H,), generator=g) * 2 - 1).double() if signed else torch.ones(H, dtype=torch.float64)
    P = torch.zeros(H, H, dtype=torch.float64)
    P[torch.arange(H), perm] = signs  # new channel i = sign_i * old channel perm[i]
    _apply_residual(cfg, w, P, P.abs())
    return _back(w, dt), _info("residual_permutation", cfg, cfg, perm=perm.tolist(), signs=signs.long().tolist(), signed=signed)


def residual_rotation(cfg: TinyConfig, weights: Weights, seed: int) -> tuple[Weights, dict[str, Any]]:
    """Rotate the residual stream by a random orthogonal matrix (RMSNorm models).

    Norm gains are folded into the following projections first (all gains become
    1; the final gain goes into ``lm_head``, untying a tied head).
    """
    if cfg.family != "llama":
        raise ValueError("an orthogonal residual rotation preserves the function only with RMSNorm (llama)")
    w, new_cfg = fold_norms(cfg, weights)
    dt = {k: v.dtype for k, v in weights.items()}
    dt.setdefault("lm_head.weight", weights[embed_name(cfg)].dtype)
    R = _rand_orthogonal(cfg.hidden, _gen(seed))
    _apply_residual(new_cfg, w, R, None)
    return _back(w, dt), _info("residual_rotation", cfg, new_cfg, folded_norms=True, untied=new_cfg != cfg)


# --------------------------------------------------------------------------- norm gains

def _random_gains(n: int, g: torch.Generator) -> torch.Tensor:
    """Random positive gains spread over a factor of ~50 (log-normal)."""
    return torch.exp(torch.randn(n, generator=g, dtype=torch.float64))


def norm_refold(cfg: TinyConfig, weights: Weights, seed: int) -> tuple[Weights, dict[str, Any]]:
    """Replace every norm gain by a random positive vector and compensate downstream.

    ``W' = W diag(g / g')`` on the projections reading the norm (Zhu et al.'s
    attack on HuRef, without the rotation).  LayerNorm biases are replaced by
    random vectors, compensated in the projection biases.  The final norm of a
    tied model is left alone (its compensation would have to go into the tied
    embedding).
    """
    g = _gen(seed)
    w, dt = _f64(weights)
    touched: list[str] = []
    if cfg.family == "llama":
        pairs = []
        for i in range(cfg.n_layers):
            n = llama_layer_names(i)
            pairs += [(n["norm_attn"], [n["q"], n["k"], n["v"]]), (n["norm_mlp"], [n["gate"], n["up"]])]
        if not cfg.tie_embeddings:
            pairs.append(("model.norm.weight", ["lm_head.weight"]))
        for norm, outs in pairs:
            old = w[norm]
            new = _random_gains(old.numel(), g) * old.abs().mean().clamp_min(1e-3)
            for o in outs:
                w[o] = w[o] * (old / new)[None, :]
            w[norm] = new
            touched.append(norm)
    else:
        for i in range(cfg.n_layers):
            n = gpt2_layer_names(i)
            for gw, gb, ww, wb in (("ln1_w", "ln1_b", "attn_w", "attn_b"), ("ln2_w", "ln2_b", "fc_w", "fc_b")):
                old_g, old_b = w[n[gw]], w[n[gb]]
                new_g = _random_gains(old_g.numel(), g) * old_g.abs().mean().clamp_min(1e-3)
                new_b = torch.randn(old_b.numel(), generator=g, dtype=torch.float64) * old_b.std().clamp_min(1e-3)
                W = w[n[ww]]
                W_new = (old_g / new_g)[:, None] * W
                w[n[wb]] = w[n[wb]] + old_b @ W - new_b @ W_new
                w[n[ww]] = W_new
                w[n[gw]], w[n[gb]] = new_g, new_b
                touched += [n[gw], n[gb]]
    return _back(w, dt), _info("norm_refold", cfg, cfg, norms=touched)


# --------------------------------------------------------------------------- MLP

def mlp_permutation(cfg: TinyConfig, weights: Weights, seed: int) -> tuple[Weights, dict[str, Any]]:
    """Permute MLP neurons in every layer; for SwiGLU also trade a per-neuron scale
    (and sign) between the up row and the down column.  The gate is never scaled."""
    g = _gen(seed)
    w, dt = _f64(weights)
    perms, scaled = [], cfg.family == "llama"
    for i in range(cfg.n_layers):
        perm = torch.randperm(cfg.intermediate, generator=g)
        perms.append(perm.tolist())
        if cfg.family == "llama":
            n = llama_layer_names(i)
            s = torch.exp(0.7 * torch.randn(cfg.intermediate, generator=g, dtype=torch.float64))
            s = s * (torch.randint(0, 2, (cfg.intermediate,), generator=g) * 2 - 1)
            w[n["gate"]] = w[n["gate"]][perm]
            w[n["up"]] = w[n["up"]][perm] * s[:, None]
            w[n["down"]] = w[n["down"]][:, perm] / s[None, :]
        else:
            n = gpt2_layer_names(i)
            w[n["fc_w"]] = w[n["fc_w"]][:, perm]
            w[n["fc_b"]] = w[n["fc_b"]][perm]
            w[n["mproj_w"]] = w[n["mproj_w"]][perm]
    return _back(w, dt), _info("mlp_permutation", cfg, cfg, perms=perms, scale_trading=scaled)


# --------------------------------------------------------------------------- attention

def _head_rows(head_order: list[int], hd: int) -> torch.Tensor:
    return torch.tensor([h * hd + j for h in head_order for j in range(hd)])


def head_permutation(cfg: TinyConfig, weights: Weights, seed: int) -> tuple[Weights, dict[str, Any]]:
    """Permute attention heads.  With GQA the key/value groups are permuted and the
    query heads move with their group (and are shuffled inside it)."""
    g = _gen(seed)
    w, dt = _f64(weights)
    nh, hd = cfg.n_heads, cfg.head_dim
    nkv = cfg.kv_heads
    rep = nh // nkv
    infos = []
    for i in range(cfg.n_layers):
        kv_perm = torch.randperm(nkv, generator=g).tolist()
        q_perm = []
        for j in range(nkv):
            inner = torch.randperm(rep, generator=g).tolist()
            q_perm += [kv_perm[j] * rep + a for a in inner]
        if cfg.family == "gpt2":
            q_perm = kv_perm  # rep == 1: one head per group
        infos.append({"kv_perm": kv_perm, "q_perm": q_perm})
        qr, kr = _head_rows(q_perm, hd), _head_rows(kv_perm, hd)
        if cfg.family == "llama":
            n = llama_layer_names(i)
            w[n["q"]] = w[n["q"]][qr]
            w[n["k"]] = w[n["k"]][kr]
            w[n["v"]] = w[n["v"]][kr]
            w[n["o"]] = w[n["o"]][:, qr]
        else:
            n = gpt2_layer_names(i)
            H = cfg.hidden
            cols = torch.cat([qr, qr + H, qr + 2 * H])
            w[n["attn_w"]] = w[n["attn_w"]][:, cols]
            w[n["attn_b"]] = w[n["attn_b"]][cols]
            w[n["proj_w"]] = w[n["proj_w"]][qr]
    return _back(w, dt), _info("head_permutation", cfg, cfg, layers=infos)


def qk_scale(cfg: TinyConfig, weights: Weights, seed: int) -> tuple[Weights, dict[str, Any]]:
    """Multiply each query head by ``c`` and its key head by ``1/c`` (per KV group)."""
    g = _gen(seed)
    w, dt = _f64(weights)
    nh, hd, nkv = cfg.n_heads, cfg.head_dim, cfg.kv_heads
    rep = nh // nkv
    scales = []
    for i in range(cfg.n_layers):
        c = torch.exp(0.8 * torch.randn(nkv, generator=g, dtype=torch.float64))
        scales.append(c.tolist())
        cq = c.repeat_interleave(rep).repeat_interleave(hd)
        ck = c.repeat_interleave(hd)
        if cfg.family == "llama":
            n = llama_layer_names(i)
            w[n["q"]] = w[n["q"]] * cq[:, None]
            w[n["k"]] = w[n["k"]] / ck[:, None]
        else:
            n = gpt2_layer_names(i)
            H = cfg.hidden
            mult = torch.cat([cq, 1.0 / ck, torch.ones(H, dtype=torch.float64)])
            w[n["attn_w"]] = w[n["attn_w"]] * mult[None, :]
            w[n["attn_b"]] = w[n["attn_b"]] * mult
    return _back(w, dt), _info("qk_scale", cfg, cfg, scales=scales)


def qk_rotation(cfg: TinyConfig, weights: Weights, seed: int) -> tuple[Weights, dict[str, Any]]:
    """Rotate queries and keys of each KV group by the same orthogonal map.

    Llama: rotations inside each RoPE plane (dims ``j`` and ``j + hd/2``), which
    commute with RoPE.  GPT-2: any orthogonal ``hd × hd`` map per head.
    """
    g = _gen(seed)
    w, dt = _f64(weights)
    nh, hd, nkv = cfg.n_heads, cfg.head_dim, cfg.kv_heads
    rep = nh // nkv
    for i in range(cfg.n_layers):
        mats = []
        for _ in range(nkv):
            if cfg.family == "llama":
                half = hd // 2
                th = torch.rand(half, generator=g, dtype=torch.float64) * 2 * math.pi
                Rm = torch.zeros(hd, hd, dtype=torch.float64)
                idx = torch.arange(half)
                Rm[idx, idx] = th.cos()
                Rm[idx + half, idx + half] = th.cos()
                Rm[idx, idx + half] = -th.sin()
                Rm[idx + half, idx] = th.sin()
            else:
                Rm = _rand_orthogonal(hd, g)
            mats.append(Rm)
        Rk = torch.block_diag(*mats)
        Rq = torch.block_diag(*[mats[h // rep] for h in range(nh)])
        if cfg.family == "llama":
            n = llama_layer_names(i)
            w[n["q"]] = Rq @ w[n["q"]]
            w[n["k"]] = Rk @ w[n["k"]]
        else:
            n = gpt2_layer_names(i)
            H = cfg.hidden
            W, b = w[n["attn_w"]], w[n["attn_b"]]
            w[n["attn_w"]] = torch.cat([W[:, :H] @ Rq.T, W[:, H : 2 * H] @ Rk.T, W[:, 2 * H :]], dim=1)
            w[n["attn_b"]] = torch.cat([Rq @ b[:H], Rk @ b[H : 2 * H], b[2 * H :]])
    return _back(w, dt), _info("qk_rotation", cfg, cfg)


def vo_mixing(cfg: TinyConfig, weights: Weights, seed: int) -> tuple[Weights, dict[str, Any]]:
    """Apply an invertible ``hd × hd`` map ``A`` to each value head and ``A⁻¹`` to the
    matching columns of the output projection (for every query head of the group)."""
    g = _gen(seed)
    w, dt = _f64(weights)
    nh, hd, nkv = cfg.n_heads, cfg.head_dim, cfg.kv_heads
    rep = nh // nkv
    for i in range(cfg.n_layers):
        mats, invs = [], []
        for _ in range(nkv):
            A = _rand_orthogonal(hd, g) * torch.exp(0.3 * torch.randn(hd, generator=g, dtype=torch.float64))[None, :]
            A = A @ _rand_orthogonal(hd, g)
            mats.append(A)
            invs.append(torch.linalg.inv(A))
        Av = torch.block_diag(*mats)
        Ainv_o = torch.block_diag(*[invs[h // rep] for h in range(nh)])
        if cfg.family == "llama":
            n = llama_layer_names(i)
            w[n["v"]] = Av @ w[n["v"]]
            w[n["o"]] = w[n["o"]] @ Ainv_o
        else:
            n = gpt2_layer_names(i)
            H = cfg.hidden
            W, b = w[n["attn_w"]], w[n["attn_b"]]
            w[n["attn_w"]] = torch.cat([W[:, : 2 * H], W[:, 2 * H :] @ Av.T], dim=1)
            w[n["attn_b"]] = torch.cat([b[: 2 * H], Av @ b[2 * H :]])
            w[n["proj_w"]] = Ainv_o.T @ w[n["proj_w"]]
    return _back(w, dt), _info("vo_mixing", cfg, cfg)


# --------------------------------------------------------------------------- registry

#: name -> (function, families it applies to)
DISGUISES: dict[str, tuple[Disguise, tuple[str, ...]]] = {
    "residual_permutation": (residual_permutation, ("llama", "gpt2")),
    "residual_rotation": (residual_rotation, ("llama",)),
    "norm_refold": (norm_refold, ("llama", "gpt2")),
    "mlp_permutation": (mlp_permutation, ("llama", "gpt2")),
    "head_permutation": (head_permutation, ("llama", "gpt2")),
    "qk_scale": (qk_scale, ("llama", "gpt2")),
    "qk_rotation": (qk_rotation, ("llama", "gpt2")),
    "vo_mixing": (vo_mixing, ("llama", "gpt2")),
}

#: Order used by :func:`combine`: the basis change first (it folds gains), the
#: gain refold last (so the final model has random gains again).
COMBINE_ORDER = (
    "residual_rotation",
    "residual_permutation",
    "head_permutation",
    "qk_scale",
    "qk_rotation",
    "vo_mixing",
    "mlp_permutation",
    "norm_refold",
)


def disguises_for(family: str) -> list[str]:
    """Names of the disguises that apply to a family."""
    return [k for k, (_, fams) in DISGUISES.items() if family in fams]


def apply(name: str, cfg: TinyConfig, weights: Weights, seed: int) -> tuple[Weights, dict[str, Any]]:
    """Apply one disguise by name."""
    fn, fams = DISGUISES[name]
    if cfg.family not in fams:
        raise ValueError(f"disguise {name!r} does not preserve the function of a {cfg.family} model")
    return fn(cfg, weights, seed)


def combine(
    cfg: TinyConfig, weights: Weights, seed: int, names: list[str] | tuple[str, ...] | None = None
) -> tuple[Weights, dict[str, Any]]:
    """Apply several disguises in :data:`COMBINE_ORDER` (all that apply by default)."""
    chosen = [n for n in COMBINE_ORDER if (names is None or n in names) and cfg.family in DISGUISES[n][1]]
    cur_cfg, w, steps = cfg, weights, []
    for k, name in enumerate(chosen):
        w, info = apply(name, cur_cfg, w, seed * 1009 + k + 1)
        cur_cfg = config_after(cur_cfg, info)
        steps.append({kk: vv for kk, vv in info.items() if kk != "config"})
    return w, _info("combine", cfg, cur_cfg, steps=chosen, details=steps)


from lineage.testing.derive import (  # noqa: E402  (re-exported for convenience)
    add_noise,
    drop_layers,
    duplicate_layers,
    extend_vocab,
    lora_merge,
    merge_linear,
    merge_slerp,
    merge_ties,
    prune_mlp_width,
    prune_vocab,
    quantise_int4_per_group,
    quantise_int8_per_row,
    remap_layers,
    reorder_vocab,
)

__all__ = [
    "DISGUISES",
    "COMBINE_ORDER",
    "apply",
    "combine",
    "config_after",
    "disguises_for",
    "fold_norms",
    "residual_permutation",
    "residual_rotation",
    "norm_refold",
    "mlp_permutation",
    "head_permutation",
    "qk_scale",
    "qk_rotation",
    "vo_mixing",
    "add_noise",
    "quantise_int8_per_row",
    "quantise_int4_per_group",
    "lora_merge",
    "remap_layers",
    "drop_layers",
    "duplicate_layers",
    "prune_mlp_width",
    "extend_vocab",
    "prune_vocab",
    "reorder_vocab",
    "merge_linear",
    "merge_slerp",
    "merge_ties",
]
