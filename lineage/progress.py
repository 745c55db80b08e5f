"""Progress reporting: the library calls a callback; the CLI draws it with tqdm on stderr.

The library side is one callable, ``progress(done, total, label)``, optionally with keyword
arguments ``stage`` (a stage name such as ``"stream"`` or ``"canonicalise"``) and ``unit``
(``"B"``, ``"elem"``, ``"layer"`` …).  :class:`TqdmProgress` turns the calls into one tqdm bar
per stage: stage name, done/total, rate and ETA, redrawn to the terminal's width, erased when
the stage ends (no stale lines, nothing left standing at 100 %).
"""

from __future__ import annotations

import re
import sys
import threading
from typing import Any, Callable, TextIO

#: ``progress(done, total, label)`` (keywords ``stage`` and ``unit`` optional).
ProgressFn = Callable[..., None]

#: Stages of a compare (labels "stage: item") and the unit their counts are in.
_STAGE_UNITS = {"reading": "elem", "canonical test": "step", "anatomy": "module"}

_ROLE = re.compile(r"^(L\d+\.|embed|lm_head|final_norm|pos_embed)")


def stage_of(label: str) -> tuple[str, str]:
    """Stage name and unit inferred from a label, for callers that pass no ``stage``."""
    head, sep, _ = label.partition(": ")
    if sep and head in _STAGE_UNITS:  # the compare pipeline's labels: "reading: L3.attn.q"
        return head, _STAGE_UNITS[head]
    first = label.split(" ", 1)[0]
    if first in ("fingerprint", "compare", "confirm"):
        return {"fingerprint": "fingerprinting", "compare": "comparing fingerprints",
                "confirm": "confirming links"}[first], "model" if first == "fingerprint" else "pair"
    if " vs " in label:
        return "comparing pairs", "pair"
    if _ROLE.match(label):
        return "streaming tensors", "elem"
    if label.startswith("layer") or label.startswith("L"):
        return "aligning layers", "layer"
    return "working", "step"


class TqdmProgress:
    """A progress callback drawing one tqdm bar per stage on ``stream``.

    Between stages (after one reached 100 %, before the library reports the next) a line
    ``working… 3.2 s`` ticks on a timer thread, so a long step without its own progress never
    looks stalled.
    """

    def __init__(self, stream: TextIO | None = None, *, disable: bool = False, idle_label: str = "working…") -> None:
        self.stream = stream or sys.stderr
        self.disable = disable
        self.idle_label = idle_label
        self._bar: Any = None
        self._key: tuple[str, int] | None = None
        self._lock = threading.RLock()
        self._idle: threading.Event | None = None

    def __call__(self, done: int, total: int, label: str = "", *, stage: str | None = None,
                 unit: str | None = None, **_: Any) -> None:
        if self.disable:
            return
        with self._lock:
            self._stop_idle()
            self._update(done, total, label, stage, unit)

    def _update(self, done: int, total: int, label: str, stage: str | None, unit: str | None) -> None:
        guess_stage, guess_unit = stage_of(label)
        stage = stage or guess_stage
        key = (stage, int(total))
        if key != self._key:
            self._new_bar(stage, total, unit or guess_unit)
            self._key = key
        bar = self._bar
        bar.n = min(done, total) if total > 0 else done
        if label:
            bar.set_postfix_str(label[-40:], refresh=False)
        bar.refresh()
        if total > 0 and done >= total:
            self._close_bar()
            self._start_idle()

    def _start_idle(self) -> None:
        from tqdm import tqdm

        stop = threading.Event()
        bar = tqdm(total=None, desc=self.idle_label, bar_format="{desc} {elapsed}", file=self.stream,
                   dynamic_ncols=True, leave=False)
        self._bar, self._idle = bar, stop

        def tick() -> None:
            while not stop.wait(0.5):
                with self._lock:
                    if not stop.is_set():
                        bar.refresh()

        threading.Thread(target=tick, name="lineage-progress", daemon=True).start()

    def _stop_idle(self) -> None:
        if self._idle is not None:
            self._idle.set()
            self._idle = None
            self._close_bar()

    def _new_bar(self, stage: str, total: int, unit: str) -> None:
        from tqdm import tqdm

        self.close()
        self._bar = tqdm(total=total if total > 0 else None, desc=stage, unit=unit,
                         unit_scale=unit in ("B", "elem"), unit_divisor=1024 if unit == "B" else 1000,
                         file=self.stream, dynamic_ncols=True, leave=False, mininterval=0.1,
                         smoothing=0.1)

    def close(self) -> None:
        """Erase the current bar (if any) and stop the idle ticker."""
        with self._lock:
            self._stop_idle()
            self._close_bar()

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            self._key = None

