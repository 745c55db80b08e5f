"""Hugging Face Hub references: ``org/name[@revision]`` and ``hf://org/name[@revision][/path]``.

Opening a Hub reference reads only what the analysis needs:

1. ``HfApi.model_info`` (endpoint from ``HF_ENDPOINT``, token from ``HF_TOKEN``) gives the
   commit hash and every file's size; all later requests are pinned to that commit.
2. Weight files already in the standard HF cache (``HF_HUB_CACHE`` / ``HF_HOME``) are read
   locally.  Otherwise safetensors and GGUF files are read by HTTP range requests from
   ``{endpoint}/{repo}/resolve/{commit}/{file}`` (:class:`~lineage.io.http.HttpRangeSource`):
   the header first, then exactly the byte span of each row block asked for.
3. Small files (``config.json``, the shard index, adapter files, tokenizer files — the
   tokenizer only when :meth:`Checkpoint.vocab` is first called) are fetched into the cache
   with ``hf_hub_download``.
4. With ``download=True`` (the CLI's ``--download``, or ``LINEAGE_HUB_DOWNLOAD=1``) weight
   files are downloaded into the cache with ``hf_hub_download`` and read locally.  PyTorch
   ``.bin`` weights can only be read this way.

If the endpoint cannot be reached, a cached snapshot of the same revision is used.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import quote

from lineage.errors import CheckpointError, RemoteError, ShardError
from lineage.io.checkpoint import Checkpoint, open_safetensors_sources
from lineage.io.http import HttpOptions, HttpRangeSource
from lineage.io.spill import SpilledSource, spill_enabled
from lineage.io.sources import ByteSource, LocalFileSource

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://huggingface.co"
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "tokenizer_config.json")
_REPO = r"[A-Za-z0-9][\w.-]*/[\w.-]+"
_PLAIN_REF = re.compile(rf"({_REPO})(?:@([^\s@]+))?")
_HF_REF = re.compile(rf"hf://({_REPO})(?:@([^\s/@]+))?(?:/(.*))?")


@dataclass(frozen=True)
class HubRef:
    """A parsed Hub reference."""

    repo_id: str
    revision: str | None = None
    path: str = ""  # a file or folder inside the repo ("" = the root)

    def __str__(self) -> str:
        rev = f"@{self.revision}" if self.revision else ""
        return f"hf://{self.repo_id}{rev}{'/' + self.path if self.path else ''}"


def parse_hub_ref(ref: str) -> HubRef | None:
    """``hf://org/name[@rev][/path]`` always; ``org/name[@rev]`` unless it exists locally."""
    m = _HF_REF.fullmatch(ref)
    if m:
        return HubRef(m.group(1), m.group(2), (m.group(3) or "").strip("/"))
    if ref.startswith(("/", ".", "~")) or os.path.exists(ref):
        return None
    m = _PLAIN_REF.fullmatch(ref)
    if m and not m.group(1).endswith((".safetensors", ".gguf", ".bin", ".pt", ".pth")):
        return HubRef(m.group(1), m.group(2))
    return None


def _default_cache() -> str:
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface"
    )
    return os.path.join(os.path.expanduser(home), "hub")


