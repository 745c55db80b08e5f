"""Charts for the HTML reports: inline SVG, no network, no JavaScript.

matplotlib draws the data charts (:func:`mpl_line_chart`, :func:`mpl_qq`: markers, line styles,
legend, axes fitted to the data); :func:`line_chart` is the older dependency-free drawing.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Mapping, Sequence

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f")


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    for m in (1, 2, 5, 10):
        if (hi - lo) / (step * m) <= n:
            step *= m
            break
    start = math.ceil(lo / step) * step
    out = []
    v = start
    while v <= hi + 1e-12:
        out.append(round(v, 10))
        v += step
    return out


def line_chart(
    series: Mapping[str, Sequence[tuple[float, float | None]]],
    *,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    y_range: tuple[float, float] | None = None,
    x_range: tuple[float, float] | None = None,
    lines: bool = True,
    diagonal: bool = False,
    width: int = 720,
    height: int = 320,
) -> str:
    """An SVG chart with one polyline (or point set) per series; None values leave gaps."""
    pts = [(x, y) for s in series.values() for x, y in s if y is not None and math.isfinite(y)]
    if x_range is None:
        xs = [p[0] for p in pts] or [0.0, 1.0]
        x_range = (min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1)
    if y_range is None:
        ys = [p[1] for p in pts] or [0.0, 1.0]
        lo, hi = min(ys), max(ys)
        if hi - lo < 1e-9:
            lo, hi = lo - 0.5, hi + 0.5
        y_range = (lo, hi)
    ml, mr, mt, mb = 60, 150, 30, 40
    pw, ph = width - ml - mr, height - mt - mb
    (x0, x1), (y0, y1) = x_range, y_range

    def sx(x: float) -> float:
        return ml + (x - x0) / (x1 - x0) * pw

    def sy(y: float) -> float:
        return mt + (1 - (min(max(y, y0), y1) - y0) / (y1 - y0)) * ph

    e = html.escape
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif" font-size="11" role="img" aria-label="{e(title)}">',
        f'<text x="{ml}" y="18" font-size="13" font-weight="bold">{e(title)}</text>',
        f'<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>',
    ]
    for t in _ticks(y0, y1):
        parts.append(f'<line x1="{ml}" x2="{ml + pw}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" stroke="#eee"/>')
        parts.append(f'<text x="{ml - 5}" y="{sy(t) + 4:.1f}" text-anchor="end">{t:g}</text>')
    for t in _ticks(x0, x1, 10):
        parts.append(f'<text x="{sx(t):.1f}" y="{mt + ph + 15}" text-anchor="middle">{t:g}</text>')
    parts.append(f'<text x="{ml + pw / 2}" y="{height - 5}" text-anchor="middle">{e(xlabel)}</text>')
    parts.append(
        f'<text x="14" y="{mt + ph / 2}" text-anchor="middle" transform="rotate(-90 14 {mt + ph / 2})">{e(ylabel)}</text>'
    )
    if diagonal:
        lo, hi = max(x0, y0), min(x1, y1)
        parts.append(
            f'<line x1="{sx(lo):.1f}" y1="{sy(lo):.1f}" x2="{sx(hi):.1f}" y2="{sy(hi):.1f}" stroke="#aaa" stroke-dasharray="4 3"/>'
        )
    for i, (name, s) in enumerate(series.items()):
        c = PALETTE[i % len(PALETTE)]
        run: list[str] = []
        for x, y in list(s) + [(math.nan, None)]:
            if y is None or not math.isfinite(y) or not math.isfinite(x):
                if lines and len(run) > 1:
                    parts.append(f'<polyline fill="none" stroke="{c}" stroke-width="1.5" points="{" ".join(run)}"/>')
                run = []
                continue
            run.append(f"{sx(x):.1f},{sy(y):.1f}")
            parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{c}"><title>{e(name)}: {x:g}, {y:.4g}</title></circle>')
        ly = mt + 14 * i + 8
        parts.append(f'<rect x="{ml + pw + 10}" y="{ly - 8}" width="10" height="10" fill="{c}"/>')
        parts.append(f'<text x="{ml + pw + 25}" y="{ly + 1}">{e(name)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def page(title: str, body: str) -> str:
    """A self-contained HTML page (inline CSS, no external resources)."""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body{{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}}
table{{border-collapse:collapse;font-size:12px}} td,th{{border:1px solid #ddd;padding:2px 6px;text-align:right}}
th{{background:#f4f4f4}} td.l,th.l,td:first-child,th:first-child{{text-align:left}} .derived{{color:#0a7d2c}} .unrelated{{color:#1f5fa8}}
.inconclusive{{color:#b36b00}} code{{background:#f4f4f4;padding:0 3px}} .muted{{color:#777}}
h1{{font-size:1.4em}} h2{{font-size:1.25em}} h3{{margin-top:1.6em}} figure{{margin:1em 0}} figcaption{{font-size:12px;color:#555}}
.summary{{background:#f7f9fc;border:1px solid #d8e0ec;border-radius:6px;padding:0.6em 1.2em}}
.summary dt{{font-weight:600;margin-top:0.4em}} .summary dd{{margin-left:1em}}
details{{margin:0.6em 0}} summary{{cursor:pointer;font-weight:600}} td.mono,.mono{{font-family:ui-monospace,monospace;font-size:11px}}
svg{{max-width:100%;height:auto}}
</style></head><body>
{body}
</body></html>
"""


