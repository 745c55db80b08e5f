"""The provisional lineage verdict: element-wise correlation against an explicit null.

Pure: takes per-matrix evidence, returns a :class:`Verdict`.  The calibrated test
with canonicalisation (:mod:`lineage.stattest`) supersedes it when available; this
module stays as the fallback for pairs that cannot be canonicalised.

Null hypothesis (stated in every report): the two models were initialised
independently.  Their hidden units are then in unrelated orders, so the centred
correlation ``r`` of two corresponding weight matrices has mean zero.  Treating
only ``m = min(rows, cols)`` units of each matrix as independent (conservative:
the true number of independent entries is much larger), Fisher's
``z = atanh(r)·sqrt(m − 3)`` is standard normal; the z of all matrices are combined
by Stouffer's method, one-sided (derivation makes correlations positive).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

#: p-value at or below which a pair is called derived.
DERIVED_P = 1e-3
#: p-value above which a pair is called unrelated (between the two: inconclusive).
UNRELATED_P = 0.01
#: Largest relative L2 distance in every matrix for a "re-encoded copy" (dtype cast).
COPY_REL_L2 = 5e-3

NULL_ELEMENTWISE = (
    "H0: independent initialisation. Per matrix z = atanh(pearson)·sqrt(min(rows, cols) − 3) ~ N(0,1); "
    "Stouffer combination over matrices, one-sided. Element-wise, without canonicalisation: a "
    "permuted or rotated copy is not detected by this test."
)


@dataclass(frozen=True)
class MatrixEvidence:
    """One paired 2-D weight matrix's contribution to the verdict."""

    role: str
    rows: int
    cols: int
    pearson: float
    rel_l2: float | None
    identical: bool


@dataclass(frozen=True)
class Verdict:
    """Decision on a pair of models.

    ``derived`` is True/False, or None when inconclusive or nothing could be compared.
    ``log10_p`` keeps tiny p-values that underflow a float.
    """

    derived: bool | None
    relation: str
    p_value: float | None
    log10_p: float | None
    summary: str
    null: str
    method: str
    details: dict[str, object] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        """Plain-JSON form."""
        return asdict(self)


def fisher_z(r: float, m: int) -> float:
    """Fisher's z statistic of a correlation ``r`` with ``m`` effective samples."""
    r = max(-0.999999999999, min(0.999999999999, r))
    return math.atanh(r) * math.sqrt(max(m - 3, 1))


def log10_norm_sf(z: float) -> float:
    """log10 P(Z > z) for a standard normal Z, exact far into the tail (no scipy import)."""
    if z < 30.0:
        return math.log10(0.5 * math.erfc(z / math.sqrt(2.0)))
    # Asymptotic series of the Mills ratio: relative error below 1e-9 for z >= 30.
    z2 = z * z
    series = 1.0 - 1.0 / z2 + 3.0 / z2**2 - 15.0 / z2**3 + 105.0 / z2**4
    ln = -z2 / 2.0 - math.log(z) - 0.5 * math.log(2.0 * math.pi) + math.log(series)
    return ln / math.log(10.0)


def combined_log10_p(zs: Sequence[float]) -> float:
    """log10 of the one-sided Stouffer p-value of the z statistics (no underflow)."""
    if not zs:
        return 0.0
    return log10_norm_sf(sum(zs) / math.sqrt(len(zs)))


def p_from_log10(log10_p: float) -> float:
    """The p-value as a float (0.0 when it underflows; the log stays exact)."""
    return 10.0**log10_p if log10_p > -307 else 0.0


