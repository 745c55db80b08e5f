"""The local Hub stand-in used by the tests; it lives in :mod:`lineage.testing.hubserver` (benchmarks use it too)."""

from __future__ import annotations

from lineage.testing.hubserver import LFS_SUFFIXES, Fault, HubServer

__all__ = ["LFS_SUFFIXES", "Fault", "HubServer"]
