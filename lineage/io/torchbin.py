"""PyTorch ``.bin`` / ``.pt`` / ``.pth`` state dicts, loaded with ``weights_only=True`` only.

``torch.load(..., weights_only=True)`` uses torch's restricted unpickler, which never
calls arbitrary ``__reduce__`` callables; with the zip format the file is memory-mapped
(``mmap=True``) so tensors are paged in only as rows are read.  Anything but a flat
mapping of names to tensors is refused, as is anything torch's safe loader refuses.
Sharded checkpoints use ``pytorch_model.bin.index.json``.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import threading
import zipfile
from pathlib import Path

import torch

from lineage.errors import CheckpointError, HeaderError, ShardError, UnsupportedFormatError
from lineage.io.checkpoint import Checkpoint, TensorMeta, load_config, read_shard_index
from lineage.io.dtypes import TORCH_TO_NAME

log = logging.getLogger(__name__)

SUFFIXES = (".bin", ".pt", ".pth")
INDEX = "pytorch_model.bin.index.json"


class _FileAccount:
    """A ByteSource-shaped record of one loaded file: its size and the bytes handed out."""

    def __init__(self, path: Path) -> None:
        self.name = str(path)
        self.size = path.stat().st_size
        self._n = 0
        self._lock = threading.Lock()

    @property
    def bytes_read(self) -> int:
        return self._n

    def count(self, n: int) -> None:
        with self._lock:
            self._n += n

    def read(self, offset: int, length: int) -> bytes:
        with open(self.name, "rb") as f:
            f.seek(offset)
            data = f.read(length)
        if len(data) != length:
            raise CheckpointError(f"short read at offset {offset}", path=self.name)
        self.count(length)
        return data

    def readinto(self, offset: int, buffer: memoryview) -> None:
        buffer.cast("B")[:] = self.read(offset, buffer.nbytes)

    def close(self) -> None:
        pass


class TorchReader:
    """Rows of tensors held by a (memory-mapped) loaded state dict."""

    def __init__(self, state: dict[str, torch.Tensor], account: _FileAccount) -> None:
        self.state = state
        self.account = account

    def read_rows(self, meta: TensorMeta, start: int, stop: int) -> torch.Tensor:
        t = self.state[meta.name]
        out = t[start:stop] if t.dim() >= 2 else t
        out = out.contiguous().clone()
        self.account.count(out.numel() * out.element_size())
        return out


#: How torch's legacy (pre-zip) format starts: protocol-2 pickle of its magic number.
LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19."


class _BoundedFile(io.FileIO):
    """A file whose ``read(n)`` never asks for more than what is left, so a hostile
    length field in a pickle cannot make the unpickler allocate beyond the file."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, "rb")
        self._size = os.fstat(self.fileno()).st_size

    def read(self, n: int | None = -1) -> bytes:
        left = max(0, self._size - self.tell())
        return super().read(left if n is None or n < 0 else min(n, left))


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """``torch.load`` with ``weights_only=True`` (mmap when the file is a zip), validated."""
    mmap = zipfile.is_zipfile(path)
    if not mmap:
        with open(path, "rb") as f:
            if f.read(len(LEGACY_MAGIC)) != LEGACY_MAGIC:
                raise UnsupportedFormatError(
                    "refused: not a PyTorch checkpoint (neither a zip archive nor torch's legacy format)",
                    path=str(path))
    try:
        if mmap:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        else:
            with _BoundedFile(path) as f:
                obj = torch.load(f, map_location="cpu", weights_only=True)
    except MemoryError:
        raise HeaderError("cannot load as a PyTorch checkpoint: it claims more data than the file "
                          "holds (corrupt or hostile)", path=str(path)) from None
    except pickle.UnpicklingError as e:
        raise UnsupportedFormatError(
            "refused: the file is not a plain weights-only state dict (its pickle asks for "
            f"objects torch's safe loader does not allow: {str(e).splitlines()[0][:200]})",
            path=str(path),
        ) from e
    except Exception as e:  # torch's loader parses hostile bytes: any failure means "not loadable"
        msg = " ".join(str(e).split())[:200] or type(e).__name__
        if "allocate" in msg:  # a storage size from the pickle, refused before any byte was used
            raise HeaderError("cannot load as a PyTorch checkpoint: it declares tensor storage larger "
                              "than memory allows (corrupt or hostile)", path=str(path)) from None
        raise HeaderError(f"cannot load as a PyTorch checkpoint: {msg}", path=str(path)) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict) \
            and all(not isinstance(v, torch.Tensor) for k, v in obj.items() if k != "state_dict"):
        log.info("%s: using the nested 'state_dict' entry", path)
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise UnsupportedFormatError(
            f"expected a state dict (name → tensor), found {type(obj).__name__}", path=str(path)
        )
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        k = bad[0]
        raise UnsupportedFormatError(
            f"expected a plain state dict of tensors, but entry {k!r} is "
            f"{type(obj[k]).__name__}",
            path=str(path),
        )
    for k, v in obj.items():
        _check_tensor(k, v, path)
    return dict(obj)


