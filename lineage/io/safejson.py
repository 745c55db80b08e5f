"""One JSON loader for every file lineage reads: bounded size, depth and integer length.

Python's :func:`json.loads` turns hostile input into untyped failures: an integer of
thousands of digits raises ``ValueError`` (or costs quadratic time below the limit),
and deep nesting raises ``RecursionError`` (or, below the limit, lets later recursive
code blow up).  :func:`loads_bounded` and :func:`load_json_file` parse with caps on
every one of these and raise :class:`~lineage.errors.HeaderError` naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lineage.errors import CheckpointError, HeaderError

#: Default cap on a JSON side file (config.json, adapter_config.json, shard index).
MAX_JSON_BYTES = 16 * 1024 * 1024
#: Cap on tokenizer files, which hold whole vocabularies and merge lists.
MAX_TOKENIZER_BYTES = 128 * 1024 * 1024
#: Deepest nesting accepted (real files nest a handful of levels).
MAX_DEPTH = 64
#: Longest integer literal accepted (2**64 has 20 digits).
MAX_INT_DIGITS = 24


class _Reject(Exception):
    """Raised inside the parser's hooks; turned into a HeaderError by the caller."""


def _parse_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_INT_DIGITS:
        raise _Reject(f"integer literal of {digits} digits (cap {MAX_INT_DIGITS})")
    return int(text)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _Reject(f"duplicate key {k[:80]!r}")
        out[k] = v
    return out


def _depth_ok(value: Any, max_depth: int) -> bool:
    """True when no container in ``value`` nests deeper than ``max_depth`` (iterative walk)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        v, d = stack.pop()
        if d > max_depth:
            return False
        items = v.values() if isinstance(v, dict) else v
        for c in items:
            if isinstance(c, (dict, list)):
                stack.append((c, d + 1))
    return True


def loads_bounded(
    data: bytes | str, *, path: str, what: str = "JSON", max_bytes: int = MAX_JSON_BYTES,
    max_depth: int = MAX_DEPTH, unique_keys: bool = False,
) -> Any:
    """Parse ``data`` as JSON within the caps, or raise :class:`HeaderError` naming ``path``.

    ``unique_keys`` rejects an object that repeats a key (safetensors headers).
    """
    if len(data) > max_bytes:
        raise HeaderError(f"{what} is {len(data)} bytes, over the {max_bytes}-byte cap", path=path)
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise HeaderError(f"{what} is not UTF-8 ({e.reason} at byte {e.start})", path=path) from e
    try:
        value = json.loads(data, parse_int=_parse_int,
                           object_pairs_hook=_no_duplicates if unique_keys else None)
    except _Reject as e:
        raise HeaderError(f"{what} rejected: JSON {e}", path=path) from None
    except RecursionError:
        raise HeaderError(f"{what} rejected: JSON nested more than {max_depth} levels deep", path=path) from None
    except (ValueError, TypeError) as e:
        raise HeaderError(f"{what} is not valid JSON: {str(e)[:200]}", path=path) from None
    if isinstance(value, (dict, list)) and not _depth_ok(value, max_depth):
        raise HeaderError(f"{what} rejected: JSON nested more than {max_depth} levels deep", path=path)
    return value


def load_json_file(path: str | Path, what: str, *, max_bytes: int = MAX_JSON_BYTES,
                   expect: type | None = dict) -> Any:
    """Read and parse a JSON file within the caps; ``expect`` checks the top-level type.

    Raises :class:`CheckpointError` when the file is missing or unreadable and
    :class:`HeaderError` when its content is malformed or hostile.
    """
    p = Path(path)
    try:
        size = p.stat().st_size
        if size > max_bytes:
            raise HeaderError(f"{what} is {size} bytes, over the {max_bytes}-byte cap", path=str(p))
        raw = p.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{what} not found", path=str(p)) from None
    except OSError as e:
        raise CheckpointError(f"cannot read {what}: {e.strerror or e}", path=str(p)) from None
    value = loads_bounded(raw, path=str(p), what=what, max_bytes=max_bytes)
    if expect is not None and not isinstance(value, expect):
        raise HeaderError(f"{what} must be a JSON {'object' if expect is dict else expect.__name__}, "
                          f"found {type(value).__name__}", path=str(p))
    return value
