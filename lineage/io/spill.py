"""Keep the bytes of a remote source that were read once, so later passes read them from disk.

A comparison reads the weights in several passes (element-wise statistics, the
canonical test layer by layer, the anatomy).  Over HTTP every pass would fetch the
same spans again.  :class:`SpilledSource` wraps a remote :class:`ByteSource`: each
span fetched is written at its own offset into an anonymous sparse temporary file
(deleted when closed, never a full download — only what was asked for is stored),
and the exact byte intervals held are tracked, so a re-read is a local ``pread`` and
only the missing gaps go to the network.

Bounded: at most ``max_bytes`` are stored (``LINEAGE_SPILL_MAX_GB``, default 64);
beyond that, or when the temporary folder (``TMPDIR``) is full, reads go straight
to the network.  ``bytes_read`` reports the bytes fetched from the network, which is
what a remote user pays for.  ``LINEAGE_SPILL=0`` disables the cache.
"""

from __future__ import annotations

import bisect
import logging
import os
import tempfile
import threading

from lineage.io.sources import ByteSource, WrappedSource

log = logging.getLogger(__name__)

DEFAULT_MAX_GB = 64.0


def spill_enabled() -> bool:
    """Whether remote sources get a spill cache (``LINEAGE_SPILL`` unset or true)."""
    return (os.environ.get("LINEAGE_SPILL", "1").strip().lower() not in ("0", "false", "no", "off"))


def _max_bytes() -> int:
    try:
        return int(float(os.environ.get("LINEAGE_SPILL_MAX_GB", DEFAULT_MAX_GB)) * (1 << 30))
    except ValueError:
        return int(DEFAULT_MAX_GB * (1 << 30))


class SpilledSource(WrappedSource):
    """A :class:`ByteSource` that stores what it fetched from ``inner`` in a sparse temporary file."""

    def __init__(self, inner: ByteSource, *, max_bytes: int | None = None, directory: str | None = None) -> None:
        super().__init__(inner)
        self.max_bytes = _max_bytes() if max_bytes is None else int(max_bytes)
        self._dir = directory
        self._fd: int | None = None
        self._starts: list[int] = []  # disjoint, sorted [start, end) intervals held on disk
        self._ends: list[int] = []
        self._stored = 0
        self._lock = threading.Lock()
        self._disabled = False
        self.local_bytes = 0  # bytes served from the spill file

    # -- protocol ----------------------------------------------------------------
    def readinto(self, offset: int, buffer: memoryview) -> None:
        view = buffer.cast("B") if buffer.format != "B" else buffer
        length = view.nbytes
        if length == 0:
            return
        with self._lock:
            if self._disabled:
                self.inner.readinto(offset, view)
                return
            gaps = self._gaps(offset, offset + length)
            need = sum(e - s for s, e in gaps)
            if self._stored + need > self.max_bytes:
                log.info("%s: spill cache full (%d bytes); reading from the network", self.name, self._stored)
                self.inner.readinto(offset, view)
                return
            try:
                for s, e in gaps:
                    part = view[s - offset:e - offset]
                    self.inner.readinto(s, part)
                    self._write(s, part)
                    self._add(s, e)
                    self._stored += e - s
                if len(gaps) == 1 and gaps[0] == (offset, offset + length):
                    return  # all fresh from the network: already in the buffer
                self._pread(offset, view)
                self.local_bytes += length - need
            except OSError as e:  # temp folder full or unwritable: stop caching, stay correct
                log.warning("%s: spill cache disabled (%s); reading from the network", self.name, e)
                self._disabled = True
                self.inner.readinto(offset, view)

    def held_until(self, offset: int) -> int:
        """End of the stored interval that contains ``offset`` (``offset`` itself when not stored)."""
        with self._lock:
            i = bisect.bisect_right(self._starts, offset) - 1
            if i >= 0 and self._ends[i] > offset and not self._disabled:
                return self._ends[i]
            return offset

    def read_held(self, offset: int, view: memoryview) -> None:
        """Read stored bytes (all of ``[offset, offset + len)`` must be held) from the spill file."""
        with self._lock:
            self._pread(offset, view)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
        self.inner.close()

    def __enter__(self) -> SpilledSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SpilledSource({self.inner!r}, stored={self._stored})"

    # -- internals ---------------------------------------------------------------
    def _file(self) -> int:
        if self._fd is None:
            fd, path = tempfile.mkstemp(prefix="lineage-spill-", dir=self._dir)
            os.unlink(path)  # anonymous: freed when closed, even after a crash
            self._fd = fd
        return self._fd

    def _write(self, offset: int, data: memoryview) -> None:
        fd = self._file()
        done = 0
        while done < data.nbytes:
            done += os.pwrite(fd, data[done:], offset + done)

    def _pread(self, offset: int, view: memoryview) -> None:
        fd = self._file()
        done = 0
        while done < view.nbytes:
            n = os.preadv(fd, [view[done:]], offset + done)
            if n <= 0:
                raise OSError(f"spill file short read at {offset + done}")
            done += n

    def _gaps(self, start: int, end: int) -> list[tuple[int, int]]:
        """Sub-intervals of ``[start, end)`` not held on disk."""
        out = []
        i = max(0, bisect.bisect_right(self._starts, start) - 1)
        cur = start
        while cur < end and i < len(self._starts):
            s, e = self._starts[i], self._ends[i]
            if e <= cur:
                i += 1
                continue
            if s >= end:
                break
            if s > cur:
                out.append((cur, s))
            cur = max(cur, e)
            i += 1
        if cur < end:
            out.append((cur, end))
        return out

    def _add(self, start: int, end: int) -> None:
        """Insert ``[start, end)`` (disjoint from what is held) and merge touching neighbours."""
        i = bisect.bisect_left(self._starts, start)
        self._starts.insert(i, start)
        self._ends.insert(i, end)
        if i + 1 < len(self._starts) and self._starts[i + 1] == self._ends[i]:
            self._ends[i] = self._ends.pop(i + 1)
            self._starts.pop(i + 1)
        if i > 0 and self._ends[i - 1] == self._starts[i]:
            self._ends[i - 1] = self._ends.pop(i)
            self._starts.pop(i)
