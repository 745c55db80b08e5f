"""What the canonical test knows about a model (:class:`CanonArch`) and how it reads one (:class:`LayeredModel`).

Models are accessed lazily, one layer in memory at a time; role keys follow :mod:`lineage.roles`
(``"attn.q.weight"``…, linear weights in ``nn.Linear`` orientation ``(out, in)``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from lineage.errors import ArchitectureError
from lineage.roles import apply_view, assign_roles, layer_dict, read_role, roles_for

Tensor = torch.Tensor
LayerDict = dict[str, Tensor]
ProgressFn = Callable[[int, int, str], None]


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
