"""A streaming safetensors writer: tensors are written one at a time, never all in memory."""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping
from pathlib import Path

import torch

from lineage.errors import ConfigError
from lineage.io.dtypes import DTYPES, TORCH_TO_NAME


class SafetensorsWriter:
    """Write a safetensors file whose tensors are declared up front and supplied in order.

    >>> w = SafetensorsWriter(path, {"a": (torch.bfloat16, (4, 4))})
    >>> w.write("a", tensor); w.close()
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.path = Path(path)
        self._order = list(specs)
        self._specs = dict(specs)
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = dict(metadata)
        offset = 0
        for name in self._order:
            dtype, shape = specs[name]
            size = math.prod(shape) * DTYPES[TORCH_TO_NAME[dtype]].itemsize
            header[name] = {"dtype": TORCH_TO_NAME[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._fh = open(self.path, "wb")
        self._fh.write(struct.pack("<Q", len(raw)) + raw)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next declared tensor (names must come in declaration order)."""
        if self._next >= len(self._order) or self._order[self._next] != name:
            raise ConfigError(f"{self.path}: expected tensor {self._order[self._next] if self._next < len(self._order) else None!r}, got {name!r}")
        dtype, shape = self._specs[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise ConfigError(f"{self.path}: tensor {name!r} is {tensor.dtype} {tuple(tensor.shape)}, declared {dtype} {shape}")
        data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
        self._fh.write(memoryview(data))
        self._next += 1

    def close(self) -> None:
        """Finish the file; raises if a declared tensor was never written."""
        if self._fh.closed:
            return
        self._fh.close()
        if self._next != len(self._order):
            raise ConfigError(f"{self.path}: {len(self._order) - self._next} declared tensors were not written")

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
