"""One model's network budget: an overall deadline, bytes counted, progress with bytes per second.

Every remote file of a model shares one :class:`Transfer`.  Its clock counts the time
the model spends waiting for the network (any of its requests in flight, counted once
however many run in parallel), not the computing in between, so a slow analysis never
trips it while a server that answers each request just under the stall timeout does.

The deadline (:func:`model_deadline`) is ``LINEAGE_HUB_DEADLINE`` seconds when set
(``0`` or ``none``: no limit), else proportional to the model's bytes — ``floor`` seconds
plus the time to fetch every byte at ``min_rate`` bytes per second (defaults: 300 s and
1 MiB/s), which a working connection never reaches.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from lineage.errors import ConfigError, RemoteError

log = logging.getLogger(__name__)

DEADLINE_ENV = "LINEAGE_HUB_DEADLINE"


@dataclass(frozen=True)
class TransferProgress:
    """Bytes fetched so far for one model, and the rate while waiting on the network."""

    model: str
    bytes_read: int
    #: Size of the model's remote files, when known.
    total_bytes: int | None
    #: Seconds spent waiting for the network so far.
    seconds: float

    @property
    def bytes_per_second(self) -> float:
        """Mean transfer rate while requests were in flight (0 before any time passed)."""
        return self.bytes_read / self.seconds if self.seconds > 0 else 0.0


ProgressCallback = Callable[[TransferProgress], None]


@dataclass(frozen=True)
class DeadlineOptions:
    """How the per-model deadline is chosen (see :func:`model_deadline`)."""

    #: Fixed deadline in seconds; ``None``: proportional to the model's bytes.
    seconds: float | None = None
    floor: float = 300.0
    min_rate: float = float(1 << 20)

    def __post_init__(self) -> None:
        if (self.seconds is not None and self.seconds <= 0) or self.floor <= 0 or self.min_rate <= 0:
            raise ConfigError("deadline, floor and min_rate must be positive")

    @classmethod
    def from_env(cls) -> DeadlineOptions | None:
        """``LINEAGE_HUB_DEADLINE``: seconds, or ``0``/``none`` for no deadline (``None``)."""
        raw = (os.environ.get(DEADLINE_ENV) or "").strip().lower()
        if not raw:
            return cls()
        if raw in ("0", "none", "off", "inf"):
            return None
        try:
            return cls(seconds=float(raw))
        except ValueError:
            raise ConfigError(f"{DEADLINE_ENV}={raw!r}: expected seconds (e.g. 600) or 'none'") from None


def model_deadline(options: DeadlineOptions | None, total_bytes: int | None) -> float:
    """Seconds of network time a model of ``total_bytes`` may take (``inf`` without options)."""
    if options is None:
        return math.inf
    if options.seconds is not None:
        return options.seconds
    return options.floor + (total_bytes or 0) / options.min_rate


class Transfer:
    """Network time and bytes of one model, shared by all its remote files (thread-safe).

    ``progress`` is called at most every ``report_every`` seconds, and once more when every
    byte of the model's files has arrived.
    """

    def __init__(self, model: str, *, deadline: float = math.inf, total_bytes: int | None = None,
                 progress: ProgressCallback | None = None, report_every: float = 0.25) -> None:
        self.model = model
        self.deadline = deadline
        self.total_bytes = total_bytes
        self._progress = progress
        self._every = report_every
        self._lock = threading.Lock()
        self._busy = 0.0  # seconds with at least one request in flight, closed intervals
        self._active = 0
        self._since = 0.0
        self._bytes = 0
        self._last_report = -math.inf
        self._last_log = time.monotonic()

    # -- the clock -----------------------------------------------------------------
    def waited(self) -> float:
        """Seconds spent waiting for the network so far."""
        with self._lock:
            return self._busy + (time.monotonic() - self._since if self._active else 0.0)

    def remaining(self) -> float:
        """Seconds of network time left before the deadline."""
        return self.deadline - self.waited()

    def begin(self) -> None:
        """A request starts (raises when the deadline has passed)."""
        with self._lock:
            if self._active == 0:
                self._since = time.monotonic()
            self._active += 1
        if self.remaining() <= 0:
            self.end(0)
            raise self.expired()

    def end(self, nbytes: int) -> None:
        """A request ends having delivered ``nbytes``."""
        now = time.monotonic()
        with self._lock:
            self._active -= 1
            if self._active == 0:
                self._busy += now - self._since
            self._bytes += nbytes
            done = self.total_bytes is not None and self._bytes >= self.total_bytes > 0
            report = done or now - self._last_report >= self._every
            if report:
                self._last_report = now
            slow_log = now - self._last_log >= 10.0
            if slow_log:
                self._last_log = now
        if report or slow_log:
            snap = self.snapshot()
            if slow_log:
                log.info("%s: %s read in %.0f s (%s/s)", self.model, _fmt_bytes(snap.bytes_read), snap.seconds,
                         _fmt_bytes(snap.bytes_per_second))
            if report and self._progress is not None:
                self._progress(snap)

    def snapshot(self) -> TransferProgress:
        """Bytes and network time so far."""
        return TransferProgress(self.model, self._bytes, self.total_bytes, self.waited())

    def expired(self) -> RemoteError:
        """The error raised once the deadline has passed."""
        snap = self.snapshot()
        return RemoteError(
            f"overall deadline of {_fmt_seconds(self.deadline)} of network time reached after "
            f"{_fmt_bytes(snap.bytes_read)} ({_fmt_bytes(snap.bytes_per_second)}/s); the server is too slow "
            f"(raise it with {DEADLINE_ENV}=SECONDS, or 'none')",
            path=self.model,
        )


def _fmt_seconds(s: float) -> str:
    return f"{s:.0f} s" if s >= 10 else f"{s:.1f} s"


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"  # pragma: no cover
