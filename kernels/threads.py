"""Thread control for CPU kernels.

Small or many concurrent torch operations gain nothing from OpenMP intra-op threads,
and on a shared machine their spin-waits cost 10–100×.  Kernels and the streaming
reducer run inside :func:`single_threaded`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def single_threaded(device: torch.device | str | None = None) -> Iterator[None]:
    """Run torch CPU work with one intra-op thread, restoring the previous count afterwards.

    A no-op for non-CPU devices.
    """
    if device is not None and torch.device(device).type != "cpu":
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
