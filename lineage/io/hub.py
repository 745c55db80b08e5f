"""Hugging Face Hub references: ``org/name[@revision]`` and ``hf://org/name[@revision][/path]``.

Opening a Hub reference reads only what the analysis needs:

1. ``HfApi.model_info`` (endpoint from ``HF_ENDPOINT``, token from ``--token``, ``HF_TOKEN`` or
   ``hf auth login``) gives the commit hash, every file's size and the SHA-256 of each LFS file;
   all later requests are pinned to that commit.  Transient failures are retried, an
   unreachable endpoint fails at once (:mod:`lineage.io.hubapi`).
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

Every byte read is hashed on the way (:mod:`lineage.io.verify`): a file read in full is
checked against its published SHA-256, a mismatch stops the run; :meth:`Checkpoint.file_integrity`
says which files were verified.  All remote files of a model share one network deadline
(:mod:`lineage.io.transfer`, ``LINEAGE_HUB_DEADLINE``).  The checkpoint's
:attr:`~Checkpoint.provenance` names the repo, the revision, the resolved commit and the files.

References: ``hf://org/name[@rev][/path]``, ``org/name[@rev]`` and one-word ids (``gpt2``)
unless a local file or folder of that name exists.  With ``HF_HUB_OFFLINE=1``, or when the
endpoint cannot be reached, a cached snapshot of the same revision is used.
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

from lineage.errors import RemoteError
from lineage.io.checkpoint import Checkpoint
from lineage.io.http import HttpOptions, HttpRangeSource
from lineage.io.hubapi import HubUnreachable, call_with_retries
from lineage.io.provenance import HubProvenance
from lineage.io.sources import ByteSource, LocalFileSource
from lineage.io.spill import SpilledSource, spill_enabled
from lineage.io.transfer import DeadlineOptions, ProgressCallback, Transfer, model_deadline
from lineage.io.verify import VerifiedSource

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://huggingface.co"
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "tokenizer_config.json")
_REPO = r"[A-Za-z0-9][\w.-]*/[\w.-]+"
_ONE_WORD = r"[A-Za-z0-9][\w.-]*"  # legacy ids without an owner: gpt2, bert-base-uncased
_PLAIN_REF = re.compile(rf"({_REPO}|{_ONE_WORD})(?:@([^\s@]+))?")
_HF_REF = re.compile(rf"hf://({_REPO}|{_ONE_WORD})(?:@([^\s/@]+))?(?:/(.*))?")
_WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth", ".lfp", ".json")


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
    """``hf://id[@rev][/path]`` always; ``org/name[@rev]`` or a one-word id (``gpt2``) unless it exists locally."""
    m = _HF_REF.fullmatch(ref)
    if m and ".." not in m.group(1):
        return HubRef(m.group(1), m.group(2), (m.group(3) or "").strip("/"))
    if ref.startswith(("/", ".", "~")) or os.path.exists(ref) or os.path.exists(ref.split("@", 1)[0]):
        return None
    m = _PLAIN_REF.fullmatch(ref)
    if m and ".." not in m.group(1) and not m.group(1).lower().endswith(_WEIGHT_SUFFIXES):
        return HubRef(m.group(1), m.group(2))
    return None


