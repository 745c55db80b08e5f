"""Byte sources, header parsing and checkpoint opening (the bottom layer)."""

from lineage.io.checkpoint import Checkpoint, TensorMeta, open_checkpoint
from lineage.io.sources import ByteSource, LocalFileSource

__all__ = ["ByteSource", "Checkpoint", "LocalFileSource", "TensorMeta", "open_checkpoint"]
