"""Where lineage keeps what it caches (the zoo, fingerprints, benchmark models): one helper for all.

``$LINEAGE_CACHE`` when set; else ``$XDG_CACHE_HOME/lineage`` (the XDG base-directory
convention, when ``XDG_CACHE_HOME`` is an absolute path); else ``~/.cache/lineage``.
The Hugging Face cache is not ours: it stays where ``HF_HUB_CACHE`` / ``HF_HOME`` put it.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "LINEAGE_CACHE"


def cache_root() -> Path:
    """The root of lineage's cache (not created)."""
    own = os.environ.get(ENV)
    if own:
        return Path(own).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "lineage"
    return Path.home() / ".cache" / "lineage"


def cache_path(*parts: str, create: bool = False) -> Path:
    """``cache_root()`` joined with ``parts``; the folder is created when ``create``."""
    d = cache_root().joinpath(*parts)
    if create:
        d.mkdir(parents=True, exist_ok=True)
    return d
