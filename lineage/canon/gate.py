"""Whether the canonical test can change a compare's answer, decided from the element-wise evidence.

The canonical test undoes function-preserving transforms (permutations, rotations, gains) and costs
a second read of both models.  It can change nothing when there is nothing to undo: every evidence
matrix already correlates overwhelmingly and positively with its counterpart, no module stands out
from the others of its kind, and both models have the same shapes and depth with nothing unmatched.
A transform that moves a fraction ``f`` of a matrix's units (a few heads, one layer's neurons) leaves
the element-wise correlation at about ``1 − f`` for that matrix and leaves the others untouched, so
it shows up as a weak matrix (``f`` large), a matrix below :data:`MIN_PEARSON`, or an outlier against
its kind's median (``f`` small); any of them runs the test.  So do an element-wise verdict other than
"derived", differing widths or depths, and unmatched tensors.

Thresholds are set so that the undisguised children of ``benchmarks/bench_compare.py`` (noise,
fine-tune) skip the test and the planted partial disguises of ``tests/test_canon_gate.py`` run it;
``benchmarks/accuracy.py --subset full`` re-checks that the zoo's answers do not move.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lineage.roles import parse_role
from lineage.verdict import MatrixEvidence, Verdict, fisher_z

#: ``--canon`` modes: ``auto`` runs the test only when the element-wise evidence leaves room for it.
MODES = ("auto", "always", "never")
#: A matrix whose Fisher z (``atanh(r)·√(min(rows, cols) − 3)``) is below this looks unrelated element-wise.
MIN_MODULE_Z = 8.0
#: Below this correlation a matrix may hide a permutation of ≥ 1 % of its units: the test runs.
MIN_PEARSON = 0.99
#: A matrix whose ``1 − r`` exceeds its kind's median ``1 − r`` by this factor (and :data:`OUTLIER_FLOOR`)
#: departs from its siblings (a few heads or neurons moved in one layer): the test runs.
OUTLIER_RATIO = 10.0
#: ``1 − r`` below this is float rounding (a bf16 re-encoding gives ≈ 1e-6), never an outlier.
OUTLIER_FLOOR = 1e-5


@dataclass(frozen=True)
class Structure:
    """What the streaming pass learnt about the two models' shapes."""

    n_layers_a: int
    n_layers_b: int
    hidden_a: int | None
    hidden_b: int | None
    n_unmatched: int  # tensors only in A, only in B, or with differing shapes


@dataclass(frozen=True)
class CanonDecision:
    """Whether the canonical test runs, in which ``--canon`` mode, and why (one sentence)."""

    ran: bool
    mode: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (as ``Report.canon_gate`` serialises)."""
        return {"ran": self.ran, "mode": self.mode, "reason": self.reason}


def _kind(role: str) -> str:
    return parse_role(role)[1]


def _outliers(evidence: Sequence[MatrixEvidence]) -> list[tuple[MatrixEvidence, float]]:
    """Matrices whose ``1 − r`` departs from the median of their kind (``(evidence, ratio)``, worst first)."""
    by_kind: dict[str, list[MatrixEvidence]] = defaultdict(list)
    for e in evidence:
        by_kind[_kind(e.role)].append(e)
    out = []
    for group in by_kind.values():
        med = statistics.median(1.0 - e.pearson for e in group)
        for e in group:
            gap = 1.0 - e.pearson
            if gap > OUTLIER_FLOOR and gap > OUTLIER_RATIO * med:
                out.append((e, gap / med if med > 0 else math.inf))
    return sorted(out, key=lambda x: -x[1])


def _few(items: Sequence[MatrixEvidence], what: str) -> str:
    names = ", ".join(f"{e.role} (r = {e.pearson:.3g})" for e in items[:3])
    more = f" and {len(items) - 3} more" if len(items) > 3 else ""
    return f"{len(items)} weight matrices {what}: {names}{more}"


def _needs_test(elementwise: Verdict, evidence: Sequence[MatrixEvidence], structure: Structure) -> str | None:
    """Why the canonical test could change the answer (None: it cannot)."""
    if elementwise.derived is not True:
        return f"the element-wise verdict is {elementwise.relation!r}: only the canonical test can find a disguise"
    if structure.n_layers_a != structure.n_layers_b:
        return f"depths differ ({structure.n_layers_a} vs {structure.n_layers_b} layers): the layer map is searched"
    if structure.hidden_a != structure.hidden_b:
        return f"widths differ ({structure.hidden_a} vs {structure.hidden_b}): the residual map is fitted"
    if structure.n_unmatched:
        return f"{structure.n_unmatched} tensors are unmatched or differ in shape"
    weak = [e for e in evidence if e.pearson <= 0.0 or fisher_z(e.pearson, min(e.rows, e.cols)) < MIN_MODULE_Z]
    if weak:
        return _few(weak, "look unrelated element-wise (a partial disguise?)")
    far = sorted((e for e in evidence if e.pearson < MIN_PEARSON), key=lambda e: e.pearson)
    if far:
        return _few(far, f"correlate below {MIN_PEARSON} (units may be permuted)")
    odd = _outliers(evidence)
    if odd:
        e, ratio = odd[0]
        return (f"{len(odd)} weight matrices depart from the others of their kind, e.g. {e.role} "
                f"(1 − r = {1.0 - e.pearson:.2g}, {ratio:.0f}× its kind's median): units may be permuted")
    return None


def decide_canon(mode: str, elementwise: Verdict, evidence: Sequence[MatrixEvidence],
                 structure: Structure) -> CanonDecision:
    """Run the canonical test or not (``mode`` one of :data:`MODES`)."""
    if mode not in MODES:
        raise ValueError(f"canon mode must be one of {', '.join(MODES)}, not {mode!r}")
    if mode == "never":
        return CanonDecision(False, mode, "not requested (--canon never): element-wise comparison alone")
    if elementwise.relation in ("identical", "not comparable"):
        return CanonDecision(False, mode, f"the pair is {elementwise.relation} element-wise: nothing to undo")
    if mode == "always":
        return CanonDecision(True, mode, "requested (--canon always)")
    why = _needs_test(elementwise, evidence, structure)
    if why is not None:
        return CanonDecision(True, mode, why)
    return CanonDecision(False, mode, f"nothing to undo: all {len(evidence)} weight matrices correlate "
                         f"overwhelmingly (r ≥ {MIN_PEARSON}, z ≥ {MIN_MODULE_Z:.0f}) and evenly, same shapes and depth")
