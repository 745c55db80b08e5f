"""Assigning roles: walk the family tables over one checkpoint's names and shapes.

:func:`assign_roles` knows no architecture itself: names come from
:mod:`lineage.roles.tables`, fused tensors are split by :mod:`lineage.roles.split`,
and the architecture summary is built by :mod:`lineage.roles.arch`.  Nothing here
allocates in proportion to a layer or expert index read from a file: layer offsets
of encoder-decoder stacks are sums of stored indices, never ranges over them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from lineage.io.checkpoint import Checkpoint, TensorMeta
from lineage.roles.arch import build_arch
from lineage.roles.config import Cfg, read_gguf_kv, read_hf_config
from lineage.roles.keys import Role, RowRanges, Shape, generic_role, role_key, role_sort_key
from lineage.roles.model import RoleMap, RoleView, StackSpan
from lineage.roles.names import Entry, generic_layer, guess_family, parse_name, strip_prefixes, table_for
from lineage.roles.split import ranges, split_qkv
from lineage.roles.tables import Family, Layout

log = logging.getLogger(__name__)

#: GGUF architectures whose converter permutes q/k rows for llama.cpp's rotary layout.
_GGUF_PERMUTED = {"llama"}
#: Storage types that hold no weights (ids, masks): never compared, even by name.
_NOT_WEIGHTS = ("I", "U", "BOOL")

#: Layer numbers may run this far past the number of tensors (a lone shard of a deep model);
#: a larger number cannot be a real layer and would make per-layer work cost what it says.
LAYER_SLACK = 1024


@dataclass
class _Build:
    """Roles under construction (one call of :func:`assign_roles`)."""

    cfg: Cfg
    roles: dict[Role, RoleView] = field(default_factory=dict)
    unassigned: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def put(self, role: Role, view: RoleView, name: str) -> None:
        if role in self.roles:
            log.warning("tensor %s also maps to role %s (taken by %s); left unassigned",
                        name, role, self.roles[role].tensor)
            self.notes.append(f"{name}: duplicate of role {role}")
            self.unassigned.append(name)
            return
        self.roles[role] = view

    def reject(self, name: str, why: str) -> None:
        self.notes.append(f"{name}: {why}; left unassigned")
        self.unassigned.append(name)


def _shapes_of(tensors: Mapping[str, TensorMeta] | Mapping[str, Shape]) -> dict[str, Shape]:
    out: dict[str, Shape] = {}
    for name, v in tensors.items():
        shape = v.shape if hasattr(v, "shape") else v
        out[name] = tuple(int(x) for x in shape)
    return out


def _read_config(config: Mapping[str, Any] | None, metadata: Mapping[str, Any] | None) -> Cfg:
    if isinstance(config, Mapping) and config:
        return read_hf_config(config)
    if metadata and "general.architecture" in metadata:
        return read_gguf_kv(metadata)
    return Cfg()


def _stack_spans(fam: Family | None, entries: list[Entry]) -> tuple[tuple[StackSpan, ...], dict[int, int]]:
    """Layer offsets: each stack starts after the highest stored index of the stacks before it.

    Returns the spans of the stacks present and the first role layer of each stack index.
    """
    top: dict[int, int] = {}
    for e in entries:
        if e.index is not None:
            top[e.stack] = max(top.get(e.stack, -1), e.index)
    spans, offsets, first = [], {}, 0
    for k, stack in enumerate(fam.stacks if fam else ()):
        count = top.get(k, -1) + 1
        if count:
            spans.append(StackSpan(stack.tag, first, count))
        offsets[k] = first
        first += count
    return tuple(spans), offsets


def _shape_facts(b: _Build, entries: list[Entry]) -> int | None:
    """Hidden size from the weights (embedding, else the pre-attention norm); head_dim from q_norm."""
    cfg = b.cfg
    embed = next((e for e in entries if e.stem == "embed" and e.param == "weight" and len(e.shape) == 2), None)
    hidden_s = embed.shape[1] if embed else None
    if hidden_s is None:
        norm = next((e for e in entries if e.stem == "norm.attn" and len(e.shape) == 1), None)
        hidden_s = norm.shape[0] if norm else None
    if cfg.hidden and hidden_s and cfg.hidden != hidden_s:
        b.notes.append(f"config hidden_size {cfg.hidden} differs from the weights' {hidden_s}; using the weights")
    if cfg.head_dim is None:
        qn = next((e for e in entries if e.stem == "attn.q_norm" and len(e.shape) == 1), None)
        if qn is not None:
            cfg.head_dim = qn.shape[0]
            if cfg.n_heads is None:
                same = [e for e in entries if e.stack == qn.stack and e.index == qn.index
                        and e.param == "weight" and len(e.shape) == 2]
                q = next((e for e in same if e.stem == "attn.q"), None)
                k = next((e for e in same if e.stem == "attn.k"), None)
                if q and q.shape[0] % cfg.head_dim == 0:
                    cfg.n_heads = q.shape[0] // cfg.head_dim
                if k and k.shape[0] % cfg.head_dim == 0:
                    cfg.n_kv_heads = k.shape[0] // cfg.head_dim
    return hidden_s or cfg.hidden


def _conv1d_transposed(b: _Build, entries: list[Entry]) -> bool:
    """GPT-2 Conv1D is (in, out); a checkpoint already in Linear layout is (3h, h) for c_attn."""
    for e in entries:
        if e.layout == Layout.QKV_CONV1D and e.param == "weight" and len(e.shape) == 2:
            if e.shape[0] == 3 * e.shape[1]:
                b.notes.append("GPT-2 style weights already stored as (out, in); not transposing")
                return False
            return True
    return True


def _view(e: Entry, transpose: bool, rows: RowRanges | None, heads: int = 0) -> RoleView:
    shape = e.shape[::-1] if transpose and len(e.shape) == 2 else e.shape
    if rows is not None:
        shape = (sum(b - a for a, b in rows), *shape[1:])
    return RoleView(e.name, tuple(shape), transpose and len(e.shape) == 2, rows, heads)


def _gguf_heads(b: _Build, e: Entry, permute: bool) -> int:
    """Heads to un-permute for a GGUF llama q/k weight (0 = none)."""
    if not (permute and e.param == "weight" and e.stem in ("attn.q", "attn.k") and e.shape):
        return 0
    cfg = b.cfg
    heads = (cfg.n_heads if e.stem == "attn.q" else (cfg.n_kv_heads or cfg.n_heads)) or 0
    if not heads or e.shape[0] % (2 * heads):
        b.notes.append(f"{e.name}: GGUF rotary row permutation not undone "
                       f"(heads {heads or 'unknown'}, {e.shape[0]} rows)")
        return 0
    return heads


def _fused(b: _Build, e: Entry, layer: int | None, conv_t: bool, hidden: int | None) -> None:
    """Split a fused QKV or gate/up tensor into its roles."""
    if len(e.shape) != (2 if e.param == "weight" else 1):
        b.reject(e.name, f"fused tensor of unexpected shape {e.shape}")
        return
    transpose = e.layout == Layout.QKV_CONV1D and conv_t and e.param == "weight"
    out = e.shape[-1] if transpose else e.shape[0]
    if e.layout == Layout.GATE_UP:
        if out % 2:
            b.reject(e.name, f"fused gate/up with odd row count {out}")
            return
        parts = {"mlp.gate": ranges((0, out // 2)), "mlp.up": ranges((out // 2, out))}
    else:
        qkv, why = split_qkv(e.layout, out, b.cfg, hidden)
        if qkv is None:
            log.warning("%s: %s; left unassigned", e.name, why)
            b.reject(e.name, str(why))
            return
        parts = {f"attn.{k}": v for k, v in qkv.items()}
    for stem, rows in parts.items():
        b.put(role_key(layer, stem, e.param), _view(e, transpose, rows), e.name)


def _generic(shapes: Mapping[str, Shape], tensors: Mapping[str, Any], names: list[str]) -> dict[Role, RoleView]:
    """Generic roles of tensors no table knows: compared by stored name and shape only."""
    out: dict[Role, RoleView] = {}
    for name in names:
        dtype = str(getattr(tensors.get(name), "dtype", "F32")).upper()
        if not shapes[name] or dtype.startswith(_NOT_WEIGHTS):
            continue
        out[generic_role(generic_layer(name), name)] = RoleView(name, shapes[name])
    return dict(sorted(out.items(), key=lambda kv: role_sort_key(kv[0])))


def assign_roles(
    tensors: Mapping[str, TensorMeta] | Mapping[str, Shape],
    config: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> RoleMap:
    """Give every tensor a role from the family tables; never raises on unfamiliar names.

    ``tensors`` maps stored names to :class:`TensorMeta` or to shapes;
    ``config`` is the HF ``config.json`` dict (or the config-like dict of
    :mod:`lineage.io.gguf`, marked ``_from_gguf``); ``metadata`` may hold raw GGUF
    key/values (``general.architecture`` …), used when no config is given.  GGUF
    llama q/k rows are un-permuted by the view only when the reader has not done
    so already (no ``lineage.qk_unpermuted`` metadata, no ``_from_gguf`` config).
    Tensors without a role are listed in ``unassigned`` and get a generic role.
    """
    shapes = _shapes_of(tensors)
    b = _Build(_read_config(config, metadata))
    cfg = b.cfg
    fam = table_for(cfg.family)
    if fam is None:
        fam = guess_family(strip_prefixes(n) for n in shapes)
    family = cfg.family or (fam.name if fam else "unknown")
    from_config = cfg.family is not None or cfg.gguf_arch is not None
    if cfg.gguf_arch is None and family.startswith("gguf-"):
        cfg.gguf_arch = family.removeprefix("gguf-")
    entries: list[Entry] = []
    max_layer = len(shapes) + LAYER_SLACK  # layer numbers are bounded by what the file holds
    for name, shape in shapes.items():
        e = parse_name(fam, name, shape)
        if e is not None and e.index is not None and e.index >= max_layer:
            b.notes.append(f"{name[:120]}: layer number {e.index} is beyond what {len(shapes)} tensors "
                           "can hold; left unassigned")
            e = None
        (entries.append(e) if e is not None else b.unassigned.append(name))
    spans, first = _stack_spans(fam, entries)
    hidden = _shape_facts(b, entries)
    conv_t = _conv1d_transposed(b, entries)
    done = cfg.gguf_unpermuted or (metadata is not None and "lineage.qk_unpermuted" in metadata)
    permute = cfg.gguf_arch in _GGUF_PERMUTED and not done
    for e in entries:
        layer = None if e.index is None else first.get(e.stack, 0) + e.index
        if e.stem is not None:
            t = e.layout == Layout.CONV1D and conv_t and e.param == "weight"
            b.put(role_key(layer, e.stem, e.param), _view(e, t, None, _gguf_heads(b, e, permute)), e.name)
        else:
            _fused(b, e, layer, conv_t, hidden)
    roles = dict(sorted(b.roles.items(), key=lambda kv: role_sort_key(kv[0])))
    arch = build_arch(family, cfg, roles, hidden, from_config, b.notes, len(spans) > 1)
    for n in b.unassigned:
        log.debug("no role for tensor %s", n)
    return RoleMap(roles, arch, sorted(b.unassigned), tuple(b.notes), _generic(shapes, tensors, b.unassigned), spans)


def roles_for(ckpt: Checkpoint) -> RoleMap:
    """:func:`assign_roles` for an open checkpoint (its config and GGUF metadata)."""
    return assign_roles(ckpt.tensors, ckpt.config, ckpt.metadata)
