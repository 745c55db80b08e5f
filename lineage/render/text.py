"""Terminal rendering of a :class:`~lineage.report.Report` (plain text, optional ANSI colour)."""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

from lineage.render.pvalue import format_p
from lineage.report import Report, TensorRow

_COLOURS = {"green": "32", "red": "31", "yellow": "33", "dim": "2", "bold": "1", "cyan": "36"}

#: Columns of the per-layer grid, in display order.
GRID_KINDS = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down")


class Style:
    """Applies ANSI colour when enabled."""

    def __init__(self, colour: bool) -> None:
        self.colour = colour

    def __call__(self, text: str, *names: str) -> str:
        if not self.colour or not names:
            return text
        codes = ";".join(_COLOURS[n] for n in names)
        return f"\x1b[{codes}m{text}\x1b[0m"


def _fmt(x: float | None, spec: str = ".4f") -> str:
    return "—" if x is None else format(x, spec)


def _bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _pearson_style(style: Style, r: float | None, text: str) -> str:
    if r is None:
        return style(text, "dim")
    if r >= 0.5:
        return style(text, "green")
    if r >= 0.05:
        return style(text, "yellow")
    return style(text, "dim")


def meaningful_transforms(transforms: list[str]) -> list[str]:
    """Transforms that actually moved something (drops "identity" and "0 of N moved" entries)."""
    return [t for t in transforms if not re.search(r"^residual stream: identity\b", t) and not re.search(r"\b0 of \d+", t)]


def _merge_lines(m: dict[str, Any], s: Any) -> list[str]:
    tag = s("explains B", "green") if m.get("explains") else s("does NOT explain B", "red")
    base = f" relative to base {m['base']}" if m.get("base") else " on the raw weights"
    out = [f"  merge fit{base}: {m.get('method')}, residual {float(m.get('residual') or 0):.3g}: {tag}"]
    for p, w, sd in zip(m.get("parents", []), m.get("weights", []), m.get("weights_std", [])):
        out.append(f"    {float(w):7.3f} ± {float(sd):.3f}  {p}")
    if m.get("t") is not None:
        out.append(f"    SLERP t = {float(m['t']):.3f} ± {float(m.get('t_std') or 0):.3f}")
    return out


def canonical_decided(report: Report) -> bool:
    """True when the canonical (aligned) test carried the verdict rather than the element-wise one."""
    d = report.verdict.details or {}
    pc, pe = d.get("log10_p_canonical"), d.get("log10_p_elementwise")
    if not report.canon or not report.canon.get("layers") or pc is None:
        return False
    return pe is None or float(pc) < float(pe)


