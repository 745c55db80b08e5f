"""The `lineage` command: parse options, make one library call, render.

Exit codes: 0 success (whatever the verdict), 1 when ``--expect`` disagrees with
the verdict, 2 on bad input (any :class:`~lineage.errors.LineageError`), bad usage or any
other failure (always one line on stderr; ``--debug`` adds the traceback).
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


class _Ctx:
    """Global options shared by every command (set by the group)."""

    quiet: bool = False
    verbose: int = 0


_CTX = _Ctx()


def _want_colour(flag: bool | None, stream: Any) -> bool:
    """--color forces colour (also into a pipe), --no-color and NO_COLOR turn it off, else: a terminal."""
    if flag is not None:
        return flag
    if os.environ.get("NO_COLOR"):
        return False
    return hasattr(stream, "isatty") and stream.isatty()


def _check_output(path: str | None) -> None:
    """Fail before any work when an output file cannot be written (exit 2, one line naming it)."""
    if path is None:
        return
    from lineage.errors import ConfigError

    p = Path(path)
    folder = p.parent if str(p.parent) else Path(".")
    if not folder.is_dir():
        raise ConfigError(f"cannot write here: folder {str(folder)!r} does not exist", path=path)
    if p.is_dir():
        raise ConfigError("cannot write here: it is a folder", path=path)
    if not os.access(folder, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise ConfigError("cannot write here: permission denied", path=path)


def _check_device(device: str) -> None:
    """Fail before any work when ``--device`` cannot be had (``cuda`` without CUDA: exit 2, one line)."""
    from lineage.device import resolve_device

    resolve_device(device)


def _write_output(path: str, text: str) -> None:
    """Write an output file; a failure is a typed error naming it."""
    from lineage.errors import ConfigError

    try:
        Path(path).write_text(text, encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot write: {e.strerror or e}", path=path) from None


def _progress(no_progress: bool):
    """A tqdm progress callback on stderr, or None (--no-progress, --quiet, not a terminal,
    HF_HUB_DISABLE_PROGRESS_BARS)."""
    if no_progress or _CTX.quiet or not sys.stderr.isatty() or _hf_truthy("HF_HUB_DISABLE_PROGRESS_BARS"):
        return None
    from lineage.progress import TqdmProgress

    return TqdmProgress(sys.stderr)


def _note(message: str) -> None:
    """An informational line on stderr (silenced by --quiet)."""
    if not _CTX.quiet:
        click.echo(message, err=True)


def _emit(text: str, output: str | None, colour: bool | None = None) -> None:
    """The command's main output: to ``output`` when given, else stdout (colour kept only on stdout)."""
    if output:
        _write_output(output, click.unstyle(text))
        _note(f"written to {output}")
    else:
        click.echo(text, nl=False, color=colour)


def _write_html(path: str, page: str) -> None:
    _write_output(path, page)
    _note(f"HTML written to {path}")


# Options several commands share: same names, same help everywhere.
_OPT_JSON = click.option("--json", "as_json", is_flag=True, help="Write JSON (with its schema id and the tool version) instead of text.")
_OPT_OUTPUT = click.option("-o", "--output", "output", type=click.Path(dir_okay=False, writable=True),
                           help="Write the main output (text, or JSON with --json) to this file instead of stdout.")
_OPT_HTML = click.option("--html", "html_path", type=click.Path(dir_okay=False, writable=True),
                         help="Also write a self-contained HTML page to this file.")
_OPT_PROGRESS = click.option("--no-progress", is_flag=True, help="No progress bars on stderr.")
_OPT_COLOUR = click.option("--color/--no-color", "colour", default=None,
                           help="Force colour on (also into a pipe) or off (default: colour on a terminal unless NO_COLOR).")
_OPT_DEVICE = click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default="cpu", show_default=True,
                           help="Where the tensor arithmetic runs (auto: CUDA when present; cuda without one is an "
                                "error). Files are read on the CPU.")
_OPT_TENSORS = click.option("--tensors/--no-tensors", default=False, show_default=True, help="Also list every tensor.")


