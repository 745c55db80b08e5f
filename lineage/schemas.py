"""Published JSON Schemas of every ``--json`` output (``lineage schema NAME`` prints one).

Every JSON document the command line writes carries ``schema`` (an id below) and ``version``
(the lineage version that wrote it); :func:`stamp` adds both.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lineage.report import JSON_SCHEMA as COMPARE_SCHEMA

_DRAFT = "https://json-schema.org/draft/2020-12/schema"
_ARR = {"type": "array"}
_OBJ = {"type": "object"}


def _schema(sid: str, required: list[str], properties: Mapping[str, Any], title: str) -> dict[str, Any]:
    props = {"schema": {"const": sid}, "version": {"type": "string"}, **properties}
    return {"$schema": _DRAFT, "$id": sid, "title": title, "type": "object",
            "required": ["schema", "version", *required], "properties": props}


_EDGE = {"type": "object", "required": ["parent", "child", "relation", "directed"],
         "properties": {"parent": {"type": "string"}, "child": {"type": "string"}, "relation": {"type": "string"},
                        "distance": {"type": "number"}, "confidence": {"type": "number"},
                        "directed": {"type": "boolean", "description": "false: a link without direction evidence"},
                        "other_parents": {"type": "array", "items": {"type": "string"}}}}
_TREE = {"type": "object", "required": ["nodes", "roots", "edges"],
         "properties": {"nodes": {"type": "array", "items": {"type": "string"}}, "roots": _ARR,
                        "edges": {"type": "array", "items": _EDGE}, "families": _ARR}}

_DEVICE = {"type": "string", "description": "where the arithmetic ran (--device; auto resolved for fingerprint)"}

#: name → JSON Schema (draft 2020-12).
SCHEMAS: dict[str, dict[str, Any]] = {
    "compare": COMPARE_SCHEMA,
    "tree": _schema("lineage.tree/1", ["tree", "links", "pairs"], {"tree": _TREE, "links": _ARR, "pairs": _ARR},
                    "lineage tree --json"),
    "scan": _schema("lineage.scan/2", ["models", "pairs", "tree", "claims"],
                    {"models": _ARR, "pairs": _ARR, "tree": _TREE, "engine": {"type": "string"},
                     "alpha": {"type": "number"}, "n_compared": {"type": "integer"}, "n_tested": {"type": "integer"},
                     "claims": _ARR, "claim_counts": _OBJ, "registry": {"type": "string"}, "timing": _OBJ},
                    "lineage scan --json"),
    "inspect": _schema("lineage.inspect/1", ["ref", "format", "tensors"],
                       {"ref": {"type": "string"}, "format": {"type": "string"}, "tensors": _ARR, "files": _ARR},
                       "lineage inspect --json"),
    "fingerprint": _schema("lineage.fingerprint/1", ["model", "output", "bytes"],
                           {"model": {"type": "string"}, "output": {"type": "string"}, "bytes": {"type": "integer"},
                            "bytes_read": {"type": "integer"}, "model_bytes": {"type": "integer"},
                            "seconds": {"type": "number"}, "device": _DEVICE}, "lineage fingerprint --json"),
    "merge": _schema("lineage.merge/1", ["child", "parents"],
                     {"child": {"type": "string"}, "parents": _ARR, "base": {"type": ["string", "null"]},
                      "device": _DEVICE},
                     "lineage merge --json"),
    "verify": _schema("lineage.verify/1", ["report", "same", "changed_files", "differences"],
                      {"report": {"type": "string"}, "same": {"type": "boolean"}, "changed_files": _ARR,
                       "differences": _ARR}, "lineage verify --json"),
    "demo": _schema("lineage.demo/1", ["reports"], {"reports": {"type": "array", "items": COMPARE_SCHEMA}},
                    "lineage demo --json"),
}


def stamp(name: str, payload: Mapping[str, Any]) -> dict[str, Any]:
    """``payload`` with the schema id of ``name`` and the tool version first."""
    from lineage import __version__

    body = {k: v for k, v in payload.items() if k not in ("schema", "version")}
    return {"schema": SCHEMAS[name]["$id"], "version": __version__, **body}
