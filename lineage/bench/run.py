"""Run the benchmark: measure the limits, then every selected case, each against the roofline.

The roofline of a case is ``max(bytes / copy bandwidth, FLOPs / matmul FLOP/s)``: the
time it would take at the device's measured copy bandwidth or matmul rate, whichever
binds.  ``fraction`` is that time over the measured time (1.0 = at the roofline).
``memcpy_ratio`` is the measured time over the time of copying the same number of bytes
in the same run (the CPU target: pair moments within 1.5× of a memcpy).

The run is bounded: a total time budget (``budget_s``; :data:`DEFAULT_BUDGET_S` per device),
repetitions cut so that one case's timed runs stay within :data:`CASE_SHARE` of it, cases
whose predicted time (the same kernel's measured rate at a smaller size) exceeds what is
left reported as skipped with why, and an interruption (Ctrl-C, or SIGTERM inside
:func:`sigterm_interrupts`) ending the run with the cases done so far.  ``on_progress``
sees the report after every case, so a caller can write it as it grows.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from lineage.bench.cases import KERNELS, MODELS, Case, cases
from lineage.bench.measure import Limits, available_bytes, copy_time, measure_limits, time_call
from lineage.errors import LineageError

log = logging.getLogger(__name__)

#: Fraction of the free memory one case may use.
MEMORY_SHARE = 0.3
#: Total time budget of a run per device (seconds) when none is given.
DEFAULT_BUDGET_S = {"cuda": 120.0, "cpu": 1800.0}
#: Share of the budget one case's timed repetitions may take (at least one repetition runs).
CASE_SHARE = 0.05


class BenchError(LineageError):
    """The benchmark cannot run as asked (no such device, no such kernel)."""


@dataclass(frozen=True)
class BenchConfig:
    """What to measure: device, kernels, model sizes, repetitions."""

    device: str = "cpu"
    kernels: tuple[str, ...] = KERNELS
    sizes: tuple[str, ...] | None = None  # None: every size of MODELS
    reps: int = 3
    quick: bool = False
    budget_s: float | None = None  # None: DEFAULT_BUDGET_S of the device


@dataclass(frozen=True)
class CaseResult:
    """One measured (or skipped) case."""

    kernel: str
    variant: str
    size: str
    shape: tuple[int, ...]
    bytes_read: int
    flops: float
    wall_s: float | None
    cpu_s: float | None
    bytes_per_s: float | None
    flops_per_s: float | None
    fraction: float | None
    memcpy_s: float | None
    memcpy_ratio: float | None
    memcpy_cpu_s: float | None = None
    memcpy_cpu_ratio: float | None = None  # CPU time over the copy's CPU time (steadier on a loaded machine)
    skipped: str | None = None


@dataclass(frozen=True)
class BenchReport:
    """Limits and results of one run."""

    config: BenchConfig
    limits: Limits
    results: tuple[CaseResult, ...]
    elapsed_s: float = 0.0
    interrupted: bool = False


def resolve(config: BenchConfig) -> BenchConfig:
    """Check the config; ``quick`` keeps the smallest size only and two repetitions."""
    if config.device not in ("cpu", "cuda"):
        raise BenchError(f"unknown device {config.device!r} (cpu or cuda)")
    if config.device == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda: no CUDA device is visible to torch")
    bad = [k for k in config.kernels if k not in KERNELS]
    if bad:
        raise BenchError(f"unknown kernel(s) {', '.join(bad)} (choose from {', '.join(KERNELS)})")
    sizes = tuple(MODELS) if not config.sizes else config.sizes
    unknown = [s for s in sizes if s not in MODELS]
    if unknown:
        raise BenchError(f"unknown size(s) {', '.join(unknown)} (choose from {', '.join(MODELS)})")
    budget = DEFAULT_BUDGET_S[config.device] if config.budget_s is None else float(config.budget_s)
    if budget <= 0:
        raise BenchError(f"--budget must be positive, got {budget:g} s")
    if config.quick:
        kernels = tuple(k for k in config.kernels if k != "model") or config.kernels
        return BenchConfig(config.device, kernels, sizes[:1], min(config.reps, 2), True, budget)
    return BenchConfig(config.device, config.kernels, sizes, config.reps, False, budget)


def _skipped(case: Case, why: str) -> CaseResult:
    return CaseResult(case.kernel, case.variant, case.size, case.shape, 0, 0.0,
                      None, None, None, None, None, None, None, skipped=why)


def run_case(case: Case, device: torch.device, limits: Limits, reps: int, cap_s: float = float("inf")) -> CaseResult:
    """Build, time and free one case, then time a copy of the same bytes.

    The first (warm-up) run is timed too: repetitions are cut to fit ``cap_s``.
    """
    prep = case.build(device)
    t0 = time.perf_counter()
    prep.run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    first = time.perf_counter() - t0
    reps = max(1, min(reps, int(cap_s // max(first, 1e-9))))
    t = time_call(prep.run, device, reps, warmup=0)
    nbytes, flops = prep.bytes_read, prep.flops
    del prep
    gc.collect()
    tc = copy_time(nbytes, device, reps)
    roof = max(nbytes / limits.copy_bytes_per_s, flops / limits.matmul_flops_per_s)
    return CaseResult(case.kernel, case.variant, case.size, case.shape, nbytes, flops, t.wall_s, t.cpu_s,
                      nbytes / t.wall_s, flops / t.wall_s, roof / t.wall_s, tc.wall_s, t.wall_s / tc.wall_s,
                      tc.cpu_s, t.cpu_s / tc.cpu_s if tc.cpu_s > 0 else None)


class _Interrupted(BaseException):
    """SIGTERM arrived inside :func:`sigterm_interrupts`."""


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """While active (main thread only), SIGTERM ends :func:`run_bench` like Ctrl-C: with the cases done so far."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise _Interrupted()

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _why_not(case: Case, budget: float, left: float, rates: dict[tuple[str, str], float]) -> str | None:
    """Why ``case`` must be skipped (memory, or the time left), or None."""
    if case.mem_bytes > budget:
        return f"needs ~{case.mem_bytes / 2**30:.1f} GiB, {budget / 2**30:.1f} GiB allowed"
    rate = rates.get((case.kernel, case.variant))
    if left <= 0:
        return "time budget spent"
    if rate is not None and 2 * rate * case.mem_bytes > left:  # warm-up and one timed run at the rate seen so far
        return f"predicted {2 * rate * case.mem_bytes:.0f} s, {left:.0f} s of the time budget left"
    return None


