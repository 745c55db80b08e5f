"""Self-contained HTML rendering of a compare report (inline SVG plots, no network)."""

from __future__ import annotations

import html
from collections import defaultdict
from typing import Any

from lineage.plots import line_chart, page
from lineage.report import Report
from lineage.render_text import GRID_KINDS, meaningful_transforms


def _f(x: float | None, spec: str = ".4f") -> str:
    return "—" if x is None else format(x, spec)


def _anatomy_html(anatomy: dict[str, Any]) -> list[str]:
    e = html.escape
    d = anatomy.get("details", {}) or {}
    out = []
    re_ = d.get("realigned")
    if re_:
        out.append(f"<p>Realigned onto A: ‖B − A‖/‖A‖ {float(re_['raw_rel']):.3g} as stored, "
                   f"{float(re_['aligned_rel']):.3g} after undoing the transforms.</p>")
    lr = d.get("lowrank") or {}
    statuses, ranks = lr.get("statuses") or {}, lr.get("ranks") or {}
    if statuses:
        out.append("<h3>Per-module change</h3><table><tr><th class='l'>module</th><th class='l'>change</th>"
                   "<th>rank</th></tr>")
        for mod, st in statuses.items():
            out.append(f"<tr><td class='l'>{e(mod)}</td><td class='l'>{e(str(st))}</td>"
                       f"<td>{e(str(ranks.get(mod, '')))}</td></tr>")
        out.append("</table>")
    return out


def _merge_html(m: dict[str, Any]) -> list[str]:
    e = html.escape
    verdict = "explains B" if m.get("explains") else "does not explain B"
    base = f"relative to base {e(str(m['base']))}" if m.get("base") else "on the raw weights"
    out = [f"<h3>Merge fit</h3><p>{e(str(m.get('method')))} {base}; residual {float(m.get('residual') or 0):.3g}: "
           f"{verdict}.</p><table><tr><th class='l'>parent</th><th>weight</th><th>± spread</th></tr>"]
    for p, w, sd in zip(m.get("parents", []), m.get("weights", []), m.get("weights_std", [])):
        out.append(f"<tr><td class='l'>{e(str(p))}</td><td>{float(w):.3f}</td><td>{float(sd):.3f}</td></tr>")
    out.append("</table>")
    if m.get("t") is not None:
        out.append(f"<p>SLERP t = {float(m['t']):.3f} ± {float(m.get('t_std') or 0):.3f}</p>")
    return out


def render_html(report: Report) -> str:
    """The report as one HTML page with similarity-by-layer plots."""
    e = html.escape
    v = report.verdict
    cls = {True: "derived", False: "unrelated", None: "inconclusive"}[v.derived]
    p = "—" if v.log10_p is None else (f"{v.p_value:.3g}" if v.log10_p > -4 else f"10^{v.log10_p:.1f}")
    body = [f"<h1>lineage: {e(report.a.ref)} vs {e(report.b.ref)}</h1>"]
    body.append(f'<h2 class="{cls}">{e(v.relation)} <small>(p = {e(p)})</small></h2>')
    body.append(f"<p>{e(v.summary)}</p><p class='muted'>Null: {e(v.null)}</p>")
    moved = meaningful_transforms(report.canon.get("transforms", []) or []) if report.canon else []
    if moved:
        body.append("<p>Transforms undone: " + "; ".join(e(str(t)) for t in moved) + "</p>")
    if report.anatomy and report.anatomy.get("summary"):
        body.append(f"<p>Anatomy: {e(str(report.anatomy['summary']))}</p>")
        body.extend(_anatomy_html(report.anatomy))
    if report.merge:
        body.extend(_merge_html(report.merge))
    series: dict[str, list[tuple[float, float | None]]] = defaultdict(list)
    cos_series: dict[str, list[tuple[float, float | None]]] = defaultdict(list)
    for row in report.layers:
        if row.layer is not None and row.kind in GRID_KINDS and row.role.endswith(".weight"):
            series[row.kind].append((row.layer, row.pearson))
            cos_series[row.kind].append((row.layer, row.cosine))
    if series:
        body.append(
            line_chart(series, title="Pearson correlation by layer and role", xlabel="layer",
                       ylabel="Pearson r", y_range=(min(-0.05, min((y for s in series.values() for _, y in s if y is not None), default=0)), 1.0))
        )
        body.append(
            line_chart(cos_series, title="Cosine similarity by layer and role", xlabel="layer",
                       ylabel="cosine", y_range=(min(-0.05, min((y for s in cos_series.values() for _, y in s if y is not None), default=0)), 1.0))
        )
    body.append("<h3>Models</h3><table><tr><th class='l'>side</th><th class='l'>reference</th><th>format</th><th>tensors</th><th>bytes</th><th>bytes read</th><th class='l'>architecture</th></tr>")
    for side, m in (("A", report.a), ("B", report.b)):
        arch = f"{m.family or '?'}, {m.n_layers} layers, hidden {m.hidden}"
        body.append(
            f"<tr><td class='l'>{side}</td><td class='l'>{e(m.ref)}</td><td>{e(m.format)}</td><td>{m.n_tensors}</td>"
            f"<td>{m.total_bytes:,}</td><td>{m.bytes_read:,}</td><td class='l'>{e(arch)}</td></tr>"
        )
    body.append("</table>")
    if report.findings:
        body.append("<h3>Findings</h3><ul>")
        for f in report.findings:
            body.append(f"<li><b>{e(f.severity)}</b> {e(f.model or '')} {e(f.tensor or '')}: {e(f.message)}</li>")
        body.append("</ul>")
    body.append("<h3>Per tensor</h3><table><tr><th class='l'>role</th><th class='l'>A tensor</th><th>shape</th>"
                "<th>cosine</th><th>pearson</th><th>rel L2</th><th>evidence</th></tr>")
    for r in report.layers:
        body.append(
            f"<tr><td class='l'>{e(r.role)}</td><td class='l'>{e(r.tensor_a)}</td><td>{'×'.join(map(str, r.shape_a))}</td>"
            f"<td>{_f(r.cosine)}</td><td>{_f(r.pearson)}</td><td>{_f(r.rel_l2, '.3g')}</td>"
            f"<td>{'yes' if r.evidence else 'no'}</td></tr>"
        )
    body.append("</table>")
    if report.only_a or report.only_b:
        body.append(f"<p>Unpaired: {len(report.only_a)} tensors only in A, {len(report.only_b)} only in B.</p>")
    return page(f"lineage: {report.a.ref} vs {report.b.ref}", "\n".join(body))
