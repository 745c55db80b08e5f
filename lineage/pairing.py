"""Roles of tensors: which stored tensor plays which part, across naming schemes.

A *role key* names what a tensor does, independently of how a framework spells
it (see ``docs/architecture.md``): ``embed.weight``, ``lm_head.weight``,
``final_norm.weight``, and per layer ``L{i}.attn.q.weight``,
``L{i}.mlp.down.bias``, ``L{i}.norm.attn.weight``, ``L{i}.norm.post_attn.weight``,
``L{i}.attn.q_norm.weight`` …

:func:`assign_roles` maps the tensors of one checkpoint (names and shapes only)
to roles, producing a :class:`RoleMap`; each role is a :class:`RoleView` that
says which stored tensor to read, whether to transpose it (GPT-2 ``Conv1D``)
and which rows to keep (fused QKV and gate/up tensors).  :func:`read_role`,
:func:`iter_role_blocks` and :func:`layer_dict` read roles in the canonical
orientation (``nn.Linear``: ``(out_features, in_features)``; embeddings
``(vocab, hidden)``).  :func:`pair_models` matches the roles of two models.

Supported schemes (with or without ``model.``/``transformer.``/``gpt_neox.``/
``bert.``/``language_model.`` prefixes): Llama/Mistral/Qwen2/Qwen3, Gemma 1-2-3,
Phi-3 (fused ``qkv_proj``/``gate_up_proj``), Phi-2, GPT-2 (Conv1D), GPT-NeoX /
Pythia (per-head interleaved QKV), Falcon/BLOOM, BERT/RoBERTa and llama.cpp GGUF
names (``blk.{i}.attn_q`` …; q/k rows of llama GGUF are un-permuted by
:mod:`lineage.io.gguf`, or here when given raw GGUF metadata).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from lineage.errors import ShapeMismatchError
from lineage.io.checkpoint import DEFAULT_BLOCK_ELEMS, Checkpoint, TensorMeta

log = logging.getLogger(__name__)

Shape = tuple[int, ...]
RowRanges = tuple[tuple[int, int], ...]
#: A role key such as ``"L3.attn.q.weight"`` (a plain string).
Role = str

# ---------------------------------------------------------------------------- role keys

#: Order of per-layer role stems (what follows ``L{i}.``, before ``.weight``/``.bias``).
LAYER_STEMS: tuple[str, ...] = (
    "norm.attn", "attn.q_norm", "attn.k_norm", "attn.q", "attn.k", "attn.v", "attn.o",
    "norm.post_attn", "norm.mlp", "mlp.gate", "mlp.up", "mlp.down", "norm.post_mlp",
)
#: Order of global role stems; layers sort between ``embed_norm`` and ``final_norm``.
GLOBAL_STEMS: tuple[str, ...] = (
    "embed", "type_embed", "pos_embed", "embed_norm", "final_norm", "lm_head",
)
_ROLE_RE = re.compile(r"^L(\d+)\.(.+)$")


def role_key(layer: int | None, stem: str, param: str = "weight") -> Role:
    """Build a role key, e.g. ``role_key(3, "attn.q") == "L3.attn.q.weight"``."""
    return f"{stem}.{param}" if layer is None else f"L{layer}.{stem}.{param}"


def parse_role(role: Role) -> tuple[int | None, str]:
    """Split a role key into ``(layer or None, rest)``: ``"L3.attn.q.weight" -> (3, "attn.q.weight")``."""
    m = _ROLE_RE.match(role)
    return (int(m.group(1)), m.group(2)) if m else (None, role)


def role_sort_key(role: Role) -> tuple[int, int, int, str]:
    """Sort key: global roles first, layers in order (stems in :data:`LAYER_STEMS` order), head last."""
    layer, rest = parse_role(role)
    stem, _, param = rest.rpartition(".")
    p = 0 if param == "weight" else 1
    if layer is None:
        g = GLOBAL_STEMS.index(stem) if stem in GLOBAL_STEMS else len(GLOBAL_STEMS)
        block = 0 if g < GLOBAL_STEMS.index("final_norm") else 1 << 30
        return (block, g, p, role)
    s = LAYER_STEMS.index(stem) if stem in LAYER_STEMS else len(LAYER_STEMS)
    return (1 + layer, s, p, role)


def role_kind(role: Role) -> str:
    """``"embedding"``, ``"matrix"`` (a linear weight), ``"norm"`` or ``"bias"``.

    Norm gains and biases have raw cosine near 1 even between unrelated models,
    so callers show them but do not count them as evidence.
    """
    _, rest = parse_role(role)
    stem, _, param = rest.rpartition(".")
    if "norm" in stem.split(".")[-1] or stem.startswith("norm"):
        return "norm"
    if param == "bias":
        return "bias"
    if stem.endswith("embed"):
        return "embedding"
    return "matrix"


# ---------------------------------------------------------------------------- dataclasses


@dataclass(frozen=True)
class RoleView:
    """How to read one role from a stored tensor.

    ``tensor`` is the stored name; ``transpose`` is set for GPT-2 ``Conv1D``
    weights stored ``(in, out)``; ``rows`` (``None`` = all) lists ``(start, stop)``
    ranges of rows *after* transposition (elements for 1-D tensors) that are
    concatenated in order; ``unpermute_heads`` (0 = no) undoes llama.cpp's
    per-head rotary row permutation of GGUF llama q/k weights for that many heads.
    ``shape`` is the canonical shape after all of that.
    """

    tensor: str
    shape: Shape
    transpose: bool = False
    rows: RowRanges | None = None
    unpermute_heads: int = 0

    @property
    def is_plain(self) -> bool:
        """True when the role is the stored tensor as is (fast streaming path)."""
        return not self.transpose and self.rows is None and not self.unpermute_heads


@dataclass(frozen=True)
class ArchInfo:
    """Architecture of one model, from its config with fallbacks from tensor shapes.

    Fields are ``None`` when neither the config nor the shapes determine them
    (``notes`` says why).  ``source`` is ``"config"``, ``"config+shapes"`` or
    ``"shapes"``.
    """

    family: str
    n_layers: int
    hidden: int | None
    n_heads: int | None
    n_kv_heads: int | None
    head_dim: int | None
    intermediate: int | None
    vocab: int | None
    norm: str  # "rms" | "layer" | "unknown"
    mlp: str  # "glu" | "plain" | "unknown"
    positional: str  # "rope" | "learned" | "alibi" | "unknown"
    tied_embeddings: bool
    max_positions: int | None = None
    qkv_bias: bool = False
    model_type: str | None = None
    architectures: tuple[str, ...] = ()
    source: str = "shapes"
    notes: tuple[str, ...] = ()

    def describe(self) -> str:
        """One line for humans."""
        heads = "? heads" if self.n_heads is None else f"{self.n_heads} heads"
        if self.n_kv_heads is not None and self.n_kv_heads != self.n_heads:
            heads += f" ({self.n_kv_heads} kv)"
        parts = [
            self.family,
            f"{self.n_layers} layers",
            f"hidden {self.hidden if self.hidden is not None else '?'}",
            heads,
            f"intermediate {self.intermediate if self.intermediate is not None else '?'}",
            f"vocab {self.vocab if self.vocab is not None else '?'}",
            f"{self.norm} norm",
            f"{self.mlp} mlp",
            self.positional,
            "tied embeddings" if self.tied_embeddings else "untied",
        ]
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["architectures"] = list(self.architectures)
        d["notes"] = list(self.notes)
        return d


@dataclass(frozen=True)
class RoleMap:
    """Roles of one model's tensors (result of :func:`assign_roles`).

    ``roles`` maps role keys to views, sorted by :func:`role_sort_key`;
    ``unassigned`` lists stored tensors with no role (rotary buffers, attention
    masks, vision towers, MoE experts …).  With tied embeddings and no stored
    head, ``lm_head.weight`` is absent and ``arch.tied_embeddings`` is True.
    """

    roles: dict[Role, RoleView]
    arch: ArchInfo
    unassigned: list[str] = field(default_factory=list)
    notes: tuple[str, ...] = ()

    @property
    def shapes(self) -> dict[Role, Shape]:
        """Canonical shape of every role."""
        return {k: v.shape for k, v in self.roles.items()}

    @property
    def n_layers(self) -> int:
        """Number of layers."""
        return self.arch.n_layers

    @property
    def tied_embeddings(self) -> bool:
        """Whether the output head shares the embedding matrix."""
        return self.arch.tied_embeddings

    def layer_roles(self, i: int) -> dict[str, RoleView]:
        """Views of layer ``i`` keyed by the part after ``L{i}.``."""
        prefix = f"L{i}."
        return {k[len(prefix):]: v for k, v in self.roles.items() if k.startswith(prefix)}

    def global_roles(self) -> dict[Role, RoleView]:
        """Views of the roles outside layers (embeddings, final norm, head)."""
        return {k: v for k, v in self.roles.items() if parse_role(k)[0] is None}


# ---------------------------------------------------------------------------- name tables

_PREFIXES = (
    "model.", "transformer.", "gpt_neox.", "bert.", "roberta.", "language_model.", "text_model.",
)
_LAYER_RE = re.compile(r"^(layers|h|blk|encoder\.layer)\.(\d+)\.(.+)$")

_GLOBALS: dict[str, str] = {
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
}

# Layouts of stored tensors.
_PLAIN, _CONV1D = "plain", "conv1d"
_QKV_CONTIG, _QKV_CONV1D, _QKV_HEADS, _QKV_FALCON = "qkv_contig", "qkv_conv1d", "qkv_heads", "qkv_falcon"
_GATE_UP = "gate_up"
_POST_ATTN_LN, _GGUF_FFN_UP = "post_attention_layernorm?", "ffn_up?"  # depend on the layer's other names

#: Module path inside a layer -> (role stem or None for fused/contextual, layout).
_LAYER: dict[str, tuple[str | None, str]] = {
    # Llama / Mistral / Qwen2 / Gemma / Phi-3 / Phi-2
    "self_attn.q_proj": ("attn.q", _PLAIN), "self_attn.k_proj": ("attn.k", _PLAIN),
    "self_attn.v_proj": ("attn.v", _PLAIN), "self_attn.o_proj": ("attn.o", _PLAIN),
    "self_attn.dense": ("attn.o", _PLAIN),
    "mlp.gate_proj": ("mlp.gate", _PLAIN), "mlp.up_proj": ("mlp.up", _PLAIN),
    "mlp.down_proj": ("mlp.down", _PLAIN), "mlp.fc1": ("mlp.up", _PLAIN), "mlp.fc2": ("mlp.down", _PLAIN),
    "input_layernorm": ("norm.attn", _PLAIN),
    "post_attention_layernorm": (None, _POST_ATTN_LN),
    "pre_feedforward_layernorm": ("norm.mlp", _PLAIN),
    "post_feedforward_layernorm": ("norm.post_mlp", _PLAIN),
    "self_attn.q_norm": ("attn.q_norm", _PLAIN), "self_attn.k_norm": ("attn.k_norm", _PLAIN),
    "self_attn.qkv_proj": (None, _QKV_CONTIG), "mlp.gate_up_proj": (None, _GATE_UP),
    # GPT-2 (Conv1D)
    "ln_1": ("norm.attn", _PLAIN), "ln_2": ("norm.mlp", _PLAIN),
    "attn.c_attn": (None, _QKV_CONV1D), "attn.c_proj": ("attn.o", _CONV1D),
    "mlp.c_fc": ("mlp.up", _CONV1D), "mlp.c_proj": ("mlp.down", _CONV1D),
    # GPT-NeoX / Pythia
    "attention.query_key_value": (None, _QKV_HEADS), "attention.dense": ("attn.o", _PLAIN),
    "mlp.dense_h_to_4h": ("mlp.up", _PLAIN), "mlp.dense_4h_to_h": ("mlp.down", _PLAIN),
    # Falcon / BLOOM
    "self_attention.query_key_value": (None, _QKV_FALCON),
    "self_attention.dense": ("attn.o", _PLAIN),
    "ln_attn": ("norm.attn", _PLAIN), "ln_mlp": ("norm.mlp", _PLAIN),
    # BERT / RoBERTa (post-norm)
    "attention.self.query": ("attn.q", _PLAIN), "attention.self.key": ("attn.k", _PLAIN),
    "attention.self.value": ("attn.v", _PLAIN), "attention.output.dense": ("attn.o", _PLAIN),
    "attention.output.LayerNorm": ("norm.post_attn", _PLAIN),
    "intermediate.dense": ("mlp.up", _PLAIN), "output.dense": ("mlp.down", _PLAIN),
    "output.LayerNorm": ("norm.post_mlp", _PLAIN),
    # llama.cpp GGUF
    "attn_q": ("attn.q", _PLAIN), "attn_k": ("attn.k", _PLAIN), "attn_v": ("attn.v", _PLAIN),
    "attn_output": ("attn.o", _PLAIN), "attn_qkv": (None, _QKV_CONTIG),
    "ffn_gate": ("mlp.gate", _PLAIN), "ffn_up": (None, _GGUF_FFN_UP), "ffn_down": ("mlp.down", _PLAIN),
    "attn_norm": ("norm.attn", _PLAIN), "ffn_norm": ("norm.mlp", _PLAIN),
    "post_attention_norm": ("norm.post_attn", _PLAIN), "post_ffw_norm": ("norm.post_mlp", _PLAIN),
    "attn_q_norm": ("attn.q_norm", _PLAIN), "attn_k_norm": ("attn.k_norm", _PLAIN),
    "attn_output_norm": ("norm.post_attn", _PLAIN), "layer_output_norm": ("norm.post_mlp", _PLAIN),
}
_FAMILY_ALIASES = {"refinedweb": "falcon", "refinedwebmodel": "falcon", "gemma3n": "gemma3"}
_PARAMS = {"weight": "weight", "bias": "bias", "gamma": "weight", "beta": "bias"}

_RMS_FAMILIES = {"llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3"}
_LAYERNORM_FAMILIES = {"gpt2", "gpt_neox", "bert", "roberta", "falcon", "bloom", "phi"}
_ROPE_FAMILIES = _RMS_FAMILIES | {"gpt_neox", "falcon", "phi"}
#: GGUF architectures whose converter permutes q/k rows for llama.cpp's rotary layout.
_GGUF_PERMUTED = {"llama"}


#: Layer numbers may run this far past the number of tensors (a lone shard of a deep model);
#: a larger number cannot be a real layer and would make per-layer work cost what it says.
LAYER_SLACK = 1024


def _strip_prefixes(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            if name.startswith(p):
                name, changed = name[len(p):], True
    return name


@dataclass
class _Entry:
    name: str
    shape: Shape
    layer: int | None
    module: str
    param: str


def _parse_name(name: str, shape: Shape) -> _Entry | None:
    """Split a stored name into (layer, module path, param) if it can carry a role."""
    short = _strip_prefixes(name)
    module, _, param = short.rpartition(".")
    if param not in _PARAMS or not module:
        return None
    m = _LAYER_RE.match(module + ".")
    if m:
        mod = m.group(3)[:-1]
        if mod not in _LAYER:
            return None
        if len(m.group(2)) > 12:  # keeps int() cheap; larger numbers are refused below anyway
            return None
        return _Entry(name, shape, int(m.group(2)), mod, _PARAMS[param])
    if module in _GLOBALS:
        return _Entry(name, shape, None, module, _PARAMS[param])
    return None


# ---------------------------------------------------------------------------- config


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
class _Cfg:
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


def _read_hf_config(config: Mapping[str, Any]) -> _Cfg:
    c = _Cfg()
    text = config.get("text_config")
    d: dict[str, Any] = dict(config)
    if isinstance(text, Mapping):  # multimodal wrapper: the language model's values win
        d.update(text)
    mt = d.get("model_type")
    c.model_type = str(config.get("model_type") or mt) if (config.get("model_type") or mt) else None
    if isinstance(mt, str) and mt:
        fam = mt.lower().removesuffix("_text")
        c.family = _FAMILY_ALIASES.get(fam, fam)
    archs = config.get("architectures")
    if isinstance(archs, list):
        c.architectures = tuple(str(a) for a in archs)
    c.n_layers = _first(d, "num_hidden_layers", "n_layer", "num_layers")
    c.hidden = _first(d, "hidden_size", "n_embd", "d_model")
    c.n_heads = _first(d, "num_attention_heads", "n_head", "num_heads")
    c.n_kv_heads = _first(d, "num_key_value_heads", "num_kv_heads", "n_head_kv")
    c.head_dim = _first(d, "head_dim")
    c.intermediate = _first(d, "intermediate_size", "n_inner", "ffn_dim")
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


def _read_gguf_kv(kv: Mapping[str, Any]) -> _Cfg:
    c = _Cfg()
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


# ---------------------------------------------------------------------------- splitting


def _ranges(*spans: tuple[int, int]) -> RowRanges:
    return tuple((int(s), int(e)) for s, e in spans)


def _split_qkv(
    layout: str, out: int, cfg: _Cfg, hidden: int | None
) -> tuple[dict[str, RowRanges] | None, str | None]:
    """Row ranges of q, k, v inside a fused tensor with ``out`` rows, or (None, reason)."""
    nh, nkv, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    if hd is None and nh and hidden and hidden % nh == 0:
        hd = hidden // nh
    if layout == _QKV_HEADS or (layout == _QKV_FALCON and not (cfg.falcon_new_arch or cfg.falcon_multi_query)):
        # (heads, 3, head_dim, in): GPT-NeoX, BLOOM, Falcon-RW
        if not nh or out % (3 * nh):
            return None, f"fused QKV with {out} rows needs the head count (config num_attention_heads)"
        d = out // (3 * nh)
        parts = {
            s: tuple((h * 3 * d + j * d, h * 3 * d + (j + 1) * d) for h in range(nh))
            for j, s in enumerate(("q", "k", "v"))
        }
        return parts, None
    if layout == _QKV_FALCON and cfg.falcon_new_arch:
        # (kv_heads, q_per_kv + 2, head_dim, in)
        if not (nh and nkv and hd) or nh % nkv or out != (nh + 2 * nkv) * hd:
            return None, f"Falcon grouped QKV with {out} rows does not match the config head counts"
        g = nh // nkv
        step = (g + 2) * hd
        return {
            "q": tuple((k * step, k * step + g * hd) for k in range(nkv)),
            "k": tuple((k * step + g * hd, k * step + (g + 1) * hd) for k in range(nkv)),
            "v": tuple((k * step + (g + 1) * hd, (k + 1) * step) for k in range(nkv)),
        }, None
    # contiguous q | k | v (GPT-2 c_attn, Phi-3 qkv_proj, GGUF attn_qkv, Falcon multi-query)
    if nh and hd:
        kv = nkv or nh
        q_rows, kv_rows = nh * hd, kv * hd
        if q_rows + 2 * kv_rows == out:
            return {
                "q": _ranges((0, q_rows)),
                "k": _ranges((q_rows, q_rows + kv_rows)),
                "v": _ranges((q_rows + kv_rows, out)),
            }, None
    if out % 3 == 0 and (nkv is None or nkv == nh) and (hidden is None or out == 3 * hidden):
        t = out // 3
        return {"q": _ranges((0, t)), "k": _ranges((t, 2 * t)), "v": _ranges((2 * t, out))}, None
    return None, f"fused QKV with {out} rows does not split with the known head counts"


# ---------------------------------------------------------------------------- assign_roles


def _shapes_of(tensors: Mapping[str, TensorMeta] | Mapping[str, Shape]) -> dict[str, Shape]:
    out: dict[str, Shape] = {}
    for name, v in tensors.items():
        shape = v.shape if hasattr(v, "shape") else v
        out[name] = tuple(int(x) for x in shape)
    return out


def _guess_family(entries: list[_Entry]) -> str:
    mods = {e.module for e in entries}
    if any(e.name.startswith("blk.") or e.module == "token_embd" for e in entries):
        return "gguf-llama" if "attn_q" in mods or "attn_qkv" not in mods else "gguf-unknown"
    if "attn.c_attn" in mods:
        return "gpt2"
    if "attention.query_key_value" in mods:
        return "gpt_neox"
    if "self_attention.query_key_value" in mods:
        return "falcon"
    if "attention.self.query" in mods:
        return "bert"
    if "self_attn.qkv_proj" in mods:
        return "phi3"
    if "pre_feedforward_layernorm" in mods:
        return "gemma3" if "self_attn.q_norm" in mods else "gemma2"
    if "self_attn.q_proj" in mods:
        if "self_attn.q_norm" in mods:
            return "qwen3"
        if any(e.module == "self_attn.q_proj" and e.param == "bias" for e in entries):
            return "qwen2"
        return "llama"
    return "unknown"


def assign_roles(
    tensors: Mapping[str, TensorMeta] | Mapping[str, Shape],
    config: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> RoleMap:
    """Give every tensor a role (see module doc); never raises on unfamiliar names.

    ``tensors`` maps stored names to :class:`TensorMeta` or to shapes;
    ``config`` is the HF ``config.json`` dict (or the config-like dict of
    :mod:`lineage.io.gguf`, marked ``_from_gguf``); ``metadata`` may hold raw GGUF
    key/values (``general.architecture`` …), used when no config is given.  GGUF
    llama q/k rows are un-permuted by the view only when the reader has not done
    so already (no ``lineage.qk_unpermuted`` metadata, no ``_from_gguf`` config).
    """
    shapes = _shapes_of(tensors)
    notes: list[str] = []
    if isinstance(config, Mapping) and config:
        cfg = _read_hf_config(config)
    elif metadata and "general.architecture" in metadata:
        cfg = _read_gguf_kv(metadata)
    else:
        cfg = _Cfg()
    from_config = cfg.family is not None or cfg.gguf_arch is not None

    entries: list[_Entry] = []
    unassigned: list[str] = []
    max_layer = len(shapes) + LAYER_SLACK  # layer numbers are bounded by what the file holds
    for name, shape in shapes.items():
        e = _parse_name(name, shape)
        if e is not None and e.layer is not None and e.layer >= max_layer:
            notes.append(f"{name[:120]}: layer number {e.layer} is beyond what {len(shapes)} tensors "
                         "can hold; left unassigned")
            e = None
        (entries.append(e) if e is not None else unassigned.append(name))

    family = cfg.family or _guess_family(entries)
    if cfg.gguf_arch is None and family.startswith("gguf-"):
        cfg.gguf_arch = family.removeprefix("gguf-")
    by_layer: dict[int, set[str]] = {}
    for e in entries:
        if e.layer is not None:
            by_layer.setdefault(e.layer, set()).add(e.module)

    # --- shape-based facts (hidden, vocab, head_dim) needed to split fused tensors
    embed = next((e for e in entries if e.layer is None and _GLOBALS[e.module] == "embed"
                  and e.param == "weight" and len(e.shape) == 2), None)
    hidden_s = embed.shape[1] if embed else None
    if hidden_s is None:
        norm = next((e for e in entries if e.module in ("input_layernorm", "ln_1", "attn_norm")
                     and len(e.shape) == 1), None)
        hidden_s = norm.shape[0] if norm else None
    hidden = hidden_s or cfg.hidden
    if cfg.hidden and hidden_s and cfg.hidden != hidden_s:
        notes.append(f"config hidden_size {cfg.hidden} differs from the weights' {hidden_s}; using the weights")
    if cfg.head_dim is None:
        qn = next((e for e in entries if e.module in ("self_attn.q_norm", "attn_q_norm")
                   and len(e.shape) == 1), None)
        if qn is not None:
            cfg.head_dim = qn.shape[0]
            if cfg.n_heads is None:
                q = next((e for e in entries if e.layer == qn.layer and e.module in ("self_attn.q_proj", "attn_q")
                          and e.param == "weight" and len(e.shape) == 2), None)
                k = next((e for e in entries if e.layer == qn.layer and e.module in ("self_attn.k_proj", "attn_k")
                          and e.param == "weight" and len(e.shape) == 2), None)
                if q and q.shape[0] % cfg.head_dim == 0:
                    cfg.n_heads = q.shape[0] // cfg.head_dim
                if k and k.shape[0] % cfg.head_dim == 0:
                    cfg.n_kv_heads = k.shape[0] // cfg.head_dim

    # GPT-2 Conv1D is (in, out); a checkpoint already in Linear layout is (3h, h) for c_attn.
    conv_t = True
    for e in entries:
        if e.module == "attn.c_attn" and e.param == "weight" and len(e.shape) == 2:
            conv_t = not (e.shape[0] == 3 * e.shape[1])
            break
    if not conv_t:
        notes.append("GPT-2 style weights already stored as (out, in); not transposing")

    roles: dict[Role, RoleView] = {}
    # lineage.io.gguf already un-permutes llama q/k rows on read; undo it here only
    # for GGUF-named tensors whose reader did not (metadata without that marker).
    done = cfg.gguf_unpermuted or (metadata is not None and "lineage.qk_unpermuted" in metadata)
    permute = cfg.gguf_arch in _GGUF_PERMUTED and not done

    def put(role: Role, view: RoleView, name: str) -> None:
        if role in roles:
            log.warning("tensor %s also maps to role %s (taken by %s); left unassigned",
                        name, role, roles[role].tensor)
            notes.append(f"{name}: duplicate of role {role}")
            unassigned.append(name)
            return
        roles[role] = view

    def view_of(e: _Entry, transpose: bool, rows: RowRanges | None, heads: int = 0) -> RoleView:
        shape = e.shape[::-1] if transpose and len(e.shape) == 2 else e.shape
        if rows is not None:
            shape = (sum(b - a for a, b in rows), *shape[1:])
        return RoleView(e.name, tuple(shape), transpose and len(e.shape) == 2, rows, heads)

    for e in entries:
        if e.layer is None:
            put(role_key(None, _GLOBALS[e.module], e.param), view_of(e, False, None), e.name)
            continue
        stem, layout = _LAYER[e.module]
        mods = by_layer[e.layer]
        if layout == _POST_ATTN_LN:
            stem, layout = ("norm.post_attn" if "pre_feedforward_layernorm" in mods else "norm.mlp"), _PLAIN
        if layout == _GGUF_FFN_UP:
            fused = "ffn_gate" not in mods and cfg.gguf_arch == "phi3"
            stem, layout = (None, _GATE_UP) if fused else ("mlp.up", _PLAIN)
        if layout in (_PLAIN, _CONV1D):
            t = layout == _CONV1D and conv_t and e.param == "weight"
            heads = 0
            if permute and e.param == "weight" and stem in ("attn.q", "attn.k") and e.shape:
                heads = (cfg.n_heads if stem == "attn.q" else (cfg.n_kv_heads or cfg.n_heads)) or 0
                if not heads or e.shape[0] % (2 * heads):
                    notes.append(f"{e.name}: GGUF rotary row permutation not undone "
                                 f"(heads {heads or 'unknown'}, {e.shape[0]} rows)")
                    heads = 0
            put(role_key(e.layer, stem, e.param), view_of(e, t, None, heads), e.name)
            continue
        if len(e.shape) != (2 if e.param == "weight" else 1):
            notes.append(f"{e.name}: fused tensor of unexpected shape {e.shape}; left unassigned")
            unassigned.append(e.name)
            continue
        transpose = layout == _QKV_CONV1D and conv_t and e.param == "weight"
        out = e.shape[-1] if transpose else e.shape[0]
        if layout == _GATE_UP:
            if out % 2:
                notes.append(f"{e.name}: fused gate/up with odd row count {out}; left unassigned")
                unassigned.append(e.name)
                continue
            parts: dict[str, RowRanges] | None = {
                "mlp.gate": _ranges((0, out // 2)), "mlp.up": _ranges((out // 2, out))}
        else:
            qkv, why = _split_qkv(layout, out, cfg, hidden)
            if qkv is None:
                notes.append(f"{e.name}: {why}; left unassigned")
                log.warning("%s: %s; left unassigned", e.name, why)
                unassigned.append(e.name)
                continue
            parts = {f"attn.{k}": v for k, v in qkv.items()}
        for s, rows in parts.items():
            put(role_key(e.layer, s, e.param), view_of(e, transpose, rows), e.name)

    roles = dict(sorted(roles.items(), key=lambda kv: role_sort_key(kv[0])))
    arch = _build_arch(family, cfg, roles, hidden, from_config, notes)
    for n in unassigned:
        log.debug("no role for tensor %s", n)
    return RoleMap(roles, arch, sorted(unassigned), tuple(notes))


def _build_arch(
    family: str, cfg: _Cfg, roles: dict[Role, RoleView], hidden: int | None,
    from_config: bool, notes: list[str],
) -> ArchInfo:
    layers = {parse_role(r)[0] for r in roles} - {None}
    n_layers = max(layers) + 1 if layers else 0  # type: ignore[type-var]
    if cfg.n_layers is not None and cfg.n_layers != n_layers:
        notes.append(f"config says {cfg.n_layers} layers, the weights have {n_layers}; using the weights")
    if layers and len(layers) != n_layers:
        missing = [i for i in range(n_layers) if i not in layers]
        notes.append(f"layers without any role: {missing[:32]}{' …' if len(missing) > 32 else ''}")

    def shape0(role: Role) -> int | None:
        v = roles.get(role)
        return v.shape[0] if v is not None and v.shape else None

    vocab_s = shape0("embed.weight") or shape0("lm_head.weight")
    vocab = vocab_s or cfg.vocab
    inter_s = next((shape0(f"L{i}.mlp.{p}.weight") for i in sorted(layers)  # type: ignore[type-var]
                    for p in ("up", "gate") if shape0(f"L{i}.mlp.{p}.weight")), None)
    intermediate = inter_s or cfg.intermediate
    used_shapes = vocab_s is not None or inter_s is not None or hidden is not None

    base = family.removeprefix("gguf-")
    has_norm_bias = any(role_kind(r) == "norm" and r.endswith(".bias") for r in roles)
    has_norm = any(role_kind(r) == "norm" for r in roles)
    if base in _RMS_FAMILIES:
        norm = "rms"
    elif base in _LAYERNORM_FAMILIES or has_norm_bias:
        norm = "layer"
    else:
        norm = "rms" if has_norm else "unknown"
    mlp = "glu" if any(".mlp.gate." in r for r in roles) else ("plain" if any(".mlp.up." in r for r in roles) else "unknown")
    if "pos_embed.weight" in roles:
        positional = "learned"
    elif cfg.alibi or base == "bloom":
        positional = "alibi"
    elif base in _ROPE_FAMILIES:
        positional = "rope"
    else:
        positional = "unknown"

    has_head = "lm_head.weight" in roles
    tied = (not has_head and "embed.weight" in roles) or (cfg.tied is True and has_head is False)
    if cfg.tied is True and has_head:
        notes.append("config ties embeddings but the checkpoint stores lm_head too; treated as tied copy")
        tied = True
    if not has_head and cfg.tied is False:
        notes.append("config says untied embeddings but no lm_head is stored")

    n_heads, n_kv, head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    if n_heads is None:
        notes.append("head count unknown (no config): n_heads left None")
    if n_kv is None and n_heads is not None:
        n_kv = n_heads
    if head_dim is None and n_heads and hidden and hidden % n_heads == 0:
        head_dim = hidden // n_heads
    qkv_bias = any(r.endswith(".attn.q.bias") for r in roles)
    source = "shapes" if not from_config else ("config+shapes" if used_shapes else "config")
    return ArchInfo(
        family=family, n_layers=n_layers, hidden=hidden, n_heads=n_heads, n_kv_heads=n_kv,
        head_dim=head_dim, intermediate=intermediate, vocab=vocab, norm=norm, mlp=mlp,
        positional=positional, tied_embeddings=tied, max_positions=cfg.max_positions,
        qkv_bias=qkv_bias, model_type=cfg.model_type, architectures=cfg.architectures,
        source=source, notes=tuple(notes),
    )


def roles_for(ckpt: Checkpoint) -> RoleMap:
    """:func:`assign_roles` for an open checkpoint (its config and GGUF metadata)."""
    return assign_roles(ckpt.tensors, ckpt.config, ckpt.metadata)


# ---------------------------------------------------------------------------- reading


def _unpermute(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's ``permute``: rows (head, dim/2, 2) back to HF (head, 2, dim/2)."""
    n = t.shape[0]
    if heads <= 0 or n % (2 * heads):
        raise ShapeMismatchError(f"cannot un-permute {n} rows into {heads} rotary heads")
    rest = tuple(t.shape[1:])
    return t.reshape(heads, n // heads // 2, 2, *rest).transpose(1, 2).reshape(n, *rest)


def apply_view(stored: torch.Tensor, view: RoleView) -> torch.Tensor:
    """Turn a whole stored tensor into the role's canonical tensor (same dtype)."""
    t = stored.T if view.transpose and stored.ndim == 2 else stored
    if view.rows is not None:
        t = torch.cat([t[a:b] for a, b in view.rows]) if len(view.rows) != 1 else t[view.rows[0][0]:view.rows[0][1]]
    if view.unpermute_heads:
        t = _unpermute(t, view.unpermute_heads)
    return t


def _check(t: torch.Tensor, view: RoleView, ckpt: Checkpoint) -> torch.Tensor:
    if tuple(t.shape) != view.shape:
        raise ShapeMismatchError(
            f"role view of {view.tensor!r} expected shape {view.shape}, read {tuple(t.shape)}",
            path=ckpt.ref,
        )
    return t


def read_role(ckpt: Checkpoint, view: RoleView) -> torch.Tensor:
    """The role's tensor as contiguous float32 in canonical orientation.

    Untransposed row selections read only the selected rows; transposed or 1-D
    fused tensors are read whole and sliced.
    """
    meta = ckpt.tensors.get(view.tensor)
    if view.rows is not None and not view.transpose and meta is not None and len(meta.shape) >= 2:
        t = torch.cat([ckpt.read(view.tensor, a, b) for a, b in view.rows])
        if view.unpermute_heads:
            t = _unpermute(t, view.unpermute_heads)
    else:
        t = apply_view(ckpt.read(view.tensor), view)
    return _check(t, view, ckpt).float().contiguous()


def iter_role_blocks(
    ckpt: Checkpoint, view: RoleView, block_elems: int = DEFAULT_BLOCK_ELEMS
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(row_start, rows)`` of the canonical tensor in blocks of about ``block_elems``.

    Plain views delegate to :meth:`Checkpoint.iter_blocks` (storage dtype); row
    selections of untransposed matrices are streamed range by range, also in
    storage dtype; anything else (transposed, permuted, 1-D fused) is read as
    float32 by :func:`read_role` and sliced.
    """
    if view.is_plain:
        yield from ckpt.iter_blocks(view.tensor, block_elems)
        return
    meta = ckpt.tensors.get(view.tensor)
    if (meta is not None and len(meta.shape) >= 2 and not view.transpose
            and not view.unpermute_heads and view.rows is not None):
        rows_per = max(1, block_elems // max(1, meta.row_numel))
        pending: list[torch.Tensor] = []
        n_pending, start = 0, 0
        for a, b in view.rows:
            r = a
            while r < b:
                take = min(b - r, rows_per - n_pending)
                pending.append(ckpt.read_raw(view.tensor, r, r + take))
                n_pending += take
                r += take
                if n_pending == rows_per:
                    yield start, torch.cat(pending) if len(pending) > 1 else pending[0]
                    start += n_pending
                    pending, n_pending = [], 0
        if pending:
            yield start, torch.cat(pending) if len(pending) > 1 else pending[0]
        return
    t = read_role(ckpt, view)
    if t.ndim < 2:
        yield 0, t
        return
    rows_per = max(1, block_elems // max(1, math.prod(t.shape[1:])))
    for s in range(0, t.shape[0], rows_per):
        yield s, t[s:s + rows_per]


def layer_dict(ckpt: Checkpoint, rolemap: RoleMap, i: int) -> dict[str, torch.Tensor]:
    """Float32 tensors of layer ``i`` keyed by the part after ``L{i}.`` (fused tensors read once)."""
    views = rolemap.layer_roles(i)
    users: dict[str, int] = {}
    for v in views.values():
        users[v.tensor] = users.get(v.tensor, 0) + 1
    whole: dict[str, torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    for name, count in users.items():
        if count > 1:
            whole[name] = ckpt.read(name)
    for key, v in views.items():
        if v.tensor in whole:
            out[key] = _check(apply_view(whole[v.tensor], v), v, ckpt).float().contiguous()
        else:
            out[key] = read_role(ckpt, v)
    return out


# ---------------------------------------------------------------------------- pairing


@dataclass(frozen=True)
class RolePair:
    """One role present in both models.  ``note`` explains special matches (tied heads)."""

    role: Role
    view_a: RoleView
    view_b: RoleView
    shape_a: Shape
    shape_b: Shape
    same_shape: bool
    note: str = ""

    @property
    def layer(self) -> int | None:
        """Layer index, or None for global roles."""
        return parse_role(self.role)[0]

    @property
    def kind(self) -> str:
        """See :func:`role_kind`."""
        return role_kind(self.role)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return {
            "role": self.role, "tensor_a": self.view_a.tensor, "tensor_b": self.view_b.tensor,
            "shape_a": list(self.shape_a), "shape_b": list(self.shape_b),
            "same_shape": self.same_shape, "kind": self.kind, "note": self.note,
        }


@dataclass(frozen=True)
class Pairing:
    """Correspondence between the roles of models ``a`` and ``b``.

    ``matched`` holds roles present in both (shape mismatches included, with
    ``same_shape=False``); ``only_a``/``only_b`` the rest.  Layers are paired by
    index (``layer_pairs``) for now.  Zero matches is a valid result.
    """

    a: RoleMap
    b: RoleMap
    matched: tuple[RolePair, ...]
    only_a: tuple[Role, ...]
    only_b: tuple[Role, ...]
    layer_pairs: tuple[tuple[int, int], ...]
    summary: str
    notes: tuple[str, ...] = ()

    @property
    def shape_mismatches(self) -> tuple[RolePair, ...]:
        """Matched roles whose canonical shapes differ."""
        return tuple(p for p in self.matched if not p.same_shape)

    @property
    def comparable(self) -> tuple[RolePair, ...]:
        """Matched roles with equal shapes (element-wise comparable)."""
        return tuple(p for p in self.matched if p.same_shape)

    def layer(self, i: int) -> tuple[RolePair, ...]:
        """Matched roles of layer ``i``."""
        return tuple(p for p in self.matched if p.layer == i)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return {
            "arch_a": self.a.arch.to_dict(), "arch_b": self.b.arch.to_dict(),
            "matched": [p.to_dict() for p in self.matched],
            "only_a": list(self.only_a), "only_b": list(self.only_b),
            "shape_mismatches": [p.role for p in self.shape_mismatches],
            "layer_pairs": [list(x) for x in self.layer_pairs],
            "unassigned_a": list(self.a.unassigned), "unassigned_b": list(self.b.unassigned),
            "summary": self.summary, "notes": list(self.notes),
        }


def _pair(role: Role, va: RoleView, vb: RoleView, note: str = "") -> RolePair:
    return RolePair(role, va, vb, va.shape, vb.shape, va.shape == vb.shape, note)


def pair_models(a: RoleMap, b: RoleMap) -> Pairing:
    """Match the roles of two models by role key (layers by index); never raises.

    When one model stores ``lm_head.weight`` and the other ties it to its
    embedding, the head is matched against that embedding (``note`` says so).
    """
    notes: list[str] = []
    matched = [_pair(r, a.roles[r], b.roles[r]) for r in a.roles if r in b.roles]
    only_a = [r for r in a.roles if r not in b.roles]
    only_b = [r for r in b.roles if r not in a.roles]
    head = "lm_head.weight"
    for x, y, only, label in ((a, b, only_a, "b"), (b, a, only_b, "a")):
        if head in only and y.arch.tied_embeddings and "embed.weight" in y.roles:
            only.remove(head)
            va, vb = (x.roles[head], y.roles["embed.weight"])
            if label == "a":
                va, vb = vb, va
            matched.append(_pair(head, va, vb, f"{label} ties lm_head to embed.weight"))
            notes.append(f"lm_head.weight matched against the tied embedding of {label}")
    matched.sort(key=lambda p: role_sort_key(p.role))
    na, nb = a.n_layers, b.n_layers
    layer_pairs = tuple((i, i) for i in range(min(na, nb)))
    if na != nb:
        notes.append(f"layer counts differ ({na} vs {nb}): layers paired by index, "
                     f"{abs(na - nb)} unpaired")
    if a.arch.family != b.arch.family:
        notes.append(f"different families: {a.arch.family} vs {b.arch.family}")
    n_mismatch = sum(1 for p in matched if not p.same_shape)
    summary = (
        f"A: {a.arch.describe()}. B: {b.arch.describe()}. "
        f"{len(matched)} roles matched ({n_mismatch} with different shapes), "
        f"{len(only_a)} only in A, {len(only_b)} only in B."
    )
    if not matched:
        summary += " Nothing could be paired."
    elif not any(p.same_shape for p in matched):
        summary += " No matched role has equal shapes."
    if na != nb:
        summary += f" Layer counts differ ({na} vs {nb}); layers paired by index."
    log.info("pairing: %s", summary)
    return Pairing(a, b, tuple(matched), tuple(only_a), tuple(only_b), layer_pairs, summary, tuple(notes))