# ----------------------------------------------------------------------------- matplotlib charts

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "h")
LINESTYLES = ("-", "--", "-.", ":")


def _svg_of(fig: object) -> str:
    """The figure as inline SVG text (glyphs as paths: no fonts or files referenced)."""
    import io

    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")  # type: ignore[attr-defined]
    text = buf.getvalue()
    text = text[text.index("<svg"):]
    # inline in HTML: no RDF metadata block, no namespace URLs (the HTML parser knows SVG and xlink)
    text = re.sub(r"<metadata>.*?</metadata>\s*", "", text, flags=re.S)
    return text.replace(' xmlns:xlink="http://www.w3.org/1999/xlink"', "").replace(
        ' xmlns="http://www.w3.org/2000/svg"', "")


def _figure(width: float = 7.5, height: float = 3.4) -> tuple[object, object]:
    import matplotlib

    matplotlib.rcParams["svg.fonttype"] = "path"
    matplotlib.rcParams["svg.hashsalt"] = "lineage"  # deterministic ids
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    return fig, fig.add_subplot(1, 1, 1)


def mpl_line_chart(
    series: Mapping[str, Sequence[tuple[float, float | None]]],
    *,
    title: str = "",
    xlabel: str = "layer",
    ylabel: str = "",
    integer_x: bool = True,
    hline: float | None = None,
) -> str:
    """Line chart with one marker and line style per series, a legend, axes fitted to the data and
    integer ticks on x (layer numbers); returned as a self-contained ``<svg>`` element."""
    from matplotlib.ticker import MaxNLocator

    fig, ax = _figure()
    ys: list[float] = []
    for i, (name, pts) in enumerate(series.items()):
        xy = [(x, y) for x, y in pts if y is not None and math.isfinite(y)]
        if not xy:
            continue
        xs, vs = zip(*sorted(xy))
        ys += list(vs)
        ax.plot(xs, vs, marker=MARKERS[i % len(MARKERS)], linestyle=LINESTYLES[(i // 3) % len(LINESTYLES)],  # type: ignore[attr-defined]
                color=PALETTE[i % len(PALETTE)], label=name, markersize=5, linewidth=1.4, alpha=0.9)
    if ys:
        lo, hi = min(ys), max(ys)
        pad = max((hi - lo) * 0.12, 1e-3 if hi - lo < 1e-3 else 0.0, abs(hi) * 1e-4)
        ax.set_ylim(lo - pad, hi + pad)  # type: ignore[attr-defined]
    if hline is not None and ys and min(ys) - 0.05 <= hline <= max(ys) + 0.05:
        ax.axhline(hline, color="#999", linewidth=0.8, linestyle=":")  # type: ignore[attr-defined]
    if integer_x:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # type: ignore[attr-defined]
    ax.set_title(title, fontsize=11, loc="left")  # type: ignore[attr-defined]
    ax.set_xlabel(xlabel)  # type: ignore[attr-defined]
    ax.set_ylabel(ylabel)  # type: ignore[attr-defined]
    ax.grid(True, color="#e5e5e5", linewidth=0.6)  # type: ignore[attr-defined]
    if series:
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)  # type: ignore[attr-defined]
    return _svg_of(fig)


def mpl_qq(samples: Mapping[str, Sequence[float]], *, title: str = "", log: bool = True) -> str:
    """QQ plot of p-values against the uniform distribution (−log10 scale by default), labelled axes,
    the diagonal drawn; one marker per sample set.  A self-contained ``<svg>``."""
    fig, ax = _figure(5.0, 4.2)
    top = 0.0
    for i, (name, ps) in enumerate(samples.items()):
        vals = sorted(p for p in ps if p is not None and p > 0)
        n = len(vals)
        if not n:
            continue
        exp = [(k + 0.5) / n for k in range(n)]
        if log:
            xs = [-math.log10(e) for e in exp]
            ys = [-math.log10(max(v, 1e-300)) for v in vals]
        else:
            xs, ys = exp, vals
        top = max(top, max(xs), max(ys))
        ax.plot(xs, ys, MARKERS[i % len(MARKERS)], color=PALETTE[i % len(PALETTE)], markersize=4,  # type: ignore[attr-defined]
                label=f"{name} (n={n})", alpha=0.8)
    top = top or 1.0
    ax.plot([0, top], [0, top], color="#999", linestyle="--", linewidth=0.8, label="uniform (calibrated)")  # type: ignore[attr-defined]
    ax.set_title(title, fontsize=11, loc="left")  # type: ignore[attr-defined]
    ax.set_xlabel("expected −log10 p (uniform)" if log else "expected p (uniform)")  # type: ignore[attr-defined]
    ax.set_ylabel("observed −log10 p" if log else "observed p")  # type: ignore[attr-defined]
    ax.grid(True, color="#e5e5e5", linewidth=0.6)  # type: ignore[attr-defined]
    ax.legend(fontsize=8, frameon=False)  # type: ignore[attr-defined]
    return _svg_of(fig)
