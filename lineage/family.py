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
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from lineage.anatomy import AlignedPair, explain
from lineage.compare import CompareOptions, compare
from lineage.io.checkpoint import open_checkpoint
from lineage.roles import read_role, roles_for
from lineage.progress import ProgressFn
from lineage.report import Report
from lineage.signals.direction import between, direction
from lineage.signals.pairstats import pair_stats
from lineage.verdict import fisher_z, log10_norm_sf
from lineage.tree import SIBLING, Link, Tree, build_tree

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
#: Largest cosine of the parents' task vectors over the base: the zoo's merged fine-tunes have
#: 0.41-0.44 (an undertrained base's common drift); a sibling wrongly taken as base 0.64-0.88.
MERGE_MAX_TASK_COS = 0.6
#: A cone fit this close is an interpolation of the stored weights whatever the task vectors' cosine:
#: linear and SLERP merges fit to 1e-7 and 0.01 (small zoo, where fine-tunes of one undertrained base
#: share task-vector cosines of 0.74-0.80); training leaves an update of its own outside the cone.
MERGE_EXACT_RESIDUAL = 0.05
#: Extra cost of an edge from a merge child to the base its parents were fitted over.
MERGE_BASE_PENALTY = 1.0


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

    def pair_rows(self) -> list[dict[str, object]]:
        """Compared pairs by model name (``a``, ``b``, ``relation``, ``log10_p``), for drawing p-values."""
        def name(ref: str) -> str:
            p = Path(ref)
            for cand in (ref, p.name, p.parent.name):
                if cand in self.tree.nodes:
                    return cand
            return ref

        return [{"a": name(r.a.ref), "b": name(r.b.ref), "relation": r.verdict.relation,
                 "log10_p": r.verdict.log10_p} for r in self.reports]


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
    elif realigned.get("aligned_mean_rel") is not None:
        # disguised: the size of the change once the transforms are undone, measured as the
        # element-wise links measure it (mean relative change per matrix)
        distance = float(realigned["aligned_mean_rel"])
    elif rels:
        # mean relative change over the compared matrices (a median hides a LoRA on few modules)
        distance = sum(min(1.0, float(x)) for x in rels) / len(rels)
    else:
        distance = details.get("rel_delta_median")
    # neither side looks like an ancestor of the other (siblings, or a merge seen from one parent)
    vg = ((details.get("direction") or {}).get("evidence") or {}).get("variance_growth") or {}
    between_ = bool(vg.get("between")) and parent is None
    return Link(
        a=name_a,
        b=name_b,
        between=between_,
        log10_p=v.log10_p,
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
    #: share of the related matrices whose change is mostly a row/column rescaling of the other
    #: model's (a folded norm, traded Q/K scales): a partial disguise, not an update
    rescaled: float = 0.0
    #: share of the shared matrices whose Pearson reaches :data:`CLEAN_PEARSON` (a small change,
    #: not merely a significant correlation: permuted neurons keep a weak one)
    fraction_close: float = 0.0
    #: log10 p of the element-wise test (Fisher z per matrix, Stouffer; lineage.verdict's null)
    log10_p: float | None = None


#: Pearson of a matrix pair whose change is small against the weights (relative delta ≲ 1);
#: permuted or independent matrices sit far below (zoo: ≤ 0.13 for a permuted MLP).
CLEAN_PEARSON = 0.3
#: A matrix pair is "rescaled" when the best row-and-column rescaling of one removes at least this
#: share of ‖B − A‖.  Training rescales rows too (zoo, any undisguised pair: at most 0.66, the
#: embedding rows after continued pre-training); a Q/K-scale or norm-refold disguise against its
#: source or a LoRA of it gives 0.88-1.0.  Against a fine-tune (0.72-0.96) the disguise may pass
#: as clean, and is then caught by the rescaled pair with its source inside the component.
RESCALE_GAIN = 0.9
#: Changes below this relative size are storage rounding, not a rescaling worth undoing.
RESCALE_MIN_REL = 1e-3


def rescale_gain(a: torch.Tensor, b: torch.Tensor, iters: int = 4) -> float:
    """Share of ‖b − a‖ removed by the best fit ``b ≈ diag(r) · a · diag(c)`` (alternating least
    squares, float64); 0 when the change is storage-level or the fit does not help."""
    x, y = a.double(), b.double()
    d0 = float((y - x).norm())
    if d0 <= RESCALE_MIN_REL * max(float(x.norm()), 1e-30):
        return 0.0
    c = torch.ones(x.shape[1], dtype=torch.float64)
    r = torch.ones(x.shape[0], dtype=torch.float64)
    for _ in range(iters):
        xc = x * c
        r = (y * xc).sum(1) / (xc * xc).sum(1).clamp_min(1e-300)
        rx = x * r[:, None]
        c = (y * rx).sum(0) / (rx * rx).sum(0).clamp_min(1e-300)
    d1 = float((y - x * r[:, None] * c).norm())
    return max(0.0, 1.0 - d1 / d0)


def elementwise_evidence(A: Mapping[str, torch.Tensor], B: Mapping[str, torch.Tensor],
                         opts: FamilyOptions | None = None) -> PairEvidence:
    """Relatedness, distance and direction of two in-memory role maps (roles paired by key)."""
    o = opts or FamilyOptions()
    shared = [r for r in A if r in B and A[r].shape == B[r].shape and A[r].numel() > 1]
    mats = [r for r in shared if A[r].dim() == 2]
    if not mats:
        return PairEvidence(False, 0.0, UNSIZED_DISTANCE, None, 0.0, False, None)
    hits, rels, scaled, close, zs = 0, [], 0, 0, []
    for r in mats:
        st = pair_stats(A[r], B[r])
        pr = st.pearson or 0.0
        zs.append(fisher_z(pr, min(A[r].shape)))
        close += pr >= CLEAN_PEARSON
        if pr > o.z_related / math.sqrt(st.n):
            hits += 1
            scaled += rescale_gain(A[r], B[r]) >= RESCALE_GAIN
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
    log10_p = log10_norm_sf(sum(zs) / math.sqrt(len(zs)))
    return PairEvidence(True, frac, dist, d.parent, d.confidence, btw, d.decided_by, scaled / max(hits, 1),
                        close / len(mats), log10_p)


def _compare_link(name_a: str, name_b: str, ref_a: str, ref_b: str, options: CompareOptions | None
                  ) -> tuple[Link, Report]:
    rep = compare(ref_a, ref_b, options=options)
    return link_from_report(name_a, name_b, rep), rep


def _merge_candidates(c: str, flag: Mapping[str, set[str]], near: Sequence[str], kids: set[str]
                      ) -> list[tuple[str, str]]:
    """Parent pairs to fit ``c`` to: a ``between`` relative of ``c`` with a near one, and any two near
    relatives (an even merge of two siblings looks like their common ancestor's child to the direction
    evidence, and like their parent to theirs; pairwise evidence need not flag it at all)."""
    out = [(p1, p2) for p1 in sorted(flag[c] - kids) for p2 in near]
    out += [(p1, p2) for p1, p2 in itertools.combinations(sorted(near), 2)]
    return list(dict.fromkeys(out))


def _find_merges(names: Sequence[str], roles: Mapping[str, Mapping[str, torch.Tensor]],
                 links: Mapping[tuple[str, str], Link], prelim: Tree,
                 bases_out: dict[str, str] | None = None) -> dict[str, tuple[str, ...]]:
    """Models that interpolate two relatives (merges), starting from the ``between`` links.

    Candidates are fitted with :func:`lineage.signals.direction.between` (on the segment, then in
    task-vector space over the parents' common parent in ``prelim``); merges are accepted best
    fit first, and a model accepted as a merge is not used as a parent of a later one (the
    simpler explanation wins: a merge of merges is only found when nothing else fits).
    ``bases_out`` receives, per merge fitted in task-vector space, the parents' common base it used.
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

    fits: list[tuple[float, str, str, str, str | None]] = []
    # a model that one-way evidence (grid, precision, zeros, surgery) makes the child of a relative
    # is explained by that edge, not a merge
    explained = {(lk.b if lk.parent == lk.a else lk.a) for lk in links.values()
                 if lk.related and lk.one_way and lk.parent is not None}
    for c in names:
        if c not in roles or c in explained:
            continue
        # a relative that one-way evidence (grid, precision, surgery) makes a child of c cannot be its parent
        kids = {y for y in rel[c] if (lk := links.get((c, y)) or links.get((y, c))) is not None
                and lk.one_way and lk.parent == c}
        near = sorted(rel[c] - kids, key=lambda y: dist(c, y))[:MERGE_NEIGHBOURS]
        for p1, p2 in _merge_candidates(c, flag, near, kids):
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
                fitted = [(between(roles[c], roles[p1], roles[p2], base=roles[x]), x) for x in bases[:2]]
                cand = [(f, x) for f, x in fitted if f.interpolates and max(f.weights) <= MERGE_MAX_WEIGHT
                        and f.residual < MERGE_CONE_RESIDUAL
                        and (f.task_cos is None or f.task_cos < MERGE_MAX_TASK_COS
                             or f.residual < MERGE_EXACT_RESIDUAL)]
                if not cand:
                    continue
                bt, used = min(cand, key=lambda fx: fx[0].residual)
            else:
                bt, used = between(roles[c], roles[p1], roles[p2]), None
                if not bt.interpolates:
                    continue
            main, other = (p1, p2) if bt.alpha >= 0.5 else (p2, p1)
            fits.append((bt.residual, c, main, other, used))
    out: dict[str, tuple[str, ...]] = {}
    parents_used: set[str] = set()
    for res, c, main, other, used in sorted(fits, key=lambda f: f[:4]):
        if c in out or c in parents_used or main in out or other in out:
            continue
        out[c] = (main, other)
        if used is not None and bases_out is not None:
            bases_out[c] = used
        parents_used |= {main, other}
        log.info("merge: %s between %s and %s (residual %.3g)", c, main, other, res)
    return out


def merge_methods(roles: Mapping[str, Mapping[str, torch.Tensor]], merges: Mapping[str, Sequence[str]],
                  bases: Mapping[str, str]) -> dict[str, str]:
    """How each merge child was merged (linear, slerp, ties, …): :func:`lineage.signals.merge.fit_merge` of
    the child over its parents (over their common base when one was used), kept when the fit explains it."""
    from lineage.signals.merge import fit_merge

    out = {}
    for c, ps in merges.items():
        base = bases.get(c)
        if c not in roles or any(p not in roles for p in ps):
            continue
        try:
            fit = fit_merge(roles[c], [roles[p] for p in ps], roles[base] if base in roles else None)
        except (ValueError, RuntimeError) as e:
            log.debug("merge type of %s not fitted: %s", c, e)
            continue
        if fit.explains:
            out[c] = str(fit.method)
    return out


def find_merges(refs: Mapping[str, str], links: Sequence[Link], prelim: Tree, *, max_bytes: int = 4 << 30
                ) -> tuple[dict[str, tuple[str, ...]], dict[str, str]]:
    """Merges among linked models read from ``refs`` (name → reference), for trees built from links that
    came from elsewhere (``scan --confirm``): ``(merges, methods)``.  Only models in a related pair that
    could be a merge's are read, all together at most ``max_bytes`` of float32; beyond that nothing is
    fitted (logged), so the tree keeps what the links say."""
    related = [lk for lk in links if lk.related]
    names = sorted({x for lk in related for x in (lk.a, lk.b)} & set(refs))
    if len(names) < 3:
        return {}, {}
    need = sum(_bytes_of(refs[n]) for n in names)
    if need > max_bytes:
        log.info("merge detection skipped: the %d linked models need %d MB in memory (limit %d MB)",
                 len(names), need >> 20, max_bytes >> 20)
        return {}, {}
    roles = {n: _load_roles(refs[n])[0] for n in names}
    by_pair = {(lk.a, lk.b): lk for lk in related}
    used: dict[str, str] = {}
    merges = _find_merges(names, roles, by_pair, prelim, used)
    return merges, merge_methods(roles, merges, used)


def _type_edges(tree: Tree, roles: Mapping[str, Mapping[str, torch.Tensor]],
                rms: Mapping[str, Any], reports: dict[tuple[str, str], Report],
                ref_of: Mapping[str, str], options: CompareOptions | None) -> Tree:
    """Relation of each tree edge from the anatomy of that pair (merges keep their label).

    Pairs of one shape are typed from the roles in memory; shape surgery (layers, width or
    vocabulary changed) needs the layer pairing of the full comparison, which then runs.
    """
    out = []
    for e in tree.edges:
        rel = e.relation
        rep = reports.get((e.parent, e.child)) or reports.get((e.child, e.parent))
        if rep is None and e.relation != "merge" and e.parent in roles and e.child in roles:
            P, C = roles[e.parent], roles[e.child]
            if {k: tuple(v.shape) for k, v in P.items()} != {k: tuple(v.shape) for k, v in C.items()}:
                rep = compare(ref_of[e.parent], ref_of[e.child], options=options)
                reports[(e.parent, e.child)] = rep
        if e.relation in ("merge", SIBLING):
            pass  # a merge keeps its label; siblings stay siblings
        elif rep is not None:
            v = rep.verdict.relation
            rel = "disguised copy" if v.startswith("identical (") else str((rep.anatomy or {}).get("relation") or v)
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
    rescaled: list[tuple[str, str]] = []
    for k, (i, j) in enumerate(pairs):
        a, b = names[i], names[j]
        ev = elementwise_evidence(roles[a], roles[b], fo)
        # a clean link: (nearly) every shared matrix related element-wise and none merely rescaled,
        # as after training, quantisation or a LoRA merge
        clean[(a, b)] = ev.related and ev.fraction_close >= CLEAN_FRACTION and ev.rescaled == 0.0
        if ev.related and ev.rescaled > 0.0:
            rescaled.append((a, b))
        links[(a, b)] = Link(a, b, ev.related, ev.distance, {"a": a, "b": b}.get(str(ev.parent)), ev.confidence,
                             "related" if ev.related else "unrelated", ev.between,
                             ev.decided_by in ("structure", "sparsity", "grid", "precision"), ev.decided_by,
                             ev.log10_p)
        if progress is not None:
            progress(k + 1, len(pairs), f"{a} vs {b}")
    # Models joined by clean links share a basis.  A model (or a sub-family) disguised relative to
    # the rest, in part (a permuted MLP, refolded norms, traded Q/K scales) or in whole, forms a
    # component of its own; components are joined by the canonical comparison, which undoes that.
    clean_pairs = [k for k, v in clean.items() if v]
    comps = clean_components(names, clean_pairs)
    # a model rescaled against most of its component (a refolded or Q/K-rescaled copy joined to
    # the family through a clean link to a fine-tune, whose update hid the rescaling) leaves it,
    # with the models clean-linked to it alone (its own descendants)
    moved = _rescaled_members(comps, links, set(rescaled))
    if moved:
        clean_pairs = [(a, b) for a, b in clean_pairs if (a in moved) == (b in moved)]
        comps = clean_components(names, clean_pairs)
    reports = _link_components(comps, links, ref_of, options)
    # a rescaled pair still inside one component: its own link comes from the canonical comparison
    comp_of = {x: i for i, c in enumerate(comps) for x in c}
    for a, b in rescaled:
        if comp_of[a] == comp_of[b] and (a, b) not in reports:
            links[(a, b)], reports[(a, b)] = _compare_link(a, b, ref_of[a], ref_of[b], options)
    log.info("family: %d pairs element-wise, %d canonical comparisons (%d components)",
             len(pairs), len(reports), len(comps))
    size = {x: len(c) for c in comps for x in c}
    links = _orient_disguised(links, set(reports), size)
    penalties = sibling_penalties(links, roles, set(reports))
    tree = build_tree(names, links, penalties=penalties)
    if fo.detect_merges:
        # merges are fitted on the weights as stored: only element-wise links qualify (a disguised
        # model's raw weights are not in its relatives' basis)
        used: dict[str, str] = {}
        merges = _find_merges(names, roles, {k: v for k, v in links.items() if k not in reports}, tree, used)
        if merges:
            # a merge is not the parent of the base its parents were fitted over
            penalties.update({(c, x): MERGE_BASE_PENALTY for c, x in used.items()})
            tree = build_tree(names, links, merges=merges, penalties=penalties,
                              merge_methods=merge_methods(roles, merges, used))
    if fo.type_edges:
        tree = _type_edges(tree, roles, rms, reports, ref_of, options)
    return FamilyResult(tree, tuple(links.values()), tuple(reports.values()))


#: Fraction of shared matrices that must be close element-wise (:data:`CLEAN_PEARSON`) for a link to need
#: no canonical check.
CLEAN_FRACTION = 0.95
#: Extra distance of a link between two models that are both disguised relative to the family:
#: exact re-parameterisations of one model are at distance ~0 from each other, and should hang
#: from the model in the family's own basis rather than chain through one another.
DISGUISED_PAIR_COST = 0.01
#: A model keeps at least this share of its parent's update (task vector) when it is trained
#: further from it; a model that keeps less of a relative's update is its sibling, not its child
#: (zoo: true chains keep 1.17-1.18, siblings from one base 0.32-0.66, see benchmarks/tree_accuracy.py).
CHAIN_RETAINED = 0.75
#: Extra cost of a parent → child edge that the sibling test rejects.
SIBLING_PENALTY = 0.5


def clean_components(names: Sequence[str], clean_pairs: Sequence[tuple[str, str]]) -> list[list[str]]:
    """Connected components of the clean-link graph, largest first (ties: input order)."""
    up = {n: n for n in names}

    def find(x: str) -> str:
        while up[x] != x:
            up[x] = up[up[x]]
            x = up[x]
        return x

    for a, b in clean_pairs:
        up[find(a)] = find(b)
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(find(n), []).append(n)
    order = {n: i for i, n in enumerate(names)}
    return sorted(groups.values(), key=lambda c: (-len(c), order[c[0]]))


def _rescaled_members(comps: Sequence[Sequence[str]], links: Mapping[tuple[str, str], Link],
                      rescaled: set[tuple[str, str]]) -> set[str]:
    """Members of a component whose links to at least half of their related fellow members are
    rescaled pairs (the side in another basis; its source is rescaled against few)."""
    out: set[str] = set()
    for comp in comps:
        for m in comp:
            rel = resc = 0
            for o in comp:
                if o == m:
                    continue
                lk = links.get((m, o)) or links.get((o, m))
                if lk is not None and lk.related:
                    rel += 1
                    resc += (m, o) in rescaled or (o, m) in rescaled
            if rel and resc >= 0.5 * rel:
                out.add(m)
    return out


def _component_roots(comp: Sequence[str], links: Mapping[tuple[str, str], Link]) -> list[str]:
    """The top model(s) of one component, from its own element-wise links."""
    if len(comp) == 1:
        return list(comp)
    inside = set(comp)
    sub = [lk for lk in links.values() if lk.a in inside and lk.b in inside]
    return list(build_tree(comp, sub).roots)


def _link_components(comps: Sequence[Sequence[str]], links: dict[tuple[str, str], Link],
                     ref_of: Mapping[str, str], options: CompareOptions | None
                     ) -> dict[tuple[str, str], Report]:
    """Canonical comparisons across components (updates ``links`` in place).

    For each pair of components the top models are compared first; when related, the smaller
    component's top models are compared with every member of the larger one (where it attaches).
    """
    index = {n: i for i, n in enumerate(ref_of)}
    roots = [_component_roots(c, links) for c in comps]
    reports: dict[tuple[str, str], Report] = {}

    def run(x: str, y: str) -> bool:
        key = (x, y) if index[x] < index[y] else (y, x)
        if key not in reports:
            lk, rep = _compare_link(key[0], key[1], ref_of[key[0]], ref_of[key[1]], options)
            links[key] = lk
            reports[key] = rep
        return links[key].related

    for i, big in enumerate(comps):
        for j in range(i + 1, len(comps)):
            if not any(run(r, q) for r in roots[j] for q in roots[i]):
                continue
            for r in roots[j]:
                for m in big:
                    run(r, m)
    return reports


def _orient_disguised(links: dict[tuple[str, str], Link], canonical: set[tuple[str, str]],
                      size: Mapping[str, int]) -> dict[tuple[str, str], Link]:
    """Links found by the canonical comparison, between components of the clean-link graph.

    The model in the larger component (the basis most of the family shares) is the parent:
    the other one is the re-parameterised side.  Between equally large components (e.g. two
    disguised copies) the link is made slightly longer (:data:`DISGUISED_PAIR_COST`), so that
    such copies hang from a model in the family's own basis rather than from one another.
    """
    out = {}
    for key, lk in links.items():
        if key in canonical and lk.related:
            sa, sb = size.get(lk.a, 1), size.get(lk.b, 1)
            if sa != sb:
                lk = replace(lk, parent=lk.a if sa > sb else lk.b, confidence=max(lk.confidence, 0.9))
            else:
                lk = replace(lk, distance=lk.distance + DISGUISED_PAIR_COST)
        out[key] = lk
    return out


_BLOCK_ROLE = re.compile(r"^L\d+\.")


def retained_share(p: Mapping[str, torch.Tensor], x: Mapping[str, torch.Tensor],
                   y: Mapping[str, torch.Tensor]) -> float | None:
    """How much of ``x``'s update over ``p`` is in ``y``: ⟨y − p, x − p⟩ / ‖x − p‖² (float64 over
    the transformer-block matrices all three share with one shape).  ~1 or more when ``y`` was trained from ``x``
    (it carries x's whole update, idiosyncratic part included); well below 1 for a sibling of
    ``x`` (both trained from ``p``: only their common drift is shared).  None without overlap."""
    uu = uv = 0.0
    for r, t in x.items():
        if not _BLOCK_ROLE.match(r):
            continue  # embeddings move with token frequencies: a drift all training shares
        if t.dim() != 2 or r not in p or r not in y or p[r].shape != t.shape or y[r].shape != t.shape:
            continue
        p0 = p[r].double()
        u = t.double() - p0
        uu += float((u * u).sum())
        uv += float((u * (y[r].double() - p0)).sum())
    return uv / uu if uu > 0 else None


def sibling_penalties(links: Mapping[tuple[str, str], Link], roles: Mapping[str, Mapping[str, torch.Tensor]],
                      canonical: set[tuple[str, str]]) -> dict[tuple[str, str], float]:
    """Extra costs of parent → child edges that pass for chains but join siblings.

    For an element-wise link x → y (oriented so, or undecided, and not one-way) with a common
    relative p that the evidence makes x's parent and that is related to y, ``y`` must keep most
    of x's update over p.  Two quantised copies of one model (each a grid child of it) are
    siblings too: re-quantising a quantised copy reproduces it, so which one came first is not
    in the weights, and the tree attaches both to the higher-precision model.  (Not so for other
    one-way evidence: a pruned model fine-tuned under its mask is the pruned model's child.)
    """
    def get(a: str, b: str) -> Link | None:
        return links.get((a, b)) or links.get((b, a))

    def found_canonically(a: str, b: str) -> bool:
        return (a, b) in canonical or (b, a) in canonical

    names = sorted({n for k in links for n in k})
    grid_parent: dict[str, set[str]] = {n: set() for n in names}
    for (a, b), lk in links.items():
        if lk.related and lk.decided_by == "grid" and lk.parent is not None and (a, b) not in canonical:
            grid_parent[b if lk.parent == a else a].add(lk.parent)
    out: dict[tuple[str, str], float] = {}
    for key, lk in links.items():
        if not lk.related or lk.one_way or lk.between or key in canonical:
            continue
        x0, y0 = key
        if grid_parent[x0] & grid_parent[y0]:
            out[(x0, y0)] = out[(y0, x0)] = SIBLING_PENALTY
            continue
        for x, y in ((x0, y0), (y0, x0)):
            if lk.parent not in (None, x) or x not in roles or y not in roles:
                continue
            ps = []
            for p in names:
                if p in (x, y) or p not in roles:
                    continue
                lpx, lpy = get(p, x), get(p, y)
                if (lpx is None or lpy is None or not lpx.related or not lpy.related or lpx.parent != p
                        or lpx.between or lpy.parent == y):
                    continue
                if found_canonically(p, x) or found_canonically(p, y):
                    continue
                ps.append((lpx.distance, p))
            if not ps:
                continue
            p = min(ps)[1]
            kept = retained_share(roles[p], roles[x], roles[y])
            if kept is not None and kept < CHAIN_RETAINED:
                log.debug("sibling, not chain: %s keeps %.2f of %s's update over %s", y, kept, x, p)
                out[(x, y)] = SIBLING_PENALTY
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
