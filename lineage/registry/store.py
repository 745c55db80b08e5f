"""The registry database: one SQLite file (WAL) of fingerprints, references, claims and cached pair tests.

Rows are content-keyed, and each model is written in one transaction, so concurrent writers
and a killed run lose nothing and duplicate nothing:

* ``blobs(hash, data)`` — fingerprint files (``.lfp`` bytes) by their SHA-256;
* ``models(ref_key, …)`` — one row per model *reference* (Hub repo at a commit, or the content
  signature of local files: never an absolute path), pointing at its fingerprint blob, with its
  retrieval key, claims and a ``row_hash`` over all of it;
* ``pairs(a, b, version, log10_p)`` — fingerprint-test results by the two blob hashes.

Everything read back is verified: a blob must hash to its name and parse as a fingerprint,
a row must hash to its ``row_hash``; a failure raises :class:`CacheEntryError` (the caller
recomputes the entry and says so).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lineage.errors import LineageError
from lineage.registry.keys import KEY_DIM, KEY_VERSION

log = logging.getLogger(__name__)

#: Version of the fingerprint test whose results the pair cache holds (bump when the test changes).
TEST_VERSION = "fp2"
SCHEMA_VERSION = "1"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS blobs(hash TEXT PRIMARY KEY, data BLOB NOT NULL, size INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS models(
    id INTEGER PRIMARY KEY, ref_key TEXT UNIQUE NOT NULL, ref TEXT NOT NULL, label TEXT NOT NULL,
    origin TEXT NOT NULL, repo_id TEXT, revision_sha TEXT, files TEXT NOT NULL, fp_hash TEXT NOT NULL,
    key BLOB NOT NULL, key_version INTEGER NOT NULL, claims TEXT NOT NULL, info TEXT NOT NULL,
    row_hash TEXT NOT NULL, rev INTEGER NOT NULL, added REAL NOT NULL);
CREATE INDEX IF NOT EXISTS models_repo ON models(repo_id);
CREATE INDEX IF NOT EXISTS models_rev ON models(rev);
CREATE TABLE IF NOT EXISTS pairs(a TEXT NOT NULL, b TEXT NOT NULL, version TEXT NOT NULL, log10_p REAL NOT NULL,
    PRIMARY KEY(a, b, version));
"""


class CacheEntryError(LineageError):
    """A stored entry failed verification (truncated, altered, swapped or missing)."""


def default_db_path() -> Path:
    """``registry.sqlite`` in lineage's cache (:func:`lineage.io.cachedir.cache_root`: ``$LINEAGE_CACHE``,
    else ``$XDG_CACHE_HOME/lineage``, else ``~/.cache/lineage``): the one place that decides it."""
    from lineage.io.cachedir import cache_path

    return cache_path("registry.sqlite")


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class ModelRecord:
    """One registered model (a verified ``models`` row)."""

    id: int
    ref_key: str
    ref: str
    label: str
    origin: str
    repo_id: str | None
    revision_sha: str | None
    files: tuple[tuple[str, int, str], ...]
    fp_hash: str
    key: np.ndarray
    claims: tuple[tuple[str, str], ...]       # (claimed base, where it was read)
    info: str                                 # JSON: format, family, layers, hidden, bytes …

    def info_dict(self) -> dict[str, object]:
        return dict(json.loads(self.info))


@dataclass(frozen=True)
class NewModel:
    """A model to store (see :meth:`Registry.put_models`)."""

    ref_key: str
    ref: str
    label: str
    origin: str
    repo_id: str | None
    revision_sha: str | None
    files: tuple[tuple[str, int, str], ...]
    blob: bytes
    key: np.ndarray
    claims: tuple[tuple[str, str], ...]
    info: dict[str, object]


def _row_hash(ref_key: str, fp_hash: str, key: bytes, claims: str, info: str, files: str) -> str:
    h = hashlib.sha256()
    for part in (ref_key.encode(), fp_hash.encode(), key, claims.encode(), info.encode(), files.encode()):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()


