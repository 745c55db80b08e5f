"""Run the benchmark: measure the limits, then every selected case, each against the roofline.

The roofline of a case is ``max(bytes / copy bandwidth, FLOPs / matmul FLOP/s)``: the
time it would take at the device's measured copy bandwidth or matmul rate, whichever
binds.  ``fraction`` is that time over the measured time (1.0 = at the roofline).
``memcpy_ratio`` is the measured time over the time of copying the same number of bytes
in the same run (the CPU target: pair moments within 1.5× of a memcpy).
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lineage.bench.cases import KERNELS, MODELS, Case, cases
from lineage.bench.measure import Limits, available_bytes, copy_time, measure_limits, time_call
from lineage.errors import LineageError

log = logging.getLogger(__name__)

#: Fraction of the free memory one case may use.
MEMORY_SHARE = 0.3


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
    if config.quick:
        kernels = tuple(k for k in config.kernels if k != "model") or config.kernels
        return BenchConfig(config.device, kernels, sizes[:1], min(config.reps, 2), True)
    return BenchConfig(config.device, config.kernels, sizes, config.reps, False)


def _skipped(case: Case, why: str) -> CaseResult:
    return CaseResult(case.kernel, case.variant, case.size, case.shape, 0, 0.0,
                      None, None, None, None, None, None, None, skipped=why)


def run_case(case: Case, device: torch.device, limits: Limits, reps: int) -> CaseResult:
    """Build, time and free one case, then time a copy of the same bytes."""
    prep = case.build(device)
    t = time_call(prep.run, device, reps)
    nbytes, flops = prep.bytes_read, prep.flops
    del prep
    gc.collect()
    tc = copy_time(nbytes, device, reps)
    roof = max(nbytes / limits.copy_bytes_per_s, flops / limits.matmul_flops_per_s)
    return CaseResult(case.kernel, case.variant, case.size, case.shape, nbytes, flops, t.wall_s, t.cpu_s,
                      nbytes / t.wall_s, flops / t.wall_s, roof / t.wall_s, tc.wall_s, t.wall_s / tc.wall_s,
                      tc.cpu_s, t.cpu_s / tc.cpu_s if tc.cpu_s > 0 else None)


def run_bench(config: BenchConfig, on_case: Callable[[CaseResult], None] | None = None) -> BenchReport:
    """Measure the device's limits and every selected case (cases too large for memory are skipped)."""
    cfg = resolve(config)
    device = torch.device(cfg.device)
    limits = measure_limits(device, cfg.quick)
    budget = MEMORY_SHARE * available_bytes(device)
    results = []
    for case in cases(cfg.kernels, cfg.sizes):
        if case.mem_bytes > budget:
            res = _skipped(case, f"needs ~{case.mem_bytes / 2**30:.1f} GiB, {budget / 2**30:.1f} GiB allowed")
        else:
            log.info("bench %s %s %s", case.kernel, case.variant, case.size)
            res = run_case(case, device, limits, cfg.reps)
        results.append(res)
        if on_case is not None:
            on_case(res)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return BenchReport(cfg, limits, tuple(results))