def _check_tensor(name: str, t: torch.Tensor, path: Path) -> None:
    """Refuse tensors that claim more elements than their storage holds (stride tricks)."""
    try:
        held = t.untyped_storage().nbytes() - t.storage_offset() * t.element_size()
    except (RuntimeError, NotImplementedError) as e:
        raise UnsupportedFormatError(f"tensor {name!r} has no plain storage ({e})", path=str(path)) from None
    if t.numel() * t.element_size() > held:
        raise HeaderError(f"tensor {name!r} of shape {tuple(t.shape)} claims more elements than "
                          f"its storage holds (aliased or hostile strides)", path=str(path))


def open_torch_files(ref: str, paths: list[Path]) -> Checkpoint:
    """A checkpoint over one or more loaded state-dict files."""
    tensors: dict[str, TensorMeta] = {}
    readers: dict[str, TorchReader] = {}
    accounts = []
    for path in paths:
        state = load_state_dict(path)
        acct = _FileAccount(path)
        accounts.append(acct)
        reader = TorchReader(state, acct)
        for i, (name, t) in enumerate(state.items()):
            if name in tensors:
                raise ShardError(f"tensor {name!r} appears in both {tensors[name].file} and {path}",
                                 path=ref)
            if t.dtype not in TORCH_TO_NAME:
                raise UnsupportedFormatError(f"tensor {name!r} has unsupported dtype {t.dtype}",
                                             path=str(path))
            tensors[name] = TensorMeta(name, TORCH_TO_NAME[t.dtype], tuple(t.shape),
                                       t.numel() * t.element_size(), str(path), i)
            readers[name] = reader
    return Checkpoint(ref, "torch", tensors, readers, accounts)


def _shards(index: Path) -> list[Path]:
    out = []
    for n in sorted(set(read_shard_index(index).values())):
        p = index.parent / n
        if not p.is_file():
            raise ShardError(f"shard index names missing shard {n!r}", path=str(index))
        out.append(p)
    return out


def open_torchbin(ref: str) -> Checkpoint | None:
    """Opener: a ``.bin``/``.pt``/``.pth`` file, or a folder with ``pytorch_model.bin[.index.json]``."""
    p = Path(ref)
    if p.is_file() and p.suffix in SUFFIXES:
        folder, files = p.parent, [p]
    elif p.is_file() and p.name == INDEX:
        folder, files = p.parent, _shards(p)
    elif p.is_dir() and (p / INDEX).is_file():
        folder, files = p, _shards(p / INDEX)
    elif p.is_dir() and (p / "pytorch_model.bin").is_file():
        folder, files = p, [p / "pytorch_model.bin"]
    else:
        return None
    ck = open_torch_files(ref, files)
    ck.config = load_config(folder)
    if any((folder / f).is_file() for f in ("tokenizer.json", "vocab.json", "vocab.txt")):
        ck.tokenizer_dir = str(folder)
    if p.is_dir() and (p / INDEX).is_file():
        wm = read_shard_index(p / INDEX)
        absent = [t for t in wm if t not in ck.tensors]
        if absent:
            raise ShardError(f"{len(absent)} tensor(s) listed in the index are absent from the "
                             f"shards, e.g. {absent[0]!r}", path=ref)
    return ck
