"""The `registry` command group: add models, query a model's relatives."""

from __future__ import annotations

from pathlib import Path

import click

from lineage.cli.options import check_output, progress


@click.group()
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
    try:
        with progress(no_progress) as bar:
            done, secs = add(list(sources), reg, eng, refresh=refresh, progress=bar)
    finally:
        eng.close()
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
@click.option("-k", "--candidates", "k", type=int, default=10, show_default=True,
              help="Groups of near-identical keys to test (each linked group's other members are tested too).")
@click.option("--json", "as_json", is_flag=True, help="Write the result (schema lineage.registry.query/1) as JSON.")
@click.option("--html", "html_path", type=click.Path(dir_okay=False, writable=True), help="Write a plain HTML page.")
def registry_query(model: str, db: str | None, k: int, as_json: bool, html_path: str | None) -> int:
    """Likely parents and relatives of MODEL among the registered models, each with its fingerprint p-value.

    MODEL (a path or Hub id) is fingerprinted unless already registered, and registered too; its
    claimed base, if any, is checked against the weights (the first line of the output).
    """
    import json

    from lineage.engine import get_engine
    from lineage.registry import QueryPolicy, Registry, query
    from lineage.registry.query import render_html, render_text

    check_output(html_path)
    reg = Registry(db) if db else Registry()
    eng = get_engine("local", 2)
    try:
        res = query(reg, model, eng, policy=QueryPolicy(k=k))
    finally:
        eng.close()
    click.echo(json.dumps(res.to_dict(), indent=2, default=str) if as_json else render_text(res), nl=not as_json)
    if html_path:
        Path(html_path).write_text(render_html(res), encoding="utf-8")
    return 0
