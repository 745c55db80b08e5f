"""The anatomy's one-line summary: relation, its key evidence, which side is the parent."""

from __future__ import annotations

from typing import Any


def anatomy_summary(rel: dict[str, Any]) -> str:
    """One line naming the relation, its key evidence and the direction (the report's anatomy summary)."""
    d = rel.get("details", {}) or {}
    r = rel.get("relation", "?")
    parent = rel.get("parent")
    who = {"a": "A is the parent", "b": "B is the parent"}.get(str(parent), "direction undecided")
    if r == "lora merge":
        desc = str(d.get("modules_description") or "")
        # the description reads "low-rank update, rank r on <modules>": keep it, without repeating the rank
        extra = (desc.removeprefix("low-rank update, ") if desc.startswith("low-rank update, rank")
                 else f"rank {d.get('rank')} on {desc or d.get('modules')}")
        if d.get("quant_format"):
            extra += f", then quantised ({d.get('quant_format')})"
    elif r == "quantised copy":
        extra = f"format {d.get('quant_format')}"
    elif r in ("fine-tune", "continued pre-training"):
        extra = f"{d.get('change', 'dense update')}, median relative delta {d.get('rel_delta_median') or 0:.3g}"
    elif r == "pruned":
        extra = f"layers {d.get('layers')}"
    else:
        extra = str(d.get("encoding", ""))
    return f"{r}: {extra} ({who})"
