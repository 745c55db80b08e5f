"""Role-keyed tensors read on demand, and a bounded parallel map over modules.

The anatomy stage (:func:`lineage.anatomy.explain` and the signals it calls) takes
``Mapping[str, torch.Tensor]`` models.  For a large checkpoint, holding every tensor
in memory is not an option; :class:`LazyRoles` is such a mapping whose values are read
from the checkpoint when accessed (one role at a time, float32, canonical orientation)
while the shapes are known up front from the headers.  Consumers that only need shapes
use :func:`shape_of` (no read); consumers that visit every module use
:func:`map_roles`, which runs a per-module function on a small pool of threads, keeps
results in role order and never has more than ``2 × workers`` modules in flight, so peak
memory stays at a few tensors whatever the model size.

Torch runs single-threaded inside the pool (OpenMP intra-op threads oversubscribed by
several workers collapse on a small machine, see ``lineage_kernels.threads``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import torch

from lineage_kernels.threads import single_threaded

log = logging.getLogger(__name__)

R = TypeVar("R")


class LazyRoles(Mapping[str, torch.Tensor]):
    """A read-on-access ``role -> float32 tensor`` mapping with known shapes.

    ``read(role)`` produces the tensor (e.g. ``roles.read_role(ckpt, view)``);
    ``shapes`` lists the roles (in iteration order) and their shapes.  The last
    ``cache`` tensors read are kept (thread-safe) so a consumer that touches the same
    role a few times in a row reads it once; memory is bounded by ``cache`` tensors.
    """

    def __init__(self, read: Callable[[str], torch.Tensor], shapes: Mapping[str, Sequence[int]],
                 *, cache: int = 2, read_rows: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> None:
        self._read = read
        self._read_rows = read_rows
        #: Small per-module results computed by consumers (e.g. pair statistics), so two
        #: passes that need the same reduction share one read.  Bounded by the module count.
        self.memo: dict[object, object] = {}
        self._shapes = {k: torch.Size(tuple(int(x) for x in v)) for k, v in shapes.items()}
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._cache_size = max(0, int(cache))
        self._lock = threading.Lock()
        self.reads = 0  # number of tensors read (for tests and diagnostics)

    #: Values are read on access: consumers visit modules with :func:`map_roles`.
    lazy = True

    def __getitem__(self, role: str) -> torch.Tensor:
        if role not in self._shapes:
            raise KeyError(role)
        with self._lock:
            t = self._cache.get(role)
            if t is not None:
                self._cache.move_to_end(role)
                return t
        t = self._read(role)
        if tuple(t.shape) != tuple(self._shapes[role]):
            raise ValueError(f"LazyRoles: {role} read with shape {tuple(t.shape)}, "
                             f"expected {tuple(self._shapes[role])}")
        with self._lock:
            self.reads += 1
            if self._cache_size:
                self._cache[role] = t
                self._cache.move_to_end(role)
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return t

    def __iter__(self) -> Iterator[str]:
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)

    def __contains__(self, role: object) -> bool:
        return role in self._shapes

    def shape(self, role: str) -> torch.Size:
        """Shape of ``role`` without reading it."""
        return self._shapes[role]

    def rows(self, role: str, index: torch.Tensor) -> torch.Tensor:
        """Rows ``index`` of ``role`` (float32); reads only those rows when ``read_rows`` was given."""
        if role not in self._shapes:
            raise KeyError(role)
        if self._read_rows is not None:
            return self._read_rows(role, index)
        return self[role][index]


class RoleSpill:
    """Tensors produced one at a time (e.g. a model realigned layer by layer), written to a
    folder as they come and read back on access (:meth:`roles`): memory stays at a few tensors.

    Each tensor is one small safetensors file (float32 kept exactly); the folder belongs to the
    caller (a temporary directory).
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self._dir = os.fspath(directory)
        self._paths: dict[str, str] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self.bytes_written = 0

    def add(self, role: str, t: torch.Tensor) -> None:
        """Write ``role`` (replaces an earlier tensor of that role)."""
        from safetensors.torch import save_file

        path = os.path.join(self._dir, f"{len(self._paths):06d}.safetensors")
        save_file({"t": t.detach().contiguous()}, path)
        self._paths[role] = path
        self._shapes[role] = tuple(t.shape)
        self.bytes_written += t.numel() * t.element_size()

    def __contains__(self, role: object) -> bool:
        return role in self._paths

    def roles(self, cache: int = 2) -> LazyRoles:
        """The written tensors as a read-on-access mapping (in the order they were added)."""
        from safetensors.torch import load_file

        paths = dict(self._paths)
        return LazyRoles(lambda r: load_file(paths[r])["t"], self._shapes, cache=cache)


