"""Where many independent tasks run: this process (threads), a Dask cluster, or a Ray cluster.

A scan is embarrassingly parallel (one fingerprint per model, one comparison per
candidate pair), so an :class:`Engine` only needs to map a picklable function over
items and hand results back as they finish.  Each result comes back as a
:class:`Outcome` holding either the value or the exception's type and message — one
bad model must not abort a scan of thousands.

* :class:`LocalEngine` — a thread pool in this process; torch runs single-threaded in
  each task (OpenMP intra-op threads oversubscribed by several workers collapse on
  small machines, see :mod:`lineage_kernels.threads`).
* :class:`DaskEngine` — ``dask.distributed``: an existing scheduler (``address``) or a
  local cluster of single-threaded worker processes.  Optional dependency
  (``pip install 'weight-lineage[scale]'``).
* :class:`RayEngine` — Ray: an existing cluster (``address``) or a local one.
  Optional dependency (``pip install ray``).

Functions sent to Dask or Ray must be importable top-level functions and their
arguments picklable (model references are strings).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from lineage.errors import ConfigError

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

ENGINES = ("local", "dask", "ray")


@dataclass(frozen=True)
class Outcome(Generic[R]):
    """Result of one task: ``value``, or the failure as ``error_type: error``."""

    index: int
    value: R | None = None
    error: str | None = None
    error_type: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class Engine(Protocol):
    """Runs ``fn`` over ``items``; outcomes are yielded as tasks finish (any order, with their index)."""

    name: str
    workers: int

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> Iterator[Outcome[R]]: ...

    def share(self, values: Sequence[Any]) -> list[Any]:
        """Handles to ``values`` that tasks can take as (nested) arguments: the values themselves, or,
        on Dask, futures of data scattered to the workers (the scheduler holds only their keys)."""
        ...

    def close(self) -> None: ...


def _guarded(fn: Callable[[T], R], item: T) -> tuple[R | None, str | None, str | None]:
    """Run one task with torch single-threaded; exceptions become data (they must cross process boundaries)."""
    from lineage_kernels.threads import single_threaded

    try:
        with single_threaded():
            return fn(item), None, None
    except Exception as e:  # noqa: BLE001 - reported per task, never raised across the pool
        log.debug("task failed", exc_info=True)
        return None, f"{e}", type(e).__name__


class LocalEngine:
    """Thread pool in this process (``workers`` threads; 0 = one per core)."""

    name = "local"

    def __init__(self, workers: int = 0) -> None:
        self.workers = workers if workers > 0 else max(1, os.cpu_count() or 1)

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> Iterator[Outcome[R]]:
        if self.workers == 1 or len(items) <= 1:
            for i, it in enumerate(items):
                v, err, typ = _guarded(fn, it)
                yield Outcome(i, v, err, typ)
            return
        with ThreadPoolExecutor(self.workers, thread_name_prefix="lineage-engine") as pool:
            futs = {pool.submit(_guarded, fn, it): i for i, it in enumerate(items)}
            for f in as_completed(futs):
                v, err, typ = f.result()
                yield Outcome(futs[f], v, err, typ)

    def share(self, values: Sequence[Any]) -> list[Any]:
        return list(values)

    def close(self) -> None:
        """Nothing to release."""


class DaskEngine:
    """``dask.distributed``: connect to ``address`` or start a local cluster of ``workers`` processes."""

    name = "dask"

    def __init__(self, workers: int = 0, address: str | None = None) -> None:
        try:
            from dask.distributed import Client, LocalCluster
        except ImportError as e:
            raise ConfigError("the dask engine needs dask.distributed: pip install 'weight-lineage[scale]'") from e
        self.workers = workers if workers > 0 else max(1, os.cpu_count() or 1)
        self._cluster = None
        if address:
            self._client = Client(address, direct_to_workers=True)
        else:
            self._cluster = LocalCluster(n_workers=self.workers, threads_per_worker=1, processes=True,
                                         dashboard_address=None)
            self._client = Client(self._cluster, direct_to_workers=True)
        log.info("dask engine: %s", self._client)

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> Iterator[Outcome[R]]:
        from dask.distributed import as_completed as dask_completed

        futs = [self._client.submit(_guarded, fn, it, pure=False) for it in items]
        index = {f.key: i for i, f in enumerate(futs)}
        for f in dask_completed(futs):
            v, err, typ = f.result()
            yield Outcome(index[f.key], v, err, typ)

    def share(self, values: Sequence[Any]) -> list[Any]:
        """Scatter ``values`` to the workers straight from this client (bytes never pass the scheduler)."""
        return list(self._client.scatter(list(values), hash=False)) if values else []

    def close(self) -> None:
        self._client.close()
        if self._cluster is not None:
            self._cluster.close()


class RayEngine:
    """Ray: connect to ``address`` (``"auto"`` for a running cluster) or start a local one."""

    name = "ray"

    def __init__(self, workers: int = 0, address: str | None = None) -> None:
        try:
            import ray
        except ImportError as e:
            raise ConfigError("the ray engine needs ray: pip install ray") from e
        self._ray = ray
        self.workers = workers if workers > 0 else max(1, os.cpu_count() or 1)
        if not ray.is_initialized():
            ray.init(address=address, num_cpus=None if address else self.workers, include_dashboard=False,
                     log_to_driver=False)
        self._task = ray.remote(num_cpus=1)(_guarded)

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> Iterator[Outcome[R]]:
        refs = [self._task.remote(fn, it) for it in items]
        index = {r: i for i, r in enumerate(refs)}
        pending = list(refs)
        while pending:
            done, pending = self._ray.wait(pending, num_returns=1)
            for r in done:
                v, err, typ = self._ray.get(r)
                yield Outcome(index[r], v, err, typ)

    def share(self, values: Sequence[Any]) -> list[Any]:
        """Values go with the tasks (Ray puts large arguments in its object store itself)."""
        return list(values)

    def close(self) -> None:
        """Leave the Ray runtime to its owner (it may be shared)."""


def get_engine(name: str = "local", workers: int = 0, address: str | None = None) -> Any:
    """An :class:`Engine` by name (``local``, ``dask``, ``ray``)."""
    if name == "local":
        if address:
            raise ConfigError("the local engine takes no --address")
        return LocalEngine(workers)
    if name == "dask":
        return DaskEngine(workers, address)
    if name == "ray":
        return RayEngine(workers, address)
    raise ConfigError(f"engine must be one of {', '.join(ENGINES)}, not {name!r}")
