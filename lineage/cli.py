"""The `lineage` command: parse options, make one library call, render.

Exit codes: 0 success (whatever the verdict), 1 when ``--expect`` disagrees with
the verdict, 2 on bad input (any :class:`~lineage.errors.LineageError`) or bad usage.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import click

from lineage.errors import LineageError

log = logging.getLogger("lineage")


def _want_colour(flag: bool | None, stream: Any) -> bool:
    if flag is not None:
        return flag
    if os.environ.get("NO_COLOR"):
        return False
    return hasattr(stream, "isatty") and stream.isatty()


def _progress(no_progress: bool):
    from lineage.progress import ProgressBar

    if no_progress or not sys.stderr.isatty():
        return None
    return ProgressBar(sys.stderr)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
@click.option("-v", "--verbose", count=True, help="More log output on stderr (-v info, -vv debug).")
@click.version_option(package_name="weight-lineage", prog_name="lineage")
def cli(debug: bool, verbose: int) -> None:
    """Decide from the weights alone whether one model was derived from another."""
    level = logging.DEBUG if debug or verbose > 1 else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


@cli.command()
@click.argument("a")
@click.argument("b")
@click.option("--json", "as_json", is_flag=True, help="Write the versioned JSON report to stdout.")
@click.option("--html", "html_path", type=click.Path(dir_okay=False, writable=True), help="Write a self-contained HTML report.")
@click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default="cpu", show_default=True,
              help="Where the streaming pass (moments, sketches) runs; auto picks CUDA when present.")
@click.option("--expect", type=click.Choice(["derived", "unrelated"]), help="Exit 1 unless the verdict agrees (for CI).")
@click.option("--tensors", is_flag=True, help="Also print the per-tensor table.")
@click.option("--no-canon", is_flag=True,
              help="Element-wise comparison alone: one read of each file (moments of every tensor, verdict and "
                   "p-value from them). Skipped: the canonical test (a second read; undoes permutations, "
                   "rotations and gains: the calibrated p-value for disguised pairs) and the anatomy (relation, "
                   "LoRA rank and modules, quantisation format, direction; exact work only on the modules the "
                   "streamed screen flags).")
@click.option("--adapter", "adapter", type=click.Path(exists=True, file_okay=False), help="PEFT adapter folder: verify B = A + adapter.")
@click.option("--parents", "-p", "parents", multiple=True,
              help="Candidate merge parent of B (repeat): B is fitted as a merge of them.")
@click.option("--base", "merge_base", help="The parents' common base for --parents (default: A, unless A is a parent).")
@click.option("--no-progress", is_flag=True, help="No progress bar on stderr.")
@click.option("--color/--no-color", "colour", default=None, help="Colour the terminal output (default: when a terminal).")
def compare(
    a: str, b: str, as_json: bool, html_path: str | None, device: str, expect: str | None,
    tensors: bool, no_canon: bool, adapter: str | None, parents: tuple[str, ...], merge_base: str | None,
    no_progress: bool, colour: bool | None,
) -> int:
    """Compare model A (reference) with model B and give a lineage verdict.

    With --parents, B is also fitted as a merge of the given models (task vectors
    relative to --base, or to A when A is not among the parents) and called a merge
    when the fit explains it.
    """
    from lineage.compare import CompareOptions
    from lineage.compare import compare as run_compare

    bar = _progress(no_progress)
    try:
        report = run_compare(a, b, options=CompareOptions(device=device, canonicalise=not no_canon), progress=bar)
    finally:
        if bar is not None:
            bar.close()
    if adapter is not None:
        import dataclasses

        from lineage.adaptercheck import check_adapter

        report = dataclasses.replace(report, adapter_check=check_adapter(a, b, adapter).to_dict())
    if parents:
        from lineage.mergefit import apply_merge, merge_evidence

        base = merge_base if merge_base is not None else (None if a in parents else a)
        report = apply_merge(report, merge_evidence(b, list(parents), base))
    if as_json:
        click.echo(report.to_json())
    else:
        from lineage.render_text import render_text

        click.echo(render_text(report, colour=_want_colour(colour, sys.stdout), tensors=tensors), nl=False)
    if html_path:
        from lineage.render_html import render_html

        Path(html_path).write_text(render_html(report), encoding="utf-8")
        if not as_json:
            click.echo(f"HTML report written to {html_path}", err=True)
    if expect is not None:
        wanted = expect == "derived"
        if report.verdict.derived is not wanted:
            click.echo(f"lineage: expected {expect}, verdict is {report.verdict.relation}", err=True)
            return 1
    return 0


@cli.command()
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True, help="Write the inspection as JSON to stdout.")
@click.option("--tensors/--no-tensors", default=False, help="List every tensor.")
@click.option("--download", is_flag=True, help="For Hub references: download files instead of range reads.")
def inspect(ref: str, as_json: bool, tensors: bool, download: bool) -> int:
    """Show what a model reference holds (format, tensors, roles, dtypes, claimed lineage) without comparing."""
    import json

    from lineage.inspect import inspect as run_inspect

    if download:
        os.environ["LINEAGE_HUB_DOWNLOAD"] = "1"
    result = run_inspect(ref)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2, default=str))
        return 0
    from lineage.render_text import render_inspect

    click.echo(render_inspect(result, tensors=tensors), nl=False)
    return 0


@cli.command()
@click.argument("model")
@click.option("-o", "--output", "output", required=True, type=click.Path(dir_okay=False, writable=True),
              help="Fingerprint file to write (.lfp).")
@click.option("--json", "as_json", is_flag=True, help="Print size, bytes read and timing as JSON.")
@click.option("--no-progress", is_flag=True)
def fingerprint(model: str, output: str, as_json: bool, no_progress: bool) -> int:
    """Write MODEL's compact, transform-invariant fingerprint (compare it later with `lineage compare`)."""
    import json

    from lineage.fpcompare import SUFFIX, write_fingerprint

    if not output.endswith(SUFFIX):
        raise click.UsageError(f"the fingerprint file name must end in {SUFFIX}")
    bar = _progress(no_progress)
    try:
        info = write_fingerprint(model, output, progress=bar)
    finally:
        if bar is not None:
            bar.close()
    if as_json:
        click.echo(json.dumps(info, indent=2))
    else:
        click.echo(f"{output}: {info['bytes']:,} bytes, {info['layers']} layers, {info['probes']} probe tokens; "
                   f"read {info['bytes_read']:,} of {info['model_bytes']:,} model bytes in {info['seconds']:.1f} s")
    return 0


