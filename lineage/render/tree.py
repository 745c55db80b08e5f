"""Drawing a :class:`~lineage.tree.Tree`: indented text, and a self-contained HTML/SVG page.

Only what is known is drawn: a directed edge (an arrow) where evidence gave a direction, a plain
line where it did not (fingerprint links, siblings), a merge child joined to each of its parents
(dashed for the further ones) with its merge type.  Edge labels sit beside their edge on a white
halo, names are drawn in full, and a legend explains colours and line styles.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from typing import Any

from lineage.render.plots import page
from lineage.render.pvalue import format_p
from lineage.tree import Edge, Tree

COLOURS = {"fine-tune": "#1f77b4", "lora merge": "#2ca02c", "quantised copy": "#9467bd",
           "continued pre-training": "#d62728", "merge": "#ff7f0e", "pruned": "#8c564b",
           "identical": "#7f7f7f", "sibling": "#17becf", "related": "#555555"}
UNDIRECTED_NOTE = ("undirected: the evidence gives no direction (fingerprint links without --confirm, or "
                   "siblings); the model such a family is drawn from is not claimed to be its root")


def _merge_name(e: Edge) -> str:
    return f"merge ({e.merge_method})" if e.merge_method else "merge"


def _absent(e: Edge) -> str:
    return f"; {', '.join(e.absent_parents)} not among the models" if e.absent_parents else ""


def _label(e: Edge) -> str:
    if e.relation == "merge":
        return (f"{_merge_name(e)} of {' + '.join((e.parent, *e.other_parents, *e.absent_parents))}"
                f"{_absent(e)}, d={e.distance:.3g}")
    return f"{e.relation}{'' if e.directed else ', undirected'}, d={e.distance:.3g}"


def render_text(tree: Tree) -> str:
    """Indented text drawing, one family after another (no trailing newline)."""
    lines: list[str] = []

    def walk(node: str, prefix: str, last: bool, edge: Edge | None, top: bool) -> None:
        label = node if edge is None else f"{node}  [{_label(edge)}]"
        lines.append(label if top else f"{prefix}{'└── ' if last else '├── '}{label}")
        kids = sorted((e for e in tree.edges if e.parent == node), key=lambda e: e.child)
        sub = prefix if top else prefix + ("    " if last else "│   ")
        for i, e in enumerate(kids):
            walk(e.child, sub, i == len(kids) - 1, e, False)

    for r in tree.roots:
        walk(r, "", True, None, True)
    if any(not e.directed for e in tree.edges):
        lines.append(f"({UNDIRECTED_NOTE})")
    return "\n".join(lines)


def _layout(tree: Tree) -> dict[str, tuple[float, int]]:
    pos: dict[str, tuple[float, int]] = {}
    slot = [0.0]

    def place(node: str, depth: int) -> float:
        kids = tree.children_of(node)
        if not kids:
            x = slot[0]
            slot[0] += 1
        else:
            xs = [place(k, depth + 1) for k in kids]
            x = (xs[0] + xs[-1]) / 2
        pos[node] = (x, depth)
        return x

    for r in tree.roots:
        place(r, 0)
        slot[0] += 0.3
    return pos


def _p_lookup(pairs: Sequence[Mapping[str, Any]] | None) -> dict[frozenset[str], float]:
    out: dict[frozenset[str], float] = {}
    for p in pairs or ():
        if p.get("log10_p") is not None:
            out[frozenset((str(p["a"]), str(p["b"])))] = float(p["log10_p"])
    return out


def _legend(relations: Sequence[str], any_undirected: bool, any_merge: bool, any_directed: bool = True) -> str:
    e = html.escape
    items = [f'<span class="key"><svg width="34" height="10"><line x1="0" y1="5" x2="34" y2="5" '
             f'stroke="{COLOURS.get(r, "#555")}" stroke-width="3"/></svg>{e(r)}</span>' for r in relations]
    if any_directed:
        items.append('<span class="key"><svg width="34" height="10"><line x1="0" y1="5" x2="28" y2="5" stroke="#333" '
                     'stroke-width="2" marker-end="url(#arr)"/></svg>parent → child (direction from evidence)</span>')
    if any_undirected:
        items.append('<span class="key"><svg width="34" height="10"><line x1="0" y1="5" x2="34" y2="5" stroke="#333" '
                     'stroke-width="2"/></svg>undirected (no direction evidence)</span>')
    if any_merge:
        items.append('<span class="key"><svg width="34" height="10"><line x1="0" y1="5" x2="34" y2="5" stroke="#333" '
                     'stroke-width="2" stroke-dasharray="5,4"/></svg>further parent of a merge</span>')
    return '<div class="legend">' + "".join(items) + "</div>"


def _svg_label(ed: Edge, pvals: Mapping[frozenset[str], float]) -> str:
    """An edge's label in the drawing: relation (merge type, absent parents), direction, p-value."""
    label = (_merge_name(ed) if ed.relation == "merge" else ed.relation) + ("" if ed.directed else " (undirected)")
    if ed.absent_parents:
        n = len(ed.absent_parents)
        label += f", + {n} parent{'s' if n > 1 else ''} not among the models"
    lp = pvals.get(frozenset((ed.parent, ed.child)), ed.log10_p)
    return label + (f", {format_p(lp)}" if lp is not None else "")