def _hf_truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


_revision_option = click.option("--revision", help="Hub revision (branch, tag or commit) for Hub references "
                                "without their own @REV.")
_token_option = click.option("--token", help="Hugging Face token (default: HF_TOKEN, or the one `hf auth login` saved).")


def _hub_refs(refs: tuple[str, ...], revision: str | None, token: str | None) -> list[str]:
    """Apply ``--token`` (as HF_TOKEN) and ``--revision`` (to Hub references without their own @REV)."""
    from lineage.io.hub import parse_hub_ref, with_revision

    if token:
        os.environ["HF_TOKEN"] = token
    if revision and not any(parse_hub_ref(r) for r in refs):
        raise click.UsageError("--revision applies to Hub references only (org/name, hf://…)")
    return [with_revision(r, revision) for r in refs]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
@click.option("-v", "--verbose", count=True, help="More log output on stderr (-v info, -vv debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only results and errors: no progress, no notes, warnings off.")
@click.version_option(None, "-V", "--version", package_name="weight-lineage", prog_name="lineage")
def cli(debug: bool, verbose: int, quiet: bool) -> None:
    """Decide from the weights alone whether one model was derived from another.

    Exit codes: 0 success (whatever the verdict), 1 when --expect disagrees with the verdict or
    verify finds a difference, 2 bad input or usage, 3 scan finished but models failed (see
    --keep-going).
    """
    _CTX.quiet, _CTX.verbose = quiet, verbose
    level = (logging.DEBUG if debug or verbose > 1 else logging.INFO if verbose
             else logging.ERROR if quiet else logging.WARNING)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # huggingface_hub prints its own warnings (its handler, HF_HUB_VERBOSITY): not a second time through ours
    logging.getLogger("huggingface_hub").propagate = False
    if not verbose and not debug:
        # distributed engines (dask, ray) log their cluster at INFO: keep them quiet unless asked.
        # Dask applies its logging config when imported (later), so it is told through its config.
        os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "error")
        for name in ("distributed", "dask", "ray", "tornado", "bokeh"):
            logging.getLogger(name).setLevel(logging.ERROR)


@cli.command()
@click.argument("a")
@click.argument("b")
@_OPT_JSON
@_OPT_OUTPUT
@_OPT_HTML
@click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default="cpu", show_default=True,
              help="Where the streaming pass (moments, sketches) runs; auto picks CUDA when present.")
@click.option("--expect", type=click.Choice(["derived", "unrelated"]), help="Exit 1 unless the verdict agrees (for CI).")
@_OPT_TENSORS
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
@click.option("--explain", is_flag=True, help="Print the null hypothesis and method text (always in JSON and HTML).")
@click.option("--no-hash", is_flag=True, help="Do not hash the input files (the report then cannot be verified).")
@_OPT_PROGRESS
@_OPT_COLOUR
@_revision_option
@_token_option
def compare(
    a: str, b: str, as_json: bool, output: str | None, html_path: str | None, device: str, expect: str | None,
    tensors: bool, no_canon: bool, adapter: str | None, parents: tuple[str, ...], merge_base: str | None,
    explain: bool, no_hash: bool, no_progress: bool, colour: bool | None, revision: str | None = None,
    token: str | None = None,
) -> int:
    """Compare model A (reference) with model B and give a lineage verdict.

    With --parents, B is also fitted as a merge of the given models (task vectors
    relative to --base, or to A when A is not among the parents) and called a merge
    when the fit explains it.  The JSON and HTML reports record the BLAKE3 hash and size of
    every file read, the options and seeds: `lineage verify REPORT.json` re-runs them.
    """
    _check_output(html_path)
    _check_output(output)
    from lineage.verify import RunSpec, compare_recorded

    if revision or token:
        a, b = _hub_refs((a, b), revision, token)
    spec = RunSpec(a, b, device=device, canonicalise=not no_canon, adapter=adapter, parents=tuple(parents),
                   base=merge_base)
    bar = _progress(no_progress)
    try:
        report = compare_recorded(spec, progress=bar, hash_files=not no_hash)
    finally:
        if bar is not None:
            bar.close()
    want = _want_colour(colour, sys.stdout if not output else None)
    if as_json:
        _emit(report.to_json() + "\n", output)
    else:
        from lineage.render_text import render_text

        _emit(render_text(report, colour=want, tensors=tensors, explain=explain), output, colour=want)
    if html_path:
        from lineage.render_html import render_html

        _write_html(html_path, render_html(report))
    if expect is not None:
        wanted = expect == "derived"
        if report.verdict.derived is not wanted:
            click.echo(f"lineage: expected {expect}, verdict is {report.verdict.relation}", err=True)
            return 1
    return 0


