"""Non-preserving derivations: noise, quantisation, LoRA, depth/width/vocabulary
changes and merges, on dicts of Hugging Face-named tensors.

Each returns ``(new_weights, info)`` (plus the new config where the shape
changes); ``info`` is JSON-serialisable except for the keys documented as
holding tensors (``scales``, ``adapter``).
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any

import torch

from lineage.testing.models import (
    TinyConfig,
    embed_name,
    gpt2_layer_names,
    layer_index,
    llama_layer_names,
)

log = logging.getLogger(__name__)

Weights = dict[str, torch.Tensor]

_CONV1D = re.compile(r"^transformer\.h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")
_POSITIONS = ("transformer.wpe.weight",)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) & 0x7FFF_FFFF_FFFF_FFFF)


def is_conv1d(name: str) -> bool:
    """GPT-2 ``Conv1D`` weights are stored ``(in, out)``."""
    return bool(_CONV1D.match(name))


def as_linear(name: str, t: torch.Tensor) -> torch.Tensor:
    """The tensor in ``nn.Linear`` orientation ``(out, in)``."""
    return t.T if is_conv1d(name) else t


# --------------------------------------------------------------------------- noise

def add_noise(weights: Weights, rel_level: float, seed: int, *, matrices_only: bool = True) -> tuple[Weights, dict[str, Any]]:
    """Add Gaussian noise with std ``rel_level × std(tensor)`` to every matrix
    (and to vectors too when ``matrices_only`` is false)."""
    g = _gen(seed)
    out, touched = {}, 0
    for k in sorted(weights):
        v = weights[k]
        if v.dim() >= 2 or not matrices_only:
            std = v.double().std().item() if v.numel() > 1 else abs(v.double().item())
            noise = torch.randn(v.shape, generator=g, dtype=torch.float64) * (rel_level * std)
            out[k] = (v.double() + noise).to(v.dtype)
            touched += 1
        else:
            out[k] = v.clone()
    return out, {"transform": "add_noise", "rel_level": rel_level, "tensors": touched}


# --------------------------------------------------------------------------- quantisation

def _quant_targets(weights: Weights, skip: tuple[str, ...]) -> list[str]:
    return [k for k in sorted(weights) if weights[k].dim() == 2 and k not in skip]


def quantise_int8_per_row(weights: Weights, *, skip: tuple[str, ...] = _POSITIONS) -> tuple[Weights, dict[str, Any]]:
    """Symmetric int8 with one scale per output row (``nn.Linear`` orientation).

    Returns dequantised weights; ``info["scales"][name]`` holds the per-row scales
    (in linear orientation), so every value equals ``scale × q`` with integer
    ``q`` in [-127, 127].
    """
    out = {k: v.clone() for k, v in weights.items()}
    scales: dict[str, torch.Tensor] = {}
    for k in _quant_targets(weights, skip):
        w = as_linear(k, weights[k].double())
        s = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127.0
        q = torch.round(w / s).clamp(-127, 127)
        deq = q * s
        out[k] = as_linear(k, deq).contiguous().to(weights[k].dtype)
        scales[k] = s[:, 0].float()
    return out, {"transform": "quantise", "quant": "int8_per_row", "bits": 8, "symmetric": True,
                 "tensors": sorted(scales), "scales": scales}


def quantise_int4_per_group(
    weights: Weights, group_size: int = 32, *, skip: tuple[str, ...] = _POSITIONS
) -> tuple[Weights, dict[str, Any]]:
    """Q4_0-style 4-bit: groups of ``group_size`` along the input dimension, scale
    ``d = m / -8`` where ``m`` is the group's value of largest magnitude, integer
    levels in [-8, 7].  ``info["scales"][name]`` is ``(out, in // group_size)``."""
    out = {k: v.clone() for k, v in weights.items()}
    scales: dict[str, torch.Tensor] = {}
    for k in _quant_targets(weights, skip):
        w = as_linear(k, weights[k].double())
        rows, cols = w.shape
        if cols % group_size:
            log.debug("%s: %d columns not divisible by %d, left unquantised", k, cols, group_size)
            continue
        grp = w.reshape(rows, cols // group_size, group_size)
        idx = grp.abs().argmax(dim=-1, keepdim=True)
        m = torch.gather(grp, -1, idx)
        d = m / -8.0
        d = torch.where(d == 0, torch.full_like(d, 1e-12), d)
        q = torch.round(grp / d).clamp(-8, 7)
        deq = (q * d).reshape(rows, cols)
        out[k] = as_linear(k, deq).contiguous().to(weights[k].dtype)
        scales[k] = d[..., 0].float()
    return out, {"transform": "quantise", "quant": "int4_per_group", "bits": 4, "group_size": group_size,
                 "symmetric": True, "tensors": sorted(scales), "scales": scales}


# --------------------------------------------------------------------------- LoRA

def lora_targets(weights: Weights, modules: list[str] | tuple[str, ...]) -> list[str]:
    """Weight names whose module (last name component before ``.weight``) is in
    ``modules`` — PEFT's ``target_modules`` rule (e.g. ``q_proj``, ``c_attn``)."""
    out = []
    for k in sorted(weights):
        parts = k.split(".")
        if weights[k].dim() == 2 and parts[-1] == "weight" and len(parts) >= 2 and parts[-2] in modules:
            if layer_index(k) is not None:
                out.append(k)
    return out


def lora_merge(
    weights: Weights,
    rank: int,
    modules: list[str] | tuple[str, ...],
    seed: int,
    scale: float = 0.05,
) -> tuple[Weights, dict[str, Any]]:
    """Merge a random rank-``rank`` update ``B @ A`` into every targeted module.

    Each delta has Frobenius norm ``scale × ‖W‖`` and a decaying spectrum (like a
    trained adapter).  ``info["adapter"]`` holds the PEFT tensors
    (``base_model.model.<module>.lora_A.weight`` ``(r, in)`` and ``lora_B``
    ``(out, r)``, with ``lora_alpha = r`` so the scaling is 1).
    """
    g = _gen(seed)
    targets = lora_targets(weights, modules)
    if not targets:
        raise ValueError(f"no module matches {list(modules)}")
    out = {k: v.clone() for k, v in weights.items()}
    adapter: dict[str, torch.Tensor] = {}
    for k in targets:
        W = as_linear(k, weights[k].double())
        n_out, n_in = W.shape
        r = min(rank, n_out, n_in)
        A = torch.randn(r, n_in, generator=g, dtype=torch.float64) / math.sqrt(n_in)
        B = torch.randn(n_out, r, generator=g, dtype=torch.float64)
        B = B * (1.0 / (1.0 + torch.arange(r, dtype=torch.float64)))[None, :] ** 0.5
        delta = B @ A
        c = scale * W.norm() / delta.norm().clamp_min(1e-30)
        B = B * c
        delta = B @ A
        out[k] = as_linear(k, W + delta).contiguous().to(weights[k].dtype)
        mod = k[: -len(".weight")]
        adapter[f"base_model.model.{mod}.lora_A.weight"] = A.float().contiguous()
        adapter[f"base_model.model.{mod}.lora_B.weight"] = B.float().contiguous()
    return out, {"transform": "lora_merge", "rank": rank, "target_modules": list(modules), "scale": scale,
                 "modules": targets, "lora_alpha": rank, "adapter": adapter}


def peft_adapter_config(rank: int, modules: list[str] | tuple[str, ...], family: str, base: str = "") -> dict[str, Any]:
    """A PEFT ``adapter_config.json`` for an adapter built by :func:`lora_merge` or training."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": rank,
        "lora_alpha": rank,
        "lora_dropout": 0.0,
        "target_modules": sorted(modules),
        "fan_in_fan_out": family == "gpt2",
        "bias": "none",
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
    }


# --------------------------------------------------------------------------- depth and width

def remap_layers(cfg: TinyConfig, weights: Weights, layer_map: list[int]) -> tuple[TinyConfig, Weights, dict[str, Any]]:
    """New layer ``j`` is a copy of old layer ``layer_map[j]`` (drop, duplicate, reorder)."""
    if not layer_map or any(not 0 <= i < cfg.n_layers for i in layer_map):
        raise ValueError(f"bad layer map {layer_map} for {cfg.n_layers} layers")
    names = llama_layer_names if cfg.family == "llama" else gpt2_layer_names
    out = {k: v.clone() for k, v in weights.items() if layer_index(k) is None}
    for j, src in enumerate(layer_map):
        old, new = names(src), names(j)
        for role in old:
            out[new[role]] = weights[old[role]].clone()
    new_cfg = cfg.with_(n_layers=len(layer_map))
    return new_cfg, out, {"transform": "remap_layers", "layer_map": list(layer_map)}


def drop_layers(cfg: TinyConfig, weights: Weights, drop: list[int]) -> tuple[TinyConfig, Weights, dict[str, Any]]:
    """Remove the listed layers; ``info["layer_map"]`` lists the kept parents."""
    keep = [i for i in range(cfg.n_layers) if i not in set(drop)]
    c, w, info = remap_layers(cfg, weights, keep)
    info.update(transform="drop_layers", dropped=sorted(drop))
    return c, w, info


def duplicate_layers(cfg: TinyConfig, weights: Weights, layer_map: list[int]) -> tuple[TinyConfig, Weights, dict[str, Any]]:
    """Frankenmerge-style stack: layers repeat, e.g. ``[0, 1, 1, 2, 3]``."""
    c, w, info = remap_layers(cfg, weights, layer_map)
    info["transform"] = "duplicate_layers"
    return c, w, info


def prune_mlp_width(cfg: TinyConfig, weights: Weights, keep: int) -> tuple[TinyConfig, Weights, dict[str, Any]]:
    """Keep the ``keep`` MLP neurons of largest ``‖in row‖·‖out column‖`` in every layer
    (in their original order); ``info["kept"][layer]`` lists them."""
    if not 0 < keep <= cfg.intermediate:
        raise ValueError(f"keep must be in 1..{cfg.intermediate}")
    out = {k: v.clone() for k, v in weights.items()}
    kept_all = []
    for i in range(cfg.n_layers):
        if cfg.family == "llama":
            n = llama_layer_names(i)
            imp = (weights[n["gate"]].norm(dim=1) + weights[n["up"]].norm(dim=1)) * weights[n["down"]].norm(dim=0)
            kept = torch.sort(torch.topk(imp, keep).indices).values
            out[n["gate"]] = weights[n["gate"]][kept].clone()
            out[n["up"]] = weights[n["up"]][kept].clone()
            out[n["down"]] = weights[n["down"]][:, kept].clone()
        else:
            n = gpt2_layer_names(i)
            imp = weights[n["fc_w"]].norm(dim=0) * weights[n["mproj_w"]].norm(dim=1)
            kept = torch.sort(torch.topk(imp, keep).indices).values
            out[n["fc_w"]] = weights[n["fc_w"]][:, kept].clone()
            out[n["fc_b"]] = weights[n["fc_b"]][kept].clone()
            out[n["mproj_w"]] = weights[n["mproj_w"]][kept].clone()
        kept_all.append(kept.tolist())
    return cfg.with_(intermediate=keep), out, {"transform": "prune_mlp_width", "keep": keep, "kept": kept_all}


# --------------------------------------------------------------------------- vocabulary

def _vocab_tensors(cfg: TinyConfig) -> list[str]:
    return [embed_name(cfg)] + ([] if cfg.tie_embeddings else ["lm_head.weight"])


def extend_vocab(cfg: TinyConfig, weights: Weights, n_new: int, seed: int) -> tuple[TinyConfig, Weights, dict[str, Any]]:
    """Append ``n_new`` rows (mean of the old rows plus small noise), as
    ``resize_token_embeddings`` does.  Old ids keep their rows."""
    g = _gen(seed)
    out = {k: v.clone() for k, v in weights.items()}
    for k in _vocab_tensors(cfg):
        E = weights[k]
        new = E.mean(0, keepdim=True) + 0.1 * E.std() * torch.randn(n_new, E.shape[1], generator=g).to(E.dtype)
        out[k] = torch.cat([E, new], dim=0)
    return cfg.with_(vocab=cfg.vocab + n_new), out, {"transform": "extend_vocab", "n_new": n_new,
                                                      "old_vocab": cfg.vocab}


def prune_vocab(cfg: TinyConfig, weights: Weights, keep_ids: list[int]) -> tuple[TinyConfig, Weights, dict[str, Any]]:
    """Keep only ``keep_ids`` (new id ``j`` = old id ``keep_ids[j]``)."""
    idx = torch.tensor(keep_ids)
    out = {k: v.clone() for k, v in weights.items()}
    for k in _vocab_tensors(cfg):
        out[k] = weights[k][idx].clone()
    return cfg.with_(vocab=len(keep_ids)), out, {"transform": "prune_vocab", "kept": list(keep_ids),
                                                  "old_vocab": cfg.vocab}


def reorder_vocab(cfg: TinyConfig, weights: Weights, seed: int) -> tuple[TinyConfig, Weights, dict[str, Any]]:
    """Shuffle token ids (new id ``j`` = old id ``perm[j]``); tokens keep their rows."""
    perm = torch.randperm(cfg.vocab, generator=_gen(seed))
    out = {k: v.clone() for k, v in weights.items()}
    for k in _vocab_tensors(cfg):
        out[k] = weights[k][perm].clone()
    return cfg, out, {"transform": "reorder_vocab", "perm": perm.tolist()}


# --------------------------------------------------------------------------- merges

def merge_linear(models: list[Weights], coeffs: list[float]) -> tuple[Weights, dict[str, Any]]:
    """``Σ c_i W_i`` tensor by tensor (coefficients need not sum to 1)."""
    if len(models) != len(coeffs):
        raise ValueError("one coefficient per model")
    out = {}
    for k in models[0]:
        acc = sum(c * m[k].double() for c, m in zip(coeffs, models))
        out[k] = acc.to(models[0][k].dtype)
    return out, {"transform": "merge_linear", "weights": list(coeffs)}


def _slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    va, vb = a.double().flatten(), b.double().flatten()
    cos = torch.dot(va, vb) / (va.norm() * vb.norm()).clamp_min(1e-30)
    cos = cos.clamp(-1.0, 1.0)
    omega = torch.arccos(cos)
    if omega.abs() < 1e-4:
        r = (1 - t) * va + t * vb
    else:
        so = torch.sin(omega)
        r = torch.sin((1 - t) * omega) / so * va + torch.sin(t * omega) / so * vb
    return r.reshape(a.shape).to(a.dtype)


def merge_slerp(a: Weights, b: Weights, t: float) -> tuple[Weights, dict[str, Any]]:
    """Spherical interpolation per tensor (``t = 0`` gives ``a``)."""
    return {k: _slerp(a[k], b[k], t) for k in a}, {"transform": "merge_slerp", "t": t}


def merge_ties(
    base: Weights, finetunes: list[Weights], weights: list[float], density: float = 0.5
) -> tuple[Weights, dict[str, Any]]:
    """TIES: trim each task vector to its top ``density`` fraction by magnitude,
    elect a sign per element from the weighted sum, average the agreeing entries."""
    out = {}
    for k in base:
        b = base[k].double()
        taus = []
        for ft in finetunes:
            tau = ft[k].double() - b
            n_keep = max(1, int(round(density * tau.numel())))
            thr = tau.abs().flatten().kthvalue(tau.numel() - n_keep + 1).values if n_keep < tau.numel() else 0.0
            taus.append(torch.where(tau.abs() >= thr, tau, torch.zeros_like(tau)))
        stack = torch.stack([w * t for w, t in zip(weights, taus)])
        sign = torch.sign(stack.sum(0))
        agree = (torch.sign(stack) == sign) & (stack != 0)
        wsum = torch.stack([torch.full_like(b, w) for w in weights])
        num = (stack * agree).sum(0)
        den = (wsum * agree).sum(0)
        merged = torch.where(den > 0, num / den.clamp_min(1e-30), torch.zeros_like(b))
        out[k] = (b + merged).to(base[k].dtype)
    return out, {"transform": "merge_ties", "weights": list(weights), "density": density}
