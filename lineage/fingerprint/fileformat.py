"""The ``.lfp`` file: a safetensors file of float16 sketches with the fingerprint's tokens and architecture."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from lineage.errors import FingerprintError
from lineage.fingerprint.sketch import SKETCH_KINDS, Fingerprint, _unit

FORMAT = "lineage-fingerprint"
VERSION = "2"
#: Refuse fingerprint files larger than this (a fingerprint is a few MB at most).
MAX_FILE_BYTES = 64 << 20
#: File suffix of fingerprint files.
SUFFIX = ".lfp"


def save_fingerprint(fp: Fingerprint, path: str | os.PathLike[str]) -> int:
    """Write ``fp`` to ``path`` (``.lfp``); returns the file size in bytes."""
    from safetensors.torch import save_file

    tensors = {"K": fp.K.to(torch.float16).contiguous()}
    for i, layer in enumerate(fp.layers):
        for k, v in layer.items():
            tensors[f"L{i}.{k}"] = _unit(v).to(torch.float16).contiguous()
    meta = {"tokens": list(fp.tokens), "arch": fp.arch, "n_layers": fp.n_layers, "meta": fp.meta}
    save_file(tensors, os.fspath(path), metadata={"format": FORMAT, "version": VERSION, "meta": json.dumps(meta)})
    return Path(path).stat().st_size


def load_fingerprint(path: str | os.PathLike[str]) -> Fingerprint:
    """Read and validate a ``.lfp`` file; raises :class:`FingerprintError` naming what is wrong."""
    from safetensors import SafetensorError, safe_open

    p = os.fspath(path)
    try:
        size = Path(p).stat().st_size
    except OSError as e:
        raise FingerprintError(f"cannot read fingerprint ({e.strerror})", path=p) from e
    if size > MAX_FILE_BYTES:
        raise FingerprintError(f"file is {size} bytes, more than a fingerprint can be ({MAX_FILE_BYTES})", path=p)
    try:
        with safe_open(p, framework="pt") as f:
            md = f.metadata() or {}
            names = list(f.keys())
            tensors = {n: f.get_tensor(n) for n in names}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise FingerprintError(f"not a safetensors fingerprint file ({e})", path=p) from e
    if md.get("format") != FORMAT:
        raise FingerprintError(f"expected metadata format {FORMAT!r}, found {md.get('format')!r}", path=p)
    if md.get("version") != VERSION:
        old = md.get("version") in {"1"}
        hint = " (made by an older lineage from whole layers; re-create it with `lineage fingerprint`)" if old else ""
        raise FingerprintError(f"unsupported fingerprint version {md.get('version')!r}{hint}; this build reads "
                               f"version {VERSION!r}", path=p)
    meta, tokens, n_layers, arch = _read_meta(md.get("meta", ""), p)
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens) or len(set(tokens)) != len(tokens):
        raise FingerprintError("metadata tokens must be a list of distinct strings", path=p)
    m = len(tokens)
    if m < 2 or n_layers < 0 or n_layers > 10000:
        raise FingerprintError(f"implausible fingerprint: {m} tokens, {n_layers} layers", path=p)
    expected = {"K"} | {f"L{i}.{k}" for i in range(n_layers) for k in SKETCH_KINDS}
    unknown = set(tensors) - expected
    if unknown:
        raise FingerprintError(f"unexpected tensors {sorted(unknown)[:5]}", path=p)
    if "K" not in tensors:
        raise FingerprintError("missing tensor 'K'", path=p)
    for n, t in tensors.items():
        if tuple(t.shape) != (m, m):
            raise FingerprintError(f"tensor {n!r} has shape {tuple(t.shape)}, expected {(m, m)}", path=p)
        if t.dtype not in (torch.float16, torch.float32, torch.bfloat16):
            raise FingerprintError(f"tensor {n!r} has dtype {t.dtype}, expected a float type", path=p)
        if not bool(torch.isfinite(t).all()):
            raise FingerprintError(f"tensor {n!r} holds NaN or Inf", path=p)
    layers = tuple({k: tensors[f"L{i}.{k}"].float() for k in SKETCH_KINDS if f"L{i}.{k}" in tensors}
                   for i in range(n_layers))
    return Fingerprint(tuple(tokens), tensors["K"].float(), layers, arch, meta)


#: Cap on the JSON metadata of a ``.lfp`` file (the probe tokens and a few settings: ~10 KB in practice).
MAX_META_BYTES = 1 << 20


def _read_meta(raw: object, p: str) -> tuple[dict[str, Any], list[Any], int, dict[str, Any]]:
    """The ``meta`` JSON of a ``.lfp`` header through the bounded loader (size, depth, integer length):
    ``(meta, tokens, n_layers, arch)``, or :class:`FingerprintError` naming what is wrong."""
    from lineage.errors import HeaderError
    from lineage.io.safejson import loads_bounded

    if not isinstance(raw, str):
        raise FingerprintError("metadata 'meta' is missing", path=p)
    try:
        meta = loads_bounded(raw, path=p, what="fingerprint metadata 'meta'", max_bytes=MAX_META_BYTES)
    except HeaderError as e:
        raise FingerprintError(str(e).removeprefix(f"{p}: "), path=p) from None
    if not isinstance(meta, dict):
        raise FingerprintError(f"metadata 'meta' must be a JSON object, found {type(meta).__name__}", path=p)
    tokens, n_layers, arch, extra = meta.get("tokens"), meta.get("n_layers"), meta.get("arch"), meta.get("meta", {})
    if not isinstance(n_layers, int) or isinstance(n_layers, bool):
        raise FingerprintError(f"metadata n_layers must be an integer, found {type(n_layers).__name__}", path=p)
    if not isinstance(arch, dict) or not isinstance(extra, dict):
        raise FingerprintError("metadata 'arch' and 'meta' must be JSON objects", path=p)
    if not isinstance(tokens, list):
        raise FingerprintError("metadata tokens must be a list of distinct strings", path=p)
    return extra, tokens, n_layers, arch
