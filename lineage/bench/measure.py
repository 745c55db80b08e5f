"""Timing and the machine's measured limits (copy bandwidth, matmul FLOP/s), taken in the same run.

:func:`time_call` runs a thunk after a warm-up and keeps the fastest of ``reps`` runs
(on a shared machine the minimum is the least disturbed), with the process CPU time of
that run beside the wall time; on CUDA it synchronises around each run.
:func:`measure_limits` times a large copy (a device-to-device copy on CUDA, a memcpy on
the CPU; bandwidth counts bytes read plus bytes written) and a large matmul (bf16 on
CUDA, float32 on the CPU, where bf16 GEMMs are emulated on most CPUs).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Timing:
    """Best wall time of the runs, and the CPU time of the process during that run (seconds)."""

    wall_s: float
    cpu_s: float
    reps: int


@dataclass(frozen=True)
class Limits:
    """Measured ceilings of the device: copy bandwidth (bytes/s, read + write) and matmul FLOP/s."""

    device: str
    device_name: str
    copy_bytes: int
    copy_bytes_per_s: float
    matmul_dtype: str
    matmul_n: int
    matmul_flops_per_s: float
    threads: int
    load_average: tuple[float, float, float] | None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, reps: int = 3, warmup: int = 1) -> Timing:
    """Fastest of ``reps`` timed calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    _sync(device)
    best = (float("inf"), 0.0)
    for _ in range(max(1, reps)):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        _sync(device)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        if wall < best[0]:
            best = (wall, cpu)
    return Timing(best[0], best[1], max(1, reps))


#: Largest copy actually made when timing a copy of the same bytes (larger ones scale linearly).
COPY_CAP = {"cpu": 1 << 28, "cuda": 1 << 31}


def copy_time(nbytes: int, device: torch.device, reps: int = 3) -> Timing:
    """Time of copying ``nbytes`` bytes between two buffers on ``device``.

    Copies above :data:`COPY_CAP` are timed at the cap and scaled (copy time is linear
    in the size well below it), so the comparison never doubles the memory in use.
    """
    n = max(1, min(nbytes, COPY_CAP.get(device.type, 1 << 28)))
    src = torch.ones(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = time_call(lambda: dst.copy_(src), device, reps)
    k = max(1, nbytes) / n
    return Timing(t.wall_s * k, t.cpu_s * k, t.reps)


def device_name(device: torch.device) -> str:
    """A human name for the device (GPU model, or CPU model and core count)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    return f"{model or 'CPU'} ({os.cpu_count()} cores)"


def measure_limits(device: torch.device, quick: bool = False) -> Limits:
    """Copy bandwidth and matmul throughput of ``device``, measured now."""
    cuda = device.type == "cuda"
    nbytes = (1 << 30 if cuda else 1 << 28) >> (2 if quick else 0)
    t_copy = copy_time(nbytes, device, reps=3 if quick else 5)
    n = (8192 if cuda else 2048) // (2 if quick else 1)
    dtype = torch.bfloat16 if cuda else torch.float32
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(n, n, generator=g).to(device, dtype)
    y = torch.randn(n, n, generator=g).to(device, dtype)
    t_mm = time_call(lambda: x @ y, device, reps=3)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return Limits(
        device=device.type, device_name=device_name(device), copy_bytes=nbytes,
        copy_bytes_per_s=2 * nbytes / t_copy.wall_s, matmul_dtype=str(dtype).removeprefix("torch."),
        matmul_n=n, matmul_flops_per_s=2 * n**3 / t_mm.wall_s, threads=torch.get_num_threads(),
        load_average=None if load is None else tuple(round(v, 2) for v in load),
    )


def available_bytes(device: torch.device) -> int:
    """Memory free for the benchmark's tensors on ``device``."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for ln in f:
                if ln.startswith("MemAvailable:"):
                    return int(ln.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30