@cli.command()
@click.argument("report", type=click.Path(dir_okay=False))
@click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default=None,
              help="Where to re-run (default: the device recorded in the report).")
@_OPT_JSON
@_OPT_OUTPUT
@_OPT_PROGRESS
def verify(report: str, device: str | None, as_json: bool, output: str | None, no_progress: bool) -> int:
    """Re-run the comparison recorded in REPORT (a `compare --json` report) and check it.

    The input files are re-hashed (a changed file is named, with both hashes), the comparison
    re-runs with the recorded options and seeds, and the verdict, p-value and per-layer figures
    are compared.  Exit 0 when everything matches, 1 when something differs.
    """
    import json

    from lineage.verify import render_verify, verify_report

    bar = _progress(no_progress)
    try:
        result, _ = verify_report(report, device=device, progress=bar)
    finally:
        if bar is not None:
            bar.close()
    if as_json:
        from lineage.schemas import stamp

        _emit(json.dumps(stamp("verify", result.to_dict()), indent=2) + "\n", output)
    else:
        _emit(render_verify(result), output)
    return 0 if result.same else 1


@cli.command()
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


@cli.command()
@click.argument("ref")
@_OPT_JSON
@_OPT_OUTPUT
@_OPT_TENSORS
@click.option("--download", is_flag=True, help="For Hub references: download files instead of range reads.")
@_OPT_PROGRESS
@_OPT_COLOUR
@_revision_option
@_token_option
def inspect(ref: str, as_json: bool, output: str | None, tensors: bool, download: bool, no_progress: bool,
            colour: bool | None, revision: str | None = None, token: str | None = None) -> int:
    """Show what a model reference holds (format, tensors, roles, dtypes, claimed lineage) without comparing."""
    import json

    from lineage.inspect import inspect as run_inspect

    if download:
        os.environ["LINEAGE_HUB_DOWNLOAD"] = "1"
    if revision or token:
        (ref,) = _hub_refs((ref,), revision, token)
    result = run_inspect(ref)
    if as_json:
        from lineage.schemas import stamp

        _emit(json.dumps(stamp("inspect", result.to_dict()), indent=2, default=str) + "\n", output)
        return 0
    from lineage.render_text import render_inspect

    _emit(render_inspect(result, tensors=tensors), output, colour=_want_colour(colour, sys.stdout))
    return 0


@cli.command()
@click.argument("model")
@click.option("-o", "--output", "output", required=True, type=click.Path(dir_okay=False, writable=True),
              help="Fingerprint file to write (.lfp).")
@_OPT_JSON
@_OPT_DEVICE
@_OPT_PROGRESS
@_revision_option
@_token_option
def fingerprint(model: str, output: str, as_json: bool, device: str, no_progress: bool, revision: str | None = None,
                token: str | None = None) -> int:
    """Write MODEL's compact, transform-invariant fingerprint (compare it later with `lineage compare`)."""
    import json

    from lineage.fpcompare import SUFFIX

    if not output.endswith(SUFFIX):
        raise click.UsageError(f"the fingerprint file name must end in {SUFFIX}")
    _check_output(output)
    if revision or token:
        (model,) = _hub_refs((model,), revision, token)
    from lineage.fpcompare import write_fingerprint

    bar = _progress(no_progress)
    try:
        info = write_fingerprint(model, output, progress=bar, device=device)
    finally:
        if bar is not None:
            bar.close()
    if as_json:
        from lineage.schemas import stamp

        click.echo(json.dumps(stamp("fingerprint", {"model": model, "output": output, **info}), indent=2))
    else:
        click.echo(f"{output}: {info['bytes']:,} bytes, {info['layers']} layers, {info['probes']} probe tokens; "
                   f"read {info['bytes_read']:,} of {info['model_bytes']:,} model bytes in {info['seconds']:.1f} s")
    return 0