class Registry:
    """A registry database (thread-safe: one connection per thread)."""

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path) if path is not None else default_db_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        try:
            self._conn().executescript(_SCHEMA)
        except sqlite3.DatabaseError as e:
            raise CacheEntryError(f"not a registry database ({e})", path=str(self.path)) from e
        with self._tx() as c:
            c.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))

    # -- connections ----------------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        c = getattr(self._local, "conn", None)
        if c is None:
            try:
                c = sqlite3.connect(self.path, timeout=120.0, isolation_level=None, check_same_thread=False)
                c.execute("PRAGMA journal_mode=WAL")
                c.execute("PRAGMA synchronous=NORMAL")
            except sqlite3.DatabaseError as e:
                raise CacheEntryError(f"not a registry database ({e})", path=str(self.path)) from e
            self._local.conn = c
        return c

    def _tx(self) -> _Tx:
        return _Tx(self._conn())

    def close(self) -> None:
        c = getattr(self._local, "conn", None)
        if c is not None:
            c.close()
            self._local.conn = None

    # -- writing ----------------------------------------------------------------------
    def put_model(self, *, ref_key: str, ref: str, label: str, origin: str, repo_id: str | None,
                  revision_sha: str | None, files: Sequence[tuple[str, int, str]], blob: bytes, key: np.ndarray,
                  claims: Sequence[tuple[str, str]], info: dict[str, object]) -> int:
        """Store one model and its fingerprint in one transaction (upsert by ``ref_key``); returns its id."""
        return self.put_models([NewModel(ref_key, ref, label, origin, repo_id, revision_sha, tuple(files), blob,
                                         key, tuple(claims), info)])[0]

    def put_models(self, models: Sequence[NewModel]) -> list[int]:
        """Store several models in one transaction (bulk registration); returns their ids."""
        ids = []
        with self._tx() as c:
            rev = int(c.execute("SELECT COALESCE(MAX(rev), 0) FROM models").fetchone()[0])
            for m in models:
                rev += 1
                ids.append(self._put(c, m, rev))
        return ids

    def _put(self, c: sqlite3.Connection, m: NewModel, rev: int) -> int:
        fp_hash = content_hash(m.blob)
        kb = np.asarray(m.key, dtype=np.float32).tobytes()
        files_j = json.dumps([list(f) for f in m.files])
        claims_j = json.dumps([list(x) for x in m.claims])
        info_j = json.dumps(m.info, sort_keys=True, default=str)
        rh = _row_hash(m.ref_key, fp_hash, kb, claims_j, info_j, files_j)
        old = c.execute("SELECT fp_hash FROM models WHERE ref_key = ?", (m.ref_key,)).fetchone()
        c.execute("INSERT OR IGNORE INTO blobs VALUES (?, ?, ?)", (fp_hash, m.blob, len(m.blob)))
        c.execute("UPDATE blobs SET data = ?, size = ? WHERE hash = ? AND (size != ? OR data != ?)",
                  (m.blob, len(m.blob), fp_hash, len(m.blob), m.blob))
        c.execute(
            "INSERT INTO models(ref_key, ref, label, origin, repo_id, revision_sha, files, fp_hash, key, key_version,"
            " claims, info, row_hash, rev, added) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
            " ON CONFLICT(ref_key) DO UPDATE SET ref=excluded.ref, label=excluded.label, origin=excluded.origin,"
            " repo_id=excluded.repo_id, revision_sha=excluded.revision_sha, files=excluded.files,"
            " fp_hash=excluded.fp_hash, key=excluded.key, key_version=excluded.key_version, claims=excluded.claims,"
            " info=excluded.info, row_hash=excluded.row_hash, rev=excluded.rev",
            (m.ref_key, m.ref, m.label, m.origin, m.repo_id, m.revision_sha, files_j, fp_hash, kb, KEY_VERSION,
             claims_j, info_j, rh, rev, time.time()))
        row = c.execute("SELECT id FROM models WHERE ref_key = ?", (m.ref_key,)).fetchone()
        if old is not None and old[0] != fp_hash:  # the replaced fingerprint, unless another model shares it
            c.execute("DELETE FROM blobs WHERE hash = ? AND NOT EXISTS (SELECT 1 FROM models WHERE fp_hash = ?)",
                      (old[0], old[0]))
        return int(row[0])

    def outdated_keys(self) -> list[tuple[int, str]]:
        """``(id, fingerprint hash)`` of the rows whose retrieval key is of another version than :data:`KEY_VERSION`."""
        rows = self._conn().execute("SELECT id, fp_hash FROM models WHERE key_version != ?", (KEY_VERSION,))
        return [(int(i), str(h)) for i, h in rows]

    def set_key(self, id_: int, key: np.ndarray) -> None:
        """Replace a row's retrieval key by one of the current version (its row hash and revision follow)."""
        kb = np.asarray(key, dtype=np.float32).tobytes()
        with self._tx() as c:
            row = c.execute("SELECT ref_key, fp_hash, claims, info, files FROM models WHERE id = ?", (id_,)).fetchone()
            if row is None:
                return
            ref_key, fp_hash, claims_j, info_j, files_j = row
            rev = int(c.execute("SELECT COALESCE(MAX(rev), 0) FROM models").fetchone()[0]) + 1
            c.execute("UPDATE models SET key = ?, key_version = ?, row_hash = ?, rev = ? WHERE id = ?",
                      (kb, KEY_VERSION, _row_hash(ref_key, fp_hash, kb, claims_j, info_j, files_j), rev, id_))

    def touch(self, id_: int, ref: str, label: str, origin: str) -> None:
        """Record where a stored model was last seen (not part of its verified content)."""
        with self._tx() as c:
            c.execute("UPDATE models SET ref = ?, label = ?, origin = ? WHERE id = ?", (ref, label, origin, id_))

    def put_pairs(self, rows: Sequence[tuple[str, str, float]]) -> None:
        """Cache fingerprint-test results ``(blob hash a, blob hash b, log10 p)`` (order-free)."""
        with self._tx() as c:
            c.executemany("INSERT OR REPLACE INTO pairs VALUES (?, ?, ?, ?)",
                          [(*sorted((a, b)), TEST_VERSION, float(lp)) for a, b, lp in rows])

    # -- reading ----------------------------------------------------------------------
    def _record(self, row: tuple) -> ModelRecord:
        (id_, ref_key, ref, label, origin, repo_id, sha, files_j, fp_hash, kb, kv, claims_j, info_j, rh) = row
        if rh != _row_hash(ref_key, fp_hash, kb, claims_j, info_j, files_j):
            raise CacheEntryError(f"registry record {id_} ({label}) does not match its hash (altered or swapped)",
                                  path=str(self.path))
        key = np.frombuffer(kb, dtype=np.float32)
        if key.shape != (KEY_DIM,) or kv != KEY_VERSION:
            raise CacheEntryError(f"registry record {id_} ({label}) holds an outdated retrieval key", path=str(self.path))
        try:
            files = tuple((str(n), int(s), str(h)) for n, s, h in json.loads(files_j))
            claims = tuple((str(v), str(w)) for v, w in json.loads(claims_j))
        except (ValueError, TypeError) as e:
            raise CacheEntryError(f"registry record {id_} ({label}) is malformed ({e})", path=str(self.path)) from e
        return ModelRecord(int(id_), ref_key, ref, label, origin, repo_id, sha, files, fp_hash, key, claims, info_j)

    _COLS = ("id, ref_key, ref, label, origin, repo_id, revision_sha, files, fp_hash, key, key_version, claims, info,"
             " row_hash")

    def by_ref_key(self, ref_key: str) -> ModelRecord | None:
        """The verified record of a reference, or None (raises :class:`CacheEntryError` when it fails to verify)."""
        row = self._conn().execute(f"SELECT {self._COLS} FROM models WHERE ref_key = ?", (ref_key,)).fetchone()
        return None if row is None else self._record(row)

    def by_ids(self, ids: Sequence[int]) -> dict[int, ModelRecord]:
        """Verified records by id (rows that fail verification are left out and logged)."""
        out: dict[int, ModelRecord] = {}
        c = self._conn()
        for i in range(0, len(ids), 500):
            chunk = [int(x) for x in ids[i:i + 500]]
            q = f"SELECT {self._COLS} FROM models WHERE id IN ({','.join('?' * len(chunk))})"
            for row in c.execute(q, chunk):
                try:
                    rec = self._record(row)
                except CacheEntryError as e:
                    log.warning("%s", e)
                    continue
                out[rec.id] = rec
        return out

    def by_repo(self, repo_id: str) -> list[ModelRecord]:
        rows = self._conn().execute(f"SELECT {self._COLS} FROM models WHERE repo_id = ? OR label = ?",
                                    (repo_id, repo_id)).fetchall()
        return [self._record(r) for r in rows]

    def blob(self, fp_hash: str) -> bytes:
        """Fingerprint bytes, verified against their hash (raises :class:`CacheEntryError`)."""
        row = self._conn().execute("SELECT data FROM blobs WHERE hash = ?", (fp_hash,)).fetchone()
        if row is None:
            raise CacheEntryError(f"fingerprint {fp_hash[:12]} is missing from the registry", path=str(self.path))
        data = bytes(row[0])
        if content_hash(data) != fp_hash:
            raise CacheEntryError(f"fingerprint {fp_hash[:12]} does not match its hash ({len(data)} bytes: truncated, "
                                  "altered or swapped)", path=str(self.path))
        return data

    def pair_results(self, pairs: Sequence[tuple[str, str]]) -> dict[tuple[str, str], float]:
        """Cached log10 p by sorted blob-hash pair."""
        out: dict[tuple[str, str], float] = {}
        c = self._conn()
        for a, b in {tuple(sorted(p)) for p in pairs}:
            row = c.execute("SELECT log10_p FROM pairs WHERE a = ? AND b = ? AND version = ?", (a, b, TEST_VERSION)).fetchone()
            if row is not None:
                out[(a, b)] = float(row[0])
        return out

    def keys_since(self, rev: int) -> Iterator[tuple[int, int, np.ndarray]]:
        """``(id, rev, key)`` of the rows written after revision ``rev`` (for the index)."""
        q = "SELECT id, rev, key FROM models WHERE rev > ? AND key_version = ? ORDER BY rev"
        for id_, r, kb in self._conn().execute(q, (rev, KEY_VERSION)):
            yield int(id_), int(r), np.frombuffer(kb, dtype=np.float32)

    def count(self) -> int:
        return int(self._conn().execute("SELECT COUNT(*) FROM models").fetchone()[0])

    def max_rev(self) -> int:
        return int(self._conn().execute("SELECT COALESCE(MAX(rev), 0) FROM models").fetchone()[0])

    def stats(self) -> dict[str, int]:
        c = self._conn()
        return {"models": self.count(), "fingerprints": int(c.execute("SELECT COUNT(*) FROM blobs").fetchone()[0]),
                "fingerprint_bytes": int(c.execute("SELECT COALESCE(SUM(size), 0) FROM blobs").fetchone()[0]),
                "cached_pairs": int(c.execute("SELECT COUNT(*) FROM pairs").fetchone()[0]),
                "file_bytes": self.path.stat().st_size if self.path.exists() else 0}


class _Tx:
    """``BEGIN IMMEDIATE`` … ``COMMIT`` (rolled back on error): one writer at a time, readers never blocked (WAL)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.c = conn

    def __enter__(self) -> sqlite3.Connection:
        self.c.execute("BEGIN IMMEDIATE")
        return self.c

    def __exit__(self, typ: object, *exc: object) -> None:
        self.c.execute("COMMIT" if typ is None else "ROLLBACK")
