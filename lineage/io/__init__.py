"""Byte sources, header parsing and checkpoint opening (the bottom layer)."""

from lineage.io.checkpoint import OPENERS, Checkpoint, TensorMeta, open_checkpoint
from lineage.io.sources import ByteSource, LocalFileSource

# Format openers beyond local safetensors, tried in this order (explicit, no import side effects
# elsewhere): PEFT adapter folders, GGUF files, PyTorch .bin/.pt, then Hub references.
from lineage.io.adapter import open_adapter  # noqa: E402
from lineage.io.gguf import open_local_gguf  # noqa: E402
from lineage.io.torchbin import open_torchbin  # noqa: E402
from lineage.io.hub import open_hub  # noqa: E402

for _opener in (open_adapter, open_local_gguf, open_torchbin, open_hub):
    if _opener not in OPENERS:
        OPENERS.append(_opener)

__all__ = ["ByteSource", "Checkpoint", "LocalFileSource", "TensorMeta", "open_checkpoint"]