@cli.command()
@click.argument("child")
@click.option("--parents", "-p", multiple=True, required=True, help="A candidate parent (repeat the option).")
@click.option("--base", help="The parents' common base (task vectors are taken relative to it).")
@_OPT_JSON
@_OPT_OUTPUT
@_OPT_DEVICE
@_OPT_PROGRESS
def merge(child: str, parents: tuple[str, ...], base: str | None, as_json: bool, output: str | None,
          device: str, no_progress: bool) -> int:
    """Fit CHILD as a merge of PARENTS: per-module mixing weights with their uncertainty."""
    import json

    from lineage.mergefit import fit_merge_models

    _check_output(output)
    fit = fit_merge_models(child, list(parents), base, device=device)
    d = fit.to_dict()
    if as_json:
        from lineage.schemas import stamp

        d.pop("per_module", None)
        _emit(json.dumps(stamp("merge", {"child": child, "parents": list(parents), "base": base, "device": device,
                                         **d}), indent=2)
              + "\n", output)
        return 0
    lines = [f"child {child}"]
    for p, w, sd in zip(parents, fit.weights, fit.weights_std):
        lines.append(f"  {w:7.3f} ± {sd:.3f}  {p}")
    if fit.t is not None:
        lines.append(f"  SLERP t = {fit.t:.3f}" + (f" ± {fit.t_std:.3f}" if fit.t_std is not None else ""))
    lines.append(f"method {fit.method}; residual {fit.residual:.3g}; "
                 f"{'explains the child' if fit.explains else 'does NOT explain the child'}")
    _emit("\n".join(lines) + "\n", output)
    return 0


@cli.command()
@click.argument("models", nargs=-1, required=True)
@_OPT_JSON
@_OPT_OUTPUT
@_OPT_HTML
@_OPT_DEVICE
@_OPT_PROGRESS
@_OPT_COLOUR
def tree(models: tuple[str, ...], as_json: bool, output: str | None, html_path: str | None, device: str,
         no_progress: bool, colour: bool | None) -> int:
    """Family tree of MODELS: which derives from which, with edge types."""
    if len(models) < 2:  # before any heavy import
        raise click.UsageError("give at least two models")
    import json

    from lineage.compare import CompareOptions
    from lineage.family import family_tree
    from lineage.tree import render_html as tree_html
    from lineage.tree import render_text as tree_text

    _check_output(html_path)
    _check_output(output)
    _check_device(device)
    bar = _progress(no_progress)
    try:
        result = family_tree(list(models), options=CompareOptions(device=device), progress=bar)
    finally:
        if bar is not None:
            bar.close()
    if as_json:
        from lineage.schemas import stamp

        _emit(json.dumps(stamp("tree", result.to_dict()), indent=2) + "\n", output)
    else:
        _emit(tree_text(result.tree) + "\n", output, colour=_want_colour(colour, sys.stdout))
    if html_path:
        _write_html(html_path, tree_html(result.tree, pairs=result.pair_rows()))
    return 0


@cli.command()
@click.argument("sources", nargs=-1, required=True)
@click.option("--engine", type=click.Choice(["local", "dask", "ray"]), default="local", show_default=True,
              help="Where tasks run: threads here, or a Dask / Ray cluster (quiet unless -v).")
