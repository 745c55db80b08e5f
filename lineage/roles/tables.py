"""Architecture knowledge as data: one table per family, read by :mod:`lineage.roles.assign`.

Each :class:`Family` says how its stored tensor names map to role stems:

- ``stacks``: the layer containers (a regex whose one group is the layer index) and, per
  stack, the module paths inside a layer → :class:`Part` (role stem and stored layout).
  Module paths may hold ``{E}`` for an expert index (mixture-of-experts).
- ``globals``: module paths outside layers (or whole parameter-less tensor names such as
  ViT's ``embeddings.cls_token``) → role stem.
- ``model_types``: config ``model_type`` values that use the table; ``markers`` (regexes
  over the stored names with framework prefixes stripped, all must match some name) and
  ``absent`` (none may match) identify the family from names alone (no markers: by config only), tried in
  :data:`FAMILIES` order.
- ``borrow``: decoder-only tables also accept the names of the other decoder-only tables
  (a checkpoint that mixes conventions, e.g. Phi-2, still gets roles).

Adding an architecture is one entry here plus a fixture in :mod:`lineage.testing.archs`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from types import MappingProxyType


class Layout(str, Enum):
    """How a stored tensor holds its role(s)."""

    PLAIN = "plain"  # the role as stored, (out, in)
    CONV1D = "conv1d"  # GPT-2 Conv1D: stored (in, out), transposed on read
    QKV_CONTIG = "qkv_contig"  # q | k | v rows (Phi-3 qkv_proj, GGUF attn_qkv, Falcon multi-query)
    QKV_CONV1D = "qkv_conv1d"  # GPT-2 c_attn: q | k | v columns of a Conv1D weight
    QKV_HEADS = "qkv_heads"  # GPT-NeoX: per head (q, k, v) interleaved
    QKV_FALCON = "qkv_falcon"  # Falcon/BLOOM: per head or per KV group, by config
    GATE_UP = "gate_up"  # gate | up rows (Phi-3 gate_up_proj, GGUF phi3 ffn_up)


@dataclass(frozen=True)
class Part:
    """What a stored module is: a role ``stem`` (None for fused tensors) and its ``layout``."""

    stem: str | None
    layout: Layout = Layout.PLAIN


@dataclass(frozen=True)
class Stack:
    """A layer container: ``pattern`` matches the name's start, its group is the layer index."""

    pattern: str
    layer: Mapping[str, Part]
    tag: str = ""


@dataclass(frozen=True)
class Family:
    """One architecture family's names (see the module doc)."""

    name: str
    stacks: tuple[Stack, ...]
    globals: Mapping[str, str]
    model_types: tuple[str, ...] = ()
    markers: tuple[str, ...] = ()
    absent: tuple[str, ...] = ()
    borrow: bool = False
    traits: tuple[str | None, str | None] = (None, None)  # (norm, positional) when known


def _parts(table: Mapping[str, str | Part]) -> Mapping[str, Part]:
    return MappingProxyType({k: v if isinstance(v, Part) else Part(v) for k, v in table.items()})


#: Prefixes stripped from stored names before any table is read (repeatedly, in any order).
PREFIXES: tuple[str, ...] = (
    "model.", "transformer.", "gpt_neox.", "bert.", "roberta.", "language_model.", "text_model.", "vit.",
)
#: Parameter suffixes → role parameter.
PARAMS: Mapping[str, str] = MappingProxyType({"weight": "weight", "bias": "bias", "gamma": "weight", "beta": "bias"})

#: The decoder-only layer container: ``layers.N.``, ``h.N.``, ``blk.N.``, ``encoder.layer.N.``.
DECODER_LAYERS = r"^(?:layers|h|blk|encoder\.layer)\.(\d{1,9})\."

# ---------------------------------------------------------------------------- decoder-only tables

