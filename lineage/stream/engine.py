"""The streaming pass of a comparison: every paired module read once, in file order, reduced in blocks.

:func:`reduce_blocks` reads each :class:`StreamJob` in row blocks of about ``block_elems`` elements
(the reference model's file order; the next block pair is read on a background thread while the
current ones are reduced) and returns the seven moment sums of every job and, unless only the
element-wise comparison is wanted, the :class:`~lineage.stream.screen.ModuleScreen` of every job
compared on its whole shape.

Work per block runs on a pool of single-threaded workers (OpenMP intra-op threads spin and collapse
under oversubscription); the parts are merged in stream order, so results do not depend on the
worker count, and each module's screen is finished on the pool too (its lattice test on the sample
is the largest per-module cost).  On an accelerator the blocks are copied from pinned host buffers
on a side stream while the previous block is reduced (:class:`_DeviceFeed`), reads stay in file order.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from lineage.errors import LineageError
from lineage.io.checkpoint import Checkpoint
from lineage.io.hashing import complete_hashes, start_hashes
from lineage.progress import ProgressFn
from lineage.roles import read_role
from lineage.stream.screen import BlockPart, ModuleScreen, ScreenBuilder, ScreenConfig
from lineage_kernels.stored_moments import pair_moments_dense
from lineage_kernels.threads import single_threaded

log = logging.getLogger(__name__)


@dataclass
class StreamJob:
    """One paired module to stream (views as :func:`lineage.roles.pair_models` gives them)."""

    role: str
    view_a: Any
    view_b: Any
    shape_a: tuple[int, ...]
    shape_b: tuple[int, ...]
    rows: int  # rows compared (≤ both)
    full: bool  # shapes equal
    plain: bool  # both views are untransposed whole tensors: stream raw blocks


@dataclass(frozen=True)
class StreamResult:
    """Moment sums per job (float64, length 7; see :mod:`lineage_kernels.moments`) and screens by role."""

    moments: list[torch.Tensor]
    screens: dict[str, ModuleScreen]
    #: Seconds spent hashing local files in the pass (0.0 when not asked to hash).
    hash_seconds: float = 0.0


def block_pairs(ca: Checkpoint, cb: Checkpoint, job: StreamJob,
                block_elems: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """``(first_row, block_a, block_b)`` of one job, in storage dtypes."""
    if job.plain:
        meta = ca.tensors[job.view_a.tensor]
        per = max(1, block_elems // max(1, meta.row_numel))
        for s in range(0, job.rows, per):
            e = min(job.rows, s + per)
            yield s, ca.read_raw(job.view_a.tensor, s, e), cb.read_raw(job.view_b.tensor, s, e)
    else:
        ta, tb = read_role(ca, job.view_a), read_role(cb, job.view_b)
        yield 0, ta[: job.rows], tb[: job.rows]


def _n_blocks(ca: Checkpoint, job: StreamJob, block_elems: int) -> int:
    if not job.plain:
        return 1
    per = max(1, block_elems // max(1, ca.tensors[job.view_a.tensor].row_numel))
    return len(range(0, job.rows, per))


def stream_blocks(ca: Checkpoint, cb: Checkpoint, jobs: list[StreamJob], block_elems: int,
                  prefetch: bool) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """Yield ``(job_index, first_row, block_a, block_b)``, reading ahead on a thread when ``prefetch``."""

    def produce() -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
        for i, job in enumerate(jobs):
            for r0, xa, xb in block_pairs(ca, cb, job, block_elems):
                yield i, r0, xa, xb

    if not prefetch:
        yield from produce()
        return
    q: queue.Queue[Any] = queue.Queue(maxsize=2)
    stop = threading.Event()
    done = object()

    def worker() -> None:
        try:
            for item in produce():
                if stop.is_set():
                    return
                q.put(item)
            q.put(done)
        except BaseException as e:  # handed to the consumer, re-raised there
            q.put(e)

    t = threading.Thread(target=worker, name="lineage-reader", daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is done:
                break
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while t.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                t.join(0.05)


class _DeviceFeed:
    """Host blocks to the device: staged through pinned buffers, copied on a side stream.

    :meth:`put` starts the copy of a block pair and returns it with the copy's event; :meth:`ready`
    makes the compute stream wait on that event just before the pair is reduced, so the copy of
    block ``k + 1`` runs while block ``k`` is reduced.  At most ``depth`` staged pinned pairs are
    alive (the oldest copy is waited for before a new one is staged).  On the CPU it is the identity.
    """

    def __init__(self, device: torch.device, depth: int = 2) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.staged: deque[tuple[tuple[torch.Tensor, torch.Tensor], Any]] = deque()
        self.depth = depth

    def put(self, xa: torch.Tensor, xb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """Start moving a pair to the device: ``(device_a, device_b, event)`` (event None on the CPU)."""
        if not self.cuda:
            if xa.device != self.device:
                xa, xb = xa.to(self.device), xb.to(self.device)
            return xa, xb, None
        while len(self.staged) >= self.depth:
            _, ev = self.staged.popleft()
            ev.synchronize()
        pa, pb = (t.contiguous().pin_memory() for t in (xa, xb))
        assert self.stream is not None
        with torch.cuda.stream(self.stream):
            da = pa.to(self.device, non_blocking=True)
            db = pb.to(self.device, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(self.stream)
        self.staged.append(((pa, pb), ev))
        return da, db, ev

    def ready(self, da: torch.Tensor, db: torch.Tensor, ev: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The pair, usable on the compute stream (which now waits for its copy)."""
        if ev is not None:
            cur = torch.cuda.current_stream(self.device)
            cur.wait_event(ev)
            da.record_stream(cur)
            db.record_stream(cur)
        return da, db


