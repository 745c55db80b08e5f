"""Where the zoo is cached: lineage's one cache rule (:func:`lineage.io.cachedir.cache_root`).

``$LINEAGE_CACHE/zoo/<key>`` when ``LINEAGE_CACHE`` is set, else ``$XDG_CACHE_HOME/lineage/zoo/<key>``
(an absolute ``XDG_CACHE_HOME``), else ``~/.cache/lineage/zoo/<key>``.

:func:`lineage.testing.zoo.build_zoo` called without ``out`` still uses the older rule written into
``zoo.py`` (``LINEAGE_CACHE``, else ``~/.cache/lineage``): the zoo's cache key hashes that module's
code, so changing it would rebuild every cached zoo for no change of bytes.  Every caller in the
project (``lineage demo``, ``fixtures/build_zoo.py``, the tests and the benchmarks) asks here instead.
"""

from __future__ import annotations

from pathlib import Path

from lineage.io.cachedir import cache_path
from lineage.testing.zoo import Zoo, _is_built, build_zoo, zoo_key


def zoo_dir(subset: str) -> Path:
    """The cache folder of the ``subset`` zoo built by the current code (not created, maybe not built)."""
    return cache_path("zoo", zoo_key(subset)[0])


def cached_zoo(subset: str = "small", *, workers: int | None = None, force: bool = False) -> Zoo:
    """The ``subset`` zoo from lineage's cache, built there first when it is missing (or ``force``)."""
    key = zoo_key(subset)[0]
    root = cache_path("zoo", key)
    if not force and _is_built(root, key):
        return Zoo(root)
    return build_zoo(subset, root, workers=workers, force=force)
