"""Commands about one model: inspect, fingerprint."""

from __future__ import annotations

import os
import sys

import click

from lineage.cli.options import (OPT_COLOUR, OPT_DEVICE, OPT_JSON, OPT_OUTPUT, OPT_PROGRESS, OPT_REVISION, OPT_TENSORS, OPT_TOKEN,
                                 check_output, emit, hub_refs, progress, want_colour)


@click.command()
@click.argument("ref")
@OPT_JSON
@OPT_OUTPUT
@OPT_TENSORS
@click.option("--download", is_flag=True, help="For Hub references: download files instead of range reads.")
@OPT_PROGRESS
@OPT_COLOUR
@OPT_REVISION
@OPT_TOKEN
def inspect(ref: str, as_json: bool, output: str | None, tensors: bool, download: bool, no_progress: bool,
            colour: bool | None, revision: str | None = None, token: str | None = None) -> int:
    """Show what a model reference holds (format, tensors, roles, dtypes, claimed lineage) without comparing."""
    import json

    from lineage.inspect import inspect as run_inspect

    if download:
        os.environ["LINEAGE_HUB_DOWNLOAD"] = "1"
    if revision or token:
        (ref,) = hub_refs((ref,), revision, token)
    result = run_inspect(ref)
    if as_json:
        from lineage.schemas import stamp

        emit(json.dumps(stamp("inspect", result.to_dict()), indent=2, default=str) + "\n", output)
        return 0
    from lineage.render.text import render_inspect

    emit(render_inspect(result, tensors=tensors), output, colour=want_colour(colour, sys.stdout))
    return 0


@click.command()
@click.argument("model")
@click.option("-o", "--output", "output", required=True, type=click.Path(dir_okay=False, writable=True),
              help="Fingerprint file to write (.lfp).")
@OPT_JSON
@OPT_DEVICE
@OPT_PROGRESS
@OPT_REVISION
@OPT_TOKEN
def fingerprint(model: str, output: str, as_json: bool, device: str, no_progress: bool, revision: str | None = None,
                token: str | None = None) -> int:
    """Write MODEL's compact, transform-invariant fingerprint (compare it later with `lineage compare`)."""
    import json

    from lineage.fingerprint import SUFFIX

    if not output.endswith(SUFFIX):
        raise click.UsageError(f"the fingerprint file name must end in {SUFFIX}")
    check_output(output)
    if revision or token:
        (model,) = hub_refs((model,), revision, token)
    from lineage.fingerprint_workflow import write_fingerprint

    with progress(no_progress) as bar:
        info = write_fingerprint(model, output, progress=bar, device=device)
    if as_json:
        from lineage.schemas import stamp

        click.echo(json.dumps(stamp("fingerprint", {"model": model, "output": output, **info}), indent=2))
    else:
        click.echo(f"{output}: {info['bytes']:,} bytes, {info['layers']} layers, {info['probes']} probe tokens; "
                   f"read {info['bytes_read']:,} of {info['model_bytes']:,} model bytes in {info['seconds']:.1f} s")
    return 0
