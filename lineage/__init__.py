"""lineage: weight-lineage verifier.

Import what you need from the submodules (``lineage.compare``, ``lineage.family`` …): this
package module stays light so that ``lineage --help`` starts fast.
"""

from __future__ import annotations


def _find_version() -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover
        return "0+unknown"
    try:
        return version("weight-lineage")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "0+unknown"


__version__: str = _find_version()
__all__ = ["__version__"]
