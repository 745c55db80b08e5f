"""GGUF checkpoints (llama.cpp): header parsing over any ByteSource, row reads, dequantisation.

The header is parsed here, from bytes pulled through a :class:`ByteSource` with a
growing read-ahead buffer, so local files and HTTP range reads share one
validated parser (the ``gguf`` package's ``GGUFReader`` needs a local memory map;
the tests check this parser against it).  Quantised blocks are dequantised with
``gguf.quants.dequantize``.

Conventions on read:

- Tensor names stay GGUF names (``blk.0.attn_q.weight``); :mod:`lineage.roles`
  maps them to roles.
- Shapes are GGUF ``ne`` reversed, so linear weights are ``(out, in)`` and the
  embedding is ``(vocab, hidden)``; rows are contiguous and quantisation blocks run
  along the last dimension, so a row range is one byte span.
- For llama-architecture files the converter's Q/K row permutation (rotary halves
  interleaved per head) is undone, so ``attn_q``/``attn_k`` match the Hugging Face
  layout row for row.
- ``tokenizer.ggml.tokens`` is the vocabulary; other key/values (including
  ``general.base_model.*``) are in ``Checkpoint.metadata`` with long arrays summarised.
"""

from __future__ import annotations

import functools
import logging
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lineage.errors import CheckpointError, HeaderError, ShardError, UnsupportedFormatError
from lineage.io.checkpoint import Checkpoint, TensorMeta
from lineage.io.hashing import HashingSource
from lineage.io.sources import ByteSource, LocalFileSource

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_TENSORS = 1 << 20
MAX_KV = 1 << 20
MAX_STRING = 1 << 26  # 64 MiB: a chat template or a vocabulary entry, not a payload
MAX_ARRAY = 1 << 28
MAX_DIMS = 4
#: Arrays longer than this are summarised in ``Checkpoint.metadata``.
METADATA_ARRAY_LIMIT = 64
#: Architectures whose llama.cpp converter permutes Q/K rows (LlamaModel and its subclasses).
PERMUTED_QK_ARCHS = frozenset({"llama"})

@functools.cache
def ggml_types() -> dict[int, tuple[str, int, int]]:
    """GGML types: id -> (name, block size in elements, bytes per block), from the gguf package.

    The package is imported on first use only (it costs ~0.2 s, paid only when a GGUF is read).
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    return {int(q): (q.name, *GGML_QUANT_SIZES[q]) for q in GGMLQuantizationType if q in GGML_QUANT_SIZES}
_PLAIN = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "F64": torch.float64, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
          "I64": torch.int64}
#: Quantised types this reader dequantises.
QUANTISED = frozenset({"Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"})

# value types: id -> struct format (scalars)
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
           10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One tensor's header entry: name, GGML type name, torch-order shape, absolute span."""

    name: str
    ggml_type: str
    shape: tuple[int, ...]
    start: int
    nbytes: int


@dataclass(frozen=True)
class GGUFHeader:
    version: int
    kv: dict[str, Any]
    tensors: tuple[GGUFTensorInfo, ...]
    alignment: int
    data_start: int


