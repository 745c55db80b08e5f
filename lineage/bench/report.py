"""Render a :class:`~lineage.bench.run.BenchReport`: text table, JSON (``lineage.bench/1``), HTML roofline."""

from __future__ import annotations

import dataclasses
import html
import io
from importlib.metadata import PackageNotFoundError, version

from lineage.bench.run import BenchError, BenchReport, CaseResult

SCHEMA = "lineage.bench/1"


def tool_version() -> str:
    """The installed weight-lineage version."""
    try:
        return version("weight-lineage")
    except PackageNotFoundError:  # pragma: no cover - running from a bare tree
        return "unknown"


def to_dict(report: BenchReport) -> dict[str, object]:
    """The JSON document (schema ``lineage.bench/1``)."""
    return {
        "schema": SCHEMA,
        "tool": {"name": "weight-lineage", "version": tool_version()},
        "config": dataclasses.asdict(report.config),
        "limits": dataclasses.asdict(report.limits),
        "results": [dataclasses.asdict(r) for r in report.results],
        "elapsed_s": report.elapsed_s,
        "interrupted": report.interrupted,
    }


def _fmt(v: float | None, scale: float = 1.0, spec: str = ".1f") -> str:
    return "-" if v is None else format(v / scale, spec)


def _row(r: CaseResult) -> str:
    if r.skipped:
        return f"{r.kernel:<8} {r.variant:<14} {r.size:>5}  skipped: {r.skipped}"
    return (f"{r.kernel:<8} {r.variant:<14} {r.size:>5} {_fmt(r.wall_s, 1e-3, '10.2f')} {_fmt(r.cpu_s, 1e-3, '9.1f')}"
            f" {_fmt(r.bytes_per_s, 1e9, '8.2f')} {_fmt(r.flops_per_s, 1e9, '9.1f')}"
            f" {_fmt(r.fraction, 0.01, '6.1f')}% {_fmt(r.memcpy_ratio, 1.0, '7.2f')}"
            f" {_fmt(r.memcpy_cpu_ratio, 1.0, '7.2f')}")


def progress_line(r: CaseResult) -> str:
    """One line for a finished case (the CLI's progress on stderr)."""
    if r.skipped:
        return f"bench: {r.kernel} {r.variant} {r.size}: skipped ({r.skipped})"
    return (f"bench: {r.kernel} {r.variant} {r.size}: {_fmt(r.wall_s, 1e-3, '.2f')} ms, "
            f"{_fmt(r.bytes_per_s, 1e9, '.2f')} GB/s, {_fmt(r.fraction, 0.01, '.1f')} % of roofline, "
            f"{_fmt(r.memcpy_ratio, 1.0, '.2f')}x memcpy")


def render_text(report: BenchReport) -> str:
    """A table: time, CPU time, GB/s, GFLOP/s, fraction of the roofline, time over a copy of the same bytes
    (wall, and CPU time over the copy's CPU time)."""
    lim = report.limits
    load = "" if lim.load_average is None else f"; load average {lim.load_average[0]:.2f}"
    head = [
        f"device: {lim.device_name} ({lim.device}, {lim.threads} threads{load})",
        f"limits: copy {lim.copy_bytes_per_s / 1e9:.2f} GB/s (read+write, {lim.copy_bytes >> 20} MiB), "
        f"{lim.matmul_dtype} matmul {lim.matmul_flops_per_s / 1e9:.1f} GFLOP/s (n={lim.matmul_n})",
        f"run: {report.elapsed_s:.1f} s of a {report.config.budget_s or 0:.0f} s budget"
        + (" (interrupted: cases after it not run)" if report.interrupted else ""),
        f"{'kernel':<8} {'variant':<14} {'size':>5} {'ms':>10} {'cpu ms':>9} {'GB/s':>8} {'GFLOP/s':>9}"
        f" {'roof':>7} {'/memcpy':>7} {'(cpu)':>7}",
    ]
    return "\n".join(head + [_row(r) for r in report.results]) + "\n"


def _roofline_svg(report: BenchReport) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise BenchError("--html needs matplotlib: pip install 'weight-lineage[bench]'") from e
    lim = report.limits
    done = [r for r in report.results if r.wall_s and r.bytes_read]
    ai = [r.flops / r.bytes_read for r in done]
    lo, hi = min(ai + [0.1]) / 2, max(ai + [100.0]) * 2
    knee = lim.matmul_flops_per_s / lim.copy_bytes_per_s
    fig, ax = plt.subplots(figsize=(8, 5))
    xs = [lo, knee, hi]
    ax.loglog(xs, [min(x * lim.copy_bytes_per_s, lim.matmul_flops_per_s) for x in xs], "k-", label="roofline")
    for kernel in sorted({r.kernel for r in done}):
        pts = [(r.flops / r.bytes_read, r.flops_per_s) for r in done if r.kernel == kernel]
        ax.loglog([p[0] for p in pts], [p[1] for p in pts], "o", label=kernel)
    ax.set_xlabel("arithmetic intensity (FLOP / byte read)")
    ax.set_ylabel("FLOP/s")
    ax.set_title(f"{lim.device_name}: copy {lim.copy_bytes_per_s / 1e9:.1f} GB/s, "
                 f"{lim.matmul_dtype} matmul {lim.matmul_flops_per_s / 1e12:.2f} TFLOP/s", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    svg = buf.getvalue()
    return svg[svg.index("<svg"):]


def render_html(report: BenchReport) -> str:
    """A self-contained page: the roofline plot (inline SVG) and the table."""
    svg = _roofline_svg(report)
    table = html.escape(render_text(report))
    return (f"<!doctype html>\n<html><head><meta charset='utf-8'><title>lineage bench</title></head>"
            f"<body><h1>lineage bench ({html.escape(report.limits.device_name)})</h1>\n{svg}\n"
            f"<pre>{table}</pre><p>{SCHEMA}, weight-lineage {html.escape(tool_version())}</p></body></html>\n")
