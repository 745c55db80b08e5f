"""What every command shares: global flags, the common options, output and progress helpers."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click


class _Ctx:
    """Global options shared by every command (set by the group)."""

    quiet: bool = False
    verbose: int = 0


CTX = _Ctx()


def hf_truthy(name: str) -> bool:
    """True when environment variable ``name`` holds a Hugging Face style "on" value."""
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def want_colour(flag: bool | None, stream: Any) -> bool:
    """--color forces colour (also into a pipe), --no-color and NO_COLOR turn it off, else: a terminal."""
    if flag is not None:
        return flag
    if os.environ.get("NO_COLOR"):
        return False
    return hasattr(stream, "isatty") and stream.isatty()


def check_device(device: str) -> None:
    """Fail before any work when ``--device`` cannot be had (``cuda`` without CUDA: exit 2, one line)."""
    from lineage.device import resolve_device

    resolve_device(device)


def check_output(path: str | None) -> None:
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


def write_output(path: str, text: str) -> None:
    """Write an output file; a failure is a typed error naming it."""
    from lineage.errors import ConfigError

    try:
        Path(path).write_text(text, encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot write: {e.strerror or e}", path=path) from None


def progress_bar(no_progress: bool) -> Any:
    """A tqdm progress callback on stderr, or None (--no-progress, --quiet, not a terminal,
    HF_HUB_DISABLE_PROGRESS_BARS)."""
    if no_progress or CTX.quiet or not sys.stderr.isatty() or hf_truthy("HF_HUB_DISABLE_PROGRESS_BARS"):
        return None
    from lineage.progress import TqdmProgress

    return TqdmProgress(sys.stderr)


@contextmanager
def progress(no_progress: bool) -> Iterator[Any]:
    """:func:`progress_bar` as a context: the bar (or None) is closed however the block ends."""
    bar = progress_bar(no_progress)
    try:
        yield bar
    finally:
        if bar is not None:
            bar.close()


def note(message: str) -> None:
    """An informational line on stderr (silenced by --quiet)."""
    if not CTX.quiet:
        click.echo(message, err=True)


def emit(text: str, output: str | None, colour: bool | None = None) -> None:
    """The command's main output: to ``output`` when given, else stdout (colour kept only on stdout)."""
    if output:
        write_output(output, click.unstyle(text))
        note(f"written to {output}")
    else:
        click.echo(text, nl=False, color=colour)


def write_html(path: str, page: str) -> None:
    """Write an HTML page and say where."""
    write_output(path, page)
    note(f"HTML written to {path}")


def hub_refs(refs: tuple[str, ...], revision: str | None, token: str | None) -> list[str]:
    """Apply ``--token`` (as HF_TOKEN) and ``--revision`` (to Hub references without their own @REV)."""
    from lineage.io.hub import parse_hub_ref, with_revision

    if token:
        os.environ["HF_TOKEN"] = token
    if revision and not any(parse_hub_ref(r) for r in refs):
        raise click.UsageError("--revision applies to Hub references only (org/name, hf://…)")
    return [with_revision(r, revision) for r in refs]


# Options several commands share: same names, same help everywhere.
OPT_JSON = click.option("--json", "as_json", is_flag=True, help="Write JSON (with its schema id and the tool version) instead of text.")
OPT_OUTPUT = click.option("-o", "--output", "output", type=click.Path(dir_okay=False, writable=True),
                          help="Write the main output (text, or JSON with --json) to this file instead of stdout.")
OPT_HTML = click.option("--html", "html_path", type=click.Path(dir_okay=False, writable=True),
                        help="Also write a self-contained HTML page to this file.")
OPT_PROGRESS = click.option("--no-progress", is_flag=True, help="No progress bars on stderr.")
OPT_COLOUR = click.option("--color/--no-color", "colour", default=None,
                          help="Force colour on (also into a pipe) or off (default: colour on a terminal unless NO_COLOR).")
OPT_DEVICE = click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default="cpu", show_default=True,
                          help="Where the tensor arithmetic runs (auto: CUDA when present; cuda without one is an "
                               "error). Files are read on the CPU.")
OPT_TENSORS = click.option("--tensors/--no-tensors", default=False, show_default=True, help="Also list every tensor.")
OPT_REVISION = click.option("--revision", help="Hub revision (branch, tag or commit) for Hub references "
                            "without their own @REV.")
OPT_TOKEN = click.option("--token", help="Hugging Face token (default: HF_TOKEN, or the one `hf auth login` saved).")