@cli.command()
@click.argument("child")
@click.option("--parents", "-p", multiple=True, required=True, help="A candidate parent (repeat the option).")
@click.option("--base", help="The parents' common base (task vectors are taken relative to it).")
@click.option("--json", "as_json", is_flag=True, help="Write the fit as JSON to stdout.")
def merge(child: str, parents: tuple[str, ...], base: str | None, as_json: bool) -> int:
    """Fit CHILD as a merge of PARENTS: per-module mixing weights with their uncertainty."""
    import json

    from lineage.mergefit import fit_merge_models

    fit = fit_merge_models(child, list(parents), base)
    d = fit.to_dict()
    if as_json:
        d.pop("per_module", None)
        click.echo(json.dumps({"schema": "lineage.merge/1", "child": child, "parents": list(parents), "base": base, **d}, indent=2))
        return 0
    click.echo(f"child {child}")
    for p, w, sd in zip(parents, fit.weights, fit.weights_std):
        click.echo(f"  {w:7.3f} ± {sd:.3f}  {p}")
    if fit.t is not None:
        click.echo(f"  SLERP t = {fit.t:.3f}" + (f" ± {fit.t_std:.3f}" if fit.t_std is not None else ""))
    click.echo(f"method {fit.method}; residual {fit.residual:.3g}; {'explains the child' if fit.explains else 'does NOT explain the child'}")
    return 0


@cli.command()
@click.argument("models", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="Write the tree and pairwise links as JSON to stdout.")
@click.option("--html", "html_path", type=click.Path(dir_okay=False, writable=True), help="Write a drawn tree as HTML.")
@click.option("--no-progress", is_flag=True)
def tree(models: tuple[str, ...], as_json: bool, html_path: str | None, no_progress: bool) -> int:
    """Family tree of MODELS: which derives from which, with edge types."""
    import json

    from lineage.family import family_tree
    from lineage.tree import render_html as tree_html
    from lineage.tree import render_text as tree_text

    if len(models) < 2:
        raise click.UsageError("give at least two models")
    bar = _progress(no_progress)
    try:
        result = family_tree(list(models), progress=bar)
    finally:
        if bar is not None:
            bar.close()
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        click.echo(tree_text(result.tree), nl=False)
    if html_path:
        Path(html_path).write_text(tree_html(result.tree), encoding="utf-8")
    return 0


