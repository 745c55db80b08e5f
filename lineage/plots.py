"""Dependency-free SVG charts for the HTML reports (no network, no JavaScript)."""

from __future__ import annotations

import html
import math
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
th{{background:#f4f4f4}} td.l,th.l{{text-align:left}} .derived{{color:#0a7d2c}} .unrelated{{color:#1f5fa8}}
.inconclusive{{color:#b36b00}} code{{background:#f4f4f4;padding:0 3px}} .muted{{color:#777}}
</style></head><body>
{body}
</body></html>
"""
