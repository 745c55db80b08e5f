"""What a report was computed from, and how: file hashes, sizes, tool version, options, seeds.

A verdict may end up in a takedown notice or in the reply to one, so every report records
enough for someone else to check it: a BLAKE3 digest and the size of every local file the
comparison read (weights, config, tokenizer), the tool and library versions, the options and
seeds, and the method text.  ``lineage verify REPORT.json`` re-hashes the files and re-runs the
comparison (:mod:`lineage.verify`).

Weight files are hashed inside the comparison's own read pass (:mod:`lineage.io.hashing`: the
streaming pass reads each file in order and the hash takes the same buffers); side files and any
file the pass did not hash are hashed after it (:func:`hash_inputs` with ``known`` digests).  The
seconds spent hashing are recorded in ``Provenance.hash_seconds`` and the way it ran in
``Provenance.hash_pass``.  BLAKE3 is used (multi-threaded, memory
mapped): no Hub hash has to be matched for a local file.  Remote files (Hub, URLs) are listed
by repo id, resolved commit and file name with the SHA-256 the Hub publishes for them
(:func:`remote_records`; the bytes read were checked against it as they streamed,
:mod:`lineage.io.verify`), and :func:`changed_remote` asks the Hub again at that commit.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import platform
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SCHEMA = "lineage.provenance/1"
ALGORITHM = "blake3"
#: Files beside the weights that a comparison may read (config, tokenizer, adapter config).
SIDE_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
              "merges.txt", "adapter_config.json", "special_tokens_map.json", "generation_config.json")
HASH_PASS_CONCURRENT = ("sequential pass per file on a background thread, concurrent with the comparison "
                        "(the page cache shares the reads)")
HASH_PASS_AFTER = "separate sequential pass after the comparison"
HASH_PASS_IN_READ = ("weights hashed from the comparison's own read pass (one read of each file); "
                     "side files (config, tokenizer) after it")
#: Fixed seeds of the randomised steps (probe frames, permutation nulls, randomised SVDs).
SEEDS: Mapping[str, int] = {"canon.frame": 0, "canon.permutation_null": 0, "randomized_svd": 0,
                            "lowrank": 0, "merge.fit": 0}


@dataclass(frozen=True)
class FileRecord:
    """One file read: which model side, where, how big, and its digest.

    A local file has a BLAKE3 digest of its bytes.  A Hub file is named by what anyone can look up
    again (``repo_id``, the resolved ``commit``, its ``file`` name in the repo; ``path`` is
    ``hf://repo@commit/file``) with a SHA-256: the one the Hub publishes (``digest_source`` "hub",
    the LFS pointer's) for weight files, else that of the complete copy this run fetched
    ("fetched copy", small side files such as config.json).  ``status`` says whether the bytes the
    comparison read were checked against the published hash (see :mod:`lineage.io.provenance`).
    """

    side: str
    path: str
    size: int
    algorithm: str
    digest: str | None
    repo_id: str | None = None
    commit: str | None = None
    file: str | None = None
    status: str | None = None
    digest_source: str | None = None


@dataclass(frozen=True)
class Provenance:
    """Inputs and settings of one report (JSON under ``provenance``)."""

    tool: str
    version: str
    command: str
    inputs: dict[str, str]
    files: tuple[FileRecord, ...]
    options: dict[str, Any]
    seeds: dict[str, int]
    method: str
    environment: dict[str, str]
    created_utc: str
    hash_seconds: float
    hash_pass: str = "separate sequential pass"
    schema: str = SCHEMA
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return asdict(self)


#: Bytes hashed per read: memory stays at one buffer whatever the file size (a memory map of
#: the whole file would count it all in the process's resident set).
HASH_CHUNK = 16 << 20


def hash_file(path: str | os.PathLike[str]) -> str:
    """BLAKE3 hex digest of a local file, read sequentially in :data:`HASH_CHUNK` pieces."""
    import blake3

    h = blake3.blake3()
    buf = bytearray(HASH_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])  # releases the GIL: hashing runs beside the comparison
    return h.hexdigest()


def local_files(ref: str) -> list[Path]:
    """The local files a comparison of ``ref`` reads (weights and side files); empty when remote."""
    p = Path(ref)
    if not p.exists():
        return []
    if p.is_file():
        return [p]
    files: list[Path] = []
    try:
        from lineage.io.checkpoint import open_checkpoint

        ckpt = open_checkpoint(ref)
        files = [Path(s.name) for s in ckpt.sources if Path(s.name).is_file()]
        for s in ckpt.sources:
            close = getattr(s, "close", None)
            if close is not None:
                close()
    except Exception as e:  # an adapter folder or an unreadable one: hash what is there
        log.debug("provenance: %s not opened as a checkpoint (%s); hashing its weight files", ref, e)
        files = sorted(x for x in p.iterdir() if x.suffix in (".safetensors", ".gguf", ".bin", ".pt", ".json"))
    files += [p / n for n in SIDE_FILES if (p / n).is_file() and p / n not in files]
    return sorted(dict.fromkeys(files))


def hash_inputs(inputs: Mapping[str, str],
                known: Mapping[str, tuple[int, str]] | None = None) -> tuple[tuple[FileRecord, ...], float]:
    """Records of every file of every input (``side -> ref``) and the seconds the hashing took.

    ``known``: ``resolved path -> (size, BLAKE3 digest)`` of files already hashed during the comparison's
    read pass (:func:`known_digests`); they are not read again when their size still matches.
    """
    t0 = time.perf_counter()
    out: list[FileRecord] = []
    known = known or {}
    for side, ref in inputs.items():
        files = local_files(ref)
        if not files:
            out.append(FileRecord(side, ref, 0, "remote", None))
            continue
        for f in files:
            path, size = str(f.resolve()), f.stat().st_size
            hit = known.get(path)
            digest = hit[1] if hit is not None and hit[0] == size else hash_file(f)
            out.append(FileRecord(side, path, size, ALGORITHM, digest))
    return tuple(out), time.perf_counter() - t0


def known_digests(file_lists: Iterable[Iterable[Any]]) -> dict[str, tuple[int, str]]:
    """``resolved path -> (size, digest)`` from reports' per-file integrity records that carry a BLAKE3
    digest computed in the read pass (:class:`lineage.io.provenance.FileIntegrity`)."""
    out: dict[str, tuple[int, str]] = {}
    for files in file_lists:
        for f in files:
            digest = getattr(f, "blake3", None)
            if digest:
                out[str(Path(f.file).resolve())] = (int(f.size), str(digest))
    return out


#: Algorithm of Hub files' digests (the Hub publishes SHA-256 for LFS files).
REMOTE_ALGORITHM = "sha256"
#: ``FileRecord.digest_source``: the digest is the SHA-256 the Hub publishes for the file.
HUB_PUBLISHED = "hub"
#: ``FileRecord.digest_source``: the digest is the SHA-256 of the complete copy this run fetched.
FETCHED_COPY = "fetched copy"


def sha256_file(path: str | os.PathLike[str]) -> str:
    """SHA-256 hex digest of a local file, read in :data:`HASH_CHUNK` pieces."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def remote_records(side: str, hub: Any, files: Sequence[Any]) -> tuple[FileRecord, ...]:
    """Records of the Hub files one side was read from.

    ``hub`` is the side's :class:`~lineage.io.provenance.HubProvenance` (repo, commit, files opened)
    and ``files`` its :class:`~lineage.io.provenance.FileIntegrity` records (weight files: the
    published SHA-256 and whether the bytes read matched it).  Files without a published hash that
    were fetched whole (config, tokenizer) are hashed from their local copy in the Hub cache.
    """
    integrity = {str(f.file): f for f in files}
    out = []
    for name in hub.files:
        path = f"hf://{hub.repo_id}@{hub.commit}/{name}"
        fi = integrity.get(f"hf://{hub.repo_id}/{name}")
        if fi is not None:
            out.append(FileRecord(side, path, int(fi.size), REMOTE_ALGORITHM, fi.expected_sha256, hub.repo_id,
                                  hub.commit, name, fi.status, HUB_PUBLISHED if fi.expected_sha256 else None))
            continue
        copy = _cached_copy(hub, name)
        digest = sha256_file(copy) if copy is not None else None
        size = Path(copy).stat().st_size if copy is not None else 0
        out.append(FileRecord(side, path, size, REMOTE_ALGORITHM, digest, hub.repo_id, hub.commit, name,
                              "fetched" if digest else None, FETCHED_COPY if digest else None))
    return tuple(out)


def _cached_copy(hub: Any, name: str) -> str | None:
    """The local copy of a small Hub file in the Hugging Face cache (it was fetched whole), if any."""
    try:
        from huggingface_hub import try_to_load_from_cache

        from lineage.io.hub import HubOptions

        got = try_to_load_from_cache(hub.repo_id, name, cache_dir=HubOptions.from_env().cache_dir,
                                     revision=hub.commit)
    except Exception as e:  # noqa: BLE001 - a missing copy is recorded without a digest
        log.debug("provenance: no cached copy of %s/%s (%s)", hub.repo_id, name, e)
        return None
    return got if isinstance(got, str) and Path(got).is_file() else None


def with_remote(files: Sequence[FileRecord], remote: Mapping[str, Sequence[FileRecord]]) -> tuple[FileRecord, ...]:
    """``files`` with each side's ``remote`` placeholder replaced by that side's Hub file records."""
    out: list[FileRecord] = []
    for f in files:
        if f.algorithm == "remote" and remote.get(f.side):
            out.extend(remote[f.side])
        else:
            out.append(f)
    return tuple(out)


def changed_remote(recorded: Iterable[Mapping[str, Any]]) -> list[str]:
    """One line per recorded Hub file whose published SHA-256 at the recorded commit differs now (or
    that is gone); the repository is asked again at that commit (a metadata call, no weights read)."""
    from lineage.io.hub import HubOptions, HubRef, HubRepo

    want: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for f in recorded:
        if f.get("digest_source") == HUB_PUBLISHED and f.get("repo_id") and f.get("commit") and f.get("digest"):
            want.setdefault((str(f["repo_id"]), str(f["commit"])), []).append(f)
    out = []
    for (repo_id, commit), recs in want.items():
        repo = HubRepo(HubRef(repo_id, commit), HubOptions.from_env())
        for f in recs:
            name = str(f.get("file"))
            now = repo.sha256.get(name)
            if name not in repo.files:
                out.append(f"{f['path']}: no longer in the repository at commit {commit[:12]}")
            elif now != f["digest"]:
                out.append(f"{f['path']}: changed (sha256 {str(f['digest'])[:16]}… recorded, the Hub publishes "
                           f"{(now or 'none')[:16]}… now)")
    return out


def tool_version() -> str:
    """The installed version of this package."""
    from lineage import __version__

    return __version__


def _environment() -> dict[str, str]:
    env = {"python": platform.python_version(), "platform": platform.platform()}
    for mod in ("torch", "numpy", "safetensors"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:  # pragma: no cover - optional
            pass
    return env


def collect(command: str, inputs: Mapping[str, str], options: Mapping[str, Any], method: str,
            extra: Mapping[str, Any] | None = None,
            hashed: tuple[tuple[FileRecord, ...], float] | None = None, how: str | None = None) -> Provenance:
    """Record hashes, versions, options, seeds and method text for one report.

    ``hashed``: the result of :func:`hash_inputs` when it already ran (concurrently with the
    comparison, or from its read pass: say which in ``how``); otherwise the inputs are hashed now, after it.
    """
    files, secs = hashed if hashed is not None else hash_inputs(inputs)
    how = how or (HASH_PASS_CONCURRENT if hashed is not None else HASH_PASS_AFTER)
    size = sum(f.size for f in files)
    log.info("provenance: hashed %d files (%d bytes) in %.2f s", len(files), size, secs)
    return Provenance(
        tool="lineage", version=tool_version(), command=command, inputs=dict(inputs), files=files,
        options=dict(options), seeds=dict(SEEDS), method=method, environment=_environment(),
        created_utc=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        hash_seconds=round(secs, 4), hash_pass=how, extra=dict(extra or {}),
    )


def changed_files(recorded: Iterable[Mapping[str, Any]]) -> list[str]:
    """One line per recorded file that is missing or whose digest or size differs now."""
    out = []
    for f in recorded:
        if f.get("algorithm") != ALGORITHM or not f.get("digest"):
            continue
        path = Path(str(f["path"]))
        if not path.is_file():
            out.append(f"{path}: missing (recorded {f['algorithm']} {str(f['digest'])[:16]}…)")
            continue
        digest = hash_file(path)
        if digest != f["digest"] or path.stat().st_size != f.get("size"):
            out.append(f"{path}: changed ({f['algorithm']} {str(f['digest'])[:16]}… recorded, "
                       f"{digest[:16]}… now; size {f.get('size')} → {path.stat().st_size})")
    return out
