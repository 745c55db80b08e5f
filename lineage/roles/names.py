"""Reading stored tensor names with the family tables: prefixes, layers, experts, parameters."""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass

from lineage.roles.keys import Shape
from lineage.roles.tables import BORROWED, FAMILIES, PARAMS, PREFIXES, Family, Layout, Part, Stack

#: A layer index inside a name no table knows: ``layers.3.``, ``h.3.``, ``layer_3.``, ``block3.`` ….
_GENERIC_LAYER_RE = re.compile(r"(?:^|\.)(?:layers?|h|blk|blocks?)[._]?(\d{1,9})(?:\.|$)")
_ALIASES = {"refinedweb": "falcon", "refinedwebmodel": "falcon", "gemma3n": "gemma3", "clip_text_model": "clip"}


@dataclass(frozen=True)
class Entry:
    """A stored tensor that a table gives a meaning.

    ``stack`` indexes ``family.stacks`` (``-1`` outside layers); ``index`` is the layer index
    as stored (inside its stack); ``stem`` is None for fused tensors (``layout`` splits them).
    """

    name: str
    shape: Shape
    stack: int
    index: int | None
    stem: str | None
    layout: Layout
    param: str


def strip_prefixes(name: str) -> str:
    """Drop framework prefixes (``model.``, ``transformer.`` …) from the front of a name."""
    changed = True
    while changed:
        changed = False
        for p in PREFIXES:
            if name.startswith(p):
                name, changed = name[len(p):], True
    return name


def alias(family: str) -> str:
    """Canonical spelling of a config family name."""
    return _ALIASES.get(family, family)


def table_for(label: str | None) -> Family | None:
    """The table of a family label or config ``model_type`` (GGUF labels fall back to llama's names)."""
    if not label:
        return None
    for fam in FAMILIES:
        if label == fam.name or label in fam.model_types:
            return fam
    if label.startswith("gguf-"):
        return next(f for f in FAMILIES if f.name == "gguf-llama")
    return None


@functools.lru_cache(maxsize=None)
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def guess_family(stripped: Iterable[str]) -> Family | None:
    """The first family of :data:`FAMILIES` whose markers all match (and no ``absent`` one does)."""
    names = list(stripped)

    def hit(rx: str) -> bool:
        c = _compiled(rx)
        return any(c.search(n) for n in names)

    for fam in FAMILIES:
        if fam.markers and all(hit(m) for m in fam.markers) and not any(hit(m) for m in fam.absent):
            return fam
    return None


_EXPERTS: dict[int, tuple[tuple[re.Pattern[str], str], ...]] = {}


def _expert_patterns(stack: Stack) -> tuple[tuple[re.Pattern[str], str], ...]:
    """Compiled ``{E}`` module patterns of a stack (cached per stack object; the tables are constants)."""
    cached = _EXPERTS.get(id(stack))
    if cached is not None:
        return cached
    out = []
    for mod, part in stack.layer.items():
        if "{E}" in mod and part.stem is not None:
            rx = re.escape(mod).replace(r"\{E\}", r"(\d{1,9})")
            out.append((re.compile(f"^{rx}$"), part.stem))
    _EXPERTS[id(stack)] = tuple(out)
    return _EXPERTS[id(stack)]


def _layer_part(fam: Family, stack: Stack, module: str) -> Part | None:
    part = stack.layer.get(module)
    if part is not None and "{E}" not in module:
        return part
    for rx, stem in _expert_patterns(stack):
        m = rx.match(module)
        if m:
            return Part(stem.replace("{E}", str(int(m.group(1)))))
    return BORROWED.get(module) if fam.borrow else None


def parse_name(fam: Family | None, name: str, shape: Shape) -> Entry | None:
    """The entry of stored tensor ``name`` under family table ``fam``, or None if it has no role."""
    if fam is None:
        fam = next(f for f in FAMILIES if f.name == "llama")  # the decoder-only names, borrowed
    short = strip_prefixes(name)
    module, _, param = short.rpartition(".")
    if param not in PARAMS or not module:
        stem = fam.globals.get(short)
        return None if stem is None else Entry(name, shape, -1, None, stem, Layout.PLAIN, "weight")
    for k, stack in enumerate(fam.stacks):
        m = _compiled(stack.pattern).match(module + ".")
        if m and len(m.group(1)) > 12:  # keeps int() cheap; such a number is no real layer
            return None
        if m:
            part = _layer_part(fam, stack, (module + ".")[m.end():-1])
            if part is None:
                return None
            return Entry(name, shape, k, int(m.group(1)), part.stem, part.layout, PARAMS[param])
    stem = fam.globals.get(module)
    return None if stem is None else Entry(name, shape, -1, None, stem, Layout.PLAIN, PARAMS[param])


def generic_layer(name: str) -> int | None:
    """Layer index written in a name no table knows (``decoder.layer_3.…`` → 3), else None."""
    m = _GENERIC_LAYER_RE.search(name)
    return int(m.group(1)) if m else None
