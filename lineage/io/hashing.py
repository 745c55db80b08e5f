"""A local file's BLAKE3 digest computed from the bytes the comparison reads anyway.

:class:`HashingSource` wraps a local :class:`~lineage.io.sources.ByteSource` and hashes what it
delivers in file order: a read that continues the hashed prefix extends it, a read that starts past
it first hashes the gap (read once, in order; e.g. a tensor the comparison does not pair), and a
re-read of bytes already hashed costs nothing.  The streaming pass reads the reference model in file
order, so its file is hashed from the same buffers; :meth:`HashingSource.complete` hashes what is
left after the pass (headers already are: they are read first).  The digest equals
:func:`lineage.provenance.hash_file`'s (same algorithm over the same bytes), so ``lineage verify``
checks it the usual way.  BLAKE3 releases the GIL: the hashing runs on the reading thread beside the
workers that reduce the blocks.
"""

from __future__ import annotations

import threading
import time

from lineage.io.provenance import FileIntegrity
from lineage.io.sources import ByteSource, WrappedSource

#: Bytes read at once to hash a gap or the rest of a file.
_GAP_CHUNK = 16 << 20


class HashingSource(WrappedSource):
    """A :class:`ByteSource` whose bytes are BLAKE3-hashed as they are read (see module docstring)."""

    def __init__(self, inner: ByteSource) -> None:
        import blake3

        super().__init__(inner)
        self._hash = blake3.blake3()
        self._pos = 0
        self._lock = threading.Lock()
        self.hash_seconds = 0.0
        #: Off until :meth:`start`: opening a checkpoint or sampling it (fingerprints) reads scattered
        #: ranges that must not pull the whole file through the hash.
        self.active = False

    def start(self) -> None:
        """Hash from now on (bytes before the first read are hashed as a gap, once)."""
        self.active = True

    def readinto(self, offset: int, buffer: memoryview) -> None:
        view = buffer.cast("B") if buffer.format != "B" or buffer.ndim != 1 else buffer
        self.inner.readinto(offset, view)
        if not self.active:
            return
        end = offset + view.nbytes
        with self._lock:
            if offset > self._pos:
                self._hash_upto(offset)
            if offset <= self._pos < end:
                t = time.perf_counter()
                self._hash.update(view[self._pos - offset:])
                self.hash_seconds += time.perf_counter() - t
                self._pos = end

    def _hash_upto(self, stop: int) -> None:
        """Read and hash ``[pos, stop)`` in order (caller holds the lock)."""
        buf = bytearray(min(_GAP_CHUNK, max(stop - self._pos, 0)))
        while self._pos < stop:
            n = min(len(buf), stop - self._pos)
            view = memoryview(buf)[:n]
            self.inner.readinto(self._pos, view)
            t = time.perf_counter()
            self._hash.update(view)
            self.hash_seconds += time.perf_counter() - t
            self._pos += n

    @property
    def hashed(self) -> int:
        """Bytes of the file's prefix hashed so far."""
        return self._pos

    def complete(self) -> str:
        """Hash the rest of the file and return the hex digest."""
        with self._lock:
            self._hash_upto(self.size)
            return self._hash.hexdigest()

    def digest(self) -> str | None:
        """The hex digest once every byte was hashed, else None (nothing is read)."""
        with self._lock:
            return self._hash.hexdigest() if self._pos >= self.size else None

    def integrity(self) -> FileIntegrity:
        """A local file: nothing published to verify against; its BLAKE3 when complete."""
        with self._lock:
            done = self._pos >= self.size
            return FileIntegrity(self.name, self.size, "local", None, self._pos,
                                 blake3=self._hash.hexdigest() if done else None)

    def close(self) -> None:
        self.inner.close()

    def __repr__(self) -> str:
        return f"HashingSource({self.inner!r}, hashed={self._pos})"


def start_hashes(sources: list[ByteSource]) -> None:
    """Start hashing every :class:`HashingSource` in ``sources`` (others are left alone)."""
    for s in sources:
        if isinstance(s, HashingSource):
            s.start()


def complete_hashes(sources: list[ByteSource]) -> float:
    """Complete the digest of every hashing source in ``sources``; the seconds spent hashing in all."""
    total = 0.0
    for s in sources:
        if isinstance(s, HashingSource) and s.active:
            s.complete()
            total += s.hash_seconds
    return total
