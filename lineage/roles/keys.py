"""Role keys: the names of what a tensor does, independent of how a framework spells it.

A role key is a plain string: ``embed.weight``, ``lm_head.weight``, ``final_norm.weight``,
and per layer ``L{i}.attn.q.weight``, ``L{i}.mlp.down.bias``, ``L{i}.norm.attn.weight`` …
Encoder-decoder models number their decoder layers after the encoder's (a layer offset,
see :class:`lineage.roles.model.StackSpan`); cross-attention is ``L{i}.xattn.q.weight``.
Mixture-of-experts layers have ``L{i}.moe.router.weight`` and ``L{i}.moe.E{j}.mlp.up.weight``.
Stack-specific global roles carry a stack prefix (``enc.final_norm.weight``,
``vis.patch_embed.weight``).  Tensors that no table gives a meaning get a *generic* role
``L{i}.~{stored name}`` (or ``~{stored name}`` without a layer index in the name).
"""

from __future__ import annotations

import re

#: A role key such as ``"L3.attn.q.weight"`` (a plain string).
Role = str
Shape = tuple[int, ...]
RowRanges = tuple[tuple[int, int], ...]

#: Order of per-layer role stems (what follows ``L{i}.``, before ``.weight``/``.bias``).
LAYER_STEMS: tuple[str, ...] = (
    "norm.attn", "attn.q_norm", "attn.k_norm", "attn.q", "attn.k", "attn.v", "attn.o",
    "norm.post_attn", "norm.mlp", "mlp.gate", "mlp.up", "mlp.down", "norm.post_mlp",
    "attn.rel_bias", "norm.xattn", "xattn.q", "xattn.k", "xattn.v", "xattn.o", "xattn.rel_bias",
    "moe.router", "moe.shared_gate",
)
#: Order of global role stems; layers sort between the stems before ``final_norm`` and the rest.
GLOBAL_STEMS: tuple[str, ...] = (
    "embed", "type_embed", "pos_embed", "embed_norm",
    "enc.embed", "enc.conv1", "enc.conv2", "enc.pos_embed", "patch_embed", "cls_token",
    "vis.patch_embed", "vis.cls_token", "vis.pos_embed", "vis.pre_norm",
    "final_norm", "lm_head", "enc.final_norm", "vis.final_norm", "text_proj", "vis_proj",
)
#: Marks a generic role (a stored name no table knows), e.g. ``"L0.~decoder.layer_0.linear_0.weight"``.
GENERIC = "~"

#: Stems whose 2-D weights count as evidence of lineage.  Norm gains, biases, fixed
#: (sinusoidal) position tables, relative-attention bias tables and tied aliases never do.
EVIDENCE_STEMS = frozenset({
    "embed", "lm_head", "pos_embed", "attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down",
    "xattn.q", "xattn.k", "xattn.v", "xattn.o", "moe.router", "vis.pos_embed", "text_proj", "vis_proj",
})
_EXPERT_RE = re.compile(r"^moe\.(?:E\d+|shared)\.mlp\.(?:gate|up|down)$")
_ROLE_RE = re.compile(r"^L(\d+)\.(.+)$")


def role_key(layer: int | None, stem: str, param: str = "weight") -> Role:
    """Build a role key, e.g. ``role_key(3, "attn.q") == "L3.attn.q.weight"``."""
    return f"{stem}.{param}" if layer is None else f"L{layer}.{stem}.{param}"


def generic_role(layer: int | None, name: str) -> Role:
    """The generic role of stored tensor ``name`` (no table gives it a meaning)."""
    return f"{GENERIC}{name}" if layer is None else f"L{layer}.{GENERIC}{name}"


def parse_role(role: Role) -> tuple[int | None, str]:
    """Split a role key into ``(layer or None, rest)``: ``"L3.attn.q.weight" -> (3, "attn.q.weight")``."""
    m = _ROLE_RE.match(role)
    return (int(m.group(1)), m.group(2)) if m else (None, role)


def is_generic(role: Role) -> bool:
    """True for a generic role (paired by stored name and shape only)."""
    return parse_role(role)[1].startswith(GENERIC)


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
    last = stem.split(".")[-1].lower()
    if "norm" in last or stem.startswith("norm"):
        return "norm"
    if param in ("bias", "beta"):
        return "bias"
    if stem.endswith("embed"):
        return "embedding"
    return "matrix"


def is_evidence_role(role: Role) -> bool:
    """Whether the role's 2-D weight counts as evidence (callers also check it is 2-D).

    Known stems: :data:`EVIDENCE_STEMS` and expert MLP weights.  Generic roles count when
    they are weights that are not norms (paired by stored name and shape, their meaning unknown).
    """
    _, rest = parse_role(role)
    stem, _, param = rest.rpartition(".")
    if stem.startswith(GENERIC):
        return param in ("weight", "kernel") and role_kind(role) in ("matrix", "embedding")
    if param != "weight":
        return False
    return stem in EVIDENCE_STEMS or _EXPERT_RE.match(stem) is not None
