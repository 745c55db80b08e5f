"""``lineage inspect``: what a model reference holds, without comparing it to anything.

:func:`inspect` opens a reference (reading headers only: no tensor data), and reports
its format, files, tensors (dtype, shape, size, role), architecture as paired roles see
it, and the lineage it *claims*: GGUF ``general.base_model.*`` / ``general.source.*``,
a model card's ``base_model`` (README front matter, local or on the Hub), a PEFT
adapter's base, and ``config.json``'s ``_name_or_path``.  Claims are what the files
say, not what was measured.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lineage.errors import CheckpointError, HeaderError
from lineage.io.checkpoint import Checkpoint, open_checkpoint

log = logging.getLogger(__name__)

_SCALARS = (str, int, float, bool, type(None))


@dataclass(frozen=True)
class TensorInfo:
    """One stored tensor."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    file: str
    roles: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape),
                "nbytes": self.nbytes, "file": self.file, "roles": list(self.roles)}


@dataclass(frozen=True)
class FileInfo:
    """One file (or remote object) the checkpoint reads from."""

    name: str
    size: int

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "size": self.size}


@dataclass(frozen=True)
class LineageClaim:
    """A parent the files name: where the claim comes from and what it says."""

    source: str  # "gguf", "model_card", "adapter", "config"
    model: str  # a repo id, URL or name
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "model": self.model, "details": dict(self.details)}


@dataclass(frozen=True)
class InspectResult:
    """Everything :func:`inspect` found."""

    ref: str
    format: str
    files: tuple[FileInfo, ...]
    tensors: tuple[TensorInfo, ...]
    total_bytes: int
    n_params: int
    bytes_read: int
    dtypes: dict[str, int]  # storage dtype -> bytes
    claims: tuple[LineageClaim, ...]
    metadata: dict[str, Any]
    config: dict[str, Any] | None
    architecture: dict[str, Any] | None = None
    unassigned: tuple[str, ...] = ()
    vocab_size: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "ref": self.ref,
            "format": self.format,
            "files": [f.to_dict() for f in self.files],
            "n_tensors": len(self.tensors),
            "tensors": [t.to_dict() for t in self.tensors],
            "total_bytes": self.total_bytes,
            "n_params": self.n_params,
            "bytes_read": self.bytes_read,
            "dtypes": dict(self.dtypes),
            "claimed_lineage": [c.to_dict() for c in self.claims],
            "metadata": dict(self.metadata),
            "config": self.config,
            "architecture": self.architecture,
            "unassigned": list(self.unassigned),
            "vocab_size": self.vocab_size,
        }


# ---------------------------------------------------------------------------- claims


def _gguf_claims(meta: dict[str, Any]) -> list[LineageClaim]:
    out = []
    n = meta.get("general.base_model.count")
    idx = sorted({int(m.group(1)) for k in meta
                  if (m := re.fullmatch(r"general\.base_model\.(\d{1,6})\.\w+", k))})
    if isinstance(n, int):
        idx = sorted(set(idx) | set(range(min(n, 64))))
    for i in idx:
        d = {k.rsplit(".", 1)[-1]: v for k, v in meta.items()
             if k.startswith(f"general.base_model.{i}.")}
        if not d:
            continue
        model = d.get("repo_url") or "/".join(str(d[k]) for k in ("organization", "name") if d.get(k))
        out.append(LineageClaim("gguf", str(model or f"base_model.{i}"), d))
    src = {k.removeprefix("general.source."): v for k, v in meta.items() if k.startswith("general.source.")}
    if src:
        model = src.get("huggingface.repository") or src.get("url") or src.get("repo_url")
        if model:
            out.append(LineageClaim("gguf_source", str(model), src))
    return out


def _card_claims(card: str | None) -> list[LineageClaim]:
    if not card:
        return []
    from lineage.io.safeyaml import load_front_matter

    try:
        fm = load_front_matter(card)  # hostile front matter (aliases, nesting, size) is a HeaderError
    except HeaderError:
        raise
    except CheckpointError:
        return []
    base = fm.get("base_model")
    bases = base if isinstance(base, list) else [base] if base else []
    rel = fm.get("base_model_relation")
    return [LineageClaim("model_card", str(b), {"base_model_relation": rel} if rel else {})
            for b in bases if isinstance(b, (str, int))]


def _find_card(ref: str, ckpt: Checkpoint) -> str | None:
    p = Path(ref)
    if p.exists():
        for d in ([p] if p.is_dir() else []) + [p.parent if p.is_file() else p]:
            if (d / "README.md").is_file():
                return str(d / "README.md")
        return None
    if "hub.repo_id" in ckpt.metadata or ref.startswith("hf://"):
        try:
            from lineage.io.hub import fetch_file

            return fetch_file(ref, "README.md")
        except Exception as e:  # the card is optional
            log.info("%s: no model card (%s)", ref, e)
    return None


def _claims(ref: str, ckpt: Checkpoint) -> list[LineageClaim]:
    meta = ckpt.metadata
    claims = _gguf_claims(meta) + _card_claims(_find_card(ref, ckpt))
    if meta.get("adapter.base_model"):
        claims.append(LineageClaim("adapter", str(meta["adapter.base_model"]),
                                   {"r": meta.get("adapter.r"), "lora_alpha": meta.get("adapter.lora_alpha")}))
    if ckpt.config and isinstance(ckpt.config.get("_name_or_path"), str) and ckpt.config["_name_or_path"]:
        claims.append(LineageClaim("config", ckpt.config["_name_or_path"]))
    return claims


# ---------------------------------------------------------------------------- inspect


def _roles(ckpt: Checkpoint) -> tuple[dict[str, list[str]], dict[str, Any] | None, list[str]]:
    try:
        from lineage.roles import roles_for

        rm = roles_for(ckpt)
    except Exception as e:  # roles are a convenience here; never fail inspect on them
        log.info("%s: no roles (%s)", ckpt.ref, e)
        return {}, None, []
    by_tensor: dict[str, list[str]] = {}
    for role, view in rm.roles.items():
        by_tensor.setdefault(view.tensor, []).append(role)
    return by_tensor, rm.arch.to_dict(), list(rm.unassigned)


def inspect(ref: str) -> InspectResult:
    """Open ``ref`` (headers only) and describe it; see the module doc."""
    ckpt = open_checkpoint(ref)
    try:
        roles, arch, unassigned = _roles(ckpt)
        tensors = tuple(
            TensorInfo(m.name, m.dtype, tuple(m.shape), m.nbytes, m.file, tuple(roles.get(m.name, ())))
            for m in (ckpt.tensors[n] for n in ckpt.in_file_order())
        )
        files = tuple(FileInfo(s.name, s.size) for s in ckpt.sources)
        dtypes: dict[str, int] = {}
        for t in tensors:
            dtypes[t.dtype] = dtypes.get(t.dtype, 0) + t.nbytes
        vocab = ckpt.vocab()
        metadata = {k: v for k, v in ckpt.metadata.items() if isinstance(v, _SCALARS)}
        return InspectResult(
            ref=ref,
            format=ckpt.format,
            files=files,
            tensors=tensors,
            total_bytes=ckpt.total_bytes,
            n_params=sum(_numel(t.shape) for t in tensors),
            bytes_read=ckpt.bytes_read,
            dtypes=dtypes,
            claims=tuple(_claims(ref, ckpt)),
            metadata=metadata,
            config=ckpt.config,
            architecture=arch,
            unassigned=tuple(unassigned),
            vocab_size=len(vocab) if vocab is not None else None,
        )
    finally:
        ckpt.close()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
