"""What identifies a model's bytes, without reading them all: a Hub repo at a commit, or local file content.

* Hub ids: the repository and the commit the revision resolves to, with every file's size and
  the hash the Hub publishes (LFS SHA-256 for weights, git blob id otherwise) — one metadata call.
* Local files and folders: the relative file names, sizes and content hashes.  A file in a
  Hugging Face cache snapshot links to ``blobs/<sha256>``, which is its hash for free; a file of at
  most :data:`FULL_HASH_BYTES` is hashed whole; a larger one by a sample (its size, the first and
  last MiB and :data:`SAMPLES` evenly spaced 64 KiB spans), marked ``sampled:`` — cheap, and the
  safetensors / GGUF header (tensor names, shapes, offsets) is inside the first MiB.

The reference key hashes these, never an absolute path: a moved folder, a cache shared between
machines and two copies of one model all map to the same registry entry.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from lineage.errors import ConfigError, RemoteError

#: Files up to this size are hashed whole.
FULL_HASH_BYTES = 64 << 20
#: Evenly spaced 64 KiB spans hashed in a larger file (besides its first and last MiB).
SAMPLES = 16
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Reference:
    """A model's identity: ``key`` (what the registry is keyed by) and what it was derived from."""

    key: str
    kind: str                                   # "hub" | "local"
    repo_id: str | None
    revision_sha: str | None
    files: tuple[tuple[str, int, str], ...]     # (relative name, size, hash)


def _file_hash(p: Path) -> str:
    try:
        target = Path(os.path.realpath(p))
        if target.parent.name == "blobs" and _HEX64.fullmatch(target.name):
            return target.name                      # HF cache: the blob is named by its sha256
        size = target.stat().st_size
        h = hashlib.sha256()
        with open(target, "rb") as f:
            if size <= FULL_HASH_BYTES:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
                return h.hexdigest()
            spans = [(0, 1 << 20), (size - (1 << 20), 1 << 20)]
            spans += [(size * (i + 1) // (SAMPLES + 1), 1 << 16) for i in range(SAMPLES)]
            for off, n in spans:
                f.seek(off)
                h.update(f.read(n))
        return f"sampled:{h.hexdigest()}"
    except OSError as e:
        raise ConfigError(f"cannot read ({e.strerror})", path=str(p)) from e


def local_reference(path: str | os.PathLike[str]) -> Reference:
    """Reference of a local model file or folder (hidden files skipped)."""
    p = Path(path)
    if p.is_dir():
        files = sorted(q for q in p.rglob("*") if q.is_file() and not any(s.startswith(".") for s in q.relative_to(p).parts))
        rel = [(str(q.relative_to(p)), q) for q in files]
    elif p.is_file():
        rel = [(p.name, p)]
    else:
        raise ConfigError("no such file or folder", path=str(p))
    entries = tuple((name, q.stat().st_size, _file_hash(q)) for name, q in rel)
    h = hashlib.sha256(b"local\n")
    for name, size, fh in entries:
        h.update(f"{name}\0{size}\0{fh}\n".encode())
    return Reference(h.hexdigest(), "local", None, None, entries)


def hub_reference(ref: str) -> Reference:
    """Reference of a Hub id (``org/name[@revision]``): one model-info call."""
    from huggingface_hub import HfApi

    from lineage.io.hub import HubOptions, parse_hub_ref

    hr = parse_hub_ref(ref)
    if hr is None:
        raise ConfigError("not a Hub id", path=ref)
    opts = HubOptions.from_env()
    try:
        info = HfApi(endpoint=opts.endpoint, token=opts.token).model_info(
            hr.repo_id, revision=hr.revision, files_metadata=True, timeout=opts.http.stall_timeout)
    except Exception as e:  # noqa: BLE001 - every Hub failure becomes one typed line
        raise RemoteError(f"model info of {hr.repo_id}: {type(e).__name__}: {e}", path=ref) from e
    files = []
    for s in info.siblings or []:
        lfs = getattr(s, "lfs", None)
        sha = getattr(lfs, "sha256", None) if lfs is not None else None
        files.append((s.rfilename, int(s.size or 0), str(sha or getattr(s, "blob_id", None) or "")))
    commit = str(info.sha or hr.revision or "main")
    h = hashlib.sha256(f"hub\n{hr.repo_id}\n{hr.path or ''}\n{commit}\n".encode())
    return Reference(h.hexdigest(), "hub", hr.repo_id, commit, tuple(sorted(files)))


def reference_of(ref: str) -> Reference:
    """Reference of whatever ``ref`` names (an existing path, else a Hub id)."""
    return local_reference(ref) if Path(ref).exists() else hub_reference(ref)