_LLAMA = {
    "self_attn.q_proj": "attn.q", "self_attn.k_proj": "attn.k", "self_attn.v_proj": "attn.v",
    "self_attn.o_proj": "attn.o", "self_attn.dense": "attn.o",
    "mlp.gate_proj": "mlp.gate", "mlp.up_proj": "mlp.up", "mlp.down_proj": "mlp.down",
    "mlp.fc1": "mlp.up", "mlp.fc2": "mlp.down",
    "input_layernorm": "norm.attn", "post_attention_layernorm": "norm.mlp",
    "self_attn.q_norm": "attn.q_norm", "self_attn.k_norm": "attn.k_norm",
}
#: Gemma 2/3: sandwich norms; ``post_attention_layernorm`` is *after* attention.
_GEMMA = {
    **_LLAMA, "post_attention_layernorm": "norm.post_attn",
    "pre_feedforward_layernorm": "norm.mlp", "post_feedforward_layernorm": "norm.post_mlp",
}
_PHI3 = {
    **_LLAMA,
    "self_attn.qkv_proj": Part(None, Layout.QKV_CONTIG), "mlp.gate_up_proj": Part(None, Layout.GATE_UP),
}
_GPT2 = {
    "ln_1": "norm.attn", "ln_2": "norm.mlp",
    "attn.c_attn": Part(None, Layout.QKV_CONV1D), "attn.c_proj": Part("attn.o", Layout.CONV1D),
    "mlp.c_fc": Part("mlp.up", Layout.CONV1D), "mlp.c_proj": Part("mlp.down", Layout.CONV1D),
}
_NEOX = {
    "input_layernorm": "norm.attn", "post_attention_layernorm": "norm.mlp",
    "attention.query_key_value": Part(None, Layout.QKV_HEADS), "attention.dense": "attn.o",
    "mlp.dense_h_to_4h": "mlp.up", "mlp.dense_4h_to_h": "mlp.down",
}
_FALCON = {
    "input_layernorm": "norm.attn", "post_attention_layernorm": "norm.mlp",
    "self_attention.query_key_value": Part(None, Layout.QKV_FALCON), "self_attention.dense": "attn.o",
    "ln_attn": "norm.attn", "ln_mlp": "norm.mlp",
    "mlp.dense_h_to_4h": "mlp.up", "mlp.dense_4h_to_h": "mlp.down",
}
#: BERT / RoBERTa: post-norm.
_BERT = {
    "attention.self.query": "attn.q", "attention.self.key": "attn.k", "attention.self.value": "attn.v",
    "attention.output.dense": "attn.o", "attention.output.LayerNorm": "norm.post_attn",
    "intermediate.dense": "mlp.up", "output.dense": "mlp.down", "output.LayerNorm": "norm.post_mlp",
}
_GGUF = {
    "attn_q": "attn.q", "attn_k": "attn.k", "attn_v": "attn.v", "attn_output": "attn.o",
    "attn_qkv": Part(None, Layout.QKV_CONTIG),
    "ffn_gate": "mlp.gate", "ffn_up": "mlp.up", "ffn_down": "mlp.down",
    "attn_norm": "norm.attn", "ffn_norm": "norm.mlp",
    "post_attention_norm": "norm.post_attn", "post_ffw_norm": "norm.post_mlp",
    "attn_q_norm": "attn.q_norm", "attn_k_norm": "attn.k_norm",
    "attn_output_norm": "norm.post_attn", "layer_output_norm": "norm.post_mlp",
}
#: Mixtral: router ``block_sparse_moe.gate``, experts w1 (gate), w3 (up), w2 (down).
_MIXTRAL = {
    **_LLAMA, "block_sparse_moe.gate": "moe.router",
    "block_sparse_moe.experts.{E}.w1": "moe.E{E}.mlp.gate", "block_sparse_moe.experts.{E}.w3": "moe.E{E}.mlp.up",
    "block_sparse_moe.experts.{E}.w2": "moe.E{E}.mlp.down",
}
#: Qwen2-MoE / Qwen3-MoE: router ``mlp.gate``, experts, Qwen2-MoE's shared expert and its gate.
_QWEN_MOE = {
    **_LLAMA, "mlp.gate": "moe.router",
    "mlp.experts.{E}.gate_proj": "moe.E{E}.mlp.gate", "mlp.experts.{E}.up_proj": "moe.E{E}.mlp.up",
    "mlp.experts.{E}.down_proj": "moe.E{E}.mlp.down",
    "mlp.shared_expert.gate_proj": "moe.shared.mlp.gate", "mlp.shared_expert.up_proj": "moe.shared.mlp.up",
    "mlp.shared_expert.down_proj": "moe.shared.mlp.down", "mlp.shared_expert_gate": "moe.shared_gate",
}