@dataclass(frozen=True)
class HubOptions:
    """Where the Hub is, who we are, and whether weights may be downloaded whole."""

    endpoint: str = DEFAULT_ENDPOINT
    token: str | None = None
    cache_dir: str = field(default_factory=_default_cache)
    download: bool = False
    #: Never contact the endpoint; use cached snapshots only (``HF_HUB_OFFLINE=1``).
    offline: bool = False
    http: HttpOptions = field(default_factory=HttpOptions)

    @classmethod
    def from_env(cls, **overrides: Any) -> HubOptions:
        """Options from ``HF_ENDPOINT``, ``HF_TOKEN``, ``HF_HUB_CACHE``/``HF_HOME``, ``LINEAGE_HUB_DOWNLOAD``."""
        env = dict(
            endpoint=(os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/"),
            token=os.environ.get("HF_TOKEN") or None,
            cache_dir=_default_cache(),
            download=_truthy(os.environ.get("LINEAGE_HUB_DOWNLOAD")),
            offline=_truthy(os.environ.get("HF_HUB_OFFLINE")),
        )
        env.update(overrides)
        return cls(**env)


def _truthy(v: str | None) -> bool:
    return (v or "").strip().lower() in ("1", "true", "yes", "on")


def _remote_error(e: Exception, what: str) -> RemoteError:
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(e, GatedRepoError):
        msg = "gated repository: accept its terms on the Hub and set HF_TOKEN to a token with access"
    elif isinstance(e, RepositoryNotFoundError):
        msg = ("repository not found on the Hub (or private: set HF_TOKEN); "
               "there is no local file or folder of that name either")
    elif isinstance(e, RevisionNotFoundError):
        msg = "revision not found"
    elif isinstance(e, EntryNotFoundError):
        msg = "file not found in the repository"
    elif isinstance(e, HfHubHTTPError):
        status = getattr(getattr(e, "response", None), "status_code", "?")
        msg = f"Hub request failed (HTTP {status})"
    else:
        msg = f"cannot reach the Hub ({type(e).__name__}: {e})"
    return RemoteError(msg, path=what)


def _is_connection_error(e: BaseException) -> bool:
    """True for network failures (refused, reset, DNS, timeouts), not for HTTP answers."""
    from huggingface_hub.errors import HfHubHTTPError

    seen = 0
    while e is not None and seen < 8:
        if isinstance(e, HfHubHTTPError):
            return False
        names = {c.__name__ for c in type(e).__mro__}
        if names & {"TransportError", "ConnectError", "TimeoutException", "NetworkError",
                    "ConnectionError", "TimeoutError", "OfflineModeIsEnabled"}:
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


class HubRepo:
    """One repository at one resolved commit: file sizes, cache look-ups, byte sources."""

    def __init__(self, ref: HubRef, options: HubOptions) -> None:
        from huggingface_hub import HfApi

        self.ref = ref
        self.options = options
        self.api = HfApi(endpoint=options.endpoint, token=options.token)
        info = self.api.model_info(
            ref.repo_id, revision=ref.revision, files_metadata=True,
            timeout=options.http.stall_timeout,
        )
        self.commit: str = info.sha or (ref.revision or "main")
        self.files: dict[str, int | None] = {s.rfilename: s.size for s in (info.siblings or [])}
        self.card_data = getattr(info, "card_data", None)
        log.info("hf://%s resolved to commit %s (%d files)", ref.repo_id, self.commit, len(self.files))

    # -- files ---------------------------------------------------------------------
    def url(self, filename: str) -> str:
        return f"{self.options.endpoint}/{self.ref.repo_id}/resolve/{self.commit}/{quote(filename)}"

    def cached(self, filename: str) -> str | None:
        from huggingface_hub import try_to_load_from_cache

        p = try_to_load_from_cache(self.ref.repo_id, filename, cache_dir=self.options.cache_dir,
                                   revision=self.commit)
        return p if isinstance(p, str) and os.path.isfile(p) else None

    def fetch(self, filename: str) -> str:
        """A local path for ``filename``: from the cache, else downloaded into it."""
        hit = self.cached(filename)
        if hit:
            return hit
        from huggingface_hub import hf_hub_download

        try:
            path = hf_hub_download(
                self.ref.repo_id, filename, revision=self.commit, cache_dir=self.options.cache_dir,
                endpoint=self.options.endpoint, token=self.options.token,
                etag_timeout=self.options.http.stall_timeout,
            )
        except Exception as e:
            raise _remote_error(e, f"hf://{self.ref.repo_id}/{filename}") from e
        self._remember_revision()
        return path

    def _remember_revision(self) -> None:
        """Record ``refs/<revision>`` → commit in the cache (as huggingface_hub does), for offline use."""
        rev = self.ref.revision or "main"
        if rev == self.commit:
            return
        ref_file = Path(self.options.cache_dir, "models--" + self.ref.repo_id.replace("/", "--"),
                        "refs", rev)
        try:
            if not ref_file.is_file() or ref_file.read_text().strip() != self.commit:
                ref_file.parent.mkdir(parents=True, exist_ok=True)
                ref_file.write_text(self.commit)
        except OSError as e:
            log.debug("cannot record %s in the cache: %s", ref_file, e)

    def fetch_optional(self, filename: str) -> str | None:
        return self.fetch(filename) if filename in self.files else None

    def source(self, filename: str) -> ByteSource:
        """Cached file, downloaded file (download mode) or HTTP range source."""
        hit = self.cached(filename)
        if hit:
            log.info("%s: using cached %s", self.ref, hit)
            return LocalFileSource(hit)
        if self.options.download:
            return LocalFileSource(self.fetch(filename))
        remote = HttpRangeSource(
            self.url(filename), size=self.files.get(filename), token=self.options.token,
            options=self.options.http,
        )
        # later passes of a comparison re-read spans: keep what was fetched on local disk
        return SpilledSource(remote) if spill_enabled() else remote

    def list(self, folder: str) -> list[str]:
        pre = f"{folder}/" if folder else ""
        return sorted(f[len(pre):] for f in self.files if f.startswith(pre) and "/" not in f[len(pre):])


@dataclass
class HubCheckpoint(Checkpoint):
    """A checkpoint whose tokenizer files are fetched on first use of :meth:`vocab`."""

    fetch_tokenizer: Callable[[], str | None] | None = field(default=None, repr=False)

    def vocab(self) -> list[str] | None:
        if not self._vocab_loaded and self.tokenizer_dir is None and self.fetch_tokenizer is not None:
            self.tokenizer_dir = self.fetch_tokenizer()
        return super().vocab()


def _upgrade(ckpt: Checkpoint, **extra: Any) -> HubCheckpoint:
    kw = {f.name: getattr(ckpt, f.name) for f in fields(Checkpoint)}
    kw.update(extra)
    return HubCheckpoint(**kw)


def _pick_safetensors(names: list[str]) -> list[str]:
    st = [n for n in names if n.endswith(".safetensors") and not n.startswith("adapter_model")]
    if "model.safetensors" in st:
        return ["model.safetensors"]
    sharded = [n for n in st if re.fullmatch(r"model-\d+-of-\d+\.safetensors", n)]
    if sharded:
        return sharded
    if len(st) > 1:
        rest = [n for n in st if not n.startswith("consolidated")]
        return rest or st
    return st


def open_hub(ref: str, options: HubOptions | None = None) -> Checkpoint | None:
    """Opener for Hub references (``None`` when ``ref`` is not one)."""
    hub_ref = parse_hub_ref(ref)
    if hub_ref is None:
        return None
    opts = options or HubOptions.from_env()
    if opts.offline:
        return _open_cached(ref, hub_ref, opts, "offline mode (HF_HUB_OFFLINE)")
    try:
        repo = HubRepo(hub_ref, opts)
    except Exception as e:
        if _is_connection_error(e) and cached_snapshot(hub_ref, opts) is not None:
            return _open_cached(ref, hub_ref, opts, f"Hub unreachable ({e})")
        raise _remote_error(e, str(hub_ref)) from e
    return open_repo(ref, repo)


def _open_cached(ref: str, hub_ref: HubRef, opts: HubOptions, why: str) -> Checkpoint:
    from lineage.io.checkpoint import open_checkpoint

    snap = cached_snapshot(hub_ref, opts)
    if snap is None:
        raise RemoteError(f"{why}, and no cached snapshot of this revision in {opts.cache_dir}",
                          path=ref)
    log.warning("%s: %s; using cached snapshot %s", ref, why, snap)
    return open_checkpoint(os.path.join(snap, hub_ref.path) if hub_ref.path else snap)


def cached_snapshot(hub_ref: HubRef, opts: HubOptions) -> str | None:
    """The cached snapshot folder for the ref's revision (``main`` by default), if any."""
    base = Path(opts.cache_dir) / ("models--" + hub_ref.repo_id.replace("/", "--"))
    rev = hub_ref.revision or "main"
    commit = rev
    ref_file = base / "refs" / rev
    if ref_file.is_file():
        commit = ref_file.read_text().strip()
    snap = base / "snapshots" / commit
    return str(snap) if snap.is_dir() else None


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
        return _open_files(ref, repo, path, ["model.safetensors.index.json"])
    st = _pick_safetensors(names)
    if st:
        return _open_files(ref, repo, path, st)
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
        srcs: list[ByteSource] = []
        try:
            for n in parts:
                srcs.append(repo.source(pre + n))
            ck = open_gguf_sources(ref, srcs)
        except Exception:
            for s in srcs:
                s.close()
            raise
        return _upgrade(ck, metadata={**ck.metadata, **_hub_meta(repo)})
    if first.endswith((".bin", ".pt", ".pth")):
        return _open_torch(ref, repo, pre, names)
    raise CheckpointError(f"don't know how to read {first!r}", path=ref)


def _shards(ref: str, repo: HubRepo, index_name: str) -> list[str]:
    import json

    local = repo.fetch(index_name)
    try:
        wm = json.loads(Path(local).read_text(encoding="utf-8"))["weight_map"]
        values = list(wm.values())
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ShardError(f"shard index {index_name} has no valid 'weight_map' ({e})", path=ref) from e
    if not all(isinstance(v, str) for v in values):
        raise ShardError(f"shard index {index_name}: 'weight_map' values must be file names", path=ref)
    shards = sorted(set(values))
    folder = index_name.rsplit("/", 1)[0] + "/" if "/" in index_name else ""
    missing = [s for s in shards if folder + s not in repo.files or ".." in s.split("/")]
    if missing:
        raise ShardError(
            f"shard index names {len(missing)} shard(s) missing from the repository at "
            f"{repo.commit[:12]}, e.g. {missing[0]!r}",
            path=ref,
        )
    return shards


def _hub_meta(repo: HubRepo) -> dict[str, Any]:
    return {"hub.repo_id": repo.ref.repo_id, "hub.revision": repo.ref.revision or "main",
            "hub.commit": repo.commit}


def _open_safetensors(ref: str, repo: HubRepo, pre: str, names: list[str]) -> Checkpoint:
    sources: list[ByteSource] = []
    try:
        for n in names:
            sources.append(repo.source(pre + n))
        ck = open_safetensors_sources(ref, sources)
    except Exception:
        for s in sources:
            s.close()
        raise
    index = pre + "model.safetensors.index.json"
    if index in repo.files and len(names) > 1:
        import json

        wm = json.loads(Path(repo.fetch(index)).read_text(encoding="utf-8"))["weight_map"]
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
                    fetch_tokenizer=fetch_tokenizer)


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
    return open_adapter_folder(str(Path(cfg).parent), ref=ref)


def fetch_file(ref: str, filename: str, options: HubOptions | None = None) -> str | None:
    """A local copy of a small file of a Hub repo (e.g. ``README.md``), or None if absent."""
    hub_ref = parse_hub_ref(ref)
    if hub_ref is None:
        return None
    opts = options or HubOptions.from_env()
    try:
        repo = HubRepo(hub_ref, opts)
    except Exception as e:
        raise _remote_error(e, str(hub_ref)) from e
    pre = f"{hub_ref.path}/" if hub_ref.path and hub_ref.path not in repo.files else ""
    return repo.fetch_optional(pre + filename)