@cli.command()
@click.argument("sources", nargs=-1, required=True)
@click.option("--engine", type=click.Choice(["local", "dask", "ray"]), default="local", show_default=True,
              help="Where tasks run: threads here, or a Dask / Ray cluster.")
@click.option("--workers", type=int, default=0, help="Parallel tasks (0: one per core).")
@click.option("--address", help="Scheduler address for --engine dask/ray (default: start a local cluster).")
@click.option("--confirm", is_flag=True, help="Confirm every fingerprint link with the full weight comparison.")
@click.option("--alpha", type=float, help="Per-pair link threshold (default: 1e-3 / number of pairs).")
@click.option("--cache-dir", type=click.Path(file_okay=False), help="Fingerprint cache (default: $LINEAGE_CACHE/fingerprints).")
@click.option("--refresh", is_flag=True, help="Recompute cached fingerprints.")
@click.option("--json", "as_json", is_flag=True, help="Write the scan (schema lineage.scan/1) as JSON to stdout.")
@click.option("--html", "html_path", type=click.Path(dir_okay=False, writable=True), help="Write the drawn tree as HTML.")
@click.option("--no-progress", is_flag=True)
def scan(sources: tuple[str, ...], engine: str, workers: int, address: str | None, confirm: bool, alpha: float | None,
         cache_dir: str | None, refresh: bool, as_json: bool, html_path: str | None, no_progress: bool) -> int:
    """Scan SOURCES (folders, files, hf-cache[:PATH], org:NAME, Hub ids) and report the family tree.

    Every model is fingerprinted (cached), fingerprints are compared pairwise, and linked
    pairs form the tree; --confirm re-checks each link on the weights (type, direction).
    """
    import json

    from lineage.scan import ScanOptions
    from lineage.scan import scan as run_scan
    from lineage.tree import render_html as tree_html

    opts = ScanOptions(engine=engine, workers=workers, address=address, cache_dir=cache_dir, alpha=alpha,
                       confirm=confirm, refresh=refresh)
    bar = _progress(no_progress)
    try:
        result = run_scan(list(sources), opts, progress=bar)
    finally:
        if bar is not None:
            bar.close()
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2, default=str))
    else:
        from lineage.scan import render_text as scan_text

        click.echo(scan_text(result, colour=_want_colour(None, sys.stdout)), nl=False)
    if html_path:
        Path(html_path).write_text(tree_html(result.tree, title="lineage scan"), encoding="utf-8")
    return 0


@cli.command()
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Where to write the demo models (default: a cache folder).")
@click.option("--json", "as_json", is_flag=True, help="Print the reports as a JSON list.")
@click.option("--color/--no-color", "colour", default=None)
def demo(out: str | None, as_json: bool, colour: bool | None) -> int:
    """Build small demo checkpoints (a base, a fine-tune, an unrelated model, a disguised fine-tune, a merged
    LoRA) and compare each with the base."""
    import json

    from lineage.compare import compare as run_compare
    from lineage.testing.demo import DEMO_PAIRS, build_demo

    models = build_demo(out)
    reports = []
    for x, y in DEMO_PAIRS:
        if x not in models or y not in models:
            continue
        report = run_compare(models[x], models[y])
        reports.append(report)
        if not as_json:
            from lineage.render_text import render_text

            click.secho(f"\n=== {x} vs {y} ===", bold=True, color=_want_colour(colour, sys.stdout))
            click.echo(render_text(report, colour=_want_colour(colour, sys.stdout)), nl=False)
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in reports], indent=2))
    return 0


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: maps library errors to exit code 2 without a traceback."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    try:
        rv = cli.main(args=args, prog_name="lineage", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except LineageError as e:
        if debug:
            traceback.print_exc()
        click.echo(f"lineage: error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":  # pragma: no cover
    main()