_DECODER_GLOBALS = MappingProxyType({
    "embed_tokens": "embed", "wte": "embed", "embed_in": "embed", "word_embeddings": "embed",
    "embeddings.word_embeddings": "embed", "token_embd": "embed", "tok_embeddings": "embed",
    "wpe": "pos_embed", "embeddings.position_embeddings": "pos_embed", "position_embd": "pos_embed",
    "embeddings.token_type_embeddings": "type_embed", "token_types": "type_embed",
    "embeddings.LayerNorm": "embed_norm", "word_embeddings_layernorm": "embed_norm",
    "token_embd_norm": "embed_norm",
    "norm": "final_norm", "ln_f": "final_norm", "final_layer_norm": "final_norm",
    "final_layernorm": "final_norm", "output_norm": "final_norm",
    "lm_head": "lm_head", "embed_out": "lm_head", "output": "lm_head",
    "cls.predictions.decoder": "lm_head", "cls.predictions": "lm_head",
})


def _in_layer(module_param: str) -> str:
    """Marker regex: a decoder-only layer holds ``module_param`` (a regex tail)."""
    return DECODER_LAYERS.removesuffix(r"\.") + r"\." + module_param + "$"


def _decoder(name: str, table: Mapping[str, str | Part], model_types: tuple[str, ...], markers: tuple[str, ...],
             traits: tuple[str | None, str | None] = ("rms", "rope"), absent: tuple[str, ...] = ()) -> Family:
    return Family(name, (Stack(DECODER_LAYERS, _parts(table)),), _DECODER_GLOBALS, model_types, markers,
                  absent, borrow=True, traits=traits)


_GGUF_NAMES = r"^(?:blk\.\d+\.|token_embd\.)"

# ---------------------------------------------------------------------------- encoder-decoder / vision

_T5_SELF = {
    "layer.0.SelfAttention.q": "attn.q", "layer.0.SelfAttention.k": "attn.k", "layer.0.SelfAttention.v": "attn.v",
    "layer.0.SelfAttention.o": "attn.o", "layer.0.SelfAttention.relative_attention_bias": "attn.rel_bias",
    "layer.0.layer_norm": "norm.attn",
}


def _t5_mlp(i: int) -> dict[str, str]:
    p = f"layer.{i}."
    return {p + "DenseReluDense.wi": "mlp.up", p + "DenseReluDense.wi_0": "mlp.gate",
            p + "DenseReluDense.wi_1": "mlp.up", p + "DenseReluDense.wo": "mlp.down", p + "layer_norm": "norm.mlp"}


T5 = Family(
    "t5",
    (Stack(r"^encoder\.block\.(\d{1,9})\.", _parts({**_T5_SELF, **_t5_mlp(1)}), "enc"),
     Stack(r"^decoder\.block\.(\d{1,9})\.", _parts({
         **_T5_SELF, **_t5_mlp(2), "layer.1.EncDecAttention.q": "xattn.q", "layer.1.EncDecAttention.k": "xattn.k",
         "layer.1.EncDecAttention.v": "xattn.v", "layer.1.EncDecAttention.o": "xattn.o",
         "layer.1.EncDecAttention.relative_attention_bias": "xattn.rel_bias", "layer.1.layer_norm": "norm.xattn"}),
         "dec")),
    MappingProxyType({"shared": "embed", "encoder.embed_tokens": "enc.embed", "decoder.embed_tokens": "dec.embed",
                      "encoder.final_layer_norm": "enc.final_norm", "decoder.final_layer_norm": "final_norm",
                      "lm_head": "lm_head"}),
    model_types=("t5", "mt5", "umt5"),
    markers=(r"^encoder\.block\.\d+\.layer\.0\.SelfAttention\.q\.weight$",),
    traits=("rms", "relative"),
)

