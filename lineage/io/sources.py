"""Byte sources: the one interface every reader (safetensors, GGUF, …) pulls bytes through.

A source is random-access and read-only.  Local files use ``os.pread`` (no mapping,
so resident memory is bounded by the blocks a caller asks for); remote sources
(HTTP range requests) implement the same protocol in :mod:`lineage.io.http`.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
import os
import threading
from typing import Any, Protocol, runtime_checkable

from lineage.errors import CheckpointError

log = logging.getLogger(__name__)


@runtime_checkable
class ByteSource(Protocol):
    """Random-access, read-only bytes with a known size."""

    #: Human-readable name used in error messages (a path or a URL).
    name: str

    @property
    def size(self) -> int:
        """Total size in bytes."""
        ...

    def read(self, offset: int, length: int) -> bytes:
        """Return exactly ``length`` bytes starting at ``offset``.

        Raises :class:`CheckpointError` if the range is outside the source or the
        bytes cannot be read in full.
        """
        ...

    def readinto(self, offset: int, buffer: memoryview) -> None:
        """Fill ``buffer`` with the bytes starting at ``offset`` (same errors as ``read``)."""
        ...

    @property
    def bytes_read(self) -> int:
        """Bytes delivered so far (for the report's I/O accounting)."""
        ...

    def close(self) -> None:
        """Release the underlying handle."""
        ...


class LocalFileSource:
    """A local file read with ``os.pread`` into caller-owned buffers."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.name = os.fspath(path)
        try:
            self._fd = os.open(self.name, os.O_RDONLY)
        except FileNotFoundError as e:
            raise CheckpointError("file not found", path=self.name) from e
        except IsADirectoryError as e:
            raise CheckpointError("expected a file, found a directory", path=self.name) from e
        except OSError as e:
            raise CheckpointError(f"cannot open: {e.strerror}", path=self.name) from e
        self._size = os.fstat(self._fd).st_size
        self._bytes_read = 0
        self._lock = threading.Lock()

    @property
    def size(self) -> int:
        return self._size

    @property
    def bytes_read(self) -> int:
        return self._bytes_read

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self._size:
            raise CheckpointError(
                f"read of {length} bytes at offset {offset} is outside the file "
                f"({self._size} bytes); the file is truncated or its header is wrong",
                path=self.name,
            )

    def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.readinto(offset, memoryview(buf))
        return bytes(buf)

    def readinto(self, offset: int, buffer: memoryview) -> None:
        length = buffer.nbytes
        self._check(offset, length)
        view = buffer.cast("B") if buffer.format != "B" else buffer
        done = 0
        while done < length:
            try:
                n = os.preadv(self._fd, [view[done:]], offset + done)
            except OSError as e:
                raise CheckpointError(f"read failed: {e.strerror}", path=self.name) from e
            if n == 0:
                raise CheckpointError(
                    f"unexpected end of file at offset {offset + done}", path=self.name
                )
            done += n
        with self._lock:
            self._bytes_read += length

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return f"LocalFileSource({self.name!r}, size={self._size})"


class WrappedSource(ABC):
    """Base of byte sources that wrap another (verification, spill): the size, the byte counter
    and any other attribute (``requests``, ``retries``, ``url``…) are the inner source's;
    subclasses implement :meth:`readinto`."""

    def __init__(self, inner: ByteSource) -> None:
        self.inner = inner
        self.name = inner.name

    @property
    def size(self) -> int:
        return self.inner.size

    @property
    def bytes_read(self) -> int:
        """Bytes the inner source fetched (re-reads a wrapper serves itself are not counted)."""
        return self.inner.bytes_read

    def __getattr__(self, item: str) -> Any:
        if item == "inner":
            raise AttributeError(item)
        return getattr(self.inner, item)

    def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.readinto(offset, memoryview(buf))
        return bytes(buf)

    @abstractmethod
    def readinto(self, offset: int, buffer: memoryview) -> None:
        """Fill ``buffer`` with the bytes at ``offset`` (what the wrapper adds happens here)."""
