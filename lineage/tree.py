"""Family trees from pairwise relatedness and direction evidence.

Each model is a node; a virtual root connects to every node at a cost higher
than any related edge, so every family gets exactly one root.  For a related
pair (u, v) with distance d (smaller = closer, e.g. the relative delta norm) the
candidate edges u→v and v→u both cost d, plus ``direction_weight · confidence``
on the edge that goes *against* the direction evidence.  The minimum spanning
arborescence (Chu–Liu/Edmonds, implemented here) then picks one parent per
model.  Unrelated pairs have no edge, so unrelated families become separate
trees under the virtual root.

Output: :class:`Tree` with typed edges and ``to_dict()``; :mod:`lineage.render.tree` draws it
(indented text, a self-contained SVG page).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

log = logging.getLogger(__name__)

ROOT = "__root__"
#: Relation of an undirected link between two models neither of which looks like the other's
#: ancestor (a common ancestor outside the set): drawn as siblings, never as a derivation.
SIBLING = "sibling"
#: Extra cost (× direction_weight) of an edge whose link is ``between``.
BETWEEN_PENALTY = 0.5


@dataclass(frozen=True)
class Link:
    """Pairwise evidence between models ``a`` and ``b``."""

    a: str
    b: str
    related: bool
    distance: float
    parent: str | None = None      # name of the side believed to be the parent, or None
    confidence: float = 0.0        # of the direction, in [0, 1]
    relation: str = "related"      # edge type (fine-tune, lora merge, quantised copy, ...)
    #: neither side looks like an independent-update ancestor of the other (siblings, or a merge
    #: seen from one of its parents): see ``lineage.signals.direction.BETWEEN_RATIO``
    between: bool = False
    #: the direction rests on one-way evidence (grid, precision, sparsity, shape surgery)
    one_way: bool = False
    #: which evidence decided the direction (e.g. "grid", "variance_growth"), when known
    decided_by: str | None = None
    #: log10 p-value of the relatedness test behind the link, when known
    log10_p: float | None = None


@dataclass(frozen=True)
class Edge:
    parent: str
    child: str
    relation: str
    distance: float
    confidence: float
    #: further parents of a merge child (``relation == "merge"``); ``parent`` is the main one
    other_parents: tuple[str, ...] = ()
    #: False when no evidence says which side is the parent (e.g. fingerprint links, siblings):
    #: the edge joins the two models but ``parent``/``child`` is only the drawing order
    directed: bool = True
    #: log10 p-value of the link's relatedness test, when known
    log10_p: float | None = None
    #: parents of a merge child that are not among the models (named by a claim, e.g. its model card)
    absent_parents: tuple[str, ...] = ()
    #: how a merge child was merged (linear, slerp, ties, …) when the merge fit says so
    merge_method: str | None = None

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class Tree:
    nodes: tuple[str, ...]
    roots: tuple[str, ...]
    edges: tuple[Edge, ...]
    cost: float = 0.0
    families: tuple[tuple[str, ...], ...] = field(default_factory=tuple)

    def parent_of(self, name: str) -> str | None:
        for e in self.edges:
            if e.child == name:
                return e.parent
        return None

    def children_of(self, name: str) -> list[str]:
        return sorted(e.child for e in self.edges if e.parent == name)

    def to_dict(self) -> dict[str, object]:
        return {"nodes": list(self.nodes), "roots": list(self.roots),
                "edges": [e.to_dict() for e in self.edges], "cost": self.cost,
                "families": [list(f) for f in self.families]}


# ----------------------------------------------------------------------------- Chu–Liu/Edmonds


def min_arborescence(nodes: Sequence[str], edges: Mapping[tuple[str, str], float], root: str
                     ) -> dict[str, str]:
    """Minimum-cost spanning arborescence rooted at ``root``.

    ``edges`` maps (u, v) to the cost of u → v.  Returns ``child -> parent`` for
    every node except the root.  Raises ValueError when some node is unreachable.
    """
    nodes = list(nodes)
    # best incoming edge for each node
    best: dict[str, tuple[float, str]] = {}
    for (u, v), c in edges.items():
        if v == root or u == v:
            continue
        if v not in best or c < best[v][0] or (c == best[v][0] and u < best[v][1]):
            best[v] = (c, u)
    for v in nodes:
        if v != root and v not in best:
            raise ValueError(f"min_arborescence: node {v!r} has no incoming edge")
    parent = {v: best[v][1] for v in best}
    # find a cycle
    cycle = None
    for start in nodes:
        seen = []
        v = start
        while v != root and v not in seen and v in parent:
            seen.append(v)
            v = parent[v]
        if v != root and v in seen:
            cycle = seen[seen.index(v):]
            break
    if cycle is None:
        return parent
    cyc = set(cycle)
    new = f"__cycle{len(nodes)}_{cycle[0]}__"
    contracted: dict[tuple[str, str], float] = {}
    origin: dict[tuple[str, str], tuple[str, str]] = {}
    for (u, v), c in edges.items():
        if u in cyc and v in cyc:
            continue
        if v in cyc:
            key, cost = (u, new), c - best[v][0]
        elif u in cyc:
            key, cost = (new, v), c
        else:
            key, cost = (u, v), c
        if key not in contracted or cost < contracted[key]:
            contracted[key] = cost
            origin[key] = (u, v)
    sub_nodes = [x for x in nodes if x not in cyc] + [new]
    sub = min_arborescence(sub_nodes, contracted, root)
    result: dict[str, str] = {}
    for v, p in sub.items():
        u0, v0 = origin[(p, v)]
        if v == new:
            result[v0] = u0          # the edge entering the cycle
        else:
            result[v] = u0 if p == new else p
    for v in cycle:
        if v not in result:
            result[v] = parent[v]
    return result


# ----------------------------------------------------------------------------- build


def build_tree(
    names: Sequence[str],
    pairwise: Sequence[Link] | Mapping[tuple[str, str], Link],
    *,
    direction_weight: float = 1.0,
    root_cost: float | None = None,
    merges: Mapping[str, Sequence[str]] | None = None,
    penalties: Mapping[tuple[str, str], float] | None = None,
    merge_methods: Mapping[str, str] | None = None,
) -> Tree:
    """Family tree of ``names`` from pairwise :class:`Link` evidence.

    ``merges`` maps a model found to be a merge (see :func:`lineage.signals.direction.between`)
    to its parents, main parent first: its only candidate parents are then those, and its edge
    is typed "merge" with the others in ``Edge.other_parents``.  Parents that are not among
    ``names`` (a merge claimed by a model card whose other parent was not scanned) go to
    ``Edge.absent_parents``; the merge hangs from its present parents only, never from a model
    in between.  ``merge_methods`` names the merge type per child.  ``penalties`` adds a cost to
    single directed edges ``(parent, child)`` (e.g. a chain that a three-model test rejects).
    """
    penalties = dict(penalties or {})
    links = list(pairwise.values()) if isinstance(pairwise, Mapping) else list(pairwise)
    names = list(dict.fromkeys(names))
    known = set(names)
    absent = {c: tuple(p for p in ps if p not in known) for c, ps in (merges or {}).items() if c in known}
    merges = {c: tuple(p for p in ps if p in known) for c, ps in (merges or {}).items() if c in known}
    merges = {c: ps for c, ps in merges.items() if ps}  # no parent present: nothing to hang it from
    edges: dict[tuple[str, str], float] = {}
    info: dict[tuple[str, str], Link] = {}
    rel = [lk for lk in links if lk.related and lk.a in known and lk.b in known and lk.a != lk.b]
    top = max((lk.distance + direction_weight for lk in rel), default=1.0)
    rc = root_cost if root_cost is not None else 10.0 * top + 1.0
    for lk in rel:
        for u, v in ((lk.a, lk.b), (lk.b, lk.a)):
            c = lk.distance
            if lk.parent is not None and lk.parent != u:
                c += direction_weight * lk.confidence
            elif lk.parent is None:
                c += 0.5 * direction_weight * 1e-3  # undecided: keep ties deterministic
            if lk.between:
                # neither side is an independent-update ancestor of the other (siblings, or a
                # merge seen from one parent): a poor parent → child edge in both orientations
                c += BETWEEN_PENALTY * direction_weight
            if v in merges and u not in merges[v]:
                continue  # a merge child's parents are known
            if u in merges and v in merges[u]:
                continue  # … and it is not their parent
            if v in merges:
                c = lk.distance * (1.0 if u == merges[v][0] else 1.5)
            else:
                c += penalties.get((u, v), 0.0)
            if (u, v) not in edges or c < edges[(u, v)]:
                edges[(u, v)] = c
                info[(u, v)] = lk
    # root edges: prefer as family root the model that the evidence calls a parent most
    for v in names:
        as_child = sum(lk.confidence for lk in rel if lk.parent is not None and v in (lk.a, lk.b)
                       and lk.parent != v)
        edges[(ROOT, v)] = rc + direction_weight * as_child
    par = min_arborescence([ROOT] + names, edges, ROOT)
    out_edges = []
    roots = []
    cost = 0.0
    for v in names:
        p = par[v]
        cost += edges[(p, v)]
        if p == ROOT:
            roots.append(v)
            continue
        lk = info[(p, v)]
        if v in merges:
            out_edges.append(Edge(p, v, "merge", lk.distance, max(lk.confidence, 0.9),
                                  tuple(x for x in merges[v] if x != p), log10_p=lk.log10_p,
                                  absent_parents=absent.get(v, ()),
                                  merge_method=(merge_methods or {}).get(v)))
            continue
        sibling = lk.parent is None and (lk.between or lk.relation == SIBLING)
        # two parents of one merge joined directly: the merge fit took them as co-parents (a model is
        # not merged with its own parent), so only one-way evidence may make one the other's parent
        sibling = sibling or (not lk.one_way and any({p, v} <= set(ps) for ps in merges.values()))
        out_edges.append(Edge(p, v, SIBLING if sibling else lk.relation, lk.distance,
                              0.0 if sibling or lk.parent is None else lk.confidence if lk.parent == p
                              else -lk.confidence, directed=lk.parent is not None and not sibling,
                              log10_p=lk.log10_p))
    fams = []
    for r in roots:
        fam, stack = [], [r]
        while stack:
            x = stack.pop()
            fam.append(x)
            stack.extend(e.child for e in out_edges if e.parent == x)
        fams.append(tuple(sorted(fam)))
    log.debug("tree: %d nodes, %d roots, cost %.4g", len(names), len(roots), cost)
    return Tree(tuple(names), tuple(roots), tuple(out_edges), cost - rc * len(roots), tuple(fams))