class PairView(Mapping[str, tuple[torch.Tensor, torch.Tensor]]):
    """``role -> (x[role], y[role])`` over the given roles, read on access (nothing is copied)."""

    lazy = True

    def __init__(self, x: Mapping[str, torch.Tensor], y: Mapping[str, torch.Tensor], roles: Iterable[str]) -> None:
        self._x, self._y = x, y
        self._roles = list(roles)
        self._set = set(self._roles)
        self.lazy = is_lazy(x, y)

    @property
    def x(self) -> Mapping[str, torch.Tensor]:
        return self._x

    @property
    def y(self) -> Mapping[str, torch.Tensor]:
        return self._y

    def __getitem__(self, role: str) -> tuple[torch.Tensor, torch.Tensor]:
        if role not in self._set:
            raise KeyError(role)
        return self._x[role], self._y[role]

    def __iter__(self) -> Iterator[str]:
        return iter(self._roles)

    def __len__(self) -> int:
        return len(self._roles)

    def __contains__(self, role: object) -> bool:
        return role in self._set

    def shape(self, role: str) -> torch.Size:
        """Shape of the first tensor of the pair (read-free when ``x`` is lazy)."""
        return shape_of(self._x, role)

    def rows(self, role: str, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``index`` of both tensors (only those rows read when the mappings support it)."""
        if role not in self._set:
            raise KeyError(role)
        return rows_of(self._x, role, index), rows_of(self._y, role, index)


def recall(m: Mapping[str, torch.Tensor], key: object) -> object | None:
    """A result remembered on ``m`` under ``key`` (mappings with a ``memo`` dict), else None."""
    memo = getattr(m, "memo", None)
    return memo.get(key) if isinstance(memo, dict) else None


def remember(m: Mapping[str, torch.Tensor], key: object, compute: Callable[[], R]) -> R:
    """``compute()``, remembered on ``m`` under ``key`` when ``m`` has a ``memo`` dict.

    Lets one pass over a read-on-access model compute what later passes need (small
    per-module results only), so each module is read once in the common case.
    """
    memo = getattr(m, "memo", None)
    if not isinstance(memo, dict):
        return compute()
    if key in memo:
        return memo[key]  # type: ignore[return-value]
    v = compute()
    memo[key] = v
    return v


def shape_of(m: Mapping[str, torch.Tensor], role: str) -> torch.Size:
    """Shape of ``m[role]``; read-free for :class:`LazyRoles` (and anything with a ``shape(role)`` method)."""
    fn = getattr(m, "shape", None)
    if callable(fn):
        return torch.Size(fn(role))
    v = m[role]
    return v[-1].shape if isinstance(v, tuple) else v.shape


def rows_of(m: Mapping[str, torch.Tensor], role: str, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` of ``m[role]`` (reads only those rows for :class:`LazyRoles` with ``read_rows``)."""
    fn = getattr(m, "rows", None)
    if callable(fn):
        return fn(role, index)
    return m[role][index]


def numel_of(m: Mapping[str, torch.Tensor], role: str) -> int:
    """Number of elements of ``m[role]`` (read-free for :class:`LazyRoles`)."""
    n = 1
    for s in shape_of(m, role):
        n *= int(s)
    return n


_ALLOCATOR_TUNED = False


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse instead of returning it to the OS.

    A streamed pass allocates and frees tensors of tens of MB per module; by default glibc
    gives them back at once and every new one costs a page fault per 4 KiB page (measured:
    system time was most of the anatomy's wall time on a 1.1 B-parameter pair, and a read
    pass went from 4.3 s to 1.2 s with this setting).  Peak RSS is unchanged (freed memory
    is reused, not accumulated).  Process-wide and idempotent; returns False where it is
    not available (non-glibc).
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED:
        return True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_top_pad = -1, -2
        ok = libc.mallopt(m_trim_threshold, 2**31 - 1) == 1 and libc.mallopt(m_top_pad, 256 << 20) == 1
    except (OSError, AttributeError):
        ok = False
    _ALLOCATOR_TUNED = ok
    log.debug("malloc tuned to keep freed memory: %s", ok)
    return ok


def default_workers() -> int:
    """One worker per available core."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not on Linux
        return max(1, os.cpu_count() or 1)


def is_lazy(*maps: Mapping[str, torch.Tensor]) -> bool:
    """True when any mapping reads on access (worth a parallel pass)."""
    return any(bool(getattr(m, "lazy", False)) for m in maps)


def map_roles(fn: Callable[[str], R], roles: Iterable[str], *, workers: int | None = None) -> Iterator[tuple[str, R]]:
    """``(role, fn(role))`` for every role, in order, computed on ``workers`` threads.

    ``fn`` typically reads the role's tensors from :class:`LazyRoles` mappings and
    reduces them to a small result; at most ``2 × workers`` calls are in flight, so
    memory stays bounded.  With one worker (or one role) it runs inline.  Torch is
    single-threaded for the duration (restored afterwards).  An exception in ``fn``
    propagates after the pool is shut down.
    """
    roles = list(roles)
    n = default_workers() if workers is None else max(1, int(workers))
    if n == 1 or len(roles) <= 1:
        with single_threaded():
            for r in roles:
                yield r, fn(r)
        return
    with single_threaded(), ThreadPoolExecutor(max_workers=n, thread_name_prefix="lineage-anatomy") as pool:
        pending: deque[tuple[str, Future]] = deque()
        it = iter(roles)
        try:
            for r in it:
                pending.append((r, pool.submit(fn, r)))
                if len(pending) >= 2 * n:
                    r0, f0 = pending.popleft()
                    yield r0, f0.result()
            while pending:
                r0, f0 = pending.popleft()
                yield r0, f0.result()
        finally:
            for _, f in pending:
                f.cancel()
