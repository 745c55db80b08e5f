"""Self-contained HTML rendering of a compare report (inline SVG plots, no network)."""

from __future__ import annotations

import html
from collections import defaultdict
from typing import Any

from lineage.render.plots import mpl_line_chart, page
from lineage.render.pvalue import format_p
from lineage.report import Report
from lineage.render.text import GRID_KINDS, aligned_rows, canonical_decided, meaningful_transforms, summary_text

#: What no weight comparison can tell, said in every summary.
LIMITS = ("what data a model was trained on, or how it behaves; only that its weights descend (or not) "
          "from the other's", "a model re-trained from scratch on the other's outputs (distillation) "
          "shares no weights and reads as unrelated")


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
        kind = str(lr.get("kind") or "")
        overall = {"dense": "every module changed with some structure but no common low rank: read together "
                            "they are a structured dense update (a fine-tune), not a LoRA",
                   "low-rank": f"a common low rank ({lr.get('rank')}) across the changed modules: a merged "
                               "low-rank adapter"}.get(kind, kind)
        out.append("<h3>Per-module change</h3>"
                   f"<p class='muted'>Each changed module's spectrum; overall reading: {e(overall)}.</p>"
                   "<table><tr><th class='l'>module</th><th class='l'>change</th><th>rank estimate</th></tr>")
        for mod, st in statuses.items():
            label = str(st)
            if kind == "dense" and label == "low-rank":
                label = "structured (part of a dense update)"
            out.append(f"<tr><td class='l mono'>{e(mod)}</td><td class='l'>{e(label)}</td>"
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


def _strength(report: Report) -> str:
    v = report.verdict
    lp = v.log10_p
    if lp is None:
        return "No test could be run (see the findings below)."
    if v.derived:
        return (f"{format_p(lp)}: the chance of weights this similar between two independently initialised "
                f"models. Anything below 0.001 is called derived.")
    if v.derived is False:
        return (f"{format_p(lp)}: no more similarity than between independently trained models (a large "
                f"p-value is no proof of independence).")
    return f"{format_p(lp)}: between the thresholds; not enough evidence either way."


def _summary_html(report: Report) -> list[str]:
    e = html.escape
    v = report.verdict
    moved = meaningful_transforms(report.canon.get("transforms", []) or []) if report.canon else []
    direction = ""
    if report.anatomy:
        parent = report.anatomy.get("parent")
        direction = {"a": " A is the parent.", "b": " B is the parent."}.get(str(parent), " Which one is the parent is not decided.") if v.derived else ""
    items = [
        ("What was compared", f"A = <code>{e(report.a.ref)}</code> (reference) and B = <code>{e(report.b.ref)}</code>, "
                              "from their weights alone."),
        ("Verdict", f"<b>{e(v.relation)}</b>.{e(direction)}"),
        ("How strong", e(_strength(report))),
        ("What was undone", "; ".join(e(t) for t in moved) if moved else "nothing: the weights were compared as stored."),
        ("What this cannot see", "; ".join(e(x) for x in LIMITS) + "."),
    ]
    out = ['<section class="summary"><h2>Summary</h2><dl>']
    out += [f"<dt>{k}</dt><dd>{val}</dd>" for k, val in items]
    out.append("</dl></section>")
    return out


def _series(report: Report, field: str) -> dict[str, list[tuple[float, float | None]]]:
    out: dict[str, list[tuple[float, float | None]]] = defaultdict(list)
    for row in report.layers:
        if row.layer is not None and row.kind in GRID_KINDS and row.role.endswith(".weight"):
            out[row.kind].append((row.layer, getattr(row, field)))
    return {k: out[k] for k in GRID_KINDS if k in out}


def _evidence_html(report: Report) -> list[str]:
    e = html.escape
    out = ["<h2>Evidence</h2>"]
    if canonical_decided(report):
        names, rows = aligned_rows(report)
        aligned = {n: [(r["layer"], r["r"].get(n)) for r in rows] for n in names}
        raw = {"raw element-wise (median)": [(r["layer"], r["raw"]) for r in rows]}
        moved = meaningful_transforms(report.canon.get("transforms", []) or []) if report.canon else []
        how = ("after undoing the permutations, rotations and rescalings listed above" if moved
               else "after aligning neurons, heads and the residual basis (nothing needed undoing)")
        out.append(f"<p>The <b>canonical test decided</b>: the matrices were compared {how}. Plotted: the "
                   "aligned correlation per layer and role, with the raw element-wise Pearson (what a naive "
                   "comparison sees) for contrast.</p>")
        out.append(f'<figure class="plot">{mpl_line_chart({**aligned, **raw}, title="Aligned correlation by layer", ylabel="correlation r", hline=0.0)}'
                   "<figcaption>Aligned r per role (attn.ov: per-head value→output maps; mlp.down: matched "
                   "neurons) and the raw element-wise median.</figcaption></figure>")
        out.append("<table><tr><th>layer (A→B)</th>" + "".join(f"<th>{e(n)} aligned r</th>" for n in names)
                   + "<th>layer p</th><th>raw r (secondary)</th></tr>")
        for r in rows:
            out.append(f"<tr><td>{r['layer']}→{r['layer_b']}</td>"
                       + "".join(f"<td>{_f(r['r'].get(n))}</td>" for n in names)
                       + f"<td>{e(format_p(r['log10_p']))}</td><td class='muted'>{_f(r['raw'])}</td></tr>")
        out.append("</table>")
        return out
    pear, cos = _series(report, "pearson"), _series(report, "cosine")
    if pear:
        out.append("<p>The element-wise test decided: corresponding weight matrices compared as stored.</p>")
        out.append(f'<figure class="plot">{mpl_line_chart(pear, title="Pearson correlation by layer and role", ylabel="Pearson r")}</figure>')
        out.append(f'<figure class="plot">{mpl_line_chart(cos, title="Cosine similarity by layer and role", ylabel="cosine")}</figure>')
    return out


def _models_html(report: Report) -> list[str]:
    e = html.escape
    out = ["<h3>Models</h3><table><tr><th class='l'>side</th><th class='l'>reference</th><th>format</th>"
           "<th>tensors</th><th>size (bytes)</th><th>bytes read<sup>*</sup></th><th class='l'>architecture</th></tr>"]
    for side, m in (("A", report.a), ("B", report.b)):
        arch = f"{m.family or '?'}, {m.n_layers} layers, hidden {m.hidden}"
        out.append(f"<tr><td class='l'>{side}</td><td class='l'>{e(m.ref)}</td><td>{e(m.format)}</td><td>{m.n_tensors}</td>"
                   f"<td>{m.total_bytes:,}</td><td>{m.bytes_read:,}</td><td class='l'>{e(arch)}</td></tr>")
    out.append("</table><p class='muted'><sup>*</sup> bytes read: weight bytes the comparison read from "
               "each side, counting every pass (streaming statistics, then the tensors the alignment and anatomy "
               "re-read), so it can exceed the size; remote models are read by range, only what the evidence needs.</p>")
    return out


def _checked(f: object) -> str:
    """How a provenance file record's digest relates to the bytes read."""
    status, source = getattr(f, "status", None), getattr(f, "digest_source", None)
    if getattr(f, "repo_id", None) is None:
        return "hashed here" if getattr(f, "digest", None) else "not hashed"
    what = {"verified": "all bytes matched the Hub's", "partial": "read in part", "no-hash": "no Hub hash",
            "fetched": "fetched whole, hashed here"}
    return what.get(str(status), str(status or source or "not hashed"))


def _provenance_html(report: Report) -> list[str]:
    e = html.escape
    pv = report.provenance
    out = ["<h2>Provenance</h2>"]
    if pv is None:
        return out + ["<p>Not recorded (run without hashing): this report cannot be verified.</p>"]
    out.append(f"<p>Written by lineage {e(pv.version)} on {e(pv.created_utc)}. Re-run and check it with "
               f"<code>lineage verify REPORT.json</code> (the JSON form of this report). Files hashed with "
               f"{e(', '.join(sorted({f.algorithm.upper() for f in pv.files if f.digest})) or 'BLAKE3')} in a "
               f"{e(pv.hash_pass)} ({pv.hash_seconds:.2f} s). Local files: BLAKE3 of their bytes; Hub files: "
               f"repo, commit and the SHA-256 the Hub publishes, which the bytes read were checked against.</p>")
    out.append("<table><tr><th class='l'>side</th><th class='l'>file</th><th>size (bytes)</th><th class='l'>digest</th>"
               "<th class='l'>checked</th></tr>")
    for f in pv.files:
        wrap = " style='word-break:break-all'"
        out.append(f"<tr><td class='l'>{e(f.side)}</td><td class='l mono'{wrap}>{e(f.path)}</td><td>{f.size:,}</td>"
                   f"<td class='l mono'{wrap}>{e(f.algorithm)}:{e(f.digest or '(none)')}</td>"
                   f"<td class='l'>{e(_checked(f))}</td></tr>")
    out.append("</table>")
    opts = "; ".join(f"{k} = {v}" for k, v in pv.options.items())
    seeds = "; ".join(f"{k} = {v}" for k, v in pv.seeds.items())
    env = "; ".join(f"{k} {v}" for k, v in pv.environment.items())
    out.append(f"<p><b>Options</b>: {e(opts)}<br><b>Seeds</b>: {e(seeds)}<br><b>Environment</b>: {e(env)}</p>")
    return out


def render_html(report: Report) -> str:
    """The report as one self-contained HTML page: a plain-language summary first, then the evidence."""
    e = html.escape
    v = report.verdict
    cls = {True: "derived", False: "unrelated", None: "inconclusive"}[v.derived]
    body = [f"<h1>lineage: {e(report.a.ref)} vs {e(report.b.ref)}</h1>",
            f'<h2 class="{cls}">{e(v.relation)} <small>({e(format_p(v.log10_p))})</small></h2>']
    body.extend(_summary_html(report))
    body.append(f"<p>{e(summary_text(v.summary).split('; undone:')[0].rstrip('.'))}.</p>")  # the transforms are in the summary
    if report.anatomy and report.anatomy.get("summary"):
        body.append(f"<p>Anatomy: {e(str(report.anatomy['summary']))}</p>")
    body.extend(_evidence_html(report))
    if report.anatomy:
        body.extend(_anatomy_html(report.anatomy))
    if report.merge:
        body.extend(_merge_html(report.merge))
    body.extend(_models_html(report))
    if report.findings:
        body.append("<h3>Findings</h3><ul>")
        for f in report.findings:
            body.append(f"<li><b>{e(f.severity)}</b> {e(f.model or '')} {e(f.tensor or '')}: {e(f.message)}</li>")
        body.append("</ul>")
    body.append(f"<h3>Method</h3><p class='muted'>{e(v.method)}: {e(v.null)}</p>")
    body.extend(_provenance_html(report))
    body.append("<details><summary>Per tensor (element-wise, as stored)</summary><table><tr><th class='l'>role</th>"
                "<th class='l'>A tensor</th><th>shape</th><th>cosine</th><th>pearson</th><th>rel L2</th><th>evidence</th></tr>")
    for r in report.layers:
        body.append(
            f"<tr><td class='l'>{e(r.role)}</td><td class='l mono'>{e(r.tensor_a)}</td><td>{'×'.join(map(str, r.shape_a))}</td>"
            f"<td>{_f(r.cosine)}</td><td>{_f(r.pearson)}</td><td>{_f(r.rel_l2, '.3g')}</td>"
            f"<td>{'yes' if r.evidence else 'no'}</td></tr>"
        )
    body.append("</table></details>")
    if report.only_a or report.only_b:
        body.append(f"<p>Unpaired: {len(report.only_a)} tensors only in A, {len(report.only_b)} only in B.</p>")
    return page(f"lineage: {report.a.ref} vs {report.b.ref}", "\n".join(body))
