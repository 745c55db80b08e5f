"""Progress reporting: the library calls a callback; the CLI draws a bar on stderr."""

from __future__ import annotations

import sys
import time
from typing import Callable, Protocol, TextIO

#: ``progress(done, total, label)``: units are bytes unless the caller says otherwise.
ProgressFn = Callable[[int, int, str], None]


class SupportsWrite(Protocol):
    def write(self, s: str) -> int: ...


class ProgressBar:
    """A single-line progress bar on a terminal stream, redrawn at most 10 times a second."""

    def __init__(self, stream: TextIO | None = None, width: int = 30) -> None:
        self.stream = stream or sys.stderr
        self.width = width
        self._last = 0.0
        self._shown = False
        self._stage = ""
        self._stage_start = time.monotonic()

    def __call__(self, done: int, total: int, label: str = "") -> None:
        now = time.monotonic()
        if done < total and now - self._last < 0.1:
            return
        self._last = now
        frac = 0.0 if total <= 0 else min(1.0, done / total)
        fill = int(frac * self.width)
        bar = "█" * fill + "░" * (self.width - fill)
        stage = label.split(": ", 1)[0] if ": " in label else ""  # labels "stage: item" (e.g. "reading: L3.attn.q")
        if stage != self._stage:
            self._stage, self._stage_start = stage, now
        spent = now - self._stage_start
        eta = f" ETA {spent * (1 - frac) / frac:4.0f}s" if 0 < frac < 1 and spent > 1 else ""
        rate = f" {done / spent / 1e6:6.0f} M/s" if stage == "reading" and spent > 0 else ""
        self.stream.write(f"\r{bar} {frac * 100:5.1f}% {label[:40]:<40}{rate}{eta}")
        self.stream.flush()
        self._shown = True

    def close(self) -> None:
        """Erase the bar."""
        if self._shown:
            self.stream.write("\r" + " " * (self.width + 80) + "\r")
            self.stream.flush()
