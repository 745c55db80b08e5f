"""Family trees of a set of models: pairwise comparisons → typed, directed links → arborescence."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lineage.compare import CompareOptions, compare
from lineage.progress import ProgressFn
from lineage.report import Report
from lineage.tree import Link, Tree, build_tree

log = logging.getLogger(__name__)

#: Distance given to a related pair whose delta could not be sized (e.g. disguised pairs).
UNSIZED_DISTANCE = 1.0


@dataclass(frozen=True)
class FamilyResult:
    """The tree and the pairwise reports it was built from."""

    tree: Tree
    links: tuple[Link, ...]
    reports: tuple[Report, ...]

    def to_dict(self) -> dict[str, object]:
        """Plain-JSON form (schema ``lineage.tree/1``)."""
        return {
            "schema": "lineage.tree/1",
            "tree": self.tree.to_dict(),
            "links": [vars(lk) for lk in self.links],
            "pairs": [
                {"a": r.a.ref, "b": r.b.ref, "relation": r.verdict.relation, "log10_p": r.verdict.log10_p}
                for r in self.reports
            ],
        }


def link_from_report(name_a: str, name_b: str, report: Report) -> Link:
    """Turn one comparison into a tree link (direction and distance from the anatomy when present)."""
    v = report.verdict
    anatomy = report.anatomy or {}
    details = anatomy.get("details", {}) or {}
    distance = details.get("rel_delta_median")
    parent_side = anatomy.get("parent")
    parent = {"a": name_a, "b": name_b}.get(str(parent_side))
    relation = str(anatomy.get("relation") or v.relation)
    if v.relation in ("identical", "re-encoded copy"):
        distance = 0.0
    return Link(
        a=name_a,
        b=name_b,
        related=bool(v.derived),
        distance=float(distance) if isinstance(distance, (int, float)) else UNSIZED_DISTANCE,
        parent=parent,
        confidence=float(anatomy.get("confidence") or 0.0),
        relation=relation,
    )


def family_tree(
    refs: Sequence[str], *, options: CompareOptions | None = None, progress: ProgressFn | None = None
) -> FamilyResult:
    """Compare every pair of ``refs`` and build their family tree."""
    names = [Path(r).name or r for r in refs]
    if len(set(names)) != len(names):
        names = list(refs)
    links: list[Link] = []
    reports: list[Report] = []
    pairs = list(itertools.combinations(range(len(refs)), 2))
    for k, (i, j) in enumerate(pairs):
        log.info("comparing %s and %s", names[i], names[j])
        rep = compare(refs[i], refs[j], options=options)
        reports.append(rep)
        links.append(link_from_report(names[i], names[j], rep))
        if progress is not None:
            progress(k + 1, len(pairs), f"{names[i]} vs {names[j]}")
    return FamilyResult(build_tree(names, links), tuple(links), tuple(reports))
