"""Commands about many models: tree (all pairs compared), scan (fingerprints, registry, claims)."""

from __future__ import annotations

import os
import sys

import click

from lineage.cli.options import (OPT_COLOUR, OPT_DEVICE, OPT_HTML, OPT_JSON, OPT_OUTPUT, OPT_PROGRESS, check_device,
                                 check_output, emit, progress, want_colour, write_html)


@click.command()
@click.argument("models", nargs=-1, required=True)
@OPT_JSON
@OPT_OUTPUT
@OPT_HTML
@OPT_DEVICE
@OPT_PROGRESS
@OPT_COLOUR
def tree(models: tuple[str, ...], as_json: bool, output: str | None, html_path: str | None, device: str,
         no_progress: bool, colour: bool | None) -> int:
    """Family tree of MODELS: which derives from which, with edge types."""
    if len(models) < 2:  # before any heavy import
        raise click.UsageError("give at least two models")
    import json

    from lineage.compare import CompareOptions
    from lineage.family import family_tree
    from lineage.render.tree import render_html as tree_html
    from lineage.render.tree import render_text as tree_text

    check_output(html_path)
    check_output(output)
    check_device(device)
    with progress(no_progress) as bar:
        result = family_tree(list(models), options=CompareOptions(device=device), progress=bar)
    if as_json:
        from lineage.schemas import stamp

        emit(json.dumps(stamp("tree", result.to_dict()), indent=2) + "\n", output)
    else:
        emit(tree_text(result.tree) + "\n", output, colour=want_colour(colour, sys.stdout))
    if html_path:
        write_html(html_path, tree_html(result.tree, pairs=result.pair_rows()))
    return 0


@click.command()
@click.argument("sources", nargs=-1, required=True)
@click.option("--engine", type=click.Choice(["local", "dask", "ray"]), default="local", show_default=True,
              help="Where tasks run: threads here, or a Dask / Ray cluster (quiet unless -v).")
@click.option("--workers", type=int, default=0, help="Parallel tasks (0: one per core).")
@click.option("--address", help="Scheduler address for --engine dask/ray (default: start a local cluster).")
@click.option("--confirm", is_flag=True, help="Confirm every fingerprint link with the full weight comparison.")
@OPT_DEVICE
@click.option("--alpha", type=float, help="Per-pair link threshold (default: 1e-3 / number of pairs).")
@click.option("--cache-dir", type=click.Path(file_okay=False), help="Folder of the registry database that caches fingerprints and tests (default: $LINEAGE_CACHE, else $XDG_CACHE_HOME/lineage or ~/.cache/lineage).")
@click.option("--refresh", is_flag=True, help="Recompute cached fingerprints.")
@click.option("--db", type=click.Path(dir_okay=False), help="Registry database (default: <cache-dir>/registry.sqlite).")
@click.option("-k", "--candidates", "k", type=int, default=10, show_default=True,
              help="Candidate relatives tested per model (nearest retrieval keys).")
@click.option("--keep-going", is_flag=True, help="Exit 0 even when some models failed (default: exit 3).")
@OPT_JSON
@OPT_OUTPUT
@OPT_HTML
@OPT_PROGRESS
@OPT_COLOUR
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

    check_output(html_path)
    check_output(output)
    opts = ScanOptions(engine=engine, workers=workers, address=address, cache_dir=cache_dir, db=db, alpha=alpha,
                       confirm=confirm, refresh=refresh, k=k, k_max=max(k, 32))
    check_device(device)
    if device != "cpu":
        os.environ["LINEAGE_DEVICE"] = device  # read by the --confirm comparisons (lineage.scan.confirm_task)
    with progress(no_progress) as bar:
        result = run_scan(list(sources), opts, progress=bar)
    if as_json:
        from lineage.schemas import stamp

        emit(json.dumps(stamp("scan", result.to_dict()), indent=2, default=str) + "\n", output)
    else:
        from lineage.scan import render_text as scan_text

        want = want_colour(colour, sys.stdout)
        emit(scan_text(result, colour=want), output, colour=want)
    if html_path:
        write_html(html_path, scan_html(result))
    failed = [m for m in result.models if not m.ok]
    if failed and not keep_going:
        click.echo(f"lineage: {len(failed)} of {len(result.models)} models failed (exit 3; --keep-going to exit 0)",
                   err=True)
        return 3
    return 0
