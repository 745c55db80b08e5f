"""Architecture facts from a config: HF ``config.json`` or raw GGUF key/values."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lineage.roles.names import alias


def _pos_int(v: Any) -> int | None:
    """A positive int from a config value (numpy scalars accepted), else None."""
    if isinstance(v, bool):
        return None
    if isinstance(v, (list, tuple)):
        vals = {_pos_int(x) for x in v}
        return vals.pop() if len(vals) == 1 else None
    try:
        i = int(v)
    except (TypeError, ValueError, OverflowError):
        return None
    return i if i > 0 and i == v else None


@dataclass
class Cfg:
    """What a config says (``None`` where it says nothing); mutable while roles are assigned."""

    family: str | None = None
    model_type: str | None = None
    architectures: tuple[str, ...] = ()
    n_layers: int | None = None
    hidden: int | None = None
    n_heads: int | None = None
    n_kv_heads: int | None = None
    head_dim: int | None = None
    intermediate: int | None = None
    vocab: int | None = None
    max_positions: int | None = None
    tied: bool | None = None
    falcon_new_arch: bool = False
    falcon_multi_query: bool = False
    alibi: bool = False
    gguf_unpermuted: bool = False
    gguf_arch: str | None = None


def _first(d: Mapping[str, Any], *keys: str) -> int | None:
    for k in keys:
        if k in d:
            v = _pos_int(d[k])
            if v is not None:
                return v
    return None


def read_hf_config(config: Mapping[str, Any]) -> Cfg:
    c = Cfg()
    text = config.get("text_config")
    d: dict[str, Any] = dict(config)
    if isinstance(text, Mapping):  # multimodal wrapper: the language model's values win
        d.update(text)
    mt = d.get("model_type")
    c.model_type = str(config.get("model_type") or mt) if (config.get("model_type") or mt) else None
    if isinstance(mt, str) and mt:
        fam = mt.lower().removesuffix("_text")
        c.family = alias(fam)
    archs = config.get("architectures")
    if isinstance(archs, list):
        c.architectures = tuple(str(a) for a in archs)
    c.n_layers = _first(d, "num_hidden_layers", "n_layer", "num_layers", "encoder_layers")
    c.hidden = _first(d, "hidden_size", "n_embd", "d_model")
    c.n_heads = _first(d, "num_attention_heads", "n_head", "num_heads", "encoder_attention_heads")
    c.n_kv_heads = _first(d, "num_key_value_heads", "num_kv_heads", "n_head_kv")
    c.head_dim = _first(d, "head_dim", "d_kv")
    c.intermediate = _first(d, "intermediate_size", "n_inner", "ffn_dim", "d_ff", "encoder_ffn_dim")
    c.vocab = _first(d, "vocab_size")
    c.max_positions = _first(d, "max_position_embeddings", "n_positions")
    tie = d.get("tie_word_embeddings")
    c.tied = tie if isinstance(tie, bool) else None
    c.alibi = d.get("alibi") is True or c.family == "bloom"
    if config.get("_from_gguf") is True and c.model_type:
        # lineage.io.gguf's config-like dict: GGUF architecture names, q/k already un-permuted.
        c.gguf_arch = c.model_type
        c.family = f"gguf-{c.model_type}"
        c.gguf_unpermuted = True
    if c.family == "falcon":
        c.falcon_new_arch = d.get("new_decoder_architecture") is True
        c.falcon_multi_query = d.get("multi_query", True) is True and not c.falcon_new_arch
        if c.falcon_multi_query:
            c.n_kv_heads = 1
    if c.family == "gpt2" and c.intermediate is None and c.hidden is not None:
        c.intermediate = 4 * c.hidden
    return c


def read_gguf_kv(kv: Mapping[str, Any]) -> Cfg:
    c = Cfg()
    arch = str(kv.get("general.architecture"))
    c.gguf_arch = arch
    c.family = f"gguf-{arch}"
    c.model_type = arch
    c.n_layers = _first(kv, f"{arch}.block_count")
    c.hidden = _first(kv, f"{arch}.embedding_length")
    c.n_heads = _first(kv, f"{arch}.attention.head_count")
    c.n_kv_heads = _first(kv, f"{arch}.attention.head_count_kv") or c.n_heads
    c.head_dim = _first(kv, f"{arch}.attention.key_length")
    c.intermediate = _first(kv, f"{arch}.feed_forward_length")
    c.vocab = _first(kv, f"{arch}.vocab_size")
    c.max_positions = _first(kv, f"{arch}.context_length")
    return c
