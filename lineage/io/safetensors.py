"""Safetensors header parsing: a pure function of bytes, validated against hostile input.

The same parser serves local files and HTTP range reads: callers fetch the first
8 bytes, then the header, and hand both to :func:`parse_header`.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field

from lineage.errors import HeaderError, UnsupportedFormatError
from lineage.io.dtypes import DTYPES
from lineage.io.safejson import loads_bounded

#: Largest header accepted (the reference implementation uses 100 MB as well).
MAX_HEADER_BYTES = 100 * 1024 * 1024
#: Most dimensions a tensor may have.
MAX_DIMS = 8


@dataclass(frozen=True)
class SafetensorsEntry:
    """One tensor's header entry with absolute byte offsets in the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated header: entries sorted by offset, plus the ``__metadata__`` map."""

    entries: tuple[SafetensorsEntry, ...]
    metadata: dict[str, str] = field(default_factory=dict)
    data_start: int = 0


def header_length(prefix: bytes, file_size: int, path: str) -> int:
    """Decode and check the 8-byte little-endian header length."""
    if file_size < 8 or len(prefix) < 8:
        raise HeaderError(
            f"file is {file_size} bytes, too short for a safetensors header (needs at least 8)",
            path=path,
        )
    (n,) = struct.unpack("<Q", prefix[:8])
    if n > MAX_HEADER_BYTES:
        raise HeaderError(
            f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte cap (hostile or not safetensors)",
            path=path,
        )
    if 8 + n > file_size:
        raise HeaderError(
            f"header length {n} runs past the end of the file ({file_size} bytes): truncated file",
            path=path,
        )
    return n


def parse_header(header: bytes, file_size: int, path: str) -> SafetensorsHeader:
    """Parse and validate the JSON header (the bytes after the 8-byte length).

    Checks: valid UTF-8 JSON object within the size/depth/integer caps of
    :mod:`lineage.io.safejson`, no duplicate names, known dtypes, non-negative integer
    shapes, offsets consistent with shape × itemsize, no overlaps, and tensors that
    tile the data section exactly (no gap, nothing past or before the end), so a
    wrong header length is a format error rather than shifted data.
    """
    data_start = 8 + len(header)
    raw = loads_bounded(header, path=path, what="header", max_bytes=MAX_HEADER_BYTES,
                        unique_keys=True)
    if not isinstance(raw, dict):
        raise HeaderError(f"header must be a JSON object, found {type(raw).__name__}", path=path)

    metadata: dict[str, str] = {}
    meta = raw.pop("__metadata__", None)
    if meta is not None:
        if not isinstance(meta, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
        ):
            raise HeaderError("__metadata__ must map strings to strings", path=path)
        metadata = dict(meta)

    payload = file_size - data_start
    entries: list[SafetensorsEntry] = []
    for name, info in raw.items():
        if not isinstance(info, dict):
            raise HeaderError(f"entry {name!r} is not an object", path=path)
        dtype = info.get("dtype")
        shape = info.get("shape")
        offsets = info.get("data_offsets")
        if not isinstance(dtype, str):
            raise HeaderError(f"tensor {name!r} has no dtype string", path=path)
        if dtype not in DTYPES:
            raise UnsupportedFormatError(
                f"tensor {name!r} has unknown dtype {dtype!r} (known: {', '.join(DTYPES)})",
                path=path,
            )
        if not isinstance(shape, list) or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape
        ):
            raise HeaderError(
                f"tensor {name!r} has an invalid shape {shape!r} (expected non-negative integers)",
                path=path,
            )
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        ):
            raise HeaderError(f"tensor {name!r} has invalid data_offsets {offsets!r}", path=path)
        if len(shape) > MAX_DIMS or math.prod(d for d in shape if d) > max(payload, 1 << 16):
            raise HeaderError(
                f"tensor {name!r} has an implausible shape {shape[:MAX_DIMS + 1]!r} for a data "
                f"section of {payload} bytes",
                path=path,
            )
        begin, end = offsets
        if begin < 0 or end < begin:
            raise HeaderError(
                f"tensor {name!r} has negative or reversed offsets [{begin}, {end}]", path=path
            )
        expected = math.prod(shape) * DTYPES[dtype].itemsize
        if end - begin != expected:
            raise HeaderError(
                f"tensor {name!r}: offsets span {end - begin} bytes but shape {shape} of "
                f"{dtype} needs {expected}",
                path=path,
            )
        if end > payload:
            raise HeaderError(
                f"tensor {name!r} ends at byte {end} of the data section, but the file holds "
                f"only {payload} data bytes: truncated file",
                path=path,
            )
        entries.append(
            SafetensorsEntry(name, dtype, tuple(shape), data_start + begin, data_start + end)
        )

    entries.sort(key=lambda e: (e.start, e.end))
    _check_tiling(entries, data_start, payload, path)
    return SafetensorsHeader(tuple(entries), metadata, data_start)


def _check_tiling(entries: list[SafetensorsEntry], data_start: int, payload: int, path: str) -> None:
    """Tensors (sorted by offset) must cover the data section back to back, as the format requires."""
    pos = data_start
    for prev, cur in zip([None, *entries], entries):
        if prev is not None and cur.start < prev.end:
            raise HeaderError(
                f"tensors {prev.name!r} and {cur.name!r} overlap in the file", path=path
            )
        if cur.start != pos:
            raise HeaderError(
                f"{cur.start - pos} unaccounted byte(s) before tensor {cur.name!r} in the data section "
                "(wrong offsets or header length)",
                path=path,
            )
        pos = cur.end
    if pos != data_start + payload:
        raise HeaderError(
            f"the data section holds {payload} bytes but the tensors account for "
            f"{pos - data_start}: wrong header length or trailing bytes",
            path=path,
        )
