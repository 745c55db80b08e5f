"""HTTP range reads: a :class:`~lineage.io.sources.ByteSource` over a URL.

:class:`HttpRangeSource` fetches exactly the byte spans a reader asks for with
``Range: bytes=a-b`` requests, reusing keep-alive connections, following (and
remembering) redirects the way the Hugging Face Hub uses them (``/resolve/`` →
CDN), and retrying with exponential backoff when a connection drops, the server
answers 5xx/429, or a body ends early.  Refusals (401/403/404/416) fail at once
with a :class:`~lineage.errors.RemoteError` that names the URL.

Two clocks bound every read: ``stall_timeout`` (no byte for this long → the
attempt is abandoned and retried) and ``deadline`` (wall time for one ``read`` /
``readinto`` call, retries included).  A read never blocks past its deadline by
more than the socket's granularity.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit

from lineage.errors import ConfigError, RemoteError
from lineage.io.httppool import ConnectionPool
from lineage.io.transfer import Transfer

log = logging.getLogger(__name__)

_REDIRECTS = {301, 302, 303, 307, 308}
_RETRY_STATUS = {408, 429, 500, 502, 503, 504}
_READ_CHUNK = 1 << 20


@dataclass(frozen=True)
class HttpOptions:
    """How hard to try.  Validated on construction."""

    #: Seconds without progress (connect, headers or body) before an attempt is abandoned.
    stall_timeout: float = 30.0
    #: Seconds one read call may take in total, retries included.
    deadline: float = 300.0
    #: Retries after the first attempt.
    retries: int = 5
    #: First backoff delay in seconds; doubles each retry up to ``max_backoff``.
    backoff: float = 0.5
    max_backoff: float = 8.0
    #: Largest span fetched by one request (large reads are split).
    max_request_bytes: int = 64 * 1024 * 1024
    max_redirects: int = 5
    user_agent: str = "weight-lineage (HttpRangeSource)"
    extra_headers: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.stall_timeout <= 0 or self.deadline <= 0:
            raise ConfigError("HTTP timeouts must be positive")
        if self.retries < 0 or self.backoff < 0 or self.max_backoff < 0:
            raise ConfigError("HTTP retries and backoff must be non-negative")
        if self.max_request_bytes < 1 or self.max_redirects < 0:
            raise ConfigError("max_request_bytes must be >= 1 and max_redirects >= 0")


class _Retry(Exception):
    """An attempt failed in a way worth retrying (internal); ``wait``: the server's ``Retry-After``."""

    def __init__(self, message: str, wait: float = 0.0) -> None:
        super().__init__(message)
        self.wait = wait


def _retry_after(resp: http.client.HTTPResponse) -> float:
    """Seconds from a ``Retry-After`` header (0 when absent or an HTTP date), at most 120."""
    try:
        return min(120.0, max(0.0, float(resp.getheader("Retry-After") or 0)))
    except ValueError:
        return 0.0


def _split(url: str) -> tuple[str, str, int, str]:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"not an http(s) URL: {url!r}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return parts.scheme, parts.hostname, port, path


