"""Find the models in a folder, in a Hugging Face cache, or in a Hub organisation.

Each source gives :class:`ModelEntry` items: a ``ref`` that
:func:`lineage.io.checkpoint.open_checkpoint` accepts and a short ``label`` for
reports.  Nothing is opened or read here beyond directory listings (and, for an
organisation, the Hub's model list).

What counts as a model in a folder (searched recursively, hidden folders skipped):
a folder holding ``model.safetensors``, a shard index, ``pytorch_model.bin`` (or its
index) or an ``adapter_config.json`` — the folder is then one model and is not
searched further; otherwise every ``*.safetensors`` and ``*.gguf`` file is a model
of its own (a split GGUF set ``x-00001-of-0000N.gguf`` counts once).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from lineage.errors import ConfigError

log = logging.getLogger(__name__)

_MODEL_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json", "adapter_config.json")
_SPLIT_GGUF = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$")


@dataclass(frozen=True)
class ModelEntry:
    """One model found by discovery."""

    ref: str      # what open_checkpoint takes (a path or a Hub id)
    label: str    # short unique name for reports
    origin: str   # "folder" | "hf-cache" | "hub"


def _is_model_dir(path: Path) -> bool:
    return any((path / f).is_file() for f in _MODEL_FILES)


def discover_folder(root: str | os.PathLike[str]) -> list[ModelEntry]:
    """Models under ``root`` (a folder, or a single model file/folder)."""
    base = Path(root)
    if not base.exists():
        raise ConfigError(f"{base}: no such file or folder")
    if base.is_file() or _is_model_dir(base):
        return [ModelEntry(str(base), base.name, "folder")]
    out: list[ModelEntry] = []
    for dirpath, dirnames, filenames in os.walk(base, followlinks=False):
        here = Path(dirpath)
        keep = []
        for d in sorted(dirnames):
            sub = here / d
            if d.startswith("."):
                continue
            if _is_model_dir(sub):  # a model folder (possibly a symlink) is one model: not searched further
                out.append(ModelEntry(str(sub), str(sub.relative_to(base)), "folder"))
            elif sub.is_symlink():
                if _no_loop(sub, base):
                    out.extend(ModelEntry(e.ref, f"{sub.relative_to(base)}/{e.label}", "folder")
                               for e in discover_folder(sub.resolve()))
            else:
                keep.append(d)
        dirnames[:] = keep
        for f in sorted(filenames):
            if f.startswith("."):
                continue
            m = _SPLIT_GGUF.search(f)
            if f.endswith(".safetensors") or (f.endswith(".gguf") and (m is None or m.group(1) == "00001")):
                p = here / f
                out.append(ModelEntry(str(p), str(p.relative_to(base)), "folder"))
    log.info("%s: %d models", base, len(out))
    return out


def _no_loop(link: Path, base: Path) -> bool:
    """A symlinked folder is followed once, unless it points back into the tree being searched."""
    target = link.resolve()
    root = base.resolve()
    return not (target == root or root in target.parents or target in root.parents)


def discover_hf_cache(root: str | os.PathLike[str] | None = None) -> list[ModelEntry]:
    """The model snapshots of a Hugging Face cache (``HF_HUB_CACHE``/``HF_HOME`` by default).

    One entry per repository: the snapshot ``refs/main`` points to, else the newest one.
    """
    if root is None:
        from lineage.io.hub import HubOptions

        root = HubOptions.from_env().cache_dir
    base = Path(root)
    if not base.is_dir():
        raise ConfigError(f"{base}: not a Hugging Face cache folder")
    out = []
    for repo in sorted(base.glob("models--*")):
        snaps = repo / "snapshots"
        if not snaps.is_dir():
            continue
        rev = None
        ref_main = repo / "refs" / "main"
        if ref_main.is_file():
            rev = ref_main.read_text().strip()
        cands = [snaps / rev] if rev and (snaps / rev).is_dir() else sorted(
            (p for p in snaps.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True)[:1]
        for snap in cands:
            name = repo.name[len("models--"):].replace("--", "/")
            inner = discover_folder(snap) if not _is_model_dir(snap) else [ModelEntry(str(snap), "", "hf-cache")]
            for e in inner:
                label = name + f"@{snap.name[:8]}" + (f"/{e.label}" if e.label and e.label != snap.name else "")
                out.append(ModelEntry(e.ref, label, "hf-cache"))
    log.info("%s: %d cached models", base, len(out))
    return out


def discover_hub_org(org: str, *, limit: int | None = None) -> list[ModelEntry]:
    """The models of a Hub user or organisation (``HF_ENDPOINT`` and ``HF_TOKEN`` honoured)."""
    from huggingface_hub import HfApi

    from lineage.io.hub import HubOptions, _remote_error
    from lineage.io.hubapi import check_reachable

    opts = HubOptions.from_env()
    if opts.offline:
        raise ConfigError(f"org:{org}: HF_HUB_OFFLINE is set, so the models of a Hub organisation cannot be listed")
    # one TCP connection first: a refused or unknown endpoint fails now, not after the client's five retries
    check_reachable(opts.endpoint, min(10.0, opts.http.stall_timeout))
    try:
        models = list(HfApi(endpoint=opts.endpoint, token=opts.token).list_models(author=org, limit=limit))
    except Exception as e:  # noqa: BLE001 - every Hub failure becomes a typed, one-line error
        raise _remote_error(e, f"listing the models of {org}") from e
    out = [ModelEntry(m.id, m.id, "hub") for m in models if getattr(m, "id", None)]
    log.info("hub organisation %s: %d models", org, len(out))
    return out


def discover(sources: Sequence[str]) -> list[ModelEntry]:
    """Models of every source: a path (folder or file), ``hf-cache[:PATH]``, ``org:NAME``, or a Hub id ``org/name``.

    Labels are made unique; the same ``ref`` found twice is kept once.
    """
    found: list[ModelEntry] = []
    for src in sources:
        found.extend(_one(src))
    seen: set[str] = set()
    labels: dict[str, int] = {}
    out = []
    for e in found:
        if e.ref in seen:
            continue
        seen.add(e.ref)
        label = e.label or Path(e.ref).name
        n = labels.get(label, 0)
        labels[label] = n + 1
        out.append(ModelEntry(e.ref, label if n == 0 else f"{label}#{n + 1}", e.origin))
    return out


def _is_hub_id(src: str) -> bool:
    from lineage.io.hub import parse_hub_ref

    return parse_hub_ref(src) is not None


def _one(src: str) -> Iterator[ModelEntry]:
    if src == "hf-cache" or src.startswith("hf-cache:"):
        yield from discover_hf_cache(src.split(":", 1)[1] if ":" in src else None)
    elif src.startswith("org:"):
        yield from discover_hub_org(src[4:])
    elif Path(src).exists():
        yield from discover_folder(src)
    elif _is_hub_id(src):
        yield ModelEntry(src, src.removeprefix("hf://"), "hub")
    else:
        raise ConfigError(f"{src}: not a file, folder, hf-cache[:PATH], org:NAME or Hub id")