class _Cursor:
    """Sequential reads from a ByteSource through a read-ahead buffer."""

    def __init__(self, source: ByteSource, chunk: int = 1 << 18) -> None:
        self.src = source
        self.size = source.size
        self.pos = 0
        self._buf = b""
        self._buf_at = 0
        self._chunk = chunk

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > self.size:
            raise HeaderError(
                f"GGUF header runs past the end of the file reading {what} "
                f"({n} bytes at offset {self.pos}, file is {self.size} bytes): truncated or hostile",
                path=self.src.name,
            )
        rel = self.pos - self._buf_at
        if rel < 0 or rel + n > len(self._buf):
            want = max(n, self._chunk)
            want = min(want, self.size - self.pos)
            self._buf = self.src.read(self.pos, want)
            self._buf_at = self.pos
            self._chunk = min(self._chunk * 2, 1 << 23)
            rel = 0
        self.pos += n
        return self._buf[rel : rel + n]

    def unpack(self, fmt: str, what: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.unpack("<Q", what)
        if n > MAX_STRING:
            raise HeaderError(f"GGUF string for {what} claims {n} bytes (cap {MAX_STRING})",
                              path=self.src.name)
        raw = self.take(n, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.decode("utf-8", errors="replace")


def _value(cur: _Cursor, vtype: int, key: str, depth: int = 0) -> Any:
    if vtype in _SCALAR:
        return cur.unpack(_SCALAR[vtype], key)
    if vtype == _STRING:
        return cur.string(key)
    if vtype == _ARRAY:
        if depth > 2:
            raise HeaderError(f"GGUF key {key!r}: arrays nested too deeply", path=cur.src.name)
        itype = cur.unpack("<I", key)
        n = cur.unpack("<Q", key)
        if n > MAX_ARRAY:
            raise HeaderError(f"GGUF key {key!r}: array of {n} items exceeds the cap",
                              path=cur.src.name)
        if itype in _SCALAR:
            fmt = _SCALAR[itype]
            size = struct.calcsize(fmt)
            raw = cur.take(n * size, key)
            return np.frombuffer(raw, dtype=np.dtype(fmt)).tolist()
        if itype == _STRING or itype == _ARRAY:
            return [_value(cur, itype, key, depth + 1) for _ in range(n)]
        raise HeaderError(f"GGUF key {key!r}: unknown array item type {itype}", path=cur.src.name)
    raise HeaderError(f"GGUF key {key!r}: unknown value type {vtype}", path=cur.src.name)


def parse_gguf_header(source: ByteSource) -> GGUFHeader:
    """Parse and validate a GGUF header (magic, counts, key/values, tensor infos, spans)."""
    name = source.name
    cur = _Cursor(source)
    if source.size < 24 or cur.take(4, "magic") != GGUF_MAGIC:
        raise HeaderError("not a GGUF file (bad magic)", path=name)
    version = cur.unpack("<I", "version")
    if version not in (2, 3):
        raise UnsupportedFormatError(f"GGUF version {version} (supported: 2, 3)", path=name)
    n_tensors = cur.unpack("<Q", "tensor count")
    n_kv = cur.unpack("<Q", "key/value count")
    if n_tensors > MAX_TENSORS or n_kv > MAX_KV:
        raise HeaderError(f"GGUF header claims {n_tensors} tensors and {n_kv} keys: hostile",
                          path=name)
    kv: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string("key")
        vtype = cur.unpack("<I", key)
        if key in kv:
            raise HeaderError(f"duplicate GGUF key {key!r}", path=name)
        kv[key] = _value(cur, vtype, key)
    alignment = kv.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise HeaderError(f"general.alignment {alignment!r} is not a power of two", path=name)

    raw_infos = []
    seen: set[str] = set()
    for _ in range(n_tensors):
        tname = cur.string("tensor name")
        if tname in seen:
            raise HeaderError(f"duplicate tensor name {tname!r}", path=name)
        seen.add(tname)
        n_dims = cur.unpack("<I", tname)
        if not 1 <= n_dims <= MAX_DIMS:
            raise HeaderError(f"tensor {tname!r} has {n_dims} dimensions (1..{MAX_DIMS})", path=name)
        ne = [cur.unpack("<Q", tname) for _ in range(n_dims)]
        ttype = cur.unpack("<I", tname)
        offset = cur.unpack("<Q", tname)
        raw_infos.append((tname, ne, ttype, offset))
    data_start = -(-cur.pos // alignment) * alignment

    tensors = []
    for tname, ne, ttype, offset in raw_infos:
        if ttype not in ggml_types():
            raise UnsupportedFormatError(f"tensor {tname!r} has unknown GGML type id {ttype}",
                                         path=name)
        tyname, bs, ts = ggml_types()[ttype]
        if any(d <= 0 or d > (1 << 40) for d in ne) or ne[0] % bs:
            raise HeaderError(
                f"tensor {tname!r} has invalid dims {ne} for {tyname} (block size {bs})", path=name
            )
        nbytes = math.prod(ne) // bs * ts
        if offset % alignment:
            raise HeaderError(f"tensor {tname!r} offset {offset} is not {alignment}-aligned",
                              path=name)
        start = data_start + offset
        if start + nbytes > source.size:
            raise HeaderError(
                f"tensor {tname!r} ends at byte {start + nbytes} but the file holds "
                f"{source.size} bytes: truncated file",
                path=name,
            )
        tensors.append(GGUFTensorInfo(tname, tyname, tuple(reversed(ne)), start, nbytes))
    _check_data_section(tensors, data_start, alignment, source.size, name)
    return GGUFHeader(version, kv, tuple(tensors), alignment, data_start)


def _check_data_section(tensors: list[GGUFTensorInfo], data_start: int, alignment: int,
                        size: int, name: str) -> None:
    """Every byte of the data section belongs to a tensor or to alignment padding.

    A tensor count, offset or header field that is off shifts the data section; this
    catches it as a format error instead of reading shifted bytes as weights.
    """
    pos = data_start
    for t in sorted(tensors, key=lambda t: t.start):
        if t.start < pos:
            raise HeaderError(f"tensor {t.name!r} overlaps the previous tensor or the header", path=name)
        if t.start - pos >= alignment:
            raise HeaderError(
                f"{t.start - pos} unaccounted bytes before tensor {t.name!r} in the data section "
                "(wrong tensor count or offsets)", path=name)
        pos = t.start + t.nbytes
    if size - pos >= alignment:
        raise HeaderError(
            f"{size - pos} bytes after the last tensor are not accounted for by the header "
            "(wrong tensor count or offsets)", path=name)


def dequantize_rows(raw: np.ndarray, ggml_type: str, row_numel: int) -> np.ndarray:
    """Dequantise ``(rows, row_bytes)`` uint8 blocks of ``ggml_type`` to float32 ``(rows, row_numel)``."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    out = dequantize(raw, GGMLQuantizationType[ggml_type])
    return np.asarray(out, dtype=np.float32).reshape(raw.shape[0], row_numel)


def unpermute_qk_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's per-head interleaving of rotary halves (rows of whole heads)."""
    rows = w.shape[0]
    hd = rows // n_head
    rest = w.shape[1:]
    return w.reshape(n_head, hd // 2, 2, *rest).transpose(1, 2).reshape(rows, *rest)


def permute_qk_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """What llama.cpp's converter does to Q/K rows (the inverse of :func:`unpermute_qk_rows`)."""
    rows = w.shape[0]
    hd = rows // n_head
    rest = w.shape[1:]
    return w.reshape(n_head, 2, hd // 2, *rest).transpose(1, 2).reshape(rows, *rest)


class GGUFReader:
    """Reads (and dequantises) row ranges of GGUF tensors from a byte source."""

    def __init__(self, source: ByteSource, infos: dict[str, GGUFTensorInfo],
                 qk_heads: dict[str, int]) -> None:
        self.source = source
        self.infos = infos
        self.qk_heads = qk_heads

    def read_rows(self, meta: TensorMeta, start: int, stop: int) -> torch.Tensor:
        heads = self.qk_heads.get(meta.name)
        if heads:
            hd = meta.n_rows // heads
            h0, h1 = start // hd, -(-stop // hd)
            block = self._read(meta, h0 * hd, h1 * hd)
            block = unpermute_qk_rows(block, h1 - h0)
            return block[start - h0 * hd : stop - h0 * hd]
        return self._read(meta, start, stop)

    def _read(self, meta: TensorMeta, start: int, stop: int) -> torch.Tensor:
        info = self.infos[meta.name]
        _, bs, ts = next(v for v in ggml_types().values() if v[0] == info.ggml_type)
        row_bytes = meta.row_numel // bs * ts
        n = (stop - start) * row_bytes
        shape = (stop - start, *meta.shape[1:]) if len(meta.shape) >= 2 else meta.shape
        if info.ggml_type in _PLAIN:
            buf = torch.empty(n, dtype=torch.uint8)
            if n:
                self.source.readinto(info.start + start * row_bytes, memoryview(buf.numpy()))
            return buf.view(_PLAIN[info.ggml_type]).view(shape)
        if info.ggml_type not in QUANTISED:
            raise UnsupportedFormatError(
                f"tensor {meta.name!r} is {info.ggml_type}, which lineage does not dequantise "
                f"(supported: F32, F16, BF16, {', '.join(sorted(QUANTISED))})",
                path=self.source.name,
            )
        raw = np.frombuffer(self.source.read(info.start + start * row_bytes, n), dtype=np.uint8)
        out = dequantize_rows(raw.reshape(stop - start, row_bytes), info.ggml_type, meta.row_numel)
        return torch.from_numpy(out.copy()).view(shape)


def _summarise(kv: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in kv.items():
        if isinstance(v, list) and (len(v) > METADATA_ARRAY_LIMIT or k.startswith("tokenizer.ggml.")):
            out[k] = f"<array of {len(v)} {type(v[0]).__name__ if v else 'items'}>"
        else:
            out[k] = v
    return out


def config_from_gguf(kv: dict[str, Any]) -> dict[str, Any]:
    """A config.json-like dict from GGUF metadata (Hugging Face key names)."""
    arch = kv.get("general.architecture")
    cfg: dict[str, Any] = {"model_type": arch, "_from_gguf": True}
    keys = {
        "hidden_size": "embedding_length", "num_hidden_layers": "block_count",
        "intermediate_size": "feed_forward_length", "num_attention_heads": "attention.head_count",
        "num_key_value_heads": "attention.head_count_kv",
        "rms_norm_eps": "attention.layer_norm_rms_epsilon",
        "layer_norm_eps": "attention.layer_norm_epsilon",
        "max_position_embeddings": "context_length", "rope_theta": "rope.freq_base",
        "head_dim": "attention.key_length",
    }
    for hf, g in keys.items():
        v = kv.get(f"{arch}.{g}")
        if v is not None:
            cfg[hf] = v
    toks = kv.get("tokenizer.ggml.tokens")
    if isinstance(toks, list):
        cfg["vocab_size"] = len(toks)
    return cfg


_QK = re.compile(r"blk\.\d+\.attn_([qk])\.(weight|bias)")


_SPLIT = re.compile(r"(.+)-(\d{5})-of-(\d{5})\.gguf")


def split_siblings(filename: str) -> list[str] | None:
    """All file names of a llama.cpp split set (``x-00001-of-00003.gguf``), or None."""
    m = _SPLIT.fullmatch(filename)
    if not m:
        return None
    n = int(m.group(3))
    return [f"{m.group(1)}-{i:05d}-of-{n:05d}.gguf" for i in range(1, n + 1)]


def open_gguf_source(ref: str, source: ByteSource) -> Checkpoint:
    """A checkpoint over one GGUF byte source (local file or HTTP range source)."""
    return open_gguf_sources(ref, [source])


def open_gguf_sources(ref: str, sources: list[ByteSource]) -> Checkpoint:
    """A checkpoint over GGUF byte sources: one file, or every file of a split set in order.

    Metadata and vocabulary come from the first file; tensors from all of them.
    """
    headers = [parse_gguf_header(s) for s in sources]
    kv = headers[0].kv
    count = kv.get("split.count")
    if isinstance(count, int) and count > 1 and count != len(sources):
        raise ShardError(f"GGUF split set has {count} files but {len(sources)} were given",
                         path=ref)
    arch = kv.get("general.architecture")
    n_head = kv.get(f"{arch}.attention.head_count")
    n_kv = kv.get(f"{arch}.attention.head_count_kv", n_head)
    tensors: dict[str, TensorMeta] = {}
    readers: dict[str, GGUFReader] = {}
    any_unpermuted = False
    for source, header in zip(sources, headers):
        qk_heads: dict[str, int] = {}
        for t in header.tensors:
            if t.name in tensors:
                raise ShardError(f"tensor {t.name!r} appears in two GGUF split files", path=ref)
            m = _QK.fullmatch(t.name)
            if arch in PERMUTED_QK_ARCHS and m:
                heads = n_head if m.group(1) == "q" else n_kv
                if isinstance(heads, int) and heads > 0 and t.shape[0] % heads == 0 \
                        and (t.shape[0] // heads) % 2 == 0:
                    qk_heads[t.name] = heads
                else:
                    log.warning("%s: cannot undo Q/K permutation of %s (heads=%r, rows=%d)",
                                ref, t.name, heads, t.shape[0])
        any_unpermuted = any_unpermuted or bool(qk_heads)
        reader = GGUFReader(source, {t.name: t for t in header.tensors}, qk_heads)
        for t in header.tensors:
            tensors[t.name] = TensorMeta(t.name, t.ggml_type, t.shape, t.nbytes, source.name, t.start)
            readers[t.name] = reader
    metadata = _summarise(kv)
    metadata["gguf.version"] = headers[0].version
    metadata["lineage.qk_unpermuted"] = any_unpermuted
    toks = kv.get("tokenizer.ggml.tokens")
    vocab = [str(t) for t in toks] if isinstance(toks, list) else None
    ckpt = Checkpoint(ref, "gguf", tensors, dict(readers), list(sources),
                      config=config_from_gguf(kv), metadata=metadata)
    ckpt._vocab, ckpt._vocab_loaded = vocab, True
    return ckpt


def open_local_gguf(ref: str) -> Checkpoint | None:
    """A local ``.gguf`` file (by suffix or magic), or a folder holding one GGUF (or one split set);
    a split set when given any of its files."""
    p = Path(ref)
    if p.is_dir():
        found = sorted(p.glob("*.gguf"))
        heads = sorted({(split_siblings(f.name) or [f.name])[0] for f in found})
        if not found:
            return None
        if len(heads) > 1:
            raise CheckpointError(f"folder holds {len(heads)} GGUF models ({', '.join(heads[:3])}…): name one file",
                                  path=ref)
        p = p / heads[0]
    if not p.is_file():
        return None
    if p.suffix.lower() != ".gguf":
        try:
            with open(p, "rb") as f:
                if f.read(4) != GGUF_MAGIC:
                    return None
        except OSError:
            return None
    names = split_siblings(p.name) or [p.name]
    missing = [n for n in names if not (p.parent / n).is_file()]
    if missing:
        raise ShardError(f"GGUF split set is missing {len(missing)} file(s), e.g. {missing[0]!r}",
                         path=ref)
    sources: list[ByteSource] = []
    try:
        for n in names:
            sources.append(HashingSource(LocalFileSource(p.parent / n)))
        return open_gguf_sources(ref, sources)
    except Exception:
        for s in sources:
            s.close()
        raise
