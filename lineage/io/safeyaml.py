"""Model-card front matter (the YAML block between ``---`` lines at the top of a README) read safely.

``yaml.safe_load`` constructs no objects, but it still lets a hostile card cost what it likes:
an alias tree (``&a [*b, *b, …]``, "billion laughs") is built as shared references and explodes
in whatever walks it next, deep nesting exhausts the composer's recursion, and a multi-megabyte
block is parsed in full.  :func:`load_front_matter` reads at most :data:`MAX_FRONT_MATTER_BYTES`
of the block, walks the YAML event stream first (no recursion) refusing aliases, nesting deeper
than :data:`MAX_DEPTH`, more than :data:`MAX_EVENTS` events and scalars longer than
:data:`MAX_SCALAR_CHARS`, and only then builds the value with ``yaml.safe_load``.

Hostile input raises :class:`~lineage.errors.HeaderError` naming the file; front matter that
is merely not valid YAML is logged and read as empty (real cards carry such mistakes, and a
card is only a claim, never evidence).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from lineage.errors import CheckpointError, HeaderError

log = logging.getLogger(__name__)

#: Longest front-matter block accepted (real cards: a few KB).
MAX_FRONT_MATTER_BYTES = 256 * 1024
#: Deepest nesting of mappings and sequences accepted.
MAX_DEPTH = 32
#: Most YAML events (scalars, collection starts and ends) accepted.
MAX_EVENTS = 50_000
#: Longest scalar accepted (a model id or licence name is short).
MAX_SCALAR_CHARS = 16 * 1024

_BLOCK = re.compile(r"\A\ufeff?---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(\r?\n|\Z)", re.S)


def _check_events(text: str, path: str) -> None:
    """Walk the event stream of ``text``: no aliases, bounded depth, event count and scalar length."""
    import yaml

    depth = n = 0
    for ev in yaml.parse(text, Loader=yaml.SafeLoader):
        n += 1
        if n > MAX_EVENTS:
            raise HeaderError(f"model card front matter rejected: more than {MAX_EVENTS} YAML nodes", path=path)
        if isinstance(ev, yaml.AliasEvent):
            raise HeaderError("model card front matter rejected: YAML aliases (*name) are not accepted", path=path)
        if isinstance(ev, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_DEPTH:
                raise HeaderError(f"model card front matter rejected: YAML nested more than {MAX_DEPTH} levels deep",
                                  path=path)
        elif isinstance(ev, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1
        elif isinstance(ev, yaml.ScalarEvent) and len(ev.value) > MAX_SCALAR_CHARS:
            raise HeaderError(f"model card front matter rejected: a YAML value of {len(ev.value)} characters "
                              f"(cap {MAX_SCALAR_CHARS})", path=path)


def parse_front_matter(text: str, path: str) -> dict[str, Any]:
    """The front matter of a card's ``text`` as a mapping (``{}`` when there is none or it is not YAML)."""
    import yaml

    if not text.lstrip("\ufeff").startswith("---"):
        return {}
    m = _BLOCK.match(text)
    if m is None:
        if len(text.encode("utf-8", "replace")) >= MAX_FRONT_MATTER_BYTES:
            raise HeaderError(f"model card front matter rejected: no closing '---' within "
                              f"{MAX_FRONT_MATTER_BYTES} bytes", path=path)
        return {}
    block = m.group(1)
    try:
        _check_events(block, path)
        data = yaml.safe_load(block)
    except yaml.YAMLError as e:
        log.warning("%s: ignoring model card front matter that is not valid YAML (%s)", path,
                    " ".join(str(e).split())[:200])
        return {}
    return data if isinstance(data, dict) else {}


def load_front_matter(path: str | Path) -> dict[str, Any]:
    """Read the front matter of the card at ``path`` (at most :data:`MAX_FRONT_MATTER_BYTES` + a little)."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            head = f.read(MAX_FRONT_MATTER_BYTES + 16)
    except OSError as e:
        raise CheckpointError(f"cannot read model card: {e.strerror or e}", path=str(p)) from None
    return parse_front_matter(head.decode("utf-8", errors="replace"), str(p))
