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
from typing import Any, Callable, TextIO

#: ``progress(done, total, label)`` (keywords ``stage`` and ``unit`` optional).
ProgressFn = Callable[..., None]

_ROLE = re.compile(r"^(L\d+\.|embed|lm_head|final_norm|pos_embed)")


def stage_of(label: str) -> tuple[str, str]:
    """Stage name and unit inferred from a label, for callers that pass no ``stage``."""
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
    """A progress callback drawing one tqdm bar per stage on ``stream``."""

    def __init__(self, stream: TextIO | None = None, *, disable: bool = False) -> None:
        self.stream = stream or sys.stderr
        self.disable = disable
        self._bar: Any = None
        self._key: tuple[str, int] | None = None

    def __call__(self, done: int, total: int, label: str = "", *, stage: str | None = None,
                 unit: str | None = None, **_: Any) -> None:
        if self.disable:
            return
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
            self.close()

    def _new_bar(self, stage: str, total: int, unit: str) -> None:
        from tqdm import tqdm

        self.close()
        self._bar = tqdm(total=total if total > 0 else None, desc=stage, unit=unit,
                         unit_scale=unit in ("B", "elem"), unit_divisor=1024 if unit == "B" else 1000,
                         file=self.stream, dynamic_ncols=True, leave=False, mininterval=0.1,
                         smoothing=0.1)

    def close(self) -> None:
        """Erase the current bar (if any)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            self._key = None


#: Former name (a single hand-drawn bar), kept for callers of the library.
ProgressBar = TqdmProgress
