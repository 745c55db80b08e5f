"""Tiny Llama-style and GPT-2-style causal language models in plain torch.

Weights live in a flat ``dict[str, Tensor]`` keyed by the Hugging Face tensor
names of ``LlamaForCausalLM`` / ``GPT2LMHeadModel``, so a saved model is a
checkpoint the rest of the tool reads like any Hub model.  The forward pass is
written here (no ``transformers``): it is used to train the zoo and to check
that function-preserving transforms really preserve the function.

Orientation follows the Hugging Face files: Llama linears are ``nn.Linear``
``(out, in)``; GPT-2 ``Conv1D`` weights are stored ``(in, out)``.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

FAMILIES = ("llama", "gpt2")


@dataclass(frozen=True)
class TinyConfig:
    """Shape and hyper-parameters of a tiny model.

    ``n_kv_heads`` is ignored (equal to ``n_heads``) for GPT-2.  ``rope_theta`` is
    ignored for GPT-2, which has learned positions instead.
    """

    family: str = "llama"
    vocab: int = 512
    hidden: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    intermediate: int = 172
    max_pos: int = 128
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        if self.hidden % self.n_heads:
            raise ValueError(f"hidden {self.hidden} is not a multiple of n_heads {self.n_heads}")
        if self.family == "llama":
            if self.n_heads % self.n_kv_heads:
                raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
            if self.head_dim % 2:
                raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim}")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.n_heads

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads actually used (GPT-2 has no GQA)."""
        return self.n_kv_heads if self.family == "llama" else self.n_heads

    def with_(self, **changes: Any) -> TinyConfig:
        """A copy with some fields changed."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_hf_config(self) -> dict[str, Any]:
        """A Hugging Face ``config.json`` for this model."""
        if self.family == "llama":
            return {
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "vocab_size": self.vocab,
                "hidden_size": self.hidden,
                "intermediate_size": self.intermediate,
                "num_hidden_layers": self.n_layers,
                "num_attention_heads": self.n_heads,
                "num_key_value_heads": self.n_kv_heads,
                "head_dim": self.head_dim,
                "max_position_embeddings": self.max_pos,
                "rms_norm_eps": self.norm_eps,
                "rope_theta": self.rope_theta,
                "rope_scaling": None,
                "hidden_act": "silu",
                "attention_bias": False,
                "attention_dropout": 0.0,
                "mlp_bias": False,
                "initializer_range": 0.02,
                "tie_word_embeddings": self.tie_embeddings,
                "bos_token_id": 1,
                "eos_token_id": 2,
                "torch_dtype": "float32",
                "use_cache": True,
            }
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": self.vocab,
            "n_embd": self.hidden,
            "n_layer": self.n_layers,
            "n_head": self.n_heads,
            "n_inner": self.intermediate,
            "n_positions": self.max_pos,
            "n_ctx": self.max_pos,
            "layer_norm_epsilon": self.norm_eps,
            "activation_function": "gelu_new",
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "initializer_range": 0.02,
            "scale_attn_weights": True,
            "tie_word_embeddings": self.tie_embeddings,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "torch_dtype": "float32",
            "use_cache": True,
        }

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> TinyConfig:
        """Inverse of :meth:`to_hf_config` (for the two supported model types)."""
        mt = hf.get("model_type")
        if mt == "llama":
            return cls(
                family="llama",
                vocab=hf["vocab_size"],
                hidden=hf["hidden_size"],
                n_layers=hf["num_hidden_layers"],
                n_heads=hf["num_attention_heads"],
                n_kv_heads=hf.get("num_key_value_heads", hf["num_attention_heads"]),
                intermediate=hf["intermediate_size"],
                max_pos=hf["max_position_embeddings"],
                norm_eps=hf["rms_norm_eps"],
                tie_embeddings=hf.get("tie_word_embeddings", False),
                rope_theta=hf.get("rope_theta", 10000.0),
            )
        if mt == "gpt2":
            return cls(
                family="gpt2",
                vocab=hf["vocab_size"],
                hidden=hf["n_embd"],
                n_layers=hf["n_layer"],
                n_heads=hf["n_head"],
                n_kv_heads=hf["n_head"],
                intermediate=hf.get("n_inner") or 4 * hf["n_embd"],
                max_pos=hf["n_positions"],
                norm_eps=hf["layer_norm_epsilon"],
                tie_embeddings=hf.get("tie_word_embeddings", True),
            )
        raise ValueError(f"unsupported model_type {mt!r}")


# --------------------------------------------------------------------------- names

def llama_layer_names(i: int) -> dict[str, str]:
    """Short role → Hugging Face name for Llama layer ``i``."""
    p = f"model.layers.{i}."
    return {
        "norm_attn": p + "input_layernorm.weight",
        "q": p + "self_attn.q_proj.weight",
        "k": p + "self_attn.k_proj.weight",
        "v": p + "self_attn.v_proj.weight",
        "o": p + "self_attn.o_proj.weight",
        "norm_mlp": p + "post_attention_layernorm.weight",
        "gate": p + "mlp.gate_proj.weight",
        "up": p + "mlp.up_proj.weight",
        "down": p + "mlp.down_proj.weight",
    }


def gpt2_layer_names(i: int) -> dict[str, str]:
    """Short role → Hugging Face name for GPT-2 block ``i``."""
    p = f"transformer.h.{i}."
    return {
        "ln1_w": p + "ln_1.weight",
        "ln1_b": p + "ln_1.bias",
        "attn_w": p + "attn.c_attn.weight",
        "attn_b": p + "attn.c_attn.bias",
        "proj_w": p + "attn.c_proj.weight",
        "proj_b": p + "attn.c_proj.bias",
        "ln2_w": p + "ln_2.weight",
        "ln2_b": p + "ln_2.bias",
        "fc_w": p + "mlp.c_fc.weight",
        "fc_b": p + "mlp.c_fc.bias",
        "mproj_w": p + "mlp.c_proj.weight",
        "mproj_b": p + "mlp.c_proj.bias",
    }


def embed_name(cfg: TinyConfig) -> str:
    return "model.embed_tokens.weight" if cfg.family == "llama" else "transformer.wte.weight"


def final_norm_names(cfg: TinyConfig) -> list[str]:
    if cfg.family == "llama":
        return ["model.norm.weight"]
    return ["transformer.ln_f.weight", "transformer.ln_f.bias"]


def lm_head_name(cfg: TinyConfig) -> str:
    """The tensor used as the output head (the embedding when tied)."""
    return embed_name(cfg) if cfg.tie_embeddings else "lm_head.weight"


def layer_index(name: str) -> int | None:
    """Layer number in a Hugging Face tensor name, or None for global tensors."""
    parts = name.split(".")
    for key in ("layers", "h"):
        if key in parts:
            j = parts.index(key)
            if j + 1 < len(parts) and parts[j + 1].isdigit():
                return int(parts[j + 1])
    return None


# --------------------------------------------------------------------------- init

def init_weights(cfg: TinyConfig, seed: int) -> dict[str, torch.Tensor]:
    """Fresh weights with the usual Hugging Face initialisation (normal, std 0.02)."""
    g = torch.Generator().manual_seed(int(seed))

    def normal(*shape: int, std: float = 0.02) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float32) * std

    H, I, V = cfg.hidden, cfg.intermediate, cfg.vocab
    w: dict[str, torch.Tensor] = {}
    if cfg.family == "llama":
        kv = cfg.n_kv_heads * cfg.head_dim
        w["model.embed_tokens.weight"] = normal(V, H)
        for i in range(cfg.n_layers):
            n = llama_layer_names(i)
            w[n["norm_attn"]] = torch.ones(H)
            w[n["q"]] = normal(H, H)
            w[n["k"]] = normal(kv, H)
            w[n["v"]] = normal(kv, H)
            w[n["o"]] = normal(H, H)
            w[n["norm_mlp"]] = torch.ones(H)
            w[n["gate"]] = normal(I, H)
            w[n["up"]] = normal(I, H)
            w[n["down"]] = normal(H, I)
        w["model.norm.weight"] = torch.ones(H)
        if not cfg.tie_embeddings:
            w["lm_head.weight"] = normal(V, H)
        return w
    proj_std = 0.02 / math.sqrt(2 * cfg.n_layers)
    w["transformer.wte.weight"] = normal(V, H)
    w["transformer.wpe.weight"] = normal(cfg.max_pos, H, std=0.01)
    for i in range(cfg.n_layers):
        n = gpt2_layer_names(i)
        w[n["ln1_w"]] = torch.ones(H)
        w[n["ln1_b"]] = torch.zeros(H)
        w[n["attn_w"]] = normal(H, 3 * H)
        w[n["attn_b"]] = torch.zeros(3 * H)
        w[n["proj_w"]] = normal(H, H, std=proj_std)
        w[n["proj_b"]] = torch.zeros(H)
        w[n["ln2_w"]] = torch.ones(H)
        w[n["ln2_b"]] = torch.zeros(H)
        w[n["fc_w"]] = normal(H, I)
        w[n["fc_b"]] = torch.zeros(I)
        w[n["mproj_w"]] = normal(I, H, std=proj_std)
        w[n["mproj_b"]] = torch.zeros(H)
    w["transformer.ln_f.weight"] = torch.ones(H)
    w["transformer.ln_f.bias"] = torch.zeros(H)
    if not cfg.tie_embeddings:
        w["lm_head.weight"] = normal(V, H)
    return w


def expected_shapes(cfg: TinyConfig) -> dict[str, tuple[int, ...]]:
    """Name → shape of every tensor a model of this config has."""
    return {k: tuple(v.shape) for k, v in init_weights(cfg, 0).items()}


# --------------------------------------------------------------------------- forward

def rms_norm(x: torch.Tensor, g: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * g


def rope_tables(cfg: TinyConfig, seq: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (seq, head_dim) in the Hugging Face "rotate half" layout."""
    hd = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    ang = torch.arange(seq, dtype=torch.float64)[:, None] * inv[None, :]
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos().to(dtype), ang.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention on (B, heads, T, hd) tensors; k/v already expanded to all heads."""
    T = q.shape[2]
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    mask = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
    scores = scores.masked_fill(mask, float("-inf"))
    return scores.softmax(-1) @ v


def _llama_forward(cfg: TinyConfig, w: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    B, T = ids.shape
    nh, nkv, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    x = F.embedding(ids, w["model.embed_tokens.weight"])
    cos, sin = rope_tables(cfg, T, x.dtype)
    for i in range(cfg.n_layers):
        n = llama_layer_names(i)
        h = rms_norm(x, w[n["norm_attn"]], cfg.norm_eps)
        q = (h @ w[n["q"]].T).view(B, T, nh, hd).transpose(1, 2)
        k = (h @ w[n["k"]].T).view(B, T, nkv, hd).transpose(1, 2)
        v = (h @ w[n["v"]].T).view(B, T, nkv, hd).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        rep = nh // nkv
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        a = _attention(q, k, v).transpose(1, 2).reshape(B, T, nh * hd)
        x = x + a @ w[n["o"]].T
        h = rms_norm(x, w[n["norm_mlp"]], cfg.norm_eps)
        m = F.silu(h @ w[n["gate"]].T) * (h @ w[n["up"]].T)
        x = x + m @ w[n["down"]].T
    x = rms_norm(x, w["model.norm.weight"], cfg.norm_eps)
    return x @ w[lm_head_name(cfg)].T


def _gpt2_forward(cfg: TinyConfig, w: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    B, T = ids.shape
    H, nh, hd = cfg.hidden, cfg.n_heads, cfg.head_dim
    pos = torch.arange(T, device=ids.device)
    x = F.embedding(ids, w["transformer.wte.weight"]) + w["transformer.wpe.weight"][pos]
    for i in range(cfg.n_layers):
        n = gpt2_layer_names(i)
        h = F.layer_norm(x, (H,), w[n["ln1_w"]], w[n["ln1_b"]], cfg.norm_eps)
        qkv = h @ w[n["attn_w"]] + w[n["attn_b"]]
        q, k, v = (t.view(B, T, nh, hd).transpose(1, 2) for t in qkv.split(H, dim=-1))
        a = _attention(q, k, v).transpose(1, 2).reshape(B, T, H)
        x = x + a @ w[n["proj_w"]] + w[n["proj_b"]]
        h = F.layer_norm(x, (H,), w[n["ln2_w"]], w[n["ln2_b"]], cfg.norm_eps)
        m = F.gelu(h @ w[n["fc_w"]] + w[n["fc_b"]], approximate="tanh")
        x = x + m @ w[n["mproj_w"]] + w[n["mproj_b"]]
    x = F.layer_norm(x, (H,), w["transformer.ln_f.weight"], w["transformer.ln_f.bias"], cfg.norm_eps)
    return x @ w[lm_head_name(cfg)].T


def forward(cfg: TinyConfig, weights: dict[str, torch.Tensor], input_ids: torch.Tensor) -> torch.Tensor:
    """Logits ``(batch, seq, vocab)`` for ``input_ids`` ``(batch, seq)`` (or ``(seq,)``).

    Computed in the dtype of the weights; pass float64 weights for exact checks.
    """
    ids = input_ids if input_ids.dim() == 2 else input_ids[None]
    if ids.shape[1] > cfg.max_pos:
        raise ValueError(f"sequence length {ids.shape[1]} exceeds max_pos {cfg.max_pos}")
    if cfg.family == "llama":
        return _llama_forward(cfg, weights, ids)
    return _gpt2_forward(cfg, weights, ids)


def lm_loss(cfg: TinyConfig, weights: dict[str, torch.Tensor], input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over a batch ``(batch, seq)``."""
    logits = forward(cfg, weights, input_ids[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), input_ids[:, 1:].reshape(-1))


