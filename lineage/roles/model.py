"""Stage results of role assignment: how to read a role, the architecture, the role map."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lineage.roles.keys import Role, RowRanges, Shape


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
class StackSpan:
    """One stack of layers (``"enc"``/``"dec"``, ``"txt"``/``"vis"``, ``""`` for a decoder-only model).

    Its layers are ``L{first}`` … ``L{first + count - 1}`` in role keys (a layer offset keeps
    the stacks of an encoder-decoder from colliding).  ``count`` is the highest stored
    layer index plus one.
    """

    tag: str
    first: int
    count: int


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
    positional: str  # "rope" | "learned" | "alibi" | "relative" | "unknown"
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
    """Roles of one model's tensors (result of :func:`lineage.roles.assign_roles`).

    ``roles`` maps role keys to views, sorted by :func:`~lineage.roles.keys.role_sort_key`;
    ``unassigned`` lists stored tensors with no role (rotary buffers, attention
    masks, vision towers …); ``generic`` gives each of them a generic role
    (``L{i}.~name``) under which it is still compared with a same-name, same-shape
    tensor of the other model.  With tied embeddings and no stored head,
    ``lm_head.weight`` is absent and ``arch.tied_embeddings`` is True.  ``stacks``
    names the layer stacks (one for decoder-only models); ``realigned`` says which roles were
    re-keyed to match another model (:func:`lineage.roles.experts.align_experts`).
    """

    roles: dict[Role, RoleView]
    arch: ArchInfo
    unassigned: list[str] = field(default_factory=list)
    notes: tuple[str, ...] = ()
    generic: dict[Role, RoleView] = field(default_factory=dict)
    stacks: tuple[StackSpan, ...] = ()
    realigned: tuple[str, ...] = ()

    @property
    def shapes(self) -> dict[Role, Shape]:
        """Canonical shape of every role."""
        return {k: v.shape for k, v in self.roles.items()}

    @property
    def n_layers(self) -> int:
        """Number of layers (all stacks together)."""
        return self.arch.n_layers

    @property
    def tied_embeddings(self) -> bool:
        """Whether the output head shares the embedding matrix."""
        return self.arch.tied_embeddings

    def layer_roles(self, i: int) -> dict[str, RoleView]:
        """Views of layer ``i`` keyed by the part after ``L{i}.``."""
        prefix = f"L{i}."
        return {k[len(prefix):]: v for k, v in self.roles.items() if k.startswith(prefix)}

