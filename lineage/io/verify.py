"""Check the bytes of a file against the SHA-256 the Hub publishes for it, during the reads themselves.

:class:`VerifiedSource` wraps a :class:`~lineage.io.sources.ByteSource` and hashes the
bytes it delivers, in file order: a read that continues the hashed prefix extends it;
when the inner source keeps what it fetched (a :class:`~lineage.io.spill.SpilledSource`),
bytes that arrived out of order are taken from that local copy as soon as the prefix
reaches them.  No byte is fetched for the sake of the hash.

When the prefix reaches the end of the file the digest is compared with the published
one; a mismatch raises :class:`~lineage.errors.RemoteError` (and every later read does
too): the bytes already analysed were not what the Hub holds, so no verdict may be built
on them.  :meth:`VerifiedSource.integrity` says what was established
(:class:`~lineage.io.provenance.FileIntegrity`).
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading

from lineage.errors import RemoteError
from lineage.io.provenance import FileIntegrity, IntegrityStatus
from lineage.io.sources import ByteSource, WrappedSource

log = logging.getLogger(__name__)

_CATCH_UP_CHUNK = 8 << 20


class VerifiedSource(WrappedSource):
    """A :class:`ByteSource` whose bytes are checked against ``expected_sha256`` once all were read."""

    def __init__(self, inner: ByteSource, expected_sha256: str | None, *, label: str | None = None) -> None:
        super().__init__(inner)
        self.label = label or inner.name
        self.expected = expected_sha256.lower() if expected_sha256 else None
        self._hash = hashlib.sha256()
        self._pos = 0
        self._lock = threading.Lock()
        self._failed: str | None = None
        self._checked = False

    # -- protocol ----------------------------------------------------------------
    def readinto(self, offset: int, buffer: memoryview) -> None:
        if self._failed:
            raise RemoteError(self._failed, path=self.label)
        view = buffer.cast("B") if buffer.format != "B" or buffer.ndim != 1 else buffer
        self.inner.readinto(offset, view)
        with self._lock:
            end = offset + view.nbytes
            if offset <= self._pos < end:
                self._hash.update(view[self._pos - offset:])
                self._pos = end
            self._catch_up()
            if self._pos >= self.size and not self._checked:
                self._check()
        if self._failed:
            raise RemoteError(self._failed, path=self.label)

    def close(self) -> None:
        self.inner.close()

    def __enter__(self) -> VerifiedSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"VerifiedSource({self.inner!r}, hashed={self._pos})"

    # -- verification ------------------------------------------------------------
    def integrity(self) -> FileIntegrity:
        """What is known about these bytes now (``partial`` until every byte was read)."""
        status: IntegrityStatus
        with self._lock:
            if self._pos < self.size:
                status = "partial"
            else:
                status = "verified" if self.expected else "no-hash"
            return FileIntegrity(self.label, self.size, status, self.expected, self._pos)

    def _catch_up(self) -> None:
        """Extend the hashed prefix with bytes the inner source already holds locally."""
        held_until = getattr(self.inner, "held_until", None)
        read_held = getattr(self.inner, "read_held", None)
        if not (callable(held_until) and callable(read_held)):
            return
        while self._pos < self.size:
            stop = held_until(self._pos)
            if stop <= self._pos:
                return
            n = min(stop - self._pos, _CATCH_UP_CHUNK)
            buf = bytearray(n)
            read_held(self._pos, memoryview(buf))
            self._hash.update(buf)
            self._pos += n

    def _check(self) -> None:
        self._checked = True
        if self.expected is None:
            etag = getattr(self.inner, "linked_etag", None)  # the Hub's redirect names the LFS SHA-256 too
            if isinstance(etag, str) and re.fullmatch(r"[0-9a-fA-F]{64}", etag):
                self.expected = etag.lower()
        if self.expected is None:
            log.info("%s: read in full; the Hub publishes no SHA-256 for it (unverified)", self.label)
            return
        got = self._hash.hexdigest()
        if got != self.expected:
            self._failed = (
                f"the bytes received do not match the SHA-256 the Hub publishes for this file "
                f"(expected {self.expected[:16]}…, got {got[:16]}…): altered or corrupted in transfer, "
                f"so no result is built on them; run again"
            )
            log.error("%s: %s", self.label, self._failed)
        else:
            log.info("%s: all %d bytes verified against the published SHA-256", self.label, self.size)
