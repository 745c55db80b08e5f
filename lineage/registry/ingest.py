"""Register models: reference each one, reuse its verified entry, fingerprint what is new or damaged.

Runs on any :mod:`lineage.engine` engine; the database stays in this process and every model is
stored in its own transaction as its result arrives (a killed run keeps what it finished).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from lineage.io.discover import ModelEntry
from lineage.progress import ProgressFn
from lineage.registry.reference import Reference
from lineage.registry.store import CacheEntryError, ModelRecord, Registry
from lineage.registry.tasks import Fingerprinted, fingerprint_task, reference_task

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ingested:
    """One model after registration."""

    entry: ModelEntry
    record: ModelRecord | None
    cached: bool = False
    recomputed: str | None = None     # why a stored entry was not used (failed verification)
    error: str | None = None
    seconds: float | None = None      # fingerprinting time in this run
    bytes_read: int | None = None     # bytes read in this run (0 when cached)

    @property
    def ok(self) -> bool:
        return self.record is not None


def _store(reg: Registry, e: ModelEntry, ref: Reference, v: Fingerprinted) -> ModelRecord:
    id_ = reg.put_model(ref_key=ref.key, ref=e.ref, label=e.label, origin=e.origin, repo_id=ref.repo_id,
                        revision_sha=ref.revision_sha, files=ref.files, blob=v.blob, key=v.key, claims=v.claims,
                        info=v.info())
    rec = reg.by_ids([id_]).get(id_)
    if rec is None:
        raise CacheEntryError(f"{e.label}: the entry just written does not verify", path=str(reg.path))
    return rec


def _lookup(reg: Registry, ref: Reference, refresh: bool) -> tuple[ModelRecord | None, str | None]:
    """A verified stored record for ``ref`` (and its fingerprint), else why not."""
    if refresh:
        return None, None
    try:
        rec = reg.by_ref_key(ref.key)
        if rec is None:
            return None, None
        reg.blob(rec.fp_hash)
        return rec, None
    except CacheEntryError as e:
        log.warning("%s; recomputing it", e)
        return None, str(e)


def ingest(engine: object, reg: Registry, entries: Sequence[ModelEntry], *, refresh: bool = False,
           progress: ProgressFn | None = None) -> list[Ingested]:
    """Register ``entries`` (in order); failures are reported per model, never raised."""
    from lineage.registry.ann import upgrade_keys

    upgrade_keys(reg)  # stored keys of an older key version: recomputed from their fingerprints, not re-read
    out: dict[int, Ingested] = {}
    refs: dict[int, Reference] = {}
    why: dict[int, str | None] = {}
    for o in engine.map(reference_task, [e.ref for e in entries]):  # type: ignore[attr-defined]
        e = entries[o.index]
        if not o.ok or o.value is None:
            out[o.index] = Ingested(e, None, error=f"{o.error_type}: {o.error}")
            continue
        rec, reason = _lookup(reg, o.value, refresh)
        if rec is not None:
            if (rec.ref, rec.label) != (e.ref, e.label):
                reg.touch(rec.id, e.ref, e.label, e.origin)
            out[o.index] = Ingested(e, rec, cached=True, bytes_read=0)
        else:
            refs[o.index], why[o.index] = o.value, reason
    todo = sorted(refs)
    for k, o in enumerate(engine.map(fingerprint_task, [entries[i].ref for i in todo])):  # type: ignore[attr-defined]
        i = todo[o.index]
        e = entries[i]
        if not o.ok or o.value is None:
            log.info("%s: %s", e.label, o.error)
            out[i] = Ingested(e, None, recomputed=why[i], error=f"{o.error_type}: {o.error}")
        else:
            out[i] = Ingested(e, _store(reg, e, refs[i], o.value), recomputed=why[i], seconds=o.value.seconds,
                              bytes_read=o.value.bytes_read)
        if progress is not None:
            progress(k + 1, len(todo), f"fingerprint {e.label}")
    return [out[i] for i in range(len(entries))]


def add(sources: Sequence[str], reg: Registry, engine: object, *, refresh: bool = False,
        progress: ProgressFn | None = None) -> tuple[list[Ingested], float]:
    """``lineage registry add``: discover ``sources``, register every model, update the index; returns the
    per-model outcomes and the seconds taken."""
    from lineage.io.discover import discover
    from lineage.registry.ann import open_index

    t0 = time.perf_counter()
    entries = discover(list(sources))
    done = ingest(engine, reg, entries, refresh=refresh, progress=progress)
    open_index(reg)
    return done, time.perf_counter() - t0