def to_dtype(weights: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype) for k, v in weights.items()}


def n_params(weights: dict[str, torch.Tensor]) -> int:
    return sum(v.numel() for v in weights.values())


# --------------------------------------------------------------------------- files

def save_model(
    folder: str | Path,
    cfg: TinyConfig,
    weights: dict[str, torch.Tensor],
    tokenizer: Any = None,
    *,
    dtype: torch.dtype = torch.float32,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write ``model.safetensors`` + ``config.json`` (+ ``tokenizer.json``) into ``folder``.

    ``tokenizer`` may be an object with ``save(folder)``, or a dict written as
    ``tokenizer.json``.  Returns the folder path.  Extra ``metadata`` keys make the
    bytes non-deterministic (safetensors writes its metadata map in hash order).
    """
    from safetensors.torch import save_file

    d = Path(folder)
    d.mkdir(parents=True, exist_ok=True)
    shapes = expected_shapes(cfg)
    missing = sorted(set(shapes) - set(weights))
    extra = sorted(set(weights) - set(shapes))
    if missing or extra:
        raise ValueError(f"weights do not match the config: missing {missing[:4]}, extra {extra[:4]}")
    for k, s in shapes.items():
        if tuple(weights[k].shape) != s:
            raise ValueError(f"{k}: expected shape {s}, found {tuple(weights[k].shape)}")
    tensors = {k: weights[k].detach().to(dtype).contiguous().clone() for k in sorted(weights)}
    meta = {"format": "pt"}
    meta.update(metadata or {})
    save_file(tensors, str(d / "model.safetensors"), metadata=meta)
    hf = cfg.to_hf_config()
    hf["torch_dtype"] = str(dtype).replace("torch.", "")
    (d / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
    if tokenizer is not None:
        if hasattr(tokenizer, "save"):
            tokenizer.save(d)
        else:
            (d / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False) + "\n", encoding="utf-8")
    return d


def load_model(folder: str | Path) -> tuple[TinyConfig, dict[str, torch.Tensor]]:
    """Read back what :func:`save_model` wrote (float32 tensors)."""
    from safetensors.torch import load_file

    d = Path(folder)
    cfg = TinyConfig.from_hf_config(json.loads((d / "config.json").read_text()))
    w = {k: v.float() for k, v in load_file(str(d / "model.safetensors")).items()}
    return cfg, w
