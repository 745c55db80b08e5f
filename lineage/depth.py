"""Depth alignment: from an all-pairs layer score matrix to a layer map.

``S[i, j]`` scores how well layer ``j`` of model B matches layer ``i`` of model
A (a correlation in [-1, 1] over ``n_entries`` entries).  Each B layer gets a
*source* A layer or ``None`` (a new layer, no significant match).  Two maps
are computed:

* **assignment**: each B layer independently takes its best A layer (allows
  reordering, duplication and drops);
* **monotone DP**: the best non-decreasing source sequence (duplicates and
  drops allowed, no reordering); a ``None`` costs the significance threshold.

The DP map is used unless the assignment explains clearly more (by more than
one threshold's worth of score), which is what a reordering looks like.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class LayerMap:
    """For each layer of B, the layer of A it derives from (or None)."""

    source: tuple[int | None, ...]
    n_a: int
    method: str  # "assignment" | "monotone"
    threshold: float
    scores: tuple[float | None, ...]  # S[source[j], j]

    @property
    def n_b(self) -> int:
        return len(self.source)

    @property
    def dropped(self) -> tuple[int, ...]:
        used = {s for s in self.source if s is not None}
        return tuple(i for i in range(self.n_a) if i not in used)

    @property
    def duplicated(self) -> tuple[int, ...]:
        c = Counter(s for s in self.source if s is not None)
        return tuple(sorted(i for i, k in c.items() if k > 1))

    @property
    def new(self) -> tuple[int, ...]:
        return tuple(j for j, s in enumerate(self.source) if s is None)

    @property
    def reordered(self) -> bool:
        seq = [s for s in self.source if s is not None]
        return any(b < a for a, b in zip(seq, seq[1:]))

    @property
    def is_identity(self) -> bool:
        """True when A and B have equal depth and no B layer is confidently matched elsewhere."""
        return self.n_a == self.n_b and all(s is None or s == j for j, s in enumerate(self.source))

    def describe(self) -> str:
        if self.is_identity:
            return "layer map: identity"
        parts = [f"layer map ({self.n_b} layers of B onto {self.n_a} of A)"]
        if self.dropped:
            parts.append(f"dropped A layers {list(self.dropped)}")
        if self.duplicated:
            parts.append(f"duplicated A layers {list(self.duplicated)}")
        if self.reordered:
            parts.append("reordered")
        if self.new:
            parts.append(f"B layers without a source {list(self.new)}")
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {"source": list(self.source), "n_a": self.n_a, "n_b": self.n_b, "method": self.method,
                "threshold": self.threshold, "scores": list(self.scores), "dropped": list(self.dropped),
                "duplicated": list(self.duplicated), "new": list(self.new), "reordered": self.reordered,
                "identity": self.is_identity, "description": self.describe()}


def _total(S: np.ndarray, src: list[int | None], t: float) -> float:
    return float(sum(S[s, j] if s is not None else t for j, s in enumerate(src)))


def monotone_map(S: np.ndarray, t: float) -> list[int | None]:
    """Best non-decreasing source sequence; ``None`` (no source) scores ``t``.

    DP over ``(j, last real source)`` with ``last = -1`` before any real source.
    """
    La, Lb = S.shape
    NEG = -1e300
    f = np.full(La + 1, NEG)  # index last + 1
    f[0] = 0.0
    choice: list[np.ndarray] = []  # per j: for each new state, the previous state index
    for j in range(Lb):
        g = f + t  # None keeps the state
        prev = np.arange(La + 1)
        run_v, run_k = f[0], 0
        for i in range(La):
            if f[i + 1] > run_v:
                run_v, run_k = f[i + 1], i + 1
            v = run_v + S[i, j]
            if v > g[i + 1]:
                g[i + 1] = v
                prev[i + 1] = -(run_k + 1)  # negative: real source i, previous state run_k
        choice.append(prev)
        f = g
    state = int(np.argmax(f))
    src: list[int | None] = [None] * Lb
    for j in range(Lb - 1, -1, -1):
        p = int(choice[j][state])
        if p < 0:
            src[j] = state - 1
            state = -p - 1
        else:
            src[j] = None
            state = p
    return src


def assignment_map(S: np.ndarray, t: float) -> list[int | None]:
    """Each B layer takes its best A layer when that score reaches ``t``."""
    if S.shape[0] == 0:
        return [None] * S.shape[1]
    best = S.argmax(axis=0)
    return [int(i) if S[i, j] >= t else None for j, i in enumerate(best)]


def layer_map(S: np.ndarray, n_entries: int, z_threshold: float = 8.0) -> LayerMap:
    """Layer map from scores ``S`` ``(L_a, L_b)`` of correlations over ``n_entries`` entries.

    A match is significant when ``r·√n ≥ z_threshold`` (a deliberately high
    threshold: entries of token-product sketches are not independent).
    """
    S = np.asarray(S, dtype=np.float64)
    t = z_threshold / math.sqrt(max(1, n_entries))
    a = assignment_map(S, t)
    m = monotone_map(S, t)
    ta, tm = _total(S, a, t), _total(S, m, t)
    if ta > tm + t:
        src, method = a, "assignment"
    else:
        src, method = m, "monotone"
    scores = tuple(float(S[s, j]) if s is not None else None for j, s in enumerate(src))
    return LayerMap(tuple(src), S.shape[0], method, t, scores)
