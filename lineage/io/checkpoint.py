"""Checkpoints: a uniform, streaming view of tensors across files and formats.

A :class:`Checkpoint` knows every tensor's name, storage dtype and shape from the
headers alone, and reads rows of a tensor on demand through a format-specific
:class:`TensorReader`.  Nothing is held in memory beyond the block being read.

Formats plug in through :data:`OPENERS`, an explicit tuple of functions that each
either return a :class:`Checkpoint` for a reference or ``None`` when the
reference is not theirs.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from lineage.errors import CheckpointError, LineageError, ShardError, UnsupportedFormatError
from lineage.io.dtypes import DTYPES
from lineage.io.provenance import FileIntegrity, HubProvenance
from lineage.io.safejson import load_json_file
from lineage.io.safetensors import SafetensorsEntry, header_length, parse_header
from lineage.io.selection import note_skipped, select_safetensors
from lineage.io.hashing import HashingSource
from lineage.io.sources import ByteSource, LocalFileSource

log = logging.getLogger(__name__)

#: Default block size for streaming reads, in elements.
DEFAULT_BLOCK_ELEMS = 1 << 20


@dataclass(frozen=True)
class TensorMeta:
    """What the headers say about one tensor.

    ``file`` and ``offset`` give the storage order, so readers can visit tensors in
    file order.  ``dtype`` is the storage type name (``"BF16"``, ``"Q4_K"``, …).
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    file: str
    offset: int

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)

    @property
    def n_rows(self) -> int:
        """Rows along dim 0 for matrices; a vector or scalar is one row."""
        return self.shape[0] if len(self.shape) >= 2 else 1

    @property
    def row_numel(self) -> int:
        """Elements per row."""
        return math.prod(self.shape[1:]) if len(self.shape) >= 2 else self.numel


class TensorReader(Protocol):
    """Reads rows ``[start, stop)`` of one tensor.

    Float storage is returned in its own torch dtype (so fast kernels can work on
    bf16 directly); quantised storage is dequantised to float32.  The result has
    shape ``(stop - start, *shape[1:])`` for matrices, or the full shape for vectors.
    """

    def read_rows(self, meta: TensorMeta, start: int, stop: int) -> torch.Tensor: ...