class HttpRangeSource:
    """Random-access bytes of one remote file, read by HTTP range requests.

    ``size`` may be given (e.g. from the Hub's file listing); otherwise the first
    access to :attr:`size` issues a one-byte range request and reads the total
    from ``Content-Range``.  ``token`` is sent as a bearer token to the host of
    ``url`` only (never to a redirect target on another host).  A shared ``transfer``
    bounds the network time of all files of one model and reports progress.
    """

    def __init__(
        self,
        url: str,
        *,
        size: int | None = None,
        token: str | None = None,
        options: HttpOptions | None = None,
        name: str | None = None,
        transfer: Transfer | None = None,
    ) -> None:
        _split(url)  # validate early
        self.transfer = transfer
        #: ``X-Linked-Etag`` of the Hub's redirect (for LFS files: their SHA-256), once seen.
        self.linked_etag: str | None = None
        self.url = url
        self.name = name or url
        self.options = options or HttpOptions()
        self._token = token
        self._size = size
        self._resolved: str | None = None  # remembered redirect target
        self._pool = ConnectionPool()
        self._lock = threading.Lock()
        self._bytes_read = 0
        #: Requests sent (including redirects and retries) and retries made.
        self.requests = 0
        self.retries = 0
        self._closed = False

    # -- protocol ----------------------------------------------------------------
    @property
    def size(self) -> int:
        if self._size is None:
            self._size = self._probe_size()
        return self._size

    @property
    def bytes_read(self) -> int:
        return self._bytes_read

    @property
    def connections_opened(self) -> int:
        """TCP connections opened so far (1 when keep-alive works)."""
        return self._pool.opened

    def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.readinto(offset, memoryview(buf))
        return bytes(buf)

    def readinto(self, offset: int, buffer: memoryview) -> None:
        view = buffer.cast("B") if buffer.format != "B" or buffer.ndim != 1 else buffer
        length = view.nbytes
        if offset < 0 or length < 0 or offset + length > self.size:
            raise RemoteError(
                f"read of {length} bytes at offset {offset} is outside the remote file "
                f"({self.size} bytes); the file is truncated or its header is wrong",
                path=self.name,
            )
        if length == 0:
            return
        with self._timed() as deadline:
            step = self.options.max_request_bytes
            for s in range(0, length, step):
                e = min(length, s + step)
                self._fetch(offset + s, view[s:e], deadline)

    @contextlib.contextmanager
    def _timed(self) -> Iterator[float]:
        """The deadline of one read call; network time and bytes charged to the model's transfer."""
        deadline = time.monotonic() + self.options.deadline
        if self.transfer is None:
            yield deadline
            return
        self.transfer.begin()
        before = self._bytes_read
        try:
            yield min(deadline, time.monotonic() + self.transfer.remaining())
        except RemoteError as e:
            if self.transfer.remaining() <= 0:
                raise self.transfer.expired() from e
            raise
        finally:
            self.transfer.end(self._bytes_read - before)

    def close(self) -> None:
        self._closed = True
        self._pool.close()

    def __enter__(self) -> HttpRangeSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"HttpRangeSource({self.url!r}, size={self._size})"

    # -- internals ---------------------------------------------------------------
    def _probe_size(self) -> int:
        box: dict[str, int] = {}
        with self._timed() as deadline:
            self._with_retries(lambda: self._attempt(0, None, deadline, box), deadline, 0, 1)
        if "total" not in box:
            raise RemoteError("server did not report the file size", path=self.name)
        return box["total"]

    def _fetch(self, offset: int, view: memoryview, deadline: float) -> None:
        done = [0]

        def attempt() -> None:
            got = self._attempt(offset + done[0], view[done[0]:], deadline, None)
            done[0] += got
            if done[0] < view.nbytes:
                raise _Retry(f"short body: got {done[0]} of {view.nbytes} bytes")

        self._with_retries(attempt, deadline, offset, view.nbytes)

    def _with_retries(self, attempt, deadline: float, offset: int, length: int) -> None:
        delay = self.options.backoff
        last, server_wait = "", 0.0
        for i in range(self.options.retries + 1):
            if self._closed:
                raise RemoteError("source is closed", path=self.name)
            try:
                attempt()
                return
            except _Retry as e:
                last, server_wait = str(e), e.wait
            remaining = deadline - time.monotonic()
            if i == self.options.retries or remaining <= 0:
                break
            with self._lock:
                self.retries += 1
            wait = min(max(server_wait, min(delay, self.options.max_backoff)), remaining)
            log.info("%s: %s; retry %d/%d in %.2fs", self.name, last, i + 1,
                     self.options.retries, wait)
            time.sleep(wait)
            delay *= 2
        over = time.monotonic() >= deadline
        raise RemoteError(
            f"reading {length} bytes at offset {offset} failed after {i + 1} "
            f"attempt(s){' (deadline of %.1fs reached)' % self.options.deadline if over else ''}: {last}",
            path=self.name,
        )

    def _headers(self, host: str, start: int, view_len: int | None) -> dict[str, str]:
        h = {"User-Agent": self.options.user_agent, "Accept-Encoding": "identity"}
        h.update(dict(self.options.extra_headers))
        end = start if view_len is None else start + view_len - 1
        h["Range"] = f"bytes={start}-{end}"
        if self._token and urlsplit(self.url).hostname == host:
            h["Authorization"] = f"Bearer {self._token}"
        return h

    def _attempt(
        self, start: int, view: memoryview | None, deadline: float, box: dict[str, int] | None
    ) -> int:
        """One request (following redirects); returns bytes written into ``view``."""
        url = self._resolved or self.url
        from_cache = self._resolved is not None
        for _ in range(self.options.max_redirects + 1):
            scheme, host, port, path = _split(url)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _Retry("deadline reached")
            timeout = min(self.options.stall_timeout, remaining)
            conn = self._pool.get(scheme, host, port, timeout)
            reusable = False
            try:
                with self._lock:
                    self.requests += 1
                conn.request("GET", path, headers=self._headers(host, start, None if view is None else view.nbytes))
                resp = conn.getresponse()
                status = resp.status
                if status in _REDIRECTS:
                    loc = resp.getheader("Location")
                    etag = (resp.getheader("X-Linked-Etag") or "").strip().strip('"')
                    if etag:
                        self.linked_etag = etag  # the LFS SHA-256 on the Hub
                    resp.read()
                    reusable = not resp.will_close
                    if not loc:
                        raise RemoteError(f"HTTP {status} redirect without Location", path=self.name)
                    url = urljoin(url, loc)
                    continue
                if status in (401, 403, 404, 410) and from_cache:
                    # an expired CDN link: forget it and resolve again
                    resp.read()
                    log.info("%s: cached redirect target answered %d; resolving again", self.name, status)
                    self._resolved = None
                    url, from_cache = self.url, False
                    continue
                if status in (401, 403):
                    raise RemoteError(
                        f"HTTP {status}: access denied (gated or private repository? "
                        f"set HF_TOKEN to a token with access)",
                        path=self.name,
                    )
                if status == 404:
                    raise RemoteError("HTTP 404: file not found on the server", path=self.name)
                if status == 416:
                    raise RemoteError(
                        f"HTTP 416: range starting at {start} not satisfiable "
                        f"(file shorter than expected: truncated upload?)",
                        path=self.name,
                    )
                if status in _RETRY_STATUS:
                    resp.read()
                    raise _Retry(f"HTTP {status}", _retry_after(resp))
                if status not in (200, 206):
                    raise RemoteError(f"unexpected HTTP {status} {resp.reason}", path=self.name)
                if url != self.url:
                    self._resolved = url
                got = self._read_body(resp, status, start, view, deadline, box)
                reusable = not resp.will_close and resp.isclosed()
                return got
            except (OSError, http.client.HTTPException) as e:
                reusable = False
                kind = "timed out" if isinstance(e, (socket.timeout, TimeoutError)) else "connection error"
                raise _Retry(f"{kind}: {type(e).__name__}: {e}") from e
            finally:
                if reusable:
                    self._pool.put(scheme, host, port, conn)
                else:
                    conn.close()
        raise RemoteError(f"more than {self.options.max_redirects} redirects", path=self.name)

    def _read_body(
        self,
        resp: http.client.HTTPResponse,
        status: int,
        start: int,
        view: memoryview | None,
        deadline: float,
        box: dict[str, int] | None,
    ) -> int:
        total = None
        if status == 206:
            cr = resp.getheader("Content-Range", "")
            try:
                unit, _, rest = cr.partition(" ")
                span, _, tot = rest.partition("/")
                first, _, last = span.partition("-")
                first_i, last_i = int(first), int(last)
                total = None if tot == "*" else int(tot)
            except ValueError:
                raise _Retry(f"malformed Content-Range {cr!r}") from None
            want_last = start + (view.nbytes if view is not None else 1) - 1
            size_ok = total is None or self._size is None or total == self._size  # else: reported below
            if unit != "bytes" or first_i != start or (last_i != want_last and size_ok):
                # a wrong range is retried: the bytes would land at the wrong offsets
                raise _Retry(f"server sent range {cr!r} for a request of bytes {start}-{want_last}")
        else:  # 200: the whole file
            cl = resp.getheader("Content-Length")
            total = int(cl) if cl and cl.isdigit() else None
            if start != 0:
                raise RemoteError(
                    "server ignored the Range header (answered 200 to a range request); "
                    "cannot read a span without downloading the whole file",
                    path=self.name,
                )
        if box is not None:  # size probe
            if total is not None:
                box["total"] = total
            if status == 200:  # whole file on offer: don't read it, drop the connection
                resp.close()
                resp.will_close = True
                return 0
            n = len(resp.read())
            with self._lock:
                self._bytes_read += n
            return 0
        if total is not None and self._size is not None and total != self._size:
            msg = (f"remote file is {total} bytes but {self._size} were expected "
                   f"(changed or truncated upload, or a wrong Content-Range)")
            if status == 206:
                raise _Retry(msg)  # a wrong Content-Range may be transient
            raise RemoteError(msg, path=self.name)
        assert view is not None
        want = view.nbytes
        got = 0
        try:
            while got < want:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                _set_timeout(resp, min(self.options.stall_timeout, remaining))
                # read1: at most one socket read, so the deadline is checked between reads
                chunk = resp.read1(min(want - got, _READ_CHUNK))
                if not chunk:
                    break
                view[got : got + len(chunk)] = chunk
                got += len(chunk)
        except (OSError, http.client.HTTPException) as e:
            log.info("%s: body interrupted after %d of %d bytes (%s)", self.name, got, want, e)
        with self._lock:
            self._bytes_read += got
        if got == want and resp.length == 0:
            resp.read()  # marks the response complete so the connection can be reused
        if got < want or (status == 200 and not resp.isclosed()):
            resp.close()
            resp.will_close = True  # never reuse this connection
        return got


def _set_timeout(resp: http.client.HTTPResponse, timeout: float) -> None:
    """Bound the next socket operation of a response body (best effort)."""
    raw = getattr(resp.fp, "raw", None)
    sock = getattr(raw, "_sock", None)
    if sock is not None:
        sock.settimeout(timeout)
