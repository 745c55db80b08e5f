"""Which files of a Hub repository make the model, and opening them (see :mod:`lineage.io.hub`).

The choice follows what ``transformers`` loads: the shard index when there is one, else
``model.safetensors``, else a ``model-0000i-of-0000n`` set; an adapter folder; one GGUF
(a repository with several must be told which); ``.bin`` weights only when downloaded.
Other weight files beside the chosen ones (a float32 copy, ``consolidated.safetensors``)
are left out and recorded on the checkpoint (:attr:`Checkpoint.skipped_files`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from collections.abc import Callable
from typing import Any

from lineage.errors import CheckpointError, RemoteError, ShardError
from lineage.io.checkpoint import Checkpoint, open_safetensors_sources, read_shard_index
from lineage.io.selection import note_skipped, select_safetensors
from lineage.io.hub import TOKENIZER_FILES, HubCheckpoint, HubRepo, _upgrade
from lineage.io.sources import ByteSource

log = logging.getLogger(__name__)


def open_repo(ref: str, repo: HubRepo) -> Checkpoint:
    """Choose the weight files of the referenced repo (or file/folder in it) and open them."""
    path = repo.ref.path
    if path and path in repo.files:
        folder = path.rsplit("/", 1)[0] if "/" in path else ""
        return _open_files(ref, repo, folder, [path.rsplit("/", 1)[-1]])
    if path and not repo.list(path):
        raise CheckpointError(f"no file or folder {path!r} in the repository at {repo.commit[:12]}",
                              path=ref)
    names = repo.list(path)
    pre = f"{path}/" if path else ""
    if "model.safetensors.index.json" in names:
        ck = _open_files(ref, repo, path, ["model.safetensors.index.json"])
        shards = [Path(s.name).name for s in ck.sources]
        note_skipped(ck, select_safetensors(names, shards)[1], ref)
        return ck
    st, skipped = select_safetensors(names)
    if st:
        ck = _open_files(ref, repo, path, st)
        note_skipped(ck, skipped, ref)
        return ck
    if "adapter_config.json" in names:
        return _open_adapter(ref, repo, pre)
    from lineage.io.gguf import split_siblings

    ggufs = [n for n in names if n.endswith(".gguf")]
    # a split set (x-00001-of-00003.gguf …) counts as one model, named by its first file
    ggufs = [n for n in ggufs if (split_siblings(n) or [n])[0] == n]
    if len(ggufs) == 1:
        return _open_files(ref, repo, path, ggufs)
    if len(ggufs) > 1:
        raise CheckpointError(
            f"repository holds {len(ggufs)} GGUF files ({', '.join(ggufs[:6])}"
            f"{', …' if len(ggufs) > 6 else ''}); name one, e.g. hf://{repo.ref.repo_id}/{pre}{ggufs[0]}",
            path=ref,
        )
    for cand in ("pytorch_model.bin.index.json", "pytorch_model.bin"):
        if cand in names:
            return _open_files(ref, repo, path, [cand])
    bins = [n for n in names if n.endswith((".bin", ".pt", ".pth")) and "training_args" not in n]
    if bins:
        return _open_files(ref, repo, path, bins[:1])
    raise CheckpointError(
        "repository has no model weights (safetensors, GGUF, adapter or .bin) at "
        f"{'/' + path if path else 'its root'}",
        path=ref,
    )


def _open_files(ref: str, repo: HubRepo, folder: str, names: list[str]) -> Checkpoint:
    pre = f"{folder}/" if folder else ""
    first = names[0]
    if first.endswith(".index.json"):
        shards = _shards(ref, repo, pre + first)
        if first.startswith("pytorch_model"):
            return _open_torch(ref, repo, pre, shards)
        return _open_safetensors(ref, repo, pre, shards)
    if first.endswith(".safetensors"):
        return _open_safetensors(ref, repo, pre, names)
    if first.endswith(".gguf"):
        from lineage.io.gguf import open_gguf_sources, split_siblings

        parts = split_siblings(first) or [first]
        missing = [n for n in parts if pre + n not in repo.files]
        if missing:
            raise ShardError(f"GGUF split set is missing {len(missing)} file(s) in the repository, "
                             f"e.g. {missing[0]!r}", path=ref)
        ck = _open_sources(ref, repo, [pre + n for n in parts], open_gguf_sources)
        return _upgrade(ck, metadata={**ck.metadata, **_hub_meta(repo)}, provenance=repo.provenance())
    if first.endswith((".bin", ".pt", ".pth")):
        return _open_torch(ref, repo, pre, names)
    raise CheckpointError(f"don't know how to read {first!r}", path=ref)


def _shards(ref: str, repo: HubRepo, index_name: str) -> list[str]:
    shards = sorted(set(read_shard_index(Path(repo.fetch(index_name))).values()))
    folder = index_name.rsplit("/", 1)[0] + "/" if "/" in index_name else ""
    missing = [s for s in shards if folder + s not in repo.files or ".." in s.split("/")]
    if missing:
        raise ShardError(
            f"shard index names {len(missing)} shard(s) missing from the repository at "
            f"{repo.commit[:12]}, e.g. {missing[0]!r}",
            path=ref,
        )
    return shards


def _open_sources(ref: str, repo: HubRepo, paths: list[str],
                  opener: Callable[[str, list[ByteSource]], Checkpoint]) -> Checkpoint:
    """``opener(ref, sources)`` over a byte source per repository path; sources opened so far are
    closed when opening or parsing fails."""
    sources: list[ByteSource] = []
    try:
        for path in paths:
            sources.append(repo.source(path))
        return opener(ref, sources)
    except Exception:
        for src in sources:
            src.close()
        raise


def _hub_meta(repo: HubRepo) -> dict[str, Any]:
    return {"hub.repo_id": repo.ref.repo_id, "hub.revision": repo.ref.revision or "main",
            "hub.commit": repo.commit}


def _with_provenance(ck: Checkpoint, repo: HubRepo) -> Checkpoint:
    ck.provenance = repo.provenance()
    return ck


def _open_safetensors(ref: str, repo: HubRepo, pre: str, names: list[str]) -> Checkpoint:
    ck = _open_sources(ref, repo, [pre + n for n in names], open_safetensors_sources)
    index = pre + "model.safetensors.index.json"
    if index in repo.files and len(names) > 1:
        wm = read_shard_index(Path(repo.fetch(index)))
        absent = [t for t in wm if t not in ck.tensors]
        if absent:
            raise ShardError(f"{len(absent)} tensor(s) listed in the index are absent from the "
                             f"shards, e.g. {absent[0]!r}", path=ref)
    return _finish(ref, repo, pre, ck)


def _finish(ref: str, repo: HubRepo, pre: str, ck: Checkpoint) -> HubCheckpoint:
    from lineage.io.checkpoint import load_config

    cfg_path = repo.fetch_optional(pre + "config.json")
    config = load_config(Path(cfg_path).parent) if cfg_path else None

    def fetch_tokenizer() -> str | None:
        got = None
        for f in TOKENIZER_FILES:
            if pre + f in repo.files:
                local = repo.fetch(pre + f)
                got = got or str(Path(local).parent)
        return got

    return _upgrade(ck, config=config, metadata={**ck.metadata, **_hub_meta(repo)},
                    fetch_tokenizer=fetch_tokenizer, provenance=repo.provenance())


def _open_torch(ref: str, repo: HubRepo, pre: str, names: list[str]) -> Checkpoint:
    from lineage.io.torchbin import open_torch_files

    cached = all(repo.cached(pre + n) for n in names)
    if not (cached or repo.options.download):
        total = sum(repo.files.get(pre + n) or 0 for n in names)
        raise RemoteError(
            f"the repository has only PyTorch .bin weights ({total / 1e9:.2f} GB), which cannot be "
            "read by ranges; pass --download (LINEAGE_HUB_DOWNLOAD=1) to download them",
            path=ref,
        )
    paths = [Path(repo.fetch(pre + n)) for n in names]
    ck = open_torch_files(ref, paths)
    return _finish(ref, repo, pre, ck)


def _open_adapter(ref: str, repo: HubRepo, pre: str) -> Checkpoint:
    from lineage.io.adapter import open_adapter_folder

    cfg = repo.fetch(pre + "adapter_config.json")
    for cand in ("adapter_model.safetensors", "adapter_model.bin"):
        if pre + cand in repo.files:
            repo.fetch(pre + cand)
            break
    else:
        raise CheckpointError("adapter_config.json without adapter_model.safetensors", path=ref)
    for f in TOKENIZER_FILES:
        repo.fetch_optional(pre + f)
    return _with_provenance(open_adapter_folder(str(Path(cfg).parent), ref=ref), repo)