@click.option("--workers", type=int, default=0, help="Parallel tasks (0: one per core).")
@click.option("--address", help="Scheduler address for --engine dask/ray (default: start a local cluster).")
@click.option("--confirm", is_flag=True, help="Confirm every fingerprint link with the full weight comparison.")
@_OPT_DEVICE
@click.option("--alpha", type=float, help="Per-pair link threshold (default: 1e-3 / number of pairs).")
@click.option("--cache-dir", type=click.Path(file_okay=False), help="Folder of the registry database that caches fingerprints and tests (default: $LINEAGE_CACHE, else $XDG_CACHE_HOME/lineage or ~/.cache/lineage).")
@click.option("--refresh", is_flag=True, help="Recompute cached fingerprints.")
@click.option("--db", type=click.Path(dir_okay=False), help="Registry database (default: <cache-dir>/registry.sqlite).")
@click.option("-k", "--candidates", "k", type=int, default=10, show_default=True,
              help="Candidate relatives tested per model (nearest retrieval keys).")
@click.option("--keep-going", is_flag=True, help="Exit 0 even when some models failed (default: exit 3).")
@_OPT_JSON
@_OPT_OUTPUT
@_OPT_HTML
@_OPT_PROGRESS
@_OPT_COLOUR
def scan(sources: tuple[str, ...], engine: str, workers: int, address: str | None, confirm: bool, device: str,
         alpha: float | None, cache_dir: str | None, refresh: bool, db: str | None, k: int, keep_going: bool,
         as_json: bool, output: str | None, html_path: str | None, no_progress: bool, colour: bool | None) -> int:
    """Scan SOURCES (folders, files, hf-cache[:PATH], org:NAME, Hub ids) and report the family tree.

    Every model is registered (fingerprint stored, verified on reuse), each is tested against
    its nearest candidates, linked pairs form the tree, and claimed bases are checked against
    the weights; --confirm re-checks each link on the weights (type, direction).
    Without --confirm, links carry no direction and are drawn undirected.
    Exit 3 when some models failed (their errors are listed), unless --keep-going.
    """
    import json

    from lineage.scan import ScanOptions
    from lineage.scan import render_html as scan_html
    from lineage.scan import scan as run_scan

    _check_output(html_path)
    _check_output(output)
    opts = ScanOptions(engine=engine, workers=workers, address=address, cache_dir=cache_dir, db=db, alpha=alpha,
                       confirm=confirm, refresh=refresh, k=k, k_max=max(k, 32))
    _check_device(device)
    if device != "cpu":
        os.environ["LINEAGE_DEVICE"] = device  # read by the --confirm comparisons (lineage.scan.confirm_task)
    bar = _progress(no_progress)
    try:
        result = run_scan(list(sources), opts, progress=bar)
    finally:
        if bar is not None:
            bar.close()
    if as_json:
        from lineage.schemas import stamp

        _emit(json.dumps(stamp("scan", result.to_dict()), indent=2, default=str) + "\n", output)
    else:
        from lineage.scan import render_text as scan_text

        want = _want_colour(colour, sys.stdout)
        _emit(scan_text(result, colour=want), output, colour=want)
    if html_path:
        _write_html(html_path, scan_html(result))
    failed = [m for m in result.models if not m.ok]
    if failed and not keep_going:
        click.echo(f"lineage: {len(failed)} of {len(result.models)} models failed (exit 3; --keep-going to exit 0)",
                   err=True)
        return 3
    return 0


@cli.command()
@click.option("-o", "--output", "--out", "out", type=click.Path(file_okay=False), default=None,
              help="Folder to copy the demo models into (default: they stay in the zoo cache, "
                   "$LINEAGE_CACHE, else $XDG_CACHE_HOME/lineage, else ~/.cache/lineage).")
@_OPT_JSON
@click.option("--html", "html_dir", type=click.Path(file_okay=False),
              help="Also write one HTML report per pair into this folder.")
