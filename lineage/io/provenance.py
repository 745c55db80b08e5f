"""Where a checkpoint's bytes came from, and whether they were checked: typed records for reports.

:class:`HubProvenance` names a Hub reference by what others can look up again (repo id,
the revision asked for, the commit it resolved to, the files read), not by a local
snapshot path.  :class:`FileIntegrity` says, for one weight file, whether the bytes that
were analysed were checked against the hash the Hub publishes for it (the LFS SHA-256):

- ``verified``: every byte of the file was read and its SHA-256 matches;
- ``partial``: only part of the file was read (e.g. a fingerprint), so it could not be checked;
- ``no-hash``: the whole file was read but the Hub publishes no SHA-256 for it;
- ``local``: a local file with no published hash to compare with (nothing to verify against).

A mismatch is never recorded: it stops the run with a :class:`~lineage.errors.RemoteError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

IntegrityStatus = Literal["verified", "partial", "no-hash", "local"]


@dataclass(frozen=True)
class FileIntegrity:
    """Whether the bytes of one file were verified against a published hash."""

    file: str
    size: int
    status: IntegrityStatus
    #: The SHA-256 the Hub publishes for the file (hex), if any.
    expected_sha256: str | None = None
    #: Bytes that went through the hash (== ``size`` when verified).
    bytes_hashed: int = 0
    #: BLAKE3 hex digest of the whole file when it was hashed during the comparison's read pass
    #: (:mod:`lineage.io.hashing`); the same digest :func:`lineage.provenance.hash_file` gives.
    blake3: str | None = None

    @property
    def verified(self) -> bool:
        """True when every byte was read and matched the published hash."""
        return self.status == "verified"


@dataclass(frozen=True)
class HubProvenance:
    """A Hub model by name: enough for someone else to fetch the same bytes."""

    repo_id: str
    #: The revision asked for (a branch, tag or commit; ``main`` by default).
    revision: str
    #: The commit sha the revision resolved to; every file was read at this commit.
    commit: str
    #: The repository files the checkpoint was read from (paths inside the repo).
    files: tuple[str, ...]
    endpoint: str = "https://huggingface.co"
    #: True when read from a cached snapshot without contacting the Hub (offline).
    from_cache: bool = False
