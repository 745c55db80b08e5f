"""Demo data for `lineage demo`: a few models of the small zoo with known lineage."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from lineage.testing.zoocache import cached_zoo

log = logging.getLogger(__name__)

#: Demo name → (zoo model id, what it is).
DEMO_MODELS: dict[str, tuple[str, str]] = {
    "base": ("llama-b1", "a Llama-style base trained on CPython's reference text"),
    "finetuned": ("llama-b1-fta", "the base fine-tuned"),
    "unrelated": ("llama-b0", "an independent base: same data and recipe, other seed"),
    "disguised": ("llama-b1-ftd-combined", "a fine-tune of the base, then every function-preserving disguise"),
    "lora": ("llama-b1-lorasyn2", "the base with a rank-2 LoRA merged into its attention and MLP projections"),
}

#: The pairs `lineage demo` compares, in order.
DEMO_PAIRS: tuple[tuple[str, str], ...] = (("base", "finetuned"), ("base", "unrelated"), ("base", "disguised"),
                                           ("base", "lora"))


def build_demo(out: str | Path | None = None) -> dict[str, str]:
    """Build (or reuse) the small zoo and return demo name → model folder.

    With ``out``, the demo models are copied there (the zoo stays cached).
    Models the zoo does not have are left out.
    """
    zoo = cached_zoo("small")
    ids = set(zoo.ids)
    result: dict[str, str] = {}
    for name, (model_id, _) in DEMO_MODELS.items():
        if model_id not in ids:
            log.warning("demo model %s (%s) is not in the zoo", name, model_id)
            continue
        src = Path(zoo.path(model_id))
        if out is not None:
            dst = Path(out) / name
            if dst.exists():
                shutil.rmtree(dst)
            shutil.copytree(src, dst)
            src = dst
        result[name] = str(src)
    return result