@click.option("--explain", is_flag=True, help="Print the null hypothesis and method text once.")
@_OPT_PROGRESS
@_OPT_COLOUR
def demo(out: str | None, as_json: bool, html_dir: str | None, explain: bool, no_progress: bool,
         colour: bool | None) -> int:
    """Build small demo checkpoints (a base, a fine-tune, an unrelated model, a disguised fine-tune, a merged
    LoRA) and compare each with the base."""
    import json

    from lineage.testing.demo import DEMO_MODELS, DEMO_PAIRS, build_demo
    from lineage.verify import RunSpec, compare_recorded

    want = _want_colour(colour, sys.stdout)
    _note("building the demo models (cached after the first run)…")
    models = build_demo(out)
    if models and not as_json:
        where = Path(next(iter(models.values()))).parent
        click.echo(f"demo models in {where}: " + ", ".join(f"{k} = {Path(v).name}" for k, v in models.items()))
    reports = []
    for x, y in DEMO_PAIRS:
        if x not in models or y not in models:
            continue
        bar = _progress(no_progress)
        try:
            report = compare_recorded(RunSpec(models[x], models[y]), progress=bar)
        finally:
            if bar is not None:
                bar.close()
        reports.append(report)
        if html_dir:
            from lineage.render_html import render_html

            Path(html_dir).mkdir(parents=True, exist_ok=True)
            _write_html(str(Path(html_dir) / f"{x}-vs-{y}.html"), render_html(report))
        if not as_json:
            from lineage.render_text import render_text

            what = DEMO_MODELS[y][1] if y in DEMO_MODELS else y
            click.secho(f"\n=== {x} vs {y}: {what} ===", bold=True, color=want)
            click.echo(render_text(report, colour=want, explain=False), nl=False, color=want)
    if as_json:
        from lineage.schemas import stamp

        click.echo(json.dumps(stamp("demo", {"reports": [r.to_dict() for r in reports]}), indent=2))
    elif explain and reports:
        from lineage.render_text import explain_text

        click.echo("\n" + explain_text(reports[0]), nl=False)
    elif reports:
        _note("\n(method and null hypothesis: lineage demo --explain)")
    return 0


@cli.command()
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Device whose kernels are measured against its own copy bandwidth and matmul rate.")
@click.option("--kernel", "kernels", multiple=True, help="Kernel to measure (repeat; default: all).")
@click.option("--size", "sizes", multiple=True, help="Model size whose layer to use: 1B, 8B, 70B (repeat; default: all).")
@click.option("--quick", is_flag=True, help="Smallest size (one 1B-model layer) and two repetitions.")
@_OPT_JSON
@_OPT_OUTPUT
@_OPT_HTML
def bench(device: str, kernels: tuple[str, ...], sizes: tuple[str, ...], quick: bool, as_json: bool,
          output: str | None, html_path: str | None) -> int:
    """Measure the similarity kernels against this machine's copy bandwidth and matmul rate."""
    import json

    _check_output(html_path)
    _check_output(output)
    from lineage.bench import KERNELS, BenchConfig, render_html, render_text, run_bench, to_dict

    cfg = BenchConfig(device=device, kernels=kernels or KERNELS, sizes=sizes or None, quick=quick)
    report = run_bench(cfg, on_case=lambda r: log.info("%s %s %s done", r.kernel, r.variant, r.size))
    if html_path:
        _write_html(html_path, render_html(report))
    _emit(json.dumps(to_dict(report), indent=2) + "\n" if as_json else render_text(report) + "\n", output)
    return 0


# --------------------------------------------------------------------------- registry (issue 18)


@cli.group()
def registry() -> None:
    """A persistent fingerprint registry: register models, then ask what any model is derived from."""


@registry.command("add")
@click.argument("sources", nargs=-1, required=True)
@click.option("--db", type=click.Path(dir_okay=False), help="Registry database (default: $LINEAGE_CACHE/registry.sqlite).")
@click.option("--engine", type=click.Choice(["local", "dask", "ray"]), default="local", show_default=True,
              help="Where fingerprinting runs: threads here, or a Dask / Ray cluster.")