def run_bench(config: BenchConfig, on_case: Callable[[CaseResult], None] | None = None,
              on_progress: Callable[[BenchReport], None] | None = None) -> BenchReport:
    """Measure the device's limits and every selected case, within the config's time budget.

    Cases too large for memory or for the time left are skipped (with why); an interruption
    (KeyboardInterrupt, or SIGTERM under :func:`sigterm_interrupts`) returns what was done.
    """
    cfg = resolve(config)
    budget_s = float(cfg.budget_s or 0.0)
    device = torch.device(cfg.device)
    start = time.perf_counter()
    try:
        limits = measure_limits(device, cfg.quick)
    except (KeyboardInterrupt, _Interrupted) as e:
        raise BenchError("interrupted while measuring the device's limits: nothing to report") from e
    mem_budget = MEMORY_SHARE * available_bytes(device)
    results: list[CaseResult] = []
    rates: dict[tuple[str, str], float] = {}  # best seconds per byte of case memory, per kernel and variant
    interrupted = False
    for case in cases(cfg.kernels, cfg.sizes):
        try:
            if interrupted:
                results.append(_skipped(case, "interrupted"))
                continue
            left = budget_s - (time.perf_counter() - start)
            why = _why_not(case, mem_budget, left, rates)
            if why is None:
                log.info("bench %s %s %s", case.kernel, case.variant, case.size)
                res = run_case(case, device, limits, cfg.reps, CASE_SHARE * budget_s)
                rates[(case.kernel, case.variant)] = (res.wall_s or 0.0) / max(1, case.mem_bytes)
            results.append(res if why is None else _skipped(case, why))
            if on_case is not None:
                on_case(results[-1])
            if on_progress is not None:
                on_progress(BenchReport(cfg, limits, tuple(results), time.perf_counter() - start))
        except (KeyboardInterrupt, _Interrupted):
            interrupted = True
            if len(results) == 0 or results[-1].kernel != case.kernel or results[-1].variant != case.variant \
                    or results[-1].size != case.size:
                results.append(_skipped(case, "interrupted"))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return BenchReport(cfg, limits, tuple(results), time.perf_counter() - start, interrupted)