@dataclass
class Checkpoint:
    """A model's tensors, readable in row blocks, with its config and tokenizer."""

    ref: str
    format: str
    tensors: dict[str, TensorMeta]
    readers: dict[str, TensorReader]
    sources: list[ByteSource] = field(default_factory=list)
    config: dict[str, Any] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    tokenizer_dir: str | None = None
    _vocab: list[str] | None = field(default=None, repr=False)
    _vocab_loaded: bool = field(default=False, repr=False)
    #: For Hub references: repo id, revision, resolved commit and files read.
    provenance: HubProvenance | None = None
    #: Weight files beside the chosen ones that were not loaded (e.g. a float32 copy).
    skipped_files: tuple[str, ...] = ()

    # -- reading ---------------------------------------------------------------
    def read_raw(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows ``[start, stop)`` of tensor ``name`` in its storage dtype (see TensorReader)."""
        meta = self._meta(name)
        stop = meta.n_rows if stop is None else stop
        if not 0 <= start <= stop <= meta.n_rows:
            raise CheckpointError(
                f"row range [{start}, {stop}) outside tensor {name!r} with {meta.n_rows} rows",
                path=self.ref,
            )
        return self.readers[name].read_rows(meta, start, stop)

    def read(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows ``[start, stop)`` of tensor ``name`` as float32."""
        return self.read_raw(name, start, stop).float()

    def iter_blocks(
        self, name: str, block_elems: int = DEFAULT_BLOCK_ELEMS
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield ``(row_start, rows)`` blocks of about ``block_elems`` elements, in storage dtype."""
        meta = self._meta(name)
        rows_per = max(1, block_elems // max(1, meta.row_numel))
        for s in range(0, meta.n_rows, rows_per):
            yield s, self.read_raw(name, s, min(meta.n_rows, s + rows_per))

    def _meta(self, name: str) -> TensorMeta:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"no tensor named {name!r}", path=self.ref) from None

    # -- accounting ------------------------------------------------------------
    @property
    def total_bytes(self) -> int:
        """Size of the tensor data (sum over tensors)."""
        return sum(m.nbytes for m in self.tensors.values())

    @property
    def bytes_read(self) -> int:
        """Bytes read from all sources so far (headers included)."""
        return sum(s.bytes_read for s in self.sources)

    def file_integrity(self) -> tuple[FileIntegrity, ...]:
        """Per source file: were its bytes verified against a published hash (see :mod:`lineage.io.provenance`)?"""
        out = []
        for s in self.sources:
            check = getattr(s, "integrity", None)
            out.append(check() if callable(check) else FileIntegrity(s.name, s.size, "local"))
        return tuple(out)

    def in_file_order(self, names: list[str] | None = None) -> list[str]:
        """The given tensor names (default: all) sorted by (file, offset)."""
        names = list(self.tensors) if names is None else names
        return sorted(names, key=lambda n: (self.tensors[n].file, self.tensors[n].offset))

    # -- tokenizer -------------------------------------------------------------
    def vocab(self) -> list[str] | None:
        """Token strings by id, if a tokenizer ships with the checkpoint."""
        if not self._vocab_loaded:
            self._vocab_loaded = True
            if self._vocab is None and self.tokenizer_dir is not None:
                from lineage.io.tokenizer import load_vocab

                self._vocab = load_vocab(self.tokenizer_dir)
        return self._vocab

    def close(self) -> None:
        """Close every source."""
        for s in self.sources:
            s.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------- safetensors


class SafetensorsReader:
    """Reads row ranges of safetensors tensors from a byte source."""

    def __init__(self, source: ByteSource, entries: dict[str, SafetensorsEntry]) -> None:
        self.source = source
        self.entries = entries

    def read_rows(self, meta: TensorMeta, start: int, stop: int) -> torch.Tensor:
        entry = self.entries[meta.name]
        dt = DTYPES[entry.dtype]
        if dt.torch_dtype is None:
            raise UnsupportedFormatError(
                f"tensor {meta.name!r} has dtype {entry.dtype}, which this torch build cannot read",
                path=self.source.name,
            )
        row_bytes = meta.row_numel * dt.itemsize
        n = (stop - start) * row_bytes
        buf = torch.empty(n, dtype=torch.uint8)
        if n:
            self.source.readinto(entry.start + start * row_bytes, memoryview(buf.numpy()))
        out = buf.view(dt.torch_dtype)
        shape = (stop - start, *meta.shape[1:]) if len(meta.shape) >= 2 else meta.shape
        return out.view(shape)


def read_safetensors_header(source: ByteSource):
    """Fetch and parse the header of a safetensors byte source."""
    n = header_length(source.read(0, min(8, source.size)), source.size, source.name)
    return parse_header(source.read(8, n), source.size, source.name)


def open_safetensors_sources(
    ref: str, sources: list[ByteSource], fmt: str = "safetensors"
) -> Checkpoint:
    """Build a checkpoint from one or more safetensors byte sources (shards)."""
    tensors: dict[str, TensorMeta] = {}
    readers: dict[str, TensorReader] = {}
    metadata: dict[str, Any] = {}
    for src in sources:
        header = read_safetensors_header(src)
        metadata.update(header.metadata)
        entries = {e.name: e for e in header.entries}
        reader = SafetensorsReader(src, entries)
        for e in header.entries:
            if e.name in tensors:
                raise ShardError(
                    f"tensor {e.name!r} appears in both {tensors[e.name].file} and {src.name}",
                    path=ref,
                )
            tensors[e.name] = TensorMeta(
                e.name, e.dtype, e.shape, e.end - e.start, src.name, e.start
            )
            readers[e.name] = reader
    return Checkpoint(ref, fmt, tensors, readers, list(sources), metadata=metadata)


def load_config(folder: Path) -> dict[str, Any] | None:
    """``config.json`` of a model folder, if present and valid (a bad one is only logged)."""
    p = folder / "config.json"
    if not p.is_file():
        return None
    try:
        return load_json_file(p, "config.json")
    except LineageError as e:
        log.warning("ignoring unreadable config.json (%s)", e)
        return None


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / f).is_file() for f in ("tokenizer.json", "vocab.json", "vocab.txt"))


def open_local_safetensors(ref: str) -> Checkpoint | None:
    """A ``.safetensors`` file, or a folder: its index of shards, else ``model.safetensors`` (see :func:`select_safetensors`)."""
    path = Path(ref)
    skipped: list[str] = []
    if path.is_file() and path.suffix == ".safetensors":
        folder, files = path.parent, [path]
    elif path.is_dir():
        folder = path
        index = path / "model.safetensors.index.json"
        names = [f.name for f in path.glob("*.safetensors")]
        if index.is_file():
            files = _shards_from_index(index)
            _, skipped = select_safetensors(names, [f.name for f in files])
        else:
            chosen, skipped = select_safetensors(names)
            if not chosen:
                return None
            files = [path / n for n in chosen]
    else:
        return None
    sources: list[ByteSource] = [HashingSource(LocalFileSource(f)) for f in files]
    ckpt = open_safetensors_sources(ref, sources)
    note_skipped(ckpt, skipped, ref)
    ckpt.config = load_config(folder)
    ckpt.tokenizer_dir = str(folder) if _has_tokenizer(folder) else None
    if path.is_dir() and (path / "model.safetensors.index.json").is_file():
        _check_index_covers(path / "model.safetensors.index.json", ckpt)
    return ckpt


#: Longest shard file name accepted from an index (common file systems allow 255 bytes).
MAX_SHARD_NAME = 255


def check_shard_name(shard: object, index: str) -> str:
    """A shard file name from an index: a plain, sane file name inside the index's folder."""
    if not isinstance(shard, str) or not shard:
        raise ShardError(f"shard index names a shard that is not a file name: {shard!r}", path=index)
    if len(shard.encode("utf-8", "surrogatepass")) > MAX_SHARD_NAME:
        raise ShardError(f"shard index names a file of {len(shard)} characters "
                         f"(over {MAX_SHARD_NAME}): {shard[:40]!r}…", path=index)
    if "\0" in shard or "/" in shard or "\\" in shard or shard in (".", "..") \
            or os.path.sep in os.path.normpath(shard):
        raise ShardError(f"shard index names a file outside the folder: {shard!r}", path=index)
    return shard


def read_shard_index(index: Path) -> dict[str, str]:
    """The validated ``weight_map`` (tensor name → shard file name) of a shard index."""
    data = load_json_file(index, "shard index")
    wm = data.get("weight_map")
    if not isinstance(wm, dict) or not wm:
        raise ShardError("shard index has no valid 'weight_map'", path=str(index))
    for shard in wm.values():
        check_shard_name(shard, str(index))
    return wm


def _shards_from_index(index: Path) -> list[Path]:
    files = []
    for shard in sorted(set(read_shard_index(index).values())):
        p = index.parent / shard
        if not p.is_file():
            raise ShardError(f"shard index names missing shard {shard!r}", path=str(index))
        files.append(p)
    return files


def _check_index_covers(index: Path, ckpt: Checkpoint) -> None:
    wm = read_shard_index(index)
    missing = [n for n in wm if n not in ckpt.tensors]
    if missing:
        raise ShardError(
            f"{len(missing)} tensor(s) listed in the index are absent from the shards, "
            f"e.g. {missing[0]!r}",
            path=str(index),
        )


#: Format openers, tried in order.  Each returns a Checkpoint or None ("not mine").
OPENERS: list[Callable[[str], Checkpoint | None]] = [open_local_safetensors]


def open_checkpoint(ref: str | os.PathLike[str]) -> Checkpoint:
    """Open a model reference (see :data:`OPENERS`) without reading any tensor data."""
    ref = os.fspath(ref)
    for opener in OPENERS:
        try:
            ckpt = opener(ref)
        except OSError as e:  # file-system refusals (name too long, permissions, I/O errors)
            where = e.filename if isinstance(e.filename, str) and len(e.filename) < 300 else ref
            raise CheckpointError(f"cannot read: {e.strerror or e}", path=where) from e
        if ckpt is not None:
            if not ckpt.tensors:
                raise CheckpointError("checkpoint contains no tensors", path=ref)
            log.debug("opened %s as %s with %d tensors", ref, ckpt.format, len(ckpt.tensors))
            return ckpt
    p = Path(ref)
    try:
        exists = p.exists()
    except OSError as e:
        raise CheckpointError(f"cannot read: {e.strerror or e}", path=ref[:300]) from e
    if not exists:
        raise CheckpointError("no such file or folder", path=ref)
    if p.is_dir():
        raise CheckpointError(
            "folder holds no model weights (no *.safetensors, index, GGUF, .bin or adapter)",
            path=ref,
        )
    raise UnsupportedFormatError(f"unrecognised model file type {p.suffix or '(none)'!r}", path=ref)


# ---------------------------------------------------------------------------- sparse row reads


def read_row_set(ckpt: Checkpoint, name: str, rows: "list[int] | tuple[int, ...]", *,
                 max_gap_bytes: int = 8 << 10) -> torch.Tensor:
    """Rows ``rows`` (any order, repeats allowed) of tensor ``name`` as float32, in the order given.

    The rows are read as few contiguous spans: sorted, and neighbours closer than
    ``max_gap_bytes`` of storage are merged into one read (one HTTP range request
    on a remote source), so a scattered sample costs one request per cluster
    rather than one per row.
    """
    meta = ckpt._meta(name)
    if not rows:
        return torch.empty((0, *meta.shape[1:]), dtype=torch.float32)
    n = meta.n_rows
    if min(rows) < 0 or max(rows) >= n:
        raise CheckpointError(f"row index outside tensor {name!r} with {n} rows", path=ckpt.ref)
    row_bytes = max(1, meta.nbytes // max(1, n))
    gap_rows = max_gap_bytes // row_bytes
    uniq = sorted(set(int(r) for r in rows))
    spans: list[tuple[int, int]] = []
    for r in uniq:
        if spans and r - spans[-1][1] <= gap_rows:
            spans[-1] = (spans[-1][0], r + 1)
        else:
            spans.append((r, r + 1))
    where: dict[int, int] = {}
    parts = []
    base = 0
    for a, b in spans:
        parts.append(ckpt.read(name, a, b))
        for r in range(a, b):
            where[r] = base + r - a
        base += b - a
    block = torch.cat(parts) if len(parts) > 1 else parts[0]
    return block[torch.as_tensor([where[int(r)] for r in rows], dtype=torch.int64)].contiguous()
