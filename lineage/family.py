"""Family trees of a set of models: pairwise evidence → typed, directed links → arborescence.

Small models (all of them fit in memory) take the fast path: every pair gets the element-wise
evidence (relatedness, relative delta as distance, direction), the full canonical comparison runs
only for models no element-wise link explains, merges are found as models lying between two
relatives (:func:`lineage.signals.direction.between`), and the tree's edges are typed by the
anatomy of each chosen pair.  Larger sets compare every pair with :func:`lineage.compare.compare`.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from lineage.anatomy import AlignedPair, explain
from lineage.compare import CompareOptions, compare
from lineage.io.checkpoint import open_checkpoint
from lineage.pairing import read_role, roles_for
from lineage.progress import ProgressFn
from lineage.report import Report
from lineage.signals.direction import between, direction
from lineage.signals.pairstats import pair_stats
from lineage.tree import Link, Tree, build_tree

log = logging.getLogger(__name__)

#: Distance given to a related pair whose delta could not be sized (e.g. disguised pairs).
UNSIZED_DISTANCE = 1.0
#: A merge does not extrapolate: task-vector weights above this are training, not merging.
MERGE_MAX_WEIGHT = 1.1
#: Merge parents are looked for among a model's nearest relatives.
MERGE_NEIGHBOURS = 4
#: Residual bound of the task-vector (cone) fit: zoo TIES merges 0.40, continued pre-training
#: checkpoints of one run lying along their common trajectory 0.5-0.6.
MERGE_CONE_RESIDUAL = 0.45


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
    parent_side = anatomy.get("parent")
    parent = {"a": name_a, "b": name_b}.get(str(parent_side))
    relation = str(anatomy.get("relation") or v.relation)
    realigned = details.get("realigned") or {}
    rels = [r.rel_l2 for r in report.layers if r.evidence and r.rel_l2 is not None]
    if v.relation in ("identical", "re-encoded copy"):
        distance: object = 0.0
    elif realigned.get("aligned_rel") is not None:
        # disguised: the size of the change once the transforms are undone
        distance = float(realigned["aligned_rel"])
    elif rels:
        # mean relative change over the compared matrices (a median hides a LoRA on few modules)
        distance = sum(min(1.0, float(x)) for x in rels) / len(rels)
    else:
        distance = details.get("rel_delta_median")
    return Link(
        a=name_a,
        b=name_b,
        related=bool(v.derived),
        distance=float(distance) if isinstance(distance, (int, float)) else UNSIZED_DISTANCE,
        parent=parent,
        confidence=float(anatomy.get("confidence") or 0.0),
        relation=relation,
    )


@dataclass(frozen=True)
class FamilyOptions:
    """How :func:`family_tree` gathers its pairwise evidence.

    ``fast``: when all models together fit in ``max_bytes`` of float32 they are read once into
    memory and every pair gets the cheap element-wise evidence (per-module Pearson, relative
    delta, :func:`lineage.signals.direction.direction`); the full :func:`lineage.compare.compare`
    (canonical test, realignment) runs only for models no element-wise link explains (disguised
    by a permutation or rotation).  Otherwise every pair goes through ``compare``.
    """

    fast: bool = True
    max_bytes: int = 4 << 30
    #: a module is related when its Pearson exceeds ``z_related / sqrt(numel)`` (≈ 6 σ of the
    #: independence null); a pair when at least ``min_fraction`` of its shared modules are
    z_related: float = 6.0
    min_fraction: float = 0.25
    detect_merges: bool = True
    type_edges: bool = True


def _load_roles(ref: str) -> tuple[dict[str, torch.Tensor], Any]:
    ck = open_checkpoint(ref)
    rm = roles_for(ck)
    roles = {r: read_role(ck, v) for r, v in rm.roles.items()}
    if "lm_head.weight" not in roles and rm.tied_embeddings and "embed.weight" in roles:
        roles["lm_head.weight"] = roles["embed.weight"]
    return roles, rm


def _bytes_of(ref: str) -> int:
    ck = open_checkpoint(ref)
    return 4 * sum(m.numel for m in ck.tensors.values())


@dataclass(frozen=True)
class PairEvidence:
    """Element-wise evidence of one pair (fast path)."""

    related: bool
    fraction_related: float
    distance: float
    parent: str | None          # "a", "b" or None
    confidence: float
    between: bool
    decided_by: str | None


def elementwise_evidence(A: Mapping[str, torch.Tensor], B: Mapping[str, torch.Tensor],
                         opts: FamilyOptions | None = None) -> PairEvidence:
    """Relatedness, distance and direction of two in-memory role maps (roles paired by key)."""
    o = opts or FamilyOptions()
    shared = [r for r in A if r in B and A[r].shape == B[r].shape and A[r].numel() > 1]
    mats = [r for r in shared if A[r].dim() == 2]
    if not mats:
        return PairEvidence(False, 0.0, UNSIZED_DISTANCE, None, 0.0, False, None)
    hits, rels = 0, []
    for r in mats:
        st = pair_stats(A[r], B[r])
        pr = st.pearson or 0.0
        if pr > o.z_related / math.sqrt(st.n):
            hits += 1
            na = math.sqrt(st.sxx + st.n * st.mean_x ** 2)
            nb = math.sqrt(st.syy + st.n * st.mean_y ** 2)
            dd = float((B[r].double() - A[r].double()).norm())
            rels.append(min(dd / max(math.sqrt(na * nb), 1e-30), 1.0))
        else:
            rels.append(1.0)
    frac = hits / len(mats)
    if frac < o.min_fraction:
        return PairEvidence(False, frac, UNSIZED_DISTANCE, None, 0.0, False, None)
    # mean relative delta over every matrix of either model: unmatched or unrelated ones (layers
    # dropped, vocabulary or width changed) count as a whole model-size change (1.0)
    n_all = len({r for r in A if A[r].dim() == 2} | {r for r in B if B[r].dim() == 2})
    rels += [1.0] * max(n_all - len(mats), 0)
    dist = sum(rels) / len(rels)
    pa = {r: A[r] for r in shared}
    pb = {r: B[r] for r in shared}
    d = direction(pa, pb, full_a=A, full_b=B)
    vg = d.evidence.get("variance_growth", {}) or {}
    # "between" matters only where variance growth would have decided (one-way evidence such as
    # structure, grid or precision orients the pair whatever the variance does)
    btw = bool(vg.get("between")) and d.decided_by is None
    return PairEvidence(True, frac, dist, d.parent, d.confidence, btw, d.decided_by)


def _compare_link(name_a: str, name_b: str, ref_a: str, ref_b: str, options: CompareOptions | None
                  ) -> tuple[Link, Report]:
    rep = compare(ref_a, ref_b, options=options)
    return link_from_report(name_a, name_b, rep), rep


def _find_merges(names: Sequence[str], roles: Mapping[str, Mapping[str, torch.Tensor]],
                 links: Mapping[tuple[str, str], Link], prelim: Tree) -> dict[str, tuple[str, ...]]:
    """Models that interpolate two relatives (merges), starting from the ``between`` links.

    Candidates are fitted with :func:`lineage.signals.direction.between` (on the segment, then in
    task-vector space over the parents' common parent in ``prelim``); merges are accepted best
    fit first, and a model accepted as a merge is not used as a parent of a later one (the
    simpler explanation wins: a merge of merges is only found when nothing else fits).
    """
    rel: dict[str, set[str]] = {n: set() for n in names}
    flag: dict[str, set[str]] = {n: set() for n in names}
    for (x, y), lk in links.items():
        if lk.related:
            rel[x].add(y)
            rel[y].add(x)
            if lk.between:
                flag[x].add(y)
                flag[y].add(x)

    def parent_in(x: str, y: str) -> bool:
        """The pairwise evidence (or the preliminary tree) makes ``x`` the parent of ``y``."""
        lk = links.get((x, y)) or links.get((y, x))
        return (lk is not None and lk.parent == x and not lk.between) or prelim.parent_of(y) == x

    def dist(x: str, y: str) -> float:
        lk = links.get((x, y)) or links.get((y, x))
        return lk.distance if lk is not None else float("inf")

    fits: list[tuple[float, str, str, str]] = []
    # a model that one-way evidence (grid, precision, zeros, surgery) makes the child of a relative
    # is explained by that edge, not a merge
    explained = {(lk.b if lk.parent == lk.a else lk.a) for lk in links.values()
                 if lk.related and lk.one_way and lk.parent is not None}
    for c in names:
        if not flag[c] or c not in roles or c in explained:
            continue
        # a relative that one-way evidence (grid, precision, surgery) makes a child of c cannot be its parent
        kids = {y for y in rel[c] if (lk := links.get((c, y)) or links.get((y, c))) is not None
                and lk.one_way and lk.parent == c}
        near = sorted(rel[c] - kids, key=lambda y: dist(c, y))[:MERGE_NEIGHBOURS]
        for p1 in sorted(flag[c] - kids):
            for p2 in near:
                if p2 == p1 or p2 not in rel[p1] or p1 not in roles or p2 not in roles:
                    continue
                if prelim.parent_of(p1) == p2 or prelim.parent_of(p2) == p1:
                    continue  # "merging" a model with its own parent only rescales its update
                bases = {x for x in (prelim.parent_of(p1), prelim.parent_of(p2)) if x is not None}
                bases |= {x for x in rel[p1] & rel[p2] if parent_in(x, p1) and parent_in(x, p2)}
                bases = sorted(x for x in bases - {c, p1, p2} if x in roles and x in rel[c])
                if bases:
                    # with the parents' common parent in view the merge must hold in task-vector space:
                    # siblings that merely lie near the segment (independent updates of one base) fail here
                    cand = [between(roles[c], roles[p1], roles[p2], base=roles[x]) for x in bases[:2]]
                    cand = [f for f in cand if f.interpolates and max(f.weights) <= MERGE_MAX_WEIGHT
                            and f.residual < MERGE_CONE_RESIDUAL]
                    if not cand:
                        continue
                    bt = min(cand, key=lambda f: f.residual)
                else:
                    bt = between(roles[c], roles[p1], roles[p2])
                    if not bt.interpolates:
                        continue
                main, other = (p1, p2) if bt.alpha >= 0.5 else (p2, p1)
                fits.append((bt.residual, c, main, other))
    out: dict[str, tuple[str, ...]] = {}
    parents_used: set[str] = set()
    for res, c, main, other in sorted(fits):
        if c in out or c in parents_used or main in out or other in out:
            continue
        out[c] = (main, other)
        parents_used |= {main, other}
        log.info("merge: %s between %s and %s (residual %.3g)", c, main, other, res)
    return out


def _type_edges(tree: Tree, roles: Mapping[str, Mapping[str, torch.Tensor]],
                rms: Mapping[str, Any], reports: Mapping[tuple[str, str], Report]) -> Tree:
    """Relation of each tree edge from the anatomy of that pair (merges keep their label)."""
    out = []
    for e in tree.edges:
        rel = e.relation
        rep = reports.get((e.parent, e.child)) or reports.get((e.child, e.parent))
        if e.relation == "merge":
            pass
        elif rep is not None:
            v = rep.verdict.relation
            rel = "disguised copy" if v.startswith("identical") else str((rep.anatomy or {}).get("relation") or v)
        elif e.parent in roles and e.child in roles:
            P, C = roles[e.parent], roles[e.child]
            shared = [r for r in P if r in C and P[r].shape == C[r].shape]
            try:
                r = explain(AlignedPair({k: P[k] for k in shared}, {k: C[k] for k in shared}, p_value=0.0,
                                        layers_a=rms[e.parent].n_layers, layers_b=rms[e.child].n_layers))
                rel = r.relation
            except (RuntimeError, ValueError):
                log.debug("typing %s -> %s failed", e.parent, e.child, exc_info=True)
        out.append(replace(e, relation=rel))
    return replace(tree, edges=tuple(out))


def family_tree(
    refs: Sequence[str], *, options: CompareOptions | None = None, progress: ProgressFn | None = None,
    family: FamilyOptions | None = None, names: Sequence[str] | None = None,
) -> FamilyResult:
    """Build the family tree of ``refs`` (see :class:`FamilyOptions` for how pairs are compared).

    ``names`` label the models (default: the file or folder name, the folder for a model file
    inside one, or the reference itself when those clash).
    """
    fo = family or FamilyOptions()
    if names is None:
        names = [(Path(r).parent.name if Path(r).is_file() else Path(r).name) or r for r in refs]
        if len(set(names)) != len(names):
            names = list(refs)
    names = list(names)
    ref_of = dict(zip(names, refs))
    pairs = list(itertools.combinations(range(len(refs)), 2))
    if not fo.fast or sum(_bytes_of(r) for r in refs) > fo.max_bytes:
        return _family_tree_compare(names, refs, pairs, options, progress)

    roles: dict[str, dict[str, torch.Tensor]] = {}
    rms: dict[str, Any] = {}
    for n, r in zip(names, refs):
        roles[n], rms[n] = _load_roles(r)
    links: dict[tuple[str, str], Link] = {}
    clean: dict[tuple[str, str], bool] = {}
    for k, (i, j) in enumerate(pairs):
        a, b = names[i], names[j]
        ev = elementwise_evidence(roles[a], roles[b], fo)
        clean[(a, b)] = ev.fraction_related >= CLEAN_FRACTION
        links[(a, b)] = Link(a, b, ev.related, ev.distance, {"a": a, "b": b}.get(str(ev.parent)), ev.confidence,
                             "related" if ev.related else "unrelated", ev.between,
                             ev.decided_by in ("structure", "sparsity", "grid", "precision"))
        if progress is not None:
            progress(k + 1, len(pairs), f"{a} vs {b}")
    # models no element-wise link explains: canonical comparison (undoes permutations/rotations)
    reports: dict[tuple[str, str], Report] = {}
    # models without a *clean* element-wise link (every shared matrix related, as after training,
    # quantisation or a LoRA merge) are disguised relative to the family, in part (a permuted MLP,
    # refolded norms) or in whole: their links come from the canonical comparison, which undoes that
    linked = {x for (a, b), lk in links.items() if lk.related and clean.get((a, b), False) for x in (a, b)}
    orphans = [n for n in names if n not in linked]
    for o in orphans:
        for m in names:
            if m == o or (m in orphans and names.index(m) < names.index(o)):
                continue
            key = (o, m) if names.index(o) < names.index(m) else (m, o)
            lk, rep = _compare_link(key[0], key[1], ref_of[key[0]], ref_of[key[1]], options)
            links[key] = lk
            reports[key] = rep
    log.info("family: %d pairs element-wise, %d canonical comparisons (%d models without element-wise link)",
             len(pairs), len(reports), len(orphans))
    links = _orient_disguised(links, set(orphans))
    tree = build_tree(names, links)
    if fo.detect_merges:
        # merges are fitted on the weights as stored: only element-wise links qualify (a disguised
        # model's raw weights are not in its relatives' basis)
        merges = _find_merges(names, roles, {k: v for k, v in links.items() if k not in reports}, tree)
        if merges:
            tree = build_tree(names, links, merges=merges)
    if fo.type_edges:
        tree = _type_edges(tree, roles, rms, reports)
    return FamilyResult(tree, tuple(links.values()), tuple(reports.values()))


#: Fraction of shared matrices that must be related element-wise for a link to need no canonical check.
CLEAN_FRACTION = 0.95
#: Extra distance of a link between two models that are both disguised relative to the family:
#: exact re-parameterisations of one model are at distance ~0 from each other, and should hang
#: from the model in the family's own basis rather than chain through one another.
DISGUISED_PAIR_COST = 0.01


def _orient_disguised(links: dict[tuple[str, str], Link], orphans: set[str]) -> dict[tuple[str, str], Link]:
    """Links of models without element-wise links ("orphans": disguised relative to the family).

    Between an orphan and a model in the family's basis, the orphan is the re-parameterised
    one, hence the child (the other model's lineage is consistent element-wise with the rest of
    the family); between two orphans the link is made slightly longer (:data:`DISGUISED_PAIR_COST`).
    """
    out = {}
    for key, lk in links.items():
        a_o, b_o = lk.a in orphans, lk.b in orphans
        if lk.related and a_o != b_o:
            lk = replace(lk, parent=lk.b if a_o else lk.a, confidence=max(lk.confidence, 0.9))
        elif lk.related and a_o and b_o:
            lk = replace(lk, distance=lk.distance + DISGUISED_PAIR_COST)
        out[key] = lk
    return out


def _family_tree_compare(names: Sequence[str], refs: Sequence[str], pairs: Sequence[tuple[int, int]],
                         options: CompareOptions | None, progress: ProgressFn | None) -> FamilyResult:
    """Every pair through :func:`lineage.compare.compare` (models too large for memory)."""
    links: list[Link] = []
    reports: list[Report] = []
    for k, (i, j) in enumerate(pairs):
        log.info("comparing %s and %s", names[i], names[j])
        rep = compare(refs[i], refs[j], options=options)
        reports.append(rep)
        links.append(link_from_report(names[i], names[j], rep))
        if progress is not None:
            progress(k + 1, len(pairs), f"{names[i]} vs {names[j]}")
    return FamilyResult(build_tree(names, links), tuple(links), tuple(reports))