def aligned_rows(report: Report) -> tuple[list[str], list[dict[str, Any]]]:
    """Aligned per-layer statistics from the canonical test: stat names, and one dict per layer
    (``layer``, ``layer_b``, ``r`` by stat, ``z`` by stat, ``log10_p``, ``raw`` median element-wise Pearson)."""
    layers = (report.canon or {}).get("layers") or []
    names: list[str] = []
    raw: dict[int, list[float]] = defaultdict(list)
    for row in report.layers:
        if row.layer is not None and row.evidence and row.pearson is not None:
            raw[row.layer].append(row.pearson)
    out = []
    for lr in layers:
        rs, zs = {}, {}
        for st in lr.get("stats", []):
            if st.get("name") not in names:
                names.append(st["name"])
            rs[st["name"]], zs[st["name"]] = st.get("r"), st.get("z")
        vals = sorted(raw.get(int(lr.get("layer_b", lr.get("layer_a", -1))), []))
        out.append({"layer": lr.get("layer_a"), "layer_b": lr.get("layer_b"), "r": rs, "z": zs,
                    "log10_p": lr.get("log10_p"), "raw": vals[len(vals) // 2] if vals else None})
    return names, out


def summary_text(summary: str) -> str:
    """The verdict's summary without its own copy of the p-value (the verdict line already gives it,
    written by :func:`lineage.render.pvalue.format_p`)."""
    out = re.sub(r"\s*log10 p = -?[\d.]+(e[+-]?\d+)?\s*(?=under)", " ", summary)
    out = re.sub(r"\s*\(p = [^)]*\)", "", out)
    return re.sub(r"\s{2,}", " ", out).replace("found: under", "found under")


def explain_text(report: Report) -> str:
    """The null hypothesis and method, as printed by ``--explain``."""
    v = report.verdict
    return f"Method ({v.method}):\n  {v.null}\n"


def render_text(report: Report, *, colour: bool = False, tensors: bool = False, explain: bool = False) -> str:
    """The report as a human-readable table (short by default; ``explain`` adds the method text)."""
    s = Style(colour)
    out: list[str] = []
    for side, m in (("A", report.a), ("B", report.b)):
        arch = ", ".join(
            x
            for x in (
                m.family,
                f"{m.n_layers} layers" if m.n_layers is not None else None,
                f"hidden {m.hidden}" if m.hidden is not None else None,
            )
            if x
        )
        out.append(
            f"{s(side, 'bold')}: {m.ref}  [{m.format}; {m.n_tensors} tensors; "
            f"{_bytes(m.total_bytes)}{'; ' + arch if arch else ''}]"
        )
        for k, v in m.claims.items():
            out.append(f"   claims {k}: {v}")
    v = report.verdict
    colour_name = {True: "green", False: "cyan", None: "yellow"}[v.derived]
    out.append("")
    out.append(f"{s('Verdict:', 'bold')} {s(v.relation.upper(), 'bold', colour_name)}   {format_p(v.log10_p)}")
    out.append(f"  {summary_text(v.summary)}")
    if explain:
        out.append(s("  " + explain_text(report).rstrip("\n").replace("\n", "\n  "), "dim"))
    if report.canon:
        moved = meaningful_transforms(report.canon.get("transforms", []) or [])
        if moved and "undone" not in v.summary:
            out.append("  undone: " + "; ".join(moved))
    if report.anatomy:
        desc = report.anatomy.get("summary")
        if desc:
            out.append(f"  anatomy: {desc}")
    if report.adapter_check:
        ac = report.adapter_check
        tag = s("verified", "green") if ac["verified"] else s("NOT verified", "red")
        out.append(f"  adapter {ac['adapter']}: {tag}: {ac['summary']}")
    if report.merge:
        out.extend(_merge_lines(report.merge, s))
    out.append("")
    if canonical_decided(report):
        out.extend(_aligned_grid(report, s))
    else:
        out.extend(_grid(report, s))
    if tensors:
        out.append("")
        out.extend(_tensor_table(report.layers, s))
    if report.only_a or report.only_b:
        out.append("")
        out.append(
            f"Unpaired tensors: {len(report.only_a)} only in A, {len(report.only_b)} only in B"
            + (f" (e.g. {(report.only_a or report.only_b)[0]})")
        )
    for f in report.findings:
        tag = {"error": "red", "warning": "yellow"}.get(f.severity, "dim")
        where = f" [{f.model}{': ' + f.tensor if f.tensor else ''}]" if f.model else ""
        out.append(s(f"{f.severity}:", tag) + f"{where} {f.message}")
    out.append(s(f"read A {_bytes(report.a.bytes_read)} of {_bytes(report.a.total_bytes)}, B {_bytes(report.b.bytes_read)} "
                 f"of {_bytes(report.b.total_bytes)}" + (f" in {report.timing['total_s']:.1f} s" if report.timing.get(
                     "total_s") is not None else ""), "dim"))
    return "\n".join(out) + "\n"


def _aligned_grid(report: Report, s: Style) -> list[str]:
    names, rows = aligned_rows(report)
    lines = ["Aligned correlation by layer: the canonical test decided (matrices compared after undoing",
             "permutations, rotations and rescalings); raw r = median element-wise Pearson, for comparison"]
    lines.append("layer " + "".join(f"{n + ' r':>12}" for n in names) + f"{'layer p':>24}{'raw r':>10}")
    for row in rows:
        cells = "".join(_pearson_style(s, row["r"].get(n), f"{_fmt(row['r'].get(n)):>12}") for n in names)
        lab = f"{row['layer']}" if row["layer"] == row["layer_b"] else f"{row['layer']}→{row['layer_b']}"
        lines.append(f"{lab:>5} {cells}{format_p(row['log10_p']):>24}" + s(f"{_fmt(row['raw']):>10}", "dim"))
    return lines


def _grid(report: Report, s: Style) -> list[str]:
    by_layer: dict[int, dict[str, TensorRow]] = defaultdict(dict)
    globals_: list[TensorRow] = []
    for row in report.layers:
        if row.layer is None:
            globals_.append(row)
        elif row.role.endswith(".weight"):
            by_layer[row.layer][row.kind] = row
    lines = []
    if by_layer:
        kinds = [k for k in GRID_KINDS if any(k in d for d in by_layer.values())]
        lines.append("Pearson correlation by layer (2-D weights; norms and biases are not evidence)")
        lines.append("layer " + "".join(f"{k:>10}" for k in kinds))
        for layer in sorted(by_layer):
            cells = []
            for k in kinds:
                row = by_layer[layer].get(k)
                r = row.pearson if row else None
                cells.append(_pearson_style(s, r, f"{_fmt(r):>10}"))
            lines.append(f"{layer:>5} " + "".join(cells))
    if globals_:
        lines.append("")
        for row in globals_:
            lines.append(
                f"{row.role:<22} pearson {_fmt(row.pearson)}  cosine {_fmt(row.cosine)}  "
                f"rel_l2 {_fmt(row.rel_l2, '.3g')}" + (f"  ({row.note})" if row.note else "")
            )
    return lines


def _tensor_table(rows: tuple[TensorRow, ...], s: Style) -> list[str]:
    head = f"{'role':<26}{'shape':>16}{'cosine':>10}{'pearson':>10}{'rel_l2':>10}  evidence"
    lines = [s(head, "bold")]
    for r in rows:
        shape = "x".join(map(str, r.shape_a))
        lines.append(
            f"{r.role:<26}{shape:>16}{_fmt(r.cosine):>10}"
            + _pearson_style(s, r.pearson, f"{_fmt(r.pearson):>10}")
            + f"{_fmt(r.rel_l2, '.3g'):>10}  {'yes' if r.evidence else s('no', 'dim')}"
            + (f"  {r.note}" if r.note else "")
        )
    return lines


def render_inspect(result: Any, *, tensors: bool = False) -> str:
    """An :class:`~lineage.inspect.InspectResult` as text."""
    out = [f"{result.ref}", f"  format     {result.format}", f"  files      {len(result.files)} ({_bytes(sum(f.size for f in result.files))})"]
    out.append(f"  tensors    {len(result.tensors)}; {result.n_params:,} parameters; {_bytes(result.total_bytes)} of weights")
    out.append("  dtypes     " + ", ".join(f"{k} {_bytes(v)}" for k, v in sorted(result.dtypes.items())))
    if result.architecture:
        arch = result.architecture
        keys = ("family", "n_layers", "hidden", "n_heads", "n_kv_heads", "intermediate", "vocab", "norm", "mlp", "tied_embeddings")
        out.append("  arch       " + ", ".join(f"{k}={arch.get(k)}" for k in keys if arch.get(k) is not None))
    if result.vocab_size is not None:
        out.append(f"  vocabulary {result.vocab_size} tokens")
    if result.claims:
        for c in result.claims:
            out.append(f"  claims     {c.model}  (from {c.source})")
    else:
        out.append("  claims     none (no base_model metadata found)")
    if result.unassigned:
        out.append(f"  unassigned {len(result.unassigned)} tensors, e.g. {result.unassigned[0]}")
    out.append(f"  bytes read {_bytes(result.bytes_read)} (headers and metadata only; no tensor data is read)")
    if tensors:
        out.append("")
        for t in result.tensors:
            out.append(f"  {t.name:<50} {t.dtype:>6} {'x'.join(map(str, t.shape)):>16}  {', '.join(t.roles)}")
    return "\n".join(out) + "\n"
