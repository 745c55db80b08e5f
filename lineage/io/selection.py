"""Which ``.safetensors`` files of a folder make the model: what ``transformers`` would load.

Used for local folders (:func:`lineage.io.checkpoint.open_local_safetensors`) and Hub
repositories (:mod:`lineage.io.hubfiles`) alike, so a float32 copy beside ``model.safetensors``
is left out (and said so) wherever the folder comes from, including the base an adapter names.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lineage.io.checkpoint import Checkpoint

log = logging.getLogger(__name__)

_SHARD_NAME = re.compile(r"model-\d+-of-\d+\.safetensors")


def select_safetensors(names: list[str], index_shards: list[str] | None = None) -> tuple[list[str], list[str]]:
    """The ``.safetensors`` files ``transformers`` would load from a folder, and the ones left out.

    The index's shards when there is an index, else ``model.safetensors``, else a
    ``model-0000i-of-0000n`` set, else every file except ``consolidated*`` (several
    unrelated files then fail with "tensor appears in both").  Adapter weights are never
    model weights.
    """
    st = sorted(n for n in names if n.endswith(".safetensors") and not n.startswith("adapter_model"))
    if index_shards is not None:
        chosen = sorted(set(index_shards))
    elif "model.safetensors" in st:
        chosen = ["model.safetensors"]
    elif any(_SHARD_NAME.fullmatch(n) for n in st):
        chosen = [n for n in st if _SHARD_NAME.fullmatch(n)]
    else:
        chosen = [n for n in st if not n.startswith("consolidated")] or st
    return chosen, [n for n in st if n not in chosen]


def note_skipped(ckpt: Checkpoint, skipped: list[str], where: str) -> None:
    """Record (and log, for the user) the weight files of a folder that were not loaded."""
    if not skipped:
        return
    ckpt.skipped_files = tuple(skipped)
    chosen = ", ".join(sorted({Path(s.name).name for s in ckpt.sources}))
    log.warning("%s: loading %s as transformers would; left out %s", where, chosen, ", ".join(skipped))
