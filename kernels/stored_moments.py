"""Pair moments over two tensors in their storage format (see :mod:`lineage_kernels.stored`).

``pair_moments_stored(a, b)`` returns the seven sums of
:data:`lineage_kernels.moments.MOMENT_FIELDS` (float64, CPU) of the dequantised
values of ``a`` and ``b``, which must hold the same number of values (the two
formats may differ: a ``bfloat16`` base against a ``Q4_K`` re-upload).

- On CUDA (or with ``backend="triton"``) one Triton kernel reads every byte of both
  operands once, dequantises in registers and accumulates in float32 per lane.
- On the CPU (``backend="auto"`` or ``"numba"``) the fused kernel of
  :mod:`lineage_kernels.cpu_moments` does the same in one compiled loop per format pair
  (float32 sums over 4096 values, float64 across), single-threaded (as compare runs
  it, one tensor per worker).
- ``backend="torch"`` (and ``"auto"`` where numba is missing) dequantises one
  cache-sized chunk at a time to float32 and reduces it with torch ops.

``pair_moments_stored_reference`` dequantises both operands whole to float64 on the
CPU and sums there.  ``triton_available()`` says whether the Triton path can run.
"""

from __future__ import annotations

import importlib.util

import torch

from lineage_kernels import cpu_moments
from lineage_kernels.moments import CHUNK_ELEMS, pair_moments_reference, pair_moments_torch
from lineage_kernels.stored import Stored, chunk_bounds, dequantise_range, dequantise_reference
from lineage_kernels.threads import single_threaded

BACKENDS = ("auto", "torch", "triton", "numba")


def triton_available() -> bool:
    """Whether ``triton`` is importable."""
    return importlib.util.find_spec("triton") is not None


def use_triton(backend: str, *tensors: torch.Tensor) -> bool:
    """Resolve ``backend``: ``auto`` means Triton exactly when the data is on CUDA and Triton is installed."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r} (choose from {BACKENDS})")
    if backend == "triton":
        return True
    return backend == "auto" and any(t.is_cuda for t in tensors) and triton_available()


def _check(a: Stored, b: Stored) -> None:
    if a.numel != b.numel:
        raise ValueError(f"pair_moments_stored: {a.numel} values in {a.shape} vs {b.numel} in {b.shape}")


def pair_moments_stored_reference(a: Stored, b: Stored) -> torch.Tensor:
    """Float64 reference: dequantise both operands whole, then :func:`pair_moments_reference`."""
    _check(a, b)
    return pair_moments_reference(dequantise_reference(a).reshape(-1), dequantise_reference(b).reshape(-1))


def pair_moments_stored(a: Stored, b: Stored, *, chunk_elems: int = CHUNK_ELEMS,
                        backend: str = "auto") -> torch.Tensor:
    """Seven moment sums of two stored operands (float64 CPU tensor of length 7)."""
    _check(a, b)
    if use_triton(backend, a.data, b.data):
        from lineage_kernels.triton_kernels import pair_moments_stored_triton

        return pair_moments_stored_triton(a, b)
    if backend in ("auto", "numba"):
        fused = cpu_moments.stored_moments(a, b)
        if fused is not None:
            return fused
        if backend == "numba":
            raise ValueError("backend='numba': numba is not installed, switched off "
                             "(LINEAGE_CPU_KERNEL=torch) or the operands are not on the CPU")
    with single_threaded(a.device):  # as compare runs it: threads only add spin-waits on shared cores
        return _torch_path(a, b, chunk_elems)


def _torch_path(a: Stored, b: Stored, chunk_elems: int) -> torch.Tensor:
    if a.kind == "dense" and b.kind == "dense":
        return pair_moments_torch(a.data, b.data, chunk_elems)
    n = a.numel
    step = chunk_bounds(a, chunk_bounds(b, chunk_elems))
    total = torch.zeros(7, dtype=torch.float64)
    for s in range(0, n, step):
        e = min(n, s + step)
        total += pair_moments_torch(dequantise_range(a, s, e), dequantise_range(b, s, e), chunk_elems)
    total[0] = float(n)
    return total


def pair_moments_dense(a: torch.Tensor, b: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """:func:`pair_moments` for two dense tensors, through the Triton kernel on CUDA."""
    return pair_moments_stored(Stored.dense(a), Stored.dense(b), backend=backend)


def pair_moments_dense_reference(a: torch.Tensor, b: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Float64 reference of :func:`pair_moments_dense` (``backend`` ignored)."""
    return pair_moments_reference(a, b)