def with_revision(ref: str, revision: str | None) -> str:
    """``ref`` pinned to ``revision`` (the CLI's ``--revision``) when it is a Hub reference without its own."""
    hub = parse_hub_ref(ref) if revision else None
    if hub is None or hub.revision:
        return ref
    return str(HubRef(hub.repo_id, revision, hub.path))


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
    #: Network-time deadline per model (``None``: no limit); see :mod:`lineage.io.transfer`.
    deadline: DeadlineOptions | None = field(default_factory=DeadlineOptions)
    #: Called with the bytes fetched and the rate, a few times a second while a model is read.
    progress: ProgressCallback | None = None

    @classmethod
    def from_env(cls, **overrides: Any) -> HubOptions:
        """Options from ``HF_ENDPOINT``, ``HF_TOKEN`` (or the token ``hf auth login`` saved),
        ``HF_HUB_CACHE``/``HF_HOME``, ``HF_HUB_OFFLINE``, ``LINEAGE_HUB_DOWNLOAD``, ``LINEAGE_HUB_DEADLINE``."""
        env: dict[str, Any] = dict(
            endpoint=(os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/"),
            token=_token(),
            cache_dir=_default_cache(),
            download=_truthy(os.environ.get("LINEAGE_HUB_DOWNLOAD")),
            offline=_truthy(os.environ.get("HF_HUB_OFFLINE")),
            deadline=DeadlineOptions.from_env(),
            progress=_default_progress,
        )
        env.update(overrides)
        return cls(**env)


_default_progress: ProgressCallback | None = None


def set_transfer_progress(callback: ProgressCallback | None) -> None:
    """Report the bytes and rate of every Hub model opened from now on to ``callback`` (``None``: stop).

    For front ends (the CLI's progress display): models opened by reference, e.g. through
    :func:`lineage.io.open_checkpoint`, take their options from :meth:`HubOptions.from_env`.
    """
    global _default_progress
    _default_progress = callback


def _token() -> str | None:
    if os.environ.get("HF_TOKEN"):
        return os.environ["HF_TOKEN"]
    try:
        from huggingface_hub import get_token

        return get_token()
    except Exception:  # noqa: BLE001 - an unreadable token file means no token
        return None


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


class HubRepo:
    """One repository at one resolved commit: file sizes, cache look-ups, byte sources."""

    def __init__(self, ref: HubRef, options: HubOptions) -> None:
        from huggingface_hub import HfApi

        self.ref = ref
        self.options = options
        self.api = HfApi(endpoint=options.endpoint, token=options.token)
        info = call_with_retries(
            lambda: self.api.model_info(ref.repo_id, revision=ref.revision, files_metadata=True,
                                        timeout=options.http.stall_timeout),
            what=str(ref), endpoint=options.endpoint, http=options.http, to_error=_remote_error,
        )
        self.commit: str = info.sha or (ref.revision or "main")
        siblings = info.siblings or []
        self.files: dict[str, int | None] = {s.rfilename: s.size for s in siblings}
        #: SHA-256 of each LFS file, as the Hub publishes it.
        self.sha256: dict[str, str] = {s.rfilename: s.lfs.sha256 for s in siblings
                                       if s.lfs is not None and s.lfs.sha256}
        self.card_data = getattr(info, "card_data", None)
        self.transfer = Transfer(str(ref), deadline=model_deadline(options.deadline, 0), total_bytes=0,
                                 progress=options.progress)
        self.opened: dict[str, None] = {}  # repository files the checkpoint reads, in order
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
        self.opened[filename] = None
        hit = self.cached(filename)
        if hit:
            return hit
        from huggingface_hub import hf_hub_download

        path = call_with_retries(
            lambda: hf_hub_download(
                self.ref.repo_id, filename, revision=self.commit, cache_dir=self.options.cache_dir,
                endpoint=self.options.endpoint, token=self.options.token,
                etag_timeout=self.options.http.stall_timeout,
            ),
            what=f"hf://{self.ref.repo_id}/{filename}", endpoint=self.options.endpoint, http=self.options.http,
            to_error=_remote_error,
        )
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
        """Cached file, downloaded file (download mode) or HTTP range source, its bytes hashed as read."""
        self.opened[filename] = None
        label = f"hf://{self.ref.repo_id}/{filename}"
        hit = self.cached(filename)
        if hit:
            log.info("%s: using cached %s", self.ref, hit)
            return VerifiedSource(LocalFileSource(hit), self.sha256.get(filename), label=label)
        if self.options.download:
            return VerifiedSource(LocalFileSource(self.fetch(filename)), self.sha256.get(filename), label=label)
        planned = (self.transfer.total_bytes or 0) + (self.files.get(filename) or 0)
        self.transfer.total_bytes = planned
        self.transfer.deadline = model_deadline(self.options.deadline, planned)
        remote = HttpRangeSource(
            self.url(filename), size=self.files.get(filename), token=self.options.token,
            options=self.options.http, transfer=self.transfer, name=label,
        )
        # later passes of a comparison re-read spans: keep what was fetched on local disk
        inner: ByteSource = SpilledSource(remote) if spill_enabled() else remote
        return VerifiedSource(inner, self.sha256.get(filename), label=label)

    def provenance(self) -> HubProvenance:
        """The repo, revision, resolved commit and the files opened so far."""
        return HubProvenance(self.ref.repo_id, self.ref.revision or "main", self.commit, tuple(self.opened),
                             self.options.endpoint)

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

def open_hub(ref: str, options: HubOptions | None = None) -> Checkpoint | None:
    """Opener for Hub references (``None`` when ``ref`` is not one)."""
    hub_ref = parse_hub_ref(ref)
    if hub_ref is None:
        return None
    opts = options or HubOptions.from_env()
    if opts.offline:
        return _open_cached(ref, hub_ref, opts, "offline mode (HF_HUB_OFFLINE)", warn=False)
    try:
        repo = HubRepo(hub_ref, opts)
    except HubUnreachable as e:
        if cached_snapshot(hub_ref, opts) is not None:
            return _open_cached(ref, hub_ref, opts, e.args[0], warn=True)
        raise RemoteError(f"{e.args[0].split(': ', 1)[-1]}; no cached snapshot of this revision either "
                          f"(and no local file or folder of that name)", path=ref) from e
    from lineage.io.hubfiles import open_repo

    return open_repo(ref, repo)


_warned: set[str] = set()


def _open_cached(ref: str, hub_ref: HubRef, opts: HubOptions, why: str, *, warn: bool) -> Checkpoint:
    """A cached snapshot: said once per process (a warning when the Hub failed, info when offline by choice)."""
    from lineage.io.checkpoint import open_checkpoint

    snap = cached_snapshot(hub_ref, opts)
    if snap is None:
        raise RemoteError(f"{why}, and no cached snapshot of this revision in {opts.cache_dir}",
                          path=ref)
    key = opts.endpoint if warn else "offline"
    if key not in _warned:
        _warned.add(key)
        (log.warning if warn else log.info)("%s; using cached snapshots", why)
    log.info("%s: cached snapshot %s", ref, snap)
    ck = open_checkpoint(os.path.join(snap, hub_ref.path) if hub_ref.path else snap)
    files = tuple(os.path.relpath(s.name, snap) for s in ck.sources)
    ck.provenance = HubProvenance(hub_ref.repo_id, hub_ref.revision or "main", Path(snap).name, files,
                                  opts.endpoint, from_cache=True)
    return ck


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

def fetch_file(ref: str, filename: str, options: HubOptions | None = None) -> str | None:
    """A local copy of a small file of a Hub repo (e.g. ``README.md``), or None if absent."""
    hub_ref = parse_hub_ref(ref)
    if hub_ref is None:
        return None
    opts = options or HubOptions.from_env()
    repo = HubRepo(hub_ref, opts)
    pre = f"{hub_ref.path}/" if hub_ref.path and hub_ref.path not in repo.files else ""
    return repo.fetch_optional(pre + filename)

