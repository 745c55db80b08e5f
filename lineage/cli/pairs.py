"""Commands about a pair of models: compare, verify (re-run a recorded compare), merge, demo."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from lineage.cli.options import (OPT_COLOUR, OPT_DEVICE, OPT_HTML, OPT_JSON, OPT_OUTPUT, OPT_PROGRESS, OPT_REVISION, OPT_TENSORS,
                                 OPT_TOKEN, check_output, emit, hub_refs, note, progress, want_colour, write_html)


@click.command()
@click.argument("a")
@click.argument("b")
@OPT_JSON
@OPT_OUTPUT
@OPT_HTML
@click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default="cpu", show_default=True,
              help="Where the streaming pass (moments, sketches) runs; auto picks CUDA when present.")
@click.option("--expect", type=click.Choice(["derived", "unrelated"]), help="Exit 1 unless the verdict agrees (for CI).")
@OPT_TENSORS
@click.option("--canon", "canon", type=click.Choice(["auto", "always", "never"]), default="auto", show_default=True,
              help="The canonical test (undoes permutations, rotations and gains: the calibrated p-value for "
                   "disguised pairs; costs a second read of both models and per-layer alignment, about as long "
                   "again as the element-wise pass or more). auto: only when the element-wise evidence leaves "
                   "something to undo (a module that looks unrelated or departs from its siblings, differing "
                   "widths or depths, unmatched tensors, a verdict other than derived); otherwise skipped and said "
                   "so in the report. always: every derived, unrelated or inconclusive pair. never: the "
                   "element-wise comparison alone (one read; no anatomy either).")
@click.option("--no-canon", is_flag=True,
              help="Same as --canon never: element-wise comparison alone, one read of each file (moments of every "
                   "tensor, verdict and p-value from them). Skipped: the canonical test and the anatomy (relation, "
                   "LoRA rank and modules, quantisation format, direction; exact work only on the modules the "
                   "streamed screen flags).")
@click.option("--adapter", "adapter", type=click.Path(exists=True, file_okay=False), help="PEFT adapter folder: verify B = A + adapter.")
@click.option("--parents", "-p", "parents", multiple=True,
              help="Candidate merge parent of B (repeat): B is fitted as a merge of them.")
@click.option("--base", "merge_base", help="The parents' common base for --parents (default: A, unless A is a parent).")
@click.option("--explain", is_flag=True, help="Print the null hypothesis and method text (always in JSON and HTML).")
@click.option("--no-hash", is_flag=True, help="Do not hash the input files (the report then cannot be verified).")
@OPT_PROGRESS
@OPT_COLOUR
@OPT_REVISION
@OPT_TOKEN
def compare(
    a: str, b: str, as_json: bool, output: str | None, html_path: str | None, device: str, expect: str | None,
    tensors: bool, canon: str, no_canon: bool, adapter: str | None, parents: tuple[str, ...], merge_base: str | None,
    explain: bool, no_hash: bool, no_progress: bool, colour: bool | None, revision: str | None = None,
    token: str | None = None,
) -> int:
    """Compare model A (reference) with model B and give a lineage verdict.

    With --parents, B is also fitted as a merge of the given models (task vectors
    relative to --base, or to A when A is not among the parents) and called a merge
    when the fit explains it.  The JSON and HTML reports record the BLAKE3 hash and size of
    every file read, the options and seeds: `lineage verify REPORT.json` re-runs them.
    """
    check_output(html_path)
    check_output(output)
    from lineage.verify import RunSpec, compare_recorded

    if revision or token:
        a, b = hub_refs((a, b), revision, token)
    canon = "never" if no_canon else canon
    spec = RunSpec(a, b, device=device, canonicalise=canon != "never", canon=canon, adapter=adapter, parents=tuple(parents),
                   base=merge_base)
    with progress(no_progress) as bar:
        report = compare_recorded(spec, progress=bar, hash_files=not no_hash)
    want = want_colour(colour, sys.stdout if not output else None)
    if as_json:
        emit(report.to_json() + "\n", output)
    else:
        from lineage.render.text import render_text

        emit(render_text(report, colour=want, tensors=tensors, explain=explain), output, colour=want)
    if html_path:
        from lineage.render.html import render_html

        write_html(html_path, render_html(report))
    if expect is not None:
        wanted = expect == "derived"
        if report.verdict.derived is not wanted:
            click.echo(f"lineage: expected {expect}, verdict is {report.verdict.relation}", err=True)
            return 1
    return 0


@click.command()
@click.argument("report", type=click.Path(dir_okay=False))
@click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default=None,
              help="Where to re-run (default: the device recorded in the report).")
@OPT_JSON
@OPT_OUTPUT
@OPT_PROGRESS
def verify(report: str, device: str | None, as_json: bool, output: str | None, no_progress: bool) -> int:
    """Re-run the comparison recorded in REPORT (a `compare --json` report) and check it.

    The input files are re-hashed (a changed file is named, with both hashes), the comparison
    re-runs with the recorded options and seeds, and the verdict, p-value and per-layer figures
    are compared.  Exit 0 when everything matches, 1 when something differs.
    """
    import json

    from lineage.verify import render_verify, verify_report

    with progress(no_progress) as bar:
        result, _ = verify_report(report, device=device, progress=bar)
    if as_json:
        from lineage.schemas import stamp

        emit(json.dumps(stamp("verify", result.to_dict()), indent=2) + "\n", output)
    else:
        emit(render_verify(result), output)
    return 0 if result.same else 1


@click.command()
@click.argument("child")
@click.option("--parents", "-p", multiple=True, required=True, help="A candidate parent (repeat the option).")
@click.option("--base", help="The parents' common base (task vectors are taken relative to it).")
@OPT_JSON
@OPT_OUTPUT
@OPT_DEVICE
@OPT_PROGRESS
def merge(child: str, parents: tuple[str, ...], base: str | None, as_json: bool, output: str | None,
          device: str, no_progress: bool) -> int:
    """Fit CHILD as a merge of PARENTS: per-module mixing weights with their uncertainty."""
    import json

    from lineage.mergefit import fit_merge_models

    check_output(output)
    fit = fit_merge_models(child, list(parents), base, device=device)
    d = fit.to_dict()
    if as_json:
        from lineage.schemas import stamp

        d.pop("per_module", None)
        emit(json.dumps(stamp("merge", {"child": child, "parents": list(parents), "base": base, "device": device,
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
    emit("\n".join(lines) + "\n", output)
    return 0


@click.command()
@click.option("-o", "--output", "--out", "out", type=click.Path(file_okay=False), default=None,
              help="Folder to copy the demo models into (default: they stay in the zoo cache, "
                   "$LINEAGE_CACHE, else $XDG_CACHE_HOME/lineage, else ~/.cache/lineage).")
@OPT_JSON
@click.option("--html", "html_dir", type=click.Path(file_okay=False),
              help="Also write one HTML report per pair into this folder.")
@click.option("--explain", is_flag=True, help="Print the null hypothesis and method text once.")
@OPT_PROGRESS
@OPT_COLOUR
def demo(out: str | None, as_json: bool, html_dir: str | None, explain: bool, no_progress: bool,
         colour: bool | None) -> int:
    """Build small demo checkpoints (a base, a fine-tune, an unrelated model, a disguised fine-tune, a merged
    LoRA) and compare each with the base."""
    import json

    from lineage.testing.demo import DEMO_MODELS, DEMO_PAIRS, build_demo
    from lineage.verify import RunSpec, compare_recorded

    want = want_colour(colour, sys.stdout)
    note("building the demo models (cached after the first run)…")
    models = build_demo(out)
    if models and not as_json:
        where = Path(next(iter(models.values()))).parent
        click.echo(f"demo models in {where}: " + ", ".join(f"{k} = {Path(v).name}" for k, v in models.items()))
    reports = []
    for x, y in DEMO_PAIRS:
        if x not in models or y not in models:
            continue
        with progress(no_progress) as bar:
            report = compare_recorded(RunSpec(models[x], models[y]), progress=bar)
        reports.append(report)
        if html_dir:
            from lineage.render.html import render_html

            Path(html_dir).mkdir(parents=True, exist_ok=True)
            write_html(str(Path(html_dir) / f"{x}-vs-{y}.html"), render_html(report))
        if not as_json:
            from lineage.render.text import render_text

            what = DEMO_MODELS[y][1] if y in DEMO_MODELS else y
            click.secho(f"\n=== {x} vs {y}: {what} ===", bold=True, color=want)
            click.echo(render_text(report, colour=want, explain=False), nl=False, color=want)
    if as_json:
        from lineage.schemas import stamp

        click.echo(json.dumps(stamp("demo", {"reports": [r.to_dict() for r in reports]}), indent=2))
    elif explain and reports:
        from lineage.render.text import explain_text

        click.echo("\n" + explain_text(reports[0]), nl=False)
    elif reports:
        note("\n(method and null hypothesis: lineage demo --explain)")
    return 0
