"""The approximate-nearest-neighbour index of retrieval keys (usearch HNSW, cosine, half floats).

The index is derived data: a file beside the database (``<db>.usearch``, with a small JSON
sidecar naming the last database revision it holds).  Opening it adds whatever rows the
database gained since (or rebuilds it when the file is missing or unreadable), so concurrent
writers never need to coordinate on it; it is saved by atomic replace.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lineage.registry.keys import KEY_DIM, KEY_VERSION
from lineage.registry.store import Registry

log = logging.getLogger(__name__)

#: HNSW graph degree and search breadth (recall ≈ 1 at these settings on 100,000 keys).
CONNECTIVITY = 16
EXPANSION_ADD = 128
EXPANSION_SEARCH = 256


@dataclass(frozen=True)
class Neighbour:
    """A shortlisted model: its registry id and the cosine similarity of the keys."""

    id: int
    similarity: float


def new_index():  # noqa: ANN201 - usearch.index.Index
    from usearch.index import Index

    return Index(ndim=KEY_DIM, metric="cos", dtype="f16", connectivity=CONNECTIVITY,
                 expansion_add=EXPANSION_ADD, expansion_search=EXPANSION_SEARCH)


class KeyIndex:
    """Keys ``id → retrieval key`` with nearest-neighbour search."""

    def __init__(self, index: object) -> None:
        self.index = index

    @classmethod
    def from_keys(cls, ids: Sequence[int], keys: np.ndarray) -> KeyIndex:
        """An in-memory index of the given keys (e.g. the models of one scan)."""
        idx = new_index()
        if len(ids):
            idx.add(np.asarray(ids, dtype=np.uint64), np.asarray(keys, dtype=np.float32), threads=1)
        return cls(idx)

    def __len__(self) -> int:
        return len(self.index)

    def search(self, key: np.ndarray, count: int, exclude: Sequence[int] = ()) -> list[Neighbour]:
        """The ``count`` nearest keys (cosine), leaving out ``exclude``."""
        n = len(self.index)
        if n == 0 or count <= 0:
            return []
        want = min(n, count + len(exclude))
        m = self.index.search(np.asarray(key, dtype=np.float32), want, threads=1)
        skip = set(int(x) for x in exclude)
        out = [Neighbour(int(k), 1.0 - float(d)) for k, d in zip(m.keys, m.distances) if int(k) not in skip]
        return out[:count]

    def vectors(self, ids: Sequence[int]) -> np.ndarray:
        """The stored keys of ``ids`` (``len(ids) × KEY_DIM`` float32, at the index's half precision)."""
        if len(ids) == 0:
            return np.zeros((0, KEY_DIM), dtype=np.float32)
        got = self.index.get(np.asarray(ids, dtype=np.uint64))
        return np.asarray(got, dtype=np.float32).reshape(len(ids), KEY_DIM)

    def search_many(self, ids: Sequence[int], keys: np.ndarray, count: int) -> dict[int, list[Neighbour]]:
        """Neighbours of several keys at once (each leaving itself out)."""
        if len(ids) == 0:
            return {}
        n = len(self.index)
        want = min(n, count + 1)
        res = self.index.search(np.asarray(keys, dtype=np.float32), want, threads=1)
        out: dict[int, list[Neighbour]] = {}
        for row, i in enumerate(ids):
            ks, ds = res.keys[row], res.distances[row]
            found = int(res.counts[row]) if hasattr(res, "counts") else len(ks)
            out[int(i)] = [Neighbour(int(k), 1.0 - float(d)) for k, d in zip(ks[:found], ds[:found])
                           if int(k) != int(i)][:count]
        return out


def _paths(reg: Registry) -> tuple[Path, Path]:
    base = reg.path.with_name(reg.path.name + ".usearch")
    return base, base.with_name(base.name + ".json")


def upgrade_keys(reg: Registry) -> int:
    """Recompute, from the stored fingerprints, the retrieval keys of another key version; returns how many."""
    old = reg.outdated_keys()
    if not old:
        return 0
    from lineage.fingerprint_workflow import fingerprint_from_bytes
    from lineage.registry.keys import retrieval_key
    from lineage.registry.store import CacheEntryError

    done = 0
    for id_, fp_hash in old:
        try:
            reg.set_key(id_, retrieval_key(fingerprint_from_bytes(reg.blob(fp_hash))))
            done += 1
        except CacheEntryError as e:  # its entry is recomputed when the model is next added
            log.warning("%s", e)
    log.info("%s: %d retrieval keys recomputed for key version %d", reg.path, done, KEY_VERSION)
    return done


def open_index(reg: Registry, *, save: bool = True) -> KeyIndex:
    """The registry's persistent index, brought up to date with the database (saved again when it changed);
    keys of an older key version are recomputed first (:func:`upgrade_keys`)."""
    from usearch.index import Index

    upgrade_keys(reg)
    path, side = _paths(reg)
    idx, rev = None, 0
    if path.is_file() and side.is_file():
        try:
            meta = json.loads(side.read_text())
            if meta.get("key_version") == KEY_VERSION and meta.get("ndim") == KEY_DIM:
                rev = int(meta["rev"])
                # up to date: memory-map it read-only (a query touches a few pages, not the whole file)
                idx = Index.restore(str(path), view=rev == reg.max_rev())
        except Exception as e:  # noqa: BLE001 - derived data: rebuild it
            log.warning("%s: unreadable index (%s); rebuilding it", path, e)
            idx, rev = None, 0
    if idx is None:
        idx, rev = new_index(), 0
    new = list(reg.keys_since(rev))
    if not new:
        return KeyIndex(idx)
    ids = np.array([i for i, _, _ in new], dtype=np.uint64)
    present = [int(i) for i in ids if idx.contains(int(i))]
    for i in present:  # a re-fingerprinted row: its key is replaced
        idx.remove(i)
    idx.add(ids, np.stack([k for _, _, k in new]), threads=max(1, min(2, os.cpu_count() or 1)))
    rev = max(r for _, r, _ in new)
    if save:
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        idx.save(str(tmp))
        os.replace(tmp, path)
        side.write_text(json.dumps({"rev": rev, "key_version": KEY_VERSION, "ndim": KEY_DIM, "size": len(idx)}))
    log.info("index %s: %d keys (%d new)", path, len(idx), len(new))
    return KeyIndex(idx)