_WHISPER_SELF = {
    "self_attn.q_proj": "attn.q", "self_attn.k_proj": "attn.k", "self_attn.v_proj": "attn.v",
    "self_attn.out_proj": "attn.o", "self_attn_layer_norm": "norm.attn",
    "fc1": "mlp.up", "fc2": "mlp.down", "final_layer_norm": "norm.mlp",
}
WHISPER = Family(
    "whisper",
    (Stack(r"^encoder\.layers\.(\d{1,9})\.", _parts(_WHISPER_SELF), "enc"),
     Stack(r"^decoder\.layers\.(\d{1,9})\.", _parts({
         **_WHISPER_SELF, "encoder_attn.q_proj": "xattn.q", "encoder_attn.k_proj": "xattn.k",
         "encoder_attn.v_proj": "xattn.v", "encoder_attn.out_proj": "xattn.o",
         "encoder_attn_layer_norm": "norm.xattn"}), "dec")),
    # The encoder's position table is sinusoidal and frozen: a role, never evidence.
    MappingProxyType({"encoder.conv1": "enc.conv1", "encoder.conv2": "enc.conv2",
                      "encoder.embed_positions": "enc.pos_embed", "encoder.layer_norm": "enc.final_norm",
                      "decoder.embed_tokens": "embed", "decoder.embed_positions": "pos_embed",
                      "decoder.layer_norm": "final_norm", "proj_out": "lm_head"}),
    model_types=("whisper",),
    markers=(r"^encoder\.conv1\.weight$", r"^decoder\.layers\.\d+\.encoder_attn\.q_proj\.weight$"),
    traits=("layer", "learned"),
)

_CLIP_LAYER = _parts({
    "self_attn.q_proj": "attn.q", "self_attn.k_proj": "attn.k", "self_attn.v_proj": "attn.v",
    "self_attn.out_proj": "attn.o", "layer_norm1": "norm.attn", "layer_norm2": "norm.mlp",
    "mlp.fc1": "mlp.up", "mlp.fc2": "mlp.down",
})
#: CLIP: two towers (text layers first, then vision layers); ``text_model.`` is a stripped prefix.
CLIP = Family(
    "clip",
    (Stack(r"^encoder\.layers\.(\d{1,9})\.", _CLIP_LAYER, "txt"),
     Stack(r"^vision_model\.encoder\.layers\.(\d{1,9})\.", _CLIP_LAYER, "vis")),
    MappingProxyType({
        "embeddings.token_embedding": "embed", "embeddings.position_embedding": "pos_embed",
        "final_layer_norm": "final_norm", "vision_model.embeddings.patch_embedding": "vis.patch_embed",
        "vision_model.embeddings.class_embedding": "vis.cls_token",
        "vision_model.embeddings.position_embedding": "vis.pos_embed", "vision_model.pre_layrnorm": "vis.pre_norm",
        "vision_model.post_layernorm": "vis.final_norm", "text_projection": "text_proj",
        "visual_projection": "vis_proj", "logit_scale": "logit_scale"}),
    model_types=("clip", "clip_text_model", "clip_vision_model"),
    markers=(r"^(?:vision_model\.embeddings\.class_embedding|encoder\.layers\.\d+\.layer_norm1\.weight)$",),
    traits=("layer", "learned"),
)

