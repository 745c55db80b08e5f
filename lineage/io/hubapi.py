"""Calls to the Hub's API (model info, organisation listings): retried when worth it, failing fast when not.

- An answer worth waiting for — HTTP 408/429/5xx (``Retry-After`` honoured, up to
  :data:`MAX_RETRY_AFTER` seconds), a dropped connection, a read timeout — is retried
  the way weight reads are (:class:`~lineage.io.http.HttpOptions`: ``retries`` with
  exponential ``backoff`` up to ``max_backoff``).
- An endpoint that cannot be reached at all (connection refused, unknown host,
  connect timeout, ``HF_HUB_OFFLINE``) fails at once, and the endpoint is remembered
  as unreachable for the rest of the process, so a scan of many models says so once
  and does not wait again for each model.
- Refusals (401, 404, …) fail at once with a message that says what to do.
"""

from __future__ import annotations

import errno
import http.client
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import TypeVar
from urllib.parse import urlsplit

from lineage.errors import RemoteError
from lineage.io.http import HttpOptions

log = logging.getLogger(__name__)

T = TypeVar("T")

RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
#: Longest ``Retry-After`` honoured, in seconds (a longer one is cut to this).
MAX_RETRY_AFTER = 120.0

#: How long an endpoint found unreachable is not tried again, in seconds.
UNREACHABLE_FOR = 60.0
_UNREACHABLE: dict[str, tuple[str, float]] = {}
_lock = threading.Lock()

#: Transport errors after the connection was made: worth another attempt.
_TRANSIENT_NAMES = frozenset({"RemoteProtocolError", "ReadError", "ReadTimeout", "WriteError", "WriteTimeout",
                              "PoolTimeout", "RemoteDisconnected", "ConnectionResetError", "BrokenPipeError",
                              "IncompleteRead", "ChunkedEncodingError", "ConnectionAbortedError"})
#: Failures to connect at all: not worth retrying.
_UNREACHABLE_NAMES = frozenset({"ConnectError", "ConnectTimeout", "ConnectionRefusedError", "gaierror",
                                "OfflineModeIsEnabled", "NewConnectionError", "NameResolutionError"})


class HubUnreachable(RemoteError):
    """The Hub endpoint cannot be reached (refused, unknown host, offline): nothing was retried."""


def _chain(e: BaseException | None) -> list[BaseException]:
    out: list[BaseException] = []
    while e is not None and len(out) < 8:
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


def _names(e: BaseException) -> set[str]:
    return {c.__name__ for c in type(e).__mro__}


def http_status(e: BaseException) -> int | None:
    """The HTTP status of a huggingface_hub error, if it carries a response."""
    resp = getattr(e, "response", None)
    status = getattr(resp, "status_code", None)
    return status if isinstance(status, int) else None


def is_unreachable(e: BaseException) -> bool:
    """True when the endpoint could not be connected to at all (no HTTP answer came)."""
    for x in _chain(e):
        if http_status(x) is not None:
            return False
        if _names(x) & _UNREACHABLE_NAMES:
            return True
        if isinstance(x, OSError) and x.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
            return True
    return False


def retry_wait(e: BaseException) -> float | None:
    """Seconds to wait before retrying (0: use the backoff), or ``None`` when not worth retrying."""
    for x in _chain(e):
        status = http_status(x)
        if status is not None:
            if status not in RETRY_STATUS:
                return None
            after = getattr(x.response, "headers", {}).get("Retry-After")  # type: ignore[attr-defined]
            try:
                return min(MAX_RETRY_AFTER, max(0.0, float(after))) if after else 0.0
            except ValueError:
                return 0.0  # an HTTP date: fall back to the backoff
        if _names(x) & _TRANSIENT_NAMES or isinstance(x, (http.client.HTTPException, socket.timeout)):
            return 0.0
    return None


def unreachable_reason(endpoint: str) -> str | None:
    """Why ``endpoint`` was found unreachable earlier in this process, if it was."""
    with _lock:
        hit = _UNREACHABLE.get(endpoint)
        if hit is not None and time.monotonic() - hit[1] > UNREACHABLE_FOR:
            del _UNREACHABLE[endpoint]
            hit = None
    return hit[0] if hit else None


def mark_unreachable(endpoint: str, e: BaseException) -> str:
    """Remember ``endpoint`` as unreachable; returns the one-line reason."""
    cause = next((x for x in reversed(_chain(e)) if str(x)), e)
    reason = (f"cannot reach the Hub at {endpoint} ({type(cause).__name__}: {cause}); "
              f"set HF_HUB_OFFLINE=1 to use cached models only")
    with _lock:
        _UNREACHABLE.setdefault(endpoint, (reason, time.monotonic()))
    return reason


def forget_unreachable() -> None:
    """Forget every endpoint marked unreachable (tests, long-running processes)."""
    with _lock:
        _UNREACHABLE.clear()


def check_reachable(endpoint: str, timeout: float) -> None:
    """Open (and close) one TCP connection to ``endpoint``; raise :class:`HubUnreachable` at once if refused."""
    reason = unreachable_reason(endpoint)
    if reason is not None:
        raise HubUnreachable(reason)
    parts = urlsplit(endpoint)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname or "", port), timeout=timeout).close()
    except OSError as e:
        raise HubUnreachable(mark_unreachable(endpoint, e)) from e


def call_with_retries(call: Callable[[], T], *, what: str, endpoint: str, http: HttpOptions,
                      to_error: Callable[[Exception, str], RemoteError]) -> T:
    """``call()``, retried on transient failures (see the module docstring); typed errors otherwise."""
    reason = unreachable_reason(endpoint)
    if reason is not None:
        raise HubUnreachable(reason, path=what)
    delay = http.backoff
    for attempt in range(http.retries + 1):
        try:
            return call()
        except Exception as e:  # noqa: BLE001 - every Hub failure becomes a typed, one-line error
            if is_unreachable(e):
                raise HubUnreachable(mark_unreachable(endpoint, e), path=what) from e
            wait = retry_wait(e)
            if wait is None:
                raise to_error(e, what) from e
            if attempt == http.retries:
                err = to_error(e, what)
                raise RemoteError(f"{err.args[0].removeprefix(what + ': ')} (after {attempt + 1} attempts)",
                                  path=what) from e
            wait = wait or min(delay, http.max_backoff)
            log.info("%s: %s; retry %d/%d in %.2f s", what, _short(e), attempt + 1, http.retries, wait)
            time.sleep(wait)
            delay *= 2
    raise AssertionError("unreachable")  # pragma: no cover


def _short(e: BaseException) -> str:
    status = http_status(e)
    return f"HTTP {status}" if status is not None else f"{type(e).__name__}: {e}"
