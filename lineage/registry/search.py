"""Shortlist by the index, decide by the calibrated test: candidate pairs, cached confirmations, claim checks.

The index only chooses *which* pairs the fingerprint test (:func:`lineage.fingerprint.compare_fingerprints`)
sees; every reported relation carries that test's p-value.  Results are cached in the registry by the
two fingerprints' content hashes, so a pair is tested once whatever scan or query asks for it again.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from lineage.progress import ProgressFn
from lineage.registry.ann import KeyIndex, Neighbour
from lineage.registry.claims import ClaimCheck, check_claim
from lineage.registry.store import ModelRecord, Registry
from lineage.registry.tasks import compare_task

log = logging.getLogger(__name__)

#: Candidates per model: the ``k`` nearest keys, then any further key with cosine ≥ ``tau`` up to ``k_max``.
DEFAULT_K = 10
DEFAULT_TAU = 0.3
DEFAULT_K_MAX = 32


@dataclass(frozen=True)
class CandidatePolicy:
    """How many candidates each model's fingerprint is tested against."""

    k: int = DEFAULT_K
    tau: float = DEFAULT_TAU
    k_max: int = DEFAULT_K_MAX

    def pick(self, neighbours: Sequence[Neighbour]) -> list[Neighbour]:
        """The first ``k``, then those above ``tau``, at most ``k_max``."""
        out = list(neighbours[: self.k])
        out += [n for n in neighbours[self.k: self.k_max] if n.similarity >= self.tau]
        return out


@dataclass(frozen=True)
class Confirmed:
    """Fingerprint-test results of a set of pairs (by sorted blob-hash pair), and how many came from the cache."""

    log10_p: Mapping[tuple[str, str], float]
    cached: int
    tested: int
    failed: tuple[str, ...] = ()


def confirm(engine: object, reg: Registry, pairs: Sequence[tuple[str, str]], *, progress: ProgressFn | None = None
            ) -> Confirmed:
    """log10 p of every pair of fingerprint hashes: cached results, the rest tested on ``engine`` and cached."""
    want = sorted({tuple(sorted(p)) for p in pairs if p[0] != p[1]})
    have = dict(reg.pair_results(want))
    missing = [p for p in want if p not in have]
    rows = _rows(missing, int(getattr(engine, "workers", 1)))
    hashes = sorted({h for p in missing for h in p})
    blobs = dict(zip(hashes, engine.share([reg.blob(h) for h in hashes])))  # type: ignore[attr-defined]
    jobs = [(blobs[h], [blobs[o] for o in others]) for h, others in rows]
    failed: list[str] = []
    for k, o in enumerate(engine.map(compare_task, jobs)):  # type: ignore[attr-defined]
        h, others = rows[o.index]
        if not o.ok or o.value is None:
            failed.append(f"{h[:12]}: {o.error_type}: {o.error}")
            continue
        got = [(h, b, lp) for b, lp in zip(others, o.value)]
        reg.put_pairs(got)
        have.update({tuple(sorted((a, b))): lp for a, b, lp in got})
        if progress is not None:
            progress(k + 1, len(jobs), "confirm candidates")
    same = {p: 0.0 for p in pairs if p[0] == p[1]}  # identical fingerprints: the same model
    return Confirmed({**have, **same}, len(want) - len(missing), len(missing), tuple(failed))


def _rows(pairs: Sequence[tuple[str, str]], workers: int) -> list[tuple[str, list[str]]]:
    """Tasks ``(fingerprint, [others…])``: pairs grouped by a shared side (each task loads it once), split
    so that there are at least two tasks per worker when there are enough pairs (a query is one row)."""
    by: dict[str, list[str]] = defaultdict(list)
    for a, b in pairs:
        by[a].append(b)
    size = max(1, -(-len(pairs) // max(1, 2 * workers)))
    out = []
    for h in sorted(by, key=lambda x: -len(by[x])):
        out += [(h, by[h][i:i + size]) for i in range(0, len(by[h]), size)]
    return out


def pair_p(conf: Confirmed, a: str, b: str) -> float | None:
    return 0.0 if a == b and a in {x for p in conf.log10_p for x in p} else conf.log10_p.get(tuple(sorted((a, b))))


def candidate_pairs(records: Sequence[ModelRecord], policy: CandidatePolicy) -> dict[tuple[int, int], float]:
    """Index pairs ``(i, j)`` (positions in ``records``, i < j) worth testing, with their key similarity."""
    if len(records) < 2:
        return {}
    keys = np.stack([r.key for r in records])
    idx = KeyIndex.from_keys(list(range(len(records))), keys)
    out: dict[tuple[int, int], float] = {}
    found = idx.search_many(list(range(len(records))), keys, policy.k_max)
    for i, neigh in found.items():
        for n in policy.pick(neigh):
            a, b = sorted((i, n.id))
            out[(a, b)] = max(out.get((a, b), -1.0), n.similarity)
    return out


def resolve_claim(claims: Sequence[str], by_name: Mapping[str, ModelRecord]) -> ModelRecord | None:
    """The first claimed base that names a known model (by repo id or label, case-insensitive)."""
    for c in claims:
        rec = by_name.get(c.lower())
        if rec is not None:
            return rec
    return None


def name_table(records: Sequence[ModelRecord], labels: Sequence[str] | None = None) -> dict[str, ModelRecord]:
    """Lower-case repo ids and labels → record (what a claim can name)."""
    out: dict[str, ModelRecord] = {}
    for i, r in enumerate(records):
        for n in (r.repo_id, r.label, labels[i] if labels else None):
            if n:
                out.setdefault(n.lower(), r)
    return out


def claim_for(label: str, rec: ModelRecord, resolved: ModelRecord | None, resolved_label: str | None,
              conf: Confirmed, threshold: float, points_to: tuple[str, float] | None) -> ClaimCheck:
    """:func:`~lineage.registry.claims.check_claim` for one model with its confirmed pairs."""
    lp = pair_p(conf, rec.fp_hash, resolved.fp_hash) if resolved is not None else None
    return check_claim(label, [c for c, _ in rec.claims], resolved_label if resolved is not None else None, lp,
                       threshold, points_to[0] if points_to else None, points_to[1] if points_to else None)