VIT = Family(
    "vit",
    (Stack(r"^encoder\.layer\.(\d{1,9})\.", _parts({
        "attention.attention.query": "attn.q", "attention.attention.key": "attn.k",
        "attention.attention.value": "attn.v", "attention.output.dense": "attn.o",
        "intermediate.dense": "mlp.up", "output.dense": "mlp.down",
        "layernorm_before": "norm.attn", "layernorm_after": "norm.mlp"})),),
    MappingProxyType({
        "embeddings.cls_token": "cls_token", "embeddings.position_embeddings": "pos_embed",
        "embeddings.patch_embeddings.projection": "patch_embed", "layernorm": "final_norm",
        "pooler.dense": "pooler", "classifier": "classifier"}),
    model_types=("vit",),
    markers=(r"^embeddings\.patch_embeddings\.projection\.weight$",),
    traits=("layer", "learned"),
)

# ---------------------------------------------------------------------------- the registry

#: Families in the order they are tried when guessing from names (most specific first).
FAMILIES: tuple[Family, ...] = (
    T5, WHISPER, CLIP, VIT,
    _decoder("gguf-unknown", _GGUF, (), (_GGUF_NAMES, _in_layer(r"attn_qkv\.\w+")), (None, None),
             absent=(_in_layer(r"attn_q\.\w+"),)),
    _decoder("gguf-phi3", {**_GGUF, "ffn_up": Part(None, Layout.GATE_UP)}, ("gguf-phi3",), (), ("rms", "rope")),
    _decoder("gguf-llama", _GGUF, (), (_GGUF_NAMES,), (None, None)),
    _decoder("gpt2", _GPT2, ("gpt2",), (_in_layer(r"attn\.c_attn\.\w+"),), ("layer", None)),
    _decoder("gpt_neox", _NEOX, ("gpt_neox",), (_in_layer(r"attention\.query_key_value\.\w+"),), ("layer", "rope")),
    _decoder("falcon", _FALCON, ("falcon",), (_in_layer(r"self_attention\.query_key_value\.\w+"),), ("layer", "rope")),
    _decoder("bloom", _FALCON, ("bloom",), (), ("layer", None)),
    _decoder("bert", _BERT, ("bert", "roberta"), (_in_layer(r"attention\.self\.query\.\w+"),), ("layer", None)),
    _decoder("phi3", _PHI3, ("phi3",), (_in_layer(r"self_attn\.qkv_proj\.\w+"),)),
    _decoder("mixtral", _MIXTRAL, ("mixtral",), (_in_layer(r"block_sparse_moe\.gate\.\w+"),)),
    _decoder("qwen2_moe", _QWEN_MOE, ("qwen2_moe",), (_in_layer(r"mlp\.shared_expert_gate\.\w+"),)),
    _decoder("qwen3_moe", _QWEN_MOE, ("qwen3_moe",), (_in_layer(r"mlp\.experts\.\d+\.gate_proj\.\w+"),)),
    _decoder("gemma3", _GEMMA, ("gemma3",),
             (_in_layer(r"pre_feedforward_layernorm\.\w+"), _in_layer(r"self_attn\.q_norm\.\w+"))),
    _decoder("gemma2", _GEMMA, ("gemma2",), (_in_layer(r"pre_feedforward_layernorm\.\w+"),)),
    _decoder("qwen3", _LLAMA, ("qwen3",), (_in_layer(r"self_attn\.q_proj\.\w+"), _in_layer(r"self_attn\.q_norm\.\w+"))),
    _decoder("qwen2", _LLAMA, ("qwen2",), (_in_layer(r"self_attn\.q_proj\.bias"),)),
    _decoder("llama", _LLAMA, ("llama", "mistral", "gemma"), (_in_layer(r"self_attn\.q_proj\.\w+"),)),
    _decoder("phi", _LLAMA, ("phi",), (), ("layer", "rope")),
)
#: Names every decoder-only table accepts besides its own (``borrow``): the union of their layer tables.
BORROWED: Mapping[str, Part] = _parts({
    **_BERT, **_FALCON, **_NEOX, **_GPT2, **_GGUF, **_PHI3,
    "pre_feedforward_layernorm": "norm.mlp", "post_feedforward_layernorm": "norm.post_mlp",
})