def reduce_blocks(ca: Checkpoint, cb: Checkpoint, jobs: list[StreamJob], *, block_elems: int, prefetch: bool,
                  workers: int, screen: ScreenConfig, elementwise: bool, device: torch.device,
                  progress: ProgressFn | None, hash_files: bool = False) -> StreamResult:
    """Moment sums and screening statistics of every job, streamed block by block (see module docstring).

    ``elementwise``: the seven moment sums only (``--no-canon``: nothing reads the screens).
    ``hash_files``: BLAKE3 of every local file from the bytes the pass reads (:mod:`lineage.io.hashing`),
    completed after it; the digests appear in each checkpoint's ``file_integrity()``.
    """
    if hash_files:
        start_hashes([*ca.sources, *cb.sources])
    res = _reduce(ca, cb, jobs, block_elems=block_elems, prefetch=prefetch, workers=workers, screen=screen,
                  elementwise=elementwise, device=device, progress=progress)
    if not hash_files:
        return res
    seen: set[int] = set()
    srcs = [s for s in (*ca.sources, *cb.sources) if not (id(s) in seen or seen.add(id(s)))]  # type: ignore[func-returns-value]
    return StreamResult(res.moments, res.screens, complete_hashes(srcs))


def _reduce(ca: Checkpoint, cb: Checkpoint, jobs: list[StreamJob], *, block_elems: int, prefetch: bool,
            workers: int, screen: ScreenConfig, elementwise: bool, device: torch.device,
            progress: ProgressFn | None) -> StreamResult:
    """:func:`reduce_blocks` without the hashing."""
    total = sum(j.rows * ca.tensors[j.view_a.tensor].row_numel for j in jobs) or 1
    builders: list[ScreenBuilder | None] = [
        ScreenBuilder(j.role, j.shape_a if j.full else (j.rows, *j.shape_a[1:]), screen) for j in jobs]
    moments: list[torch.Tensor] = [torch.zeros(7, dtype=torch.float64) for _ in jobs]
    left = [_n_blocks(ca, j, block_elems) for j in jobs]
    finishing: list[tuple[int, Future[ModuleScreen] | ModuleScreen]] = []
    done = 0
    tick = Ticker(progress, "reading", total)
    feed = _DeviceFeed(device)

    def reduce(i: int, r0: int, xa: torch.Tensor, xb: torch.Tensor) -> tuple[int, int, BlockPart | torch.Tensor]:
        if xa.shape != xb.shape:
            raise LineageError(f"internal: block shapes differ for {jobs[i].role}: {tuple(xa.shape)} vs {tuple(xb.shape)}")
        b = builders[i]
        assert b is not None
        return i, xa.numel(), pair_moments_dense(xa, xb) if elementwise else b.part(r0, xa, xb)

    def collect(result: tuple[int, int, BlockPart | torch.Tensor], submit: Callable[..., Any]) -> None:
        nonlocal done
        i, n, part = result
        done += n
        tick(done, jobs[i].role)
        if isinstance(part, torch.Tensor):
            moments[i] += part
            return
        b = builders[i]
        assert b is not None
        b.add(part)
        left[i] -= 1
        if left[i] == 0:
            finishing.append((i, submit(b.finish)))
            builders[i] = None  # its samples go with the finishing screen

    blocks = stream_blocks(ca, cb, jobs, block_elems, prefetch)
    n_workers = workers or (os.cpu_count() or 1)
    if device.type != "cpu" or n_workers == 1:
        ahead: tuple[int, int, torch.Tensor, torch.Tensor, Any] | None = None
        for i, r0, xa, xb in blocks:  # the next pair's copy is started before the current pair is reduced
            nxt = (i, r0, *feed.put(xa, xb))
            if ahead is not None:
                collect(reduce(ahead[0], ahead[1], *feed.ready(*ahead[2:])), lambda f: f())
            ahead = nxt
        if ahead is not None:
            collect(reduce(ahead[0], ahead[1], *feed.ready(*ahead[2:])), lambda f: f())
    else:
        with single_threaded(), ThreadPoolExecutor(n_workers, thread_name_prefix="lineage-reduce") as pool:
            pending: deque[Future[tuple[int, int, BlockPart | torch.Tensor]]] = deque()
            for item in blocks:
                pending.append(pool.submit(reduce, *item))
                while len(pending) > n_workers:
                    collect(pending.popleft().result(), pool.submit)
            while pending:
                collect(pending.popleft().result(), pool.submit)
            finished = [(i, f.result() if isinstance(f, Future) else f) for i, f in finishing]
        finishing = finished  # type: ignore[assignment]
    screens: dict[str, ModuleScreen] = {}
    for i, sc in finishing:
        assert isinstance(sc, ModuleScreen)
        moments[i] = sc.moments.pair_moments()
        if jobs[i].full:
            screens[jobs[i].role] = sc
    return StreamResult(moments, screens)


class Ticker:
    """Progress of one stage: ``progress(done, total, "stage: label")``."""

    def __init__(self, progress: ProgressFn | None, stage: str, total: int) -> None:
        self.progress, self.stage, self.total = progress, stage, total

    def __call__(self, done: int, label: str) -> None:
        if self.progress is not None:
            self.progress(done, self.total, f"{self.stage}: {label}")
