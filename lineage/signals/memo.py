"""The keys of per-module results remembered on a read-on-access model.

One pass over a lazily read pair computes, per module, what later passes need and remembers it
on the parent side's mapping (:func:`lineage.lazyroles.remember`); the later pass looks it up
under the same key (:func:`lineage.lazyroles.recall`).  The writers (the anatomy's first pass and
its use of the streamed screens) and the readers (:func:`lineage.signals.lowrank.lowrank_modules`,
:func:`lineage.signals.quantgrid.detect_modules`, :func:`lineage.signals.pairstats.memo_pair_stats`)
build their keys only here, from one typed :class:`MemoKey`: a key that drifted between writer and
reader would silently recompute every module (tests/test_memo_keys.py fails if it does).
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from enum import Enum

#: Rows of each module that the quantisation-grid detection samples, wherever it runs.
DETECT_ROWS = 128


class Signal(str, Enum):
    """Which per-module result a key names."""

    PAIR_STATS = "pair_stats"
    LOWRANK = "lowrank"
    QUANTGRID = "quantgrid"


@dataclass(frozen=True)
class MemoKey:
    """A remembered per-module result: which signal, against which other model, for which role.

    ``other`` is the ``id()`` of the other side's mapping (the result belongs to that pair and
    orientation); ``params`` the signal's settings that change the result.
    """

    signal: Signal
    other: int
    role: str
    params: Hashable = None


def pair_stats_key(other: object, role: str) -> MemoKey:
    """Key of ``pair_stats(a[role], other[role])``, remembered on ``a``."""
    return MemoKey(Signal.PAIR_STATS, id(other), role)


def lowrank_key(child: object, role: str, config: Hashable) -> MemoKey:
    """Key of ``lowrank(parent[role], child[role], config=config)`` (``config``: a ``LowRankConfig``), remembered
    on the parent's mapping."""
    return MemoKey(Signal.LOWRANK, id(child), role, config)


def detect_key(child: object, role: str, max_rows: int = DETECT_ROWS) -> MemoKey:
    """Key of ``detect_grid(child[role], parent[role], max_rows=max_rows)``, remembered on the parent's mapping."""
    return MemoKey(Signal.QUANTGRID, id(child), role, max_rows)