@click.option("--workers", type=int, default=0, help="Parallel tasks (0: one per core).")
@click.option("--address", help="Scheduler address for --engine dask/ray (default: start a local cluster).")
@click.option("--refresh", is_flag=True, help="Fingerprint again even when a verified entry exists.")
@click.option("--json", "as_json", is_flag=True, help="Write the outcome per model as JSON to stdout.")
@click.option("--no-progress", is_flag=True, help="No progress bars on stderr.")
def registry_add(sources: tuple[str, ...], db: str | None, engine: str, workers: int, address: str | None,
                 refresh: bool, as_json: bool, no_progress: bool) -> int:
    """Register SOURCES (folders, files, hf-cache[:PATH], org:NAME, Hub ids): fingerprint, reference, claims."""
    import json

    from lineage.engine import get_engine
    from lineage.registry import Registry, add

    reg = Registry(db) if db else Registry()
    eng = get_engine(engine, workers, address)
    bar = _progress(no_progress)
    try:
        done, secs = add(list(sources), reg, eng, refresh=refresh, progress=bar)
    finally:
        eng.close()
        if bar is not None:
            bar.close()
    rows = [{"label": d.entry.label, "ref": d.entry.ref, "ok": d.ok, "cached": d.cached, "recomputed": d.recomputed,
             "error": d.error, "claims": [c for c, _ in d.record.claims] if d.record else []} for d in done]
    if as_json:
        click.echo(json.dumps({"schema": "lineage.registry.add/1", "registry": str(reg.path), "seconds": secs,
                               "models": rows, "stats": reg.stats()}, indent=2))
        return 0
    for r in rows:
        state = "error: " + str(r["error"]) if not r["ok"] else "already registered" if r["cached"] else "added"
        click.echo(f"{r['label']}: {state}" + (f" (recomputed: {r['recomputed']})" if r["recomputed"] else ""))
    st = reg.stats()
    click.echo(f"{sum(r['ok'] and not r['cached'] for r in rows)} added, {sum(bool(r['cached']) for r in rows)} already "
               f"registered, {sum(not r['ok'] for r in rows)} failed in {secs:.1f} s; {st['models']} models in {reg.path}")
    return 0


@registry.command("query")
@click.argument("model")
@click.option("--db", type=click.Path(dir_okay=False), help="Registry database (default: $LINEAGE_CACHE/registry.sqlite).")
@click.option("-k", "--candidates", "k", type=int, default=10, show_default=True, help="Candidates to test.")
@click.option("--json", "as_json", is_flag=True, help="Write the result (schema lineage.registry.query/1) as JSON.")
@click.option("--html", "html_path", type=click.Path(dir_okay=False, writable=True), help="Write a plain HTML page.")
def registry_query(model: str, db: str | None, k: int, as_json: bool, html_path: str | None) -> int:
    """Likely parents and relatives of MODEL among the registered models, each with its fingerprint p-value.

    MODEL (a path or Hub id) is fingerprinted unless already registered, and registered too; its
    claimed base, if any, is checked against the weights (the first line of the output).
    """
    import json

    from lineage.engine import get_engine
    from lineage.registry import CandidatePolicy, Registry, query
    from lineage.registry.query import render_html, render_text

    _check_output(html_path)
    reg = Registry(db) if db else Registry()
    eng = get_engine("local", 2)
    try:
        res = query(reg, model, eng, policy=CandidatePolicy(k=k, k_max=k))
    finally:
        eng.close()
    click.echo(json.dumps(res.to_dict(), indent=2, default=str) if as_json else render_text(res), nl=not as_json)
    if html_path:
        Path(html_path).write_text(render_html(res), encoding="utf-8")
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
        sys.exit(2)  # exit 1 is reserved for --expect
    except LineageError as e:
        if debug:
            traceback.print_exc()
        click.echo(f"lineage: error: {e}".replace("\n", " "), err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as e:  # last resort: a bug, not bad input; still one line and exit 2
        if debug:
            traceback.print_exc()
        what = " ".join(str(e).split())[:300]
        click.echo(f"lineage: internal error ({type(e).__name__}: {what}) while running "
                   f"'lineage {' '.join(args)[:300]}'; rerun with --debug for the traceback", err=True)
        sys.exit(2)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":  # pragma: no cover
    main()
