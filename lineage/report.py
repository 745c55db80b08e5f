"""Report dataclasses and their versioned JSON form.

A :class:`Report` is what :func:`lineage.compare.compare` returns; renderers in
:mod:`lineage.render.text` and :mod:`lineage.render.html` turn it into a terminal
table or a self-contained HTML page.  ``Report.to_dict()`` follows the JSON schema
``lineage.compare/1`` (see :data:`JSON_SCHEMA`).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from lineage.io.provenance import FileIntegrity, HubProvenance
from lineage.provenance import Provenance
from lineage.render.pvalue import format_p, p_float
from lineage.verdict import Verdict

if TYPE_CHECKING:  # the canon package pulls in torch; the report module must not
    from lineage.canon.gate import CanonDecision

SCHEMA = "lineage.compare/1"


@dataclass(frozen=True)
class ModelSummary:
    """What was opened on one side."""

    ref: str
    format: str
    n_tensors: int
    total_bytes: int
    bytes_read: int
    family: str | None = None
    n_layers: int | None = None
    hidden: int | None = None
    dtypes: dict[str, int] = field(default_factory=dict)
    claims: dict[str, Any] = field(default_factory=dict)
    #: For a Hub reference: repo id, revision, resolved commit, files (not a snapshot path).
    hub: HubProvenance | None = None
    #: Per file read: were its bytes verified against the hash the Hub publishes?
    files: tuple[FileIntegrity, ...] = ()
    #: Weight files beside the loaded ones that were left out (e.g. a float32 copy).
    skipped_files: tuple[str, ...] = ()


@dataclass(frozen=True)
class TensorRow:
    """Similarity of one paired role.  ``evidence`` says whether it counts towards the verdict."""

    role: str
    layer: int | None
    kind: str
    tensor_a: str
    tensor_b: str
    shape_a: tuple[int, ...]
    shape_b: tuple[int, ...]
    dtype_a: str
    dtype_b: str
    cosine: float | None
    pearson: float | None
    rel_l2: float | None
    evidence: bool
    note: str | None = None


@dataclass(frozen=True)
class Finding:
    """Something the user should know that is not a similarity figure (NaN weights, mismatches…)."""

    severity: str  # "info" | "warning" | "error"
    message: str
    model: str | None = None  # "a" | "b" | None
    tensor: str | None = None


@dataclass(frozen=True)
class Report:
    """Everything known about a compared pair."""

    a: ModelSummary
    b: ModelSummary
    verdict: Verdict
    layers: tuple[TensorRow, ...]
    only_a: tuple[str, ...] = ()
    only_b: tuple[str, ...] = ()
    findings: tuple[Finding, ...] = ()
    canon: dict[str, Any] | None = None
    anatomy: dict[str, Any] | None = None
    adapter_check: dict[str, Any] | None = None
    merge: dict[str, Any] | None = None
    timing: dict[str, float] = field(default_factory=dict)
    #: whether the canonical test ran and why; None: not recorded (fingerprint-only comparisons)
    canon_gate: CanonDecision | None = None
    #: what the report was computed from and how (file hashes, versions, options, seeds)
    provenance: Provenance | None = None
    schema: str = SCHEMA

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dict following :data:`JSON_SCHEMA` (non-finite floats become null).

        ``verdict.p_value`` is null below 1e-300 (``log10_p`` is the exact figure) and
        ``verdict.p_text`` is the p-value as every renderer writes it.
        """
        d = asdict(self)
        v = d["verdict"]
        v["p_value"] = p_float(self.verdict.log10_p) if self.verdict.log10_p is not None else v["p_value"]
        v["p_text"] = format_p(self.verdict.log10_p)
        return _clean({"schema": self.schema, "version": _version(), **d})

    def to_json(self, indent: int | None = 2) -> str:
        """JSON text of :meth:`to_dict`."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)


def _version() -> str:
    from lineage import __version__

    return __version__


def _clean(x: Any) -> Any:
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


_num = {"type": ["number", "null"]}
_str_or_null = {"type": ["string", "null"]}
_model = {
    "type": "object",
    "required": ["ref", "format", "n_tensors", "total_bytes", "bytes_read"],
    "properties": {
        "ref": {"type": "string"},
        "format": {"type": "string"},
        "n_tensors": {"type": "integer"},
        "total_bytes": {"type": "integer"},
        "bytes_read": {"type": "integer"},
        "family": _str_or_null,
        "n_layers": {"type": ["integer", "null"]},
        "hidden": {"type": ["integer", "null"]},
        "dtypes": {"type": "object"},
        "claims": {"type": "object"},
        "hub": {"type": ["object", "null"], "properties": {
            "repo_id": {"type": "string"}, "revision": {"type": "string"}, "commit": {"type": "string"},
            "files": {"type": "array", "items": {"type": "string"}}, "endpoint": {"type": "string"},
            "from_cache": {"type": "boolean"}}},
        "files": {"type": "array", "items": {"type": "object", "properties": {
            "file": {"type": "string"}, "size": {"type": "integer"},
            "status": {"enum": ["verified", "partial", "no-hash", "local"]},
            "expected_sha256": _str_or_null, "bytes_hashed": {"type": "integer"}}}},
        "skipped_files": {"type": "array", "items": {"type": "string"}},
    },
}

#: JSON Schema (draft 2020-12) of ``Report.to_dict()``.
JSON_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": SCHEMA,
    "type": "object",
    "required": ["schema", "version", "a", "b", "verdict", "layers"],
    "properties": {
        "schema": {"const": SCHEMA},
        "version": {"type": "string", "description": "lineage version that wrote the report"},
        "a": _model,
        "b": _model,
        "verdict": {
            "type": "object",
            "required": ["derived", "relation", "p_value", "log10_p", "summary", "null", "method"],
            "properties": {
                "derived": {"type": ["boolean", "null"]},
                "relation": {"type": "string"},
                "p_value": {"type": ["number", "null"], "description": "null below 1e-300: read log10_p"},
                "log10_p": _num,
                "p_text": {"type": "string", "description": "p = 3.2e-12 or p < 1e-300 (log10 p = -620.0)"},
                "summary": {"type": "string"},
                "null": {"type": "string"},
                "method": {"type": "string"},
                "details": {"type": "object"},
            },
        },
        "layers": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["layer", "role", "kind", "cosine", "pearson", "rel_l2", "evidence"],
                "properties": {
                    "layer": {"type": ["integer", "null"]},
                    "role": {"type": "string"},
                    "kind": {"type": "string"},
                    "cosine": _num,
                    "pearson": _num,
                    "rel_l2": _num,
                    "evidence": {"type": "boolean"},
                    "shape_a": {"type": "array", "items": {"type": "integer"}},
                    "shape_b": {"type": "array", "items": {"type": "integer"}},
                },
            },
        },
        "only_a": {"type": "array", "items": {"type": "string"}},
        "only_b": {"type": "array", "items": {"type": "string"}},
        "findings": {"type": "array"},
        "canon": {"type": ["object", "null"]},
        "canon_gate": {"type": ["object", "null"], "required": ["ran", "mode", "reason"],
                       "description": "whether the canonical test ran (--canon auto|always|never) and why; "
                                      "auto skips it when the element-wise evidence leaves nothing to undo",
                       "properties": {"ran": {"type": "boolean"}, "mode": {"enum": ["auto", "always", "never"]},
                                      "reason": {"type": "string"}}},
        "anatomy": {"type": ["object", "null"]},
        "adapter_check": {"type": ["object", "null"]},
        "merge": {"type": ["object", "null"]},
        "timing": {"type": "object"},
        "provenance": {"type": ["object", "null"], "description": "schema lineage.provenance/1: files "
                       "(side, path, size, algorithm, digest), version, options, seeds, method"},
    },
}