def decide(evidence: Sequence[MatrixEvidence], n_unmatched: int = 0) -> Verdict:
    """Provisional verdict from element-wise evidence of paired 2-D matrices."""
    method = "elementwise-pearson"
    if not evidence:
        return Verdict(
            None,
            "not comparable",
            None,
            None,
            "No 2-D weight matrices could be paired between the two models; nothing to compare.",
            NULL_ELEMENTWISE,
            method,
        )
    zs = [fisher_z(e.pearson, min(e.rows, e.cols)) for e in evidence]
    log10_p = combined_log10_p(zs)
    p = p_from_log10(log10_p)
    rs = sorted(e.pearson for e in evidence)
    median_r = rs[len(rs) // 2]
    rels = [e.rel_l2 for e in evidence if e.rel_l2 is not None]
    max_rel = max(rels) if rels else None
    details: dict[str, object] = {
        "matrices": len(evidence),
        "median_pearson": median_r,
        "min_pearson": rs[0],
        "max_rel_l2": max_rel,
        "unmatched_tensors": n_unmatched,
    }
    if all(e.identical for e in evidence) and n_unmatched == 0:
        relation, derived = "identical", True
        summary = f"All {len(evidence)} weight matrices are bit-for-bit identical."
    elif log10_p <= math.log10(DERIVED_P):
        derived = True
        if max_rel is not None and max_rel <= COPY_REL_L2 and n_unmatched == 0:
            relation = "re-encoded copy"
            summary = (
                f"Every weight matrix matches within {max_rel:.1e} relative L2 (a dtype cast or "
                f"re-encoding); log10 p = {log10_p:.1f}."
            )
        else:
            relation = "derived"
            summary = (
                f"Weight matrices correlate far above the independent-initialisation null "
                f"(median Pearson {median_r:.3f} over {len(evidence)} matrices; log10 p = {log10_p:.1f})."
            )
    elif p > UNRELATED_P:
        derived, relation = False, "unrelated"
        summary = (
            f"No correlation beyond the null (median Pearson {median_r:.4f} over "
            f"{len(evidence)} matrices; p = {p:.3g})."
        )
    else:
        derived, relation = None, "inconclusive"
        summary = f"Weak evidence only (p = {p:.3g}); neither derived nor unrelated at the set thresholds."
    return Verdict(derived, relation, p, log10_p, summary, NULL_ELEMENTWISE, method, details)


NULL_CANONICAL = (
    "H0: independent initialisation. After canonicalisation (norm gains folded, residual basis fitted "
    "on token-anchored embedding rows, MLP neurons and attention heads matched), each aligned matrix "
    "gives z from its inner product against a permutation null; layers are combined by Stouffer and "
    "calibrated on independently trained models (benchmarks/accuracy.py). Reported p = 2·min(p_canonical, "
    "p_elementwise) (Bonferroni over the two tests)."
)

#: Relations of the anatomy stage that may replace a generic "derived".
ANATOMY_RELATIONS = frozenset(
    {"identical", "quantised copy", "lora merge", "fine-tune", "continued pre-training", "pruned", "merge"}
)


def decide_canonical(
    elementwise: Verdict,
    canon_log10_p: float,
    transforms: Sequence[str] = (),
    anatomy: dict[str, object] | None = None,
    disguised: bool | None = None,
) -> Verdict:
    """Final verdict from the element-wise verdict, the canonical test and the anatomy (all pure inputs).

    ``anatomy`` is the :meth:`lineage.anatomy.Relation.to_dict` of the pair, or None.
    ``disguised``: whether undoing the transforms found brought B much closer to A
    (:mod:`lineage.realign`); None falls back to "the element-wise test missed it".
    """
    logs = [canon_log10_p] + ([elementwise.log10_p] if elementwise.log10_p is not None else [])
    log10_p = min(0.0, min(logs) + math.log10(2.0))
    p = p_from_log10(log10_p)
    details = dict(elementwise.details)
    details["log10_p_canonical"] = canon_log10_p
    details["log10_p_elementwise"] = elementwise.log10_p
    method = "canonical+elementwise"
    if elementwise.relation in ("identical", "re-encoded copy"):
        return Verdict(True, elementwise.relation, p, log10_p, elementwise.summary, NULL_CANONICAL, method, details)
    if log10_p <= math.log10(DERIVED_P):
        invisible = elementwise.derived is not True
        disguised = invisible if disguised is None else (disguised or invisible)
        relation = "derived"
        if anatomy and anatomy.get("relation") in ANATOMY_RELATIONS:
            relation = str(anatomy["relation"])
        if disguised:
            relation = f"{relation} (disguised)"
        how = f"; undone: {'; '.join(transforms)}" if disguised and transforms else ""
        summary = (
            f"Lineage found: log10 p = {log10_p:.1f} under the independent-initialisation null"
            + (" — invisible element-wise, found only after canonicalisation" if invisible
               else " — disguised by a function-preserving re-parameterisation" if disguised else "")
            + how + "."
        )
        return Verdict(True, relation, p, log10_p, summary, NULL_CANONICAL, method, details)
    if p > UNRELATED_P:
        summary = f"No lineage found after canonicalisation (p = {p:.3g}); consistent with independent models."
        return Verdict(False, "unrelated", p, log10_p, summary, NULL_CANONICAL, method, details)
    summary = f"Weak evidence only (p = {p:.3g}); neither derived nor unrelated at the set thresholds."
    return Verdict(None, "inconclusive", p, log10_p, summary, NULL_CANONICAL, method, details)


def with_merge(verdict: Verdict, merge: dict[str, object]) -> Verdict:
    """The verdict once B has been fitted as a merge of candidate parents (``Report.merge``).

    B is called a merge when it is derived, the fit explains it, and at least two
    parents carry weight (a single dominant parent is an ordinary derivative of it).
    """
    weights = [float(w) for w in merge.get("weights", ()) or ()]  # type: ignore[union-attr]
    carried = sum(1 for w in weights if abs(w) >= 0.05)
    if verdict.derived is not True or not merge.get("explains") or carried < 2:
        return verdict
    method = str(merge.get("method"))
    how = (f"SLERP t = {float(merge['t']):.3f}" if merge.get("t") is not None  # type: ignore[arg-type]
           else "weights " + ", ".join(f"{w:.3f}" for w in weights))
    relation = "merge (disguised)" if verdict.relation.endswith("(disguised)") else "merge"
    summary = f"{verdict.summary} B is a {method} merge of the given parents ({how})."
    return replace(verdict, relation=relation, summary=summary)
