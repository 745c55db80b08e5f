"""Charts for the HTML reports: inline SVG, no network, no JavaScript.

matplotlib draws the data charts (:func:`mpl_line_chart`, :func:`mpl_qq`: markers, line styles,
legend, axes fitted to the data); :func:`page` is the self-contained page shell.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Mapping, Sequence

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f")


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