def _edge_svg(x1: float, y1: float, x2: float, y2: float, col: str, directed: bool, dashed: bool,
              label: str, title: str) -> list[str]:
    e = html.escape
    dash = ' stroke-dasharray="5,4"' if dashed else ""
    head = ' marker-end="url(#arr)"' if directed else ""
    out = [f'<g><title>{e(title)}</title><line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" '
           f'stroke="{col}" stroke-width="2"{dash}{head}/>']
    if label:
        # beside the edge's midpoint, on a white halo, so that the line never runs through the text
        mx, my = (x1 + x2) / 2, (y1 + y2) / 2
        dx = 8 if x2 >= x1 else -8
        anchor = "start" if x2 >= x1 else "end"
        out.append(f'<text x="{mx + dx:.1f}" y="{my + 4:.1f}" text-anchor="{anchor}" fill="{col}" '
                   f'paint-order="stroke" stroke="#fff" stroke-width="5" stroke-linejoin="round">{e(label)}</text>')
    out.append("</g>")
    return out


def render_html(tree: Tree, title: str = "lineage family tree",
                pairs: Sequence[Mapping[str, Any]] | None = None) -> str:
    """A self-contained HTML page: the tree as inline SVG, a legend, and the edge list with p-values.

    ``pairs`` (``a``, ``b``, ``relation``, ``log10_p``) add p-values to edge labels and tooltips.
    """
    e = html.escape
    pos = _layout(tree)
    pvals = _p_lookup(pairs)
    longest = max((len(n) for n in tree.nodes), default=4)
    box_w = max(90, int(longest * 7.2) + 20)
    labels = {id(ed): _svg_label(ed, pvals) for ed in tree.edges}
    # side margins leave room for the longest edge label (~6.6 px per character at 12 px sans-serif)
    reach = max((6.6 * len(t) + 24 for t in labels.values()), default=0.0)
    dx, dy, mx, my = box_w + 170, 110, box_w / 2 + 190, 40
    width = int(max((x for x, _ in pos.values()), default=0) * dx + mx + box_w / 2 + max(190.0, reach))
    height = int(max((d for _, d in pos.values()), default=0) * dy + 2 * my)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'font-family="sans-serif" font-size="12" role="img" aria-label="{e(title)}">']

    def xy(n: str) -> tuple[float, float]:
        x, d = pos[n]
        return mx + x * dx, my + d * dy

    for ed in tree.edges:
        (x1, y1), (x2, y2) = xy(ed.parent), xy(ed.child)
        col = COLOURS.get(ed.relation, "#555")
        lp = pvals.get(frozenset((ed.parent, ed.child)), ed.log10_p)
        ptxt = f", {format_p(lp)}" if lp is not None else ""
        parts += _edge_svg(x1, y1 + 14, x2, y2 - 16, col, ed.directed, False, labels[id(ed)],
                           f"{ed.parent} → {ed.child}: {_label(ed)}{ptxt}")
        for q in ed.other_parents:
            if q in pos:
                (x3, y3) = xy(q)
                parts += _edge_svg(x3, y3 + 14, x2, y2 - 16, col, True, True, "",
                                   f"{q} → {ed.child}: further parent of the merge")
    for n in tree.nodes:
        x, y = xy(n)
        parts.append(f'<g><title>{e(n)}</title><rect x="{x - box_w / 2:.1f}" y="{y - 14:.1f}" width="{box_w}" '
                     f'height="28" rx="6" fill="#f4f6fa" stroke="#333"/>'
                     f'<text x="{x:.1f}" y="{y + 4:.1f}" text-anchor="middle">{e(n)}</text></g>')
    parts.append("</svg>")
    defs = ('<svg width="0" height="0" style="position:absolute"><defs><marker id="arr" viewBox="0 0 10 10" '
            'refX="10" refY="5" markerWidth="7" markerHeight="7" orient="auto-start-reverse">'
            '<path d="M0,0 L10,5 L0,10 z" fill="#444"/></marker></defs></svg>')
    rels = sorted({ed.relation for ed in tree.edges})
    body = [f"<h1>{e(title)}</h1>", defs,
            f"<p>{len(tree.nodes)} models in {len(tree.roots)} "
            f"famil{'y' if len(tree.roots) == 1 else 'ies'}; {len(tree.edges)} links.</p>",
            _legend(rels, any(not ed.directed for ed in tree.edges), any(ed.other_parents for ed in tree.edges),
                    any(ed.directed for ed in tree.edges)),
            f'<div class="tree">{"".join(parts)}</div>']
    if any(not ed.directed for ed in tree.edges):
        body.append(f"<p class='muted'>{e(UNDIRECTED_NOTE)}.</p>")
    body.append(_edge_table(tree, pvals))
    style = ('<style>.legend{margin:0.5em 0 1em;font-size:12px}.key{display:inline-block;margin-right:1.4em}'
             '.key svg{vertical-align:middle;margin-right:0.4em}.tree{overflow-x:auto}</style>')
    return page(title, style + "\n".join(body))


def _edge_table(tree: Tree, pvals: Mapping[frozenset[str], float]) -> str:
    e = html.escape
    rows = ["<h3>Links</h3><table><tr><th class='l'>link</th><th class='l'>relation</th>"
            "<th>direction</th><th>distance</th><th>p-value</th></tr>"]
    for ed in tree.edges:
        lp = pvals.get(frozenset((ed.parent, ed.child)), ed.log10_p)
        parents = " + ".join((ed.parent, *ed.other_parents, *(f"{x} (not among the models)" for x in ed.absent_parents)))
        link = f"{parents} → {ed.child}" if ed.directed else f"{ed.parent} — {ed.child}"
        direction = ("model card (a parent not here)" if ed.absent_parents else "from evidence") if ed.directed \
            else "unknown"
        relation = _merge_name(ed) if ed.relation == "merge" else ed.relation
        rows.append(f"<tr><td class='l'>{e(link)}</td><td class='l'>{e(relation)}</td>"
                    f"<td>{direction}</td><td>{ed.distance:.3g}</td>"
                    f"<td>{e(format_p(lp)) if lp is not None else '—'}</td></tr>")
    rows.append("</table>")
    if not tree.edges:
        return "<p>No links: every model stands alone.</p>"
    return "".join(rows)




