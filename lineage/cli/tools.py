"""Utility commands: schema (the JSON Schemas of --json outputs), bench (kernel measurements)."""

from __future__ import annotations

import logging

import click

from lineage.cli.options import (OPT_HTML, OPT_JSON, OPT_OUTPUT, check_output, emit, note, write_html, write_output)

log = logging.getLogger("lineage")


@click.command()
@click.argument("name", required=False)
@click.option("--list", "list_", is_flag=True, help="List the published schema names.")
def schema(name: str | None, list_: bool) -> int:
    """Print the JSON Schema of a --json output: compare, tree, scan, inspect, fingerprint, merge, verify."""
    import json

    from lineage.schemas import SCHEMAS

    if list_ or name is None:
        click.echo("\n".join(f"{k:<12} {v['$id']}" for k, v in SCHEMAS.items()))
        return 0
    if name not in SCHEMAS:
        raise click.UsageError(f"unknown schema {name!r}; one of: {', '.join(SCHEMAS)}")
    click.echo(json.dumps(SCHEMAS[name], indent=2))
    return 0


@click.command()
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Device whose kernels are measured against its own copy bandwidth and matmul rate.")
@click.option("--kernel", "kernels", multiple=True, help="Kernel to measure (repeat; default: all).")
@click.option("--size", "sizes", multiple=True, help="Model size whose layer to use: 1B, 8B, 70B (repeat; default: all).")
@click.option("--quick", is_flag=True, help="Smallest size (one 1B-model layer) and two repetitions.")
@click.option("--budget", "budget_s", type=float, default=None,
              help="Total time budget in seconds (default: 120 on cuda, 1800 on cpu); cases that would "
                   "exceed it are reported as skipped.")
@OPT_JSON
@OPT_OUTPUT
@OPT_HTML
def bench(device: str, kernels: tuple[str, ...], sizes: tuple[str, ...], quick: bool, budget_s: float | None,
          as_json: bool, output: str | None, html_path: str | None) -> int:
    """Measure the similarity kernels against this machine's copy bandwidth and matmul rate.

    One line per case goes to stderr as it finishes; with --json -o FILE the file is rewritten
    after every case, and SIGTERM or Ctrl-C ends the run with the cases done so far.
    """
    import json

    check_output(html_path)
    check_output(output)
    from lineage.bench import (
        KERNELS,
        BenchConfig,
        render_html,
        render_text,
        run_bench,
        to_dict,
    )

    from lineage.bench.report import progress_line
    from lineage.bench.run import sigterm_interrupts

    def on_progress(partial: object) -> None:
        click.echo(progress_line(partial.results[-1]), err=True)  # type: ignore[attr-defined]
        if as_json and output:
            write_output(output, json.dumps(to_dict(partial), indent=2) + "\n")  # type: ignore[arg-type]

    cfg = BenchConfig(device=device, kernels=kernels or KERNELS, sizes=sizes or None, quick=quick, budget_s=budget_s)
    with sigterm_interrupts():
        report = run_bench(cfg, on_progress=on_progress)
    if report.interrupted:
        note("interrupted: the report holds the cases done so far")
    if html_path:
        write_html(html_path, render_html(report))
    emit(json.dumps(to_dict(report), indent=2) + "\n" if as_json else render_text(report) + "\n", output)
    return 0
