"""Where the heavy arithmetic runs: one rule for every command's ``--device cpu|cuda|auto``.

``cpu`` and ``cuda`` are taken as given (``cuda`` without a CUDA device is a
:class:`~lineage.errors.ConfigError`, exit 2 with one line); ``auto`` picks CUDA when present.
Files are always read on the CPU; what runs on the device is the arithmetic on what was read.
"""

from __future__ import annotations

from lineage.errors import ConfigError

#: The choices every ``--device`` option offers.
DEVICES = ("cpu", "cuda", "auto")


def resolve_device(name: str | None):  # -> torch.device (torch imported lazily: the CLI validates first)
    """The torch device ``name`` stands for (None = ``cpu``)."""
    import torch

    name = name or "cpu"
    if name not in DEVICES:
        raise ConfigError(f"device must be cpu, cuda or auto, not {name!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda requested but no CUDA device is available")
    return torch.device(name)
