"""Pairing: the roles of two models matched by role key, then the rest by stored name and shape.

Known roles are matched by key (layers by index).  Tensors that no table gives a meaning
(:attr:`RoleMap.generic <lineage.roles.model.RoleMap.generic>`) are matched when the other
model stores a tensor of the same name and shape, whatever the family: two exports of an
unknown architecture still compare element-wise, and :attr:`Pairing.findings` says which
tensors were compared without a meaning and which could not be compared at all.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from lineage.roles.keys import Role, Shape, parse_role, role_kind, role_sort_key
from lineage.roles.model import RoleMap, RoleView

log = logging.getLogger(__name__)

#: Stored names quoted in a finding before "…".
_QUOTED = 5


@dataclass(frozen=True)
class RoleFinding:
    """Something the report must say about the pairing (``severity``: ``"info"`` or ``"warning"``)."""

    severity: str
    message: str
    tensors: tuple[str, ...] = ()


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
    ``same_shape=False``) and generic roles paired by stored name and equal shape;
    ``only_a``/``only_b`` the known roles of one model only.  Layers are paired by
    index (``layer_pairs``: the layer numbers holding roles in both) for now.  Zero
    matches is a valid result.
    """

    a: RoleMap
    b: RoleMap
    matched: tuple[RolePair, ...]
    only_a: tuple[Role, ...]
    only_b: tuple[Role, ...]
    layer_pairs: tuple[tuple[int, int], ...]
    summary: str
    notes: tuple[str, ...] = ()
    findings: tuple[RoleFinding, ...] = ()

    @property
    def shape_mismatches(self) -> tuple[RolePair, ...]:
        """Matched roles whose canonical shapes differ."""
        return tuple(p for p in self.matched if not p.same_shape)

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
            "findings": [{"severity": f.severity, "message": f.message, "tensors": list(f.tensors)}
                         for f in self.findings],
        }


def _pair(role: Role, va: RoleView, vb: RoleView, note: str = "") -> RolePair:
    return RolePair(role, va, vb, va.shape, vb.shape, va.shape == vb.shape, note)


def _generic_pairs(a: RoleMap, b: RoleMap) -> tuple[list[RolePair], list[RoleFinding]]:
    """Pair tensors without a known role by stored name and shape; findings name the rest."""
    pairs = [_pair(r, va, b.generic[r], "no known role: paired by stored name and shape")
             for r, va in a.generic.items() if r in b.generic and b.generic[r].shape == va.shape]
    paired = {p.view_a.tensor for p in pairs}
    alone = sorted({v.tensor for v in a.generic.values()} - paired
                   | ({v.tensor for v in b.generic.values()} - paired))
    findings: list[RoleFinding] = []
    if pairs:
        names = tuple(p.view_a.tensor for p in pairs)
        fam = a.arch.family if a.arch.family == b.arch.family else f"{a.arch.family}/{b.arch.family}"
        findings.append(RoleFinding(
            "info" if (a.roles or b.roles) else "warning",
            f"{len(pairs)} tensor(s) could not be given a meaning (family {fam}): compared element-wise "
            f"by stored name and shape only, e.g. {', '.join(names[:_QUOTED])}", names))
    if alone:
        findings.append(RoleFinding(
            "info", f"{len(alone)} tensor(s) without a known role have no same-name, same-shape partner "
                    f"in the other model; not compared, e.g. {', '.join(alone[:_QUOTED])}", tuple(alone)))
    return pairs, findings


def _tied_heads(a: RoleMap, b: RoleMap, only_a: list[Role], only_b: list[Role],
                matched: list[RolePair], notes: list[str]) -> None:
    """Match a stored ``lm_head`` against the other model's tied embedding."""
    head = "lm_head.weight"
    for x, y, only, label in ((a, b, only_a, "b"), (b, a, only_b, "a")):
        if head in only and y.arch.tied_embeddings and "embed.weight" in y.roles:
            only.remove(head)
            va, vb = (x.roles[head], y.roles["embed.weight"])
            if label == "a":
                va, vb = vb, va
            matched.append(_pair(head, va, vb, f"{label} ties lm_head to embed.weight"))
            notes.append(f"lm_head.weight matched against the tied embedding of {label}")


def _summary(a: RoleMap, b: RoleMap, matched: list[RolePair], only_a: list[Role], only_b: list[Role],
             n_generic: int) -> str:
    na, nb = a.n_layers, b.n_layers
    n_mismatch = sum(1 for p in matched if not p.same_shape)
    summary = (
        f"A: {a.arch.describe()}. B: {b.arch.describe()}. "
        f"{len(matched) - n_generic} roles matched ({n_mismatch} with different shapes), "
        f"{len(only_a)} only in A, {len(only_b)} only in B."
    )
    if n_generic:
        summary += f" {n_generic} tensors without a known role paired by name and shape."
    if not matched:
        summary += " Nothing could be paired."
    elif not any(p.same_shape for p in matched):
        summary += " No matched role has equal shapes."
    if na != nb:
        summary += f" Layer counts differ ({na} vs {nb}); layers paired by index."
    return summary


def pair_models(a: RoleMap, b: RoleMap) -> Pairing:
    """Match the roles of two models by role key (layers by index); never raises.

    When one model stores ``lm_head.weight`` and the other ties it to its
    embedding, the head is matched against that embedding (``note`` says so).
    Tensors without a known role are then paired by stored name and shape.
    """
    notes: list[str] = []
    matched = [_pair(r, a.roles[r], b.roles[r]) for r in a.roles if r in b.roles]
    only_a = [r for r in a.roles if r not in b.roles]
    only_b = [r for r in b.roles if r not in a.roles]
    _tied_heads(a, b, only_a, only_b, matched, notes)
    generic, findings = _generic_pairs(a, b)
    findings.extend(RoleFinding("info", f"mixture of experts, {m}") for m in a.realigned + b.realigned)
    matched.extend(generic)
    matched.sort(key=lambda p: role_sort_key(p.role))
    na, nb = a.n_layers, b.n_layers
    layers_a = {parse_role(r)[0] for r in a.roles} - {None}
    layers_b = {parse_role(r)[0] for r in b.roles} - {None}
    layer_pairs = tuple((i, i) for i in sorted(layers_a & layers_b))  # type: ignore[type-var]
    if na != nb:
        notes.append(f"layer counts differ ({na} vs {nb}): layers paired by index, "
                     f"{abs(na - nb)} unpaired")
    if a.arch.family != b.arch.family:
        notes.append(f"different families: {a.arch.family} vs {b.arch.family}")
    summary = _summary(a, b, matched, only_a, only_b, len(generic))
    log.info("pairing: %s", summary)
    return Pairing(a, b, tuple(matched), tuple(only_a), tuple(only_b), layer_pairs, summary, tuple(notes),
                   tuple(findings))
