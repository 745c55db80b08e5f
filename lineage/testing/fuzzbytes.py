"""Byte-level mutation helpers for :mod:`lineage.testing.fuzz` (bit flips, length fields, hostile JSON)."""

from __future__ import annotations

import json
import random
import struct


def flip(data: bytes, rng: random.Random, n: int, lo: int = 0, hi: int | None = None) -> bytes:
    """``data`` with ``n`` random bits flipped in ``[lo, hi)``."""
    b = bytearray(data)
    hi = len(b) if hi is None else hi
    for _ in range(n):
        i = rng.randrange(lo, max(lo + 1, hi))
        b[i] ^= 1 << rng.randrange(8)
    return bytes(b)


def st_split(data: bytes) -> tuple[dict, bytes]:
    """A safetensors file as (header dict, data section)."""
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def st_join(header: dict | bytes, payload: bytes, delta: int = 0) -> bytes:
    """A safetensors file from a header and data section; ``delta`` skews the length field."""
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", max(0, len(h) + delta)) + h + payload


def huge_int(rng: random.Random) -> str:
    """An integer literal of 25 to 5000 digits."""
    return "9" * rng.choice([25, 400, 5000])


def deep(rng: random.Random) -> str:
    """A JSON array nested 100 to 100000 levels deep."""
    n = rng.choice([100, 2000, 100000])
    return "[" * n + "]" * n


def hostile_json(rng: random.Random, text: str) -> str:
    """A JSON text with a huge integer or deep nesting spliced in (or garbage)."""
    k = rng.randrange(5)
    if k == 0:
        return text.replace("{", '{"x": ' + huge_int(rng) + ", ", 1)
    if k == 1:
        return text.replace("{", '{"x": ' + deep(rng) + ", ", 1)
    if k == 2:
        return deep(rng)
    if k == 3:
        return text[: rng.randrange(len(text))]
    return flip(text.encode(), rng, 3).decode("latin-1")


def gguf_find(data: bytes, key: str) -> int:
    """Offset just after the GGUF string ``key`` (its 8-byte length precedes it)."""
    kb = key.encode()
    i = data.find(struct.pack("<Q", len(kb)) + kb)
    return i + 8 + len(kb) if i >= 0 else -1


def patch(data: bytes, at: int, fmt: str, value: int) -> bytes:
    """``data`` with ``value`` packed as ``fmt`` at ``at`` (unchanged when ``at`` < 0)."""
    if at < 0:
        return data
    return data[:at] + struct.pack(fmt, value) + data[at + struct.calcsize(fmt):]
