"""The `lineage` command group and its entry point: global flags, one line and exit 2 on any error.

Exit codes: 0 success (whatever the verdict), 1 when ``--expect`` disagrees with
the verdict, 2 on bad input (any :class:`~lineage.errors.LineageError`), bad usage or any
other failure (always one line on stderr; ``--debug`` adds the traceback).
"""

from __future__ import annotations

import logging
import os
import sys
import traceback

import click

from lineage.cli import fleet, model, pairs, registry, tools
from lineage.cli.options import CTX
from lineage.errors import LineageError


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
    CTX.quiet, CTX.verbose = quiet, verbose
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


for _command in (pairs.compare, pairs.verify, pairs.merge, pairs.demo, model.inspect, model.fingerprint,
                 tools.schema, fleet.tree, fleet.scan, tools.bench, registry.registry):
    cli.add_command(_command)


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

