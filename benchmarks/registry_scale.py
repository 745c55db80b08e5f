"""A simulated registry of 100,000 models: recall and search latency at scale, index size, add and query times.

    python benchmarks/registry_scale.py [--zoo PATH | --subset full|small] [--size 100000] [--db-size 10000]
                                        [--queries 30] [--keep]

Models: every zoo model (registered as in ``registry_recall.py``), plus generated independent ones.
A generated model is a zoo fingerprint whose probe-token labels are randomly permuted: its tensors,
spectra, sparsity and magnitudes are exactly those of a real fingerprint, but its token-anchored
structure is unrelated to every other model — precisely the fingerprint test's null (a Mantel
relabelling), which is how an independently trained model looks to the test.  Its retrieval key is
computed like any other (:func:`lineage.registry.keys.key_from_sums`; the layer sums are
permutation-equivariant, so only the token → bucket assignment changes).  They are *easier*
distractors than independently trained models of the same data (which share some token structure:
zoo independent pairs have key cosines with sd 0.065 vs 0.051 here), so the zoo's own independents
stay in as the hard ones.

Two parts, because storing 100,000 full fingerprints (≈ 16 GB for zoo-sized ones) does not fit
this shared machine's time budget:

1. **Index at ``--size``** (100,000 keys): the persistent usearch index file (bytes per model), the
   search latency of one query, and recall@1/5/10 of every derived zoo pair among all 100,000
   (query direction: the parent among the descendant's k nearest; scan: either way).
2. **Database at ``--db-size``** (10,000 models with their fingerprints): the 1,000 last models
   added through the registry's own write path (one transaction per model, as ``registry add``),
   the index update, and ``query`` end to end excluding fingerprinting the query (index search,
   record and fingerprint reads, k = 10 calibrated tests on 2 threads) with an empty pair cache.
   Its cost beyond the index search does not grow with the registry (SQLite B-tree look-ups,
   k tests), so latency at 100,000 = part 2's query − its index search + part 1's search.

Writes benchmarks/results/registry_scale.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from lineage.engine import LocalEngine
from lineage.fingerprint_workflow import fingerprint_from_bytes
from lineage.registry import Registry
from lineage.registry.ann import KeyIndex, Neighbour, new_index, open_index
from lineage.registry.keys import key_from_sums, layer_sums
from lineage.registry.query import query
from lineage.registry.shortlist import QueryPolicy, expansion, group_neighbours
from lineage.registry.tasks import compare_task
from lineage.registry.store import NewModel
from lineage.testing.zoo import Zoo
from lineage.testing.zoocache import cached_zoo  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cache_dir, write_result  # noqa: E402
from registry_recall import register_zoo  # noqa: E402

KS = (1, 5, 10)


def _relabelled_blob(blob: bytes, tokens: list[str]) -> bytes:
    """The same ``.lfp`` bytes with another probe-token list (header rewritten, tensor data unchanged)."""
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + n])
    meta = json.loads(header["__metadata__"]["meta"])
    meta["tokens"] = tokens
    header["__metadata__"]["meta"] = json.dumps(meta)
    h = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return len(h).to_bytes(8, "little") + h + blob[8 + n:]


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _generated(sources: list, count: int, seed: int):
    """``(source, permuted tokens, key)`` of ``count`` generated independent models."""
    for _, src, tokens, key in _generated_ix(sources, count, seed):
        yield src, tokens, key


def _generated_ix(sources: list, count: int, seed: int):
    """``(source index, source, permuted tokens, key)`` of ``count`` generated independent models."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        s = int(rng.integers(len(sources)))
        src = sources[s]
        tokens = [src[1][i] for i in rng.permutation(len(src[1]))]  # row r now carries another token
        yield s, src, tokens, key_from_sums(tokens, src[2])


def _test_pairs(pairs: list[tuple[int, int]], blob_of, zreg: Registry, hashes: dict[int, str]) -> dict[tuple[int, int], float]:
    """log10 p of the calibrated test for id pairs ``(query, candidate)`` (zoo pairs from the registry's cache)."""
    have = {}
    cached = zreg.pair_results([(hashes[a], hashes[b]) for a, b in pairs if a in hashes and b in hashes])
    rows: dict[int, list[int]] = {}
    for a, b in pairs:
        if a in hashes and b in hashes and tuple(sorted((hashes[a], hashes[b]))) in cached:
            have[(a, b)] = cached[tuple(sorted((hashes[a], hashes[b])))]
        elif a in hashes and b in hashes and hashes[a] == hashes[b]:
            have[(a, b)] = 0.0
        else:
            rows.setdefault(a, []).append(b)
    jobs = [(a, bs) for a, bs in rows.items()]
    for o in LocalEngine(2).map(compare_task, [(blob_of(a), [blob_of(b) for b in bs]) for a, bs in jobs]):
        a, bs = jobs[o.index]
        if o.ok and o.value is not None:
            have.update({(a, b): lp for b, lp in zip(bs, o.value)})
    return have


def _grouped_recall(ki: KeyIndex, keys: np.ndarray, ids: list[str], recs: dict, pairs: list, blob_of, zreg: Registry
                    ) -> dict[str, object]:
    """What ``registry query`` (grouped shortlist, k = 10) tests among all keys, and whether each parent is in it."""
    pol = QueryPolicy()
    thr = math.log10(1e-3 / (len(ki) - 1))
    hashes = {i: recs[m].fp_hash for i, m in enumerate(ids)}
    groups, lat = {}, []
    for i in range(len(ids)):
        t = time.perf_counter()
        ns = ki.search(keys[i], pol.fetch, exclude=[i])
        groups[i] = group_neighbours(ns, ki.vectors([n.id for n in ns]), pol.group_cos)[:pol.k]
        lat.append(time.perf_counter() - t)
    lead = _test_pairs([(i, g.leader.id) for i, gs in groups.items() for g in gs], blob_of, zreg, hashes)
    linked = {i: {g.leader.id for g in gs if lead.get((i, g.leader.id), 1.0) <= thr} for i, gs in groups.items()}
    tested = {i: [g.leader.id for g in gs] + [n.id for n in expansion(gs, linked[i], pol.max_tests - len(gs))]
              for i, gs in groups.items()}
    allp = {**lead, **_test_pairs([(i, j) for i, js in tested.items() for j in js if (i, j) not in lead], blob_of,
                                  zreg, hashes)}
    pos = {m: i for i, m in enumerate(ids)}
    found = [pos[p.a] in tested[pos[p.b]] for p in pairs]
    gen_linked = sum(1 for (i, j), lp in allp.items() if j >= len(ids) and lp <= thr)
    return {"grouped@10": sum(found) / len(pairs),
            "missed": [(p.a, p.b, p.relation) for p, f in zip(pairs, found) if not f],
            "tests_per_query": {"median": float(np.median([len(t) for t in tested.values()])),
                                "max": max(len(t) for t in tested.values())},
            "generated_tested": sum(1 for (i, j) in allp if j >= len(ids)), "generated_linked": gen_linked,
            "shortlist_seconds_median": statistics.median(lat), "shortlist_seconds_p90": float(np.quantile(lat, 0.9))}


class ExactIndex(KeyIndex):
    """Brute-force cosine search over a key matrix (``--exact``: the HNSW index's recall ceiling, no build)."""

    def __init__(self, keys: np.ndarray) -> None:
        self.keys = np.asarray(keys, dtype=np.float32)

    def __len__(self) -> int:
        return len(self.keys)

    def search(self, key: np.ndarray, count: int, exclude=()) -> list[Neighbour]:
        sims = self.keys @ np.asarray(key, dtype=np.float32)
        top = np.argpartition(-sims, min(len(sims) - 1, count + len(exclude)))[:count + len(exclude)]
        top = top[np.argsort(-sims[top], kind="stable")]
        skip = {int(x) for x in exclude}
        return [Neighbour(int(i), float(sims[i])) for i in top if int(i) not in skip][:count]

    def vectors(self, ids) -> np.ndarray:
        return self.keys[np.asarray(ids, dtype=np.int64)]


def _exact_part(zoo: Zoo, zreg: Registry, recs: dict, sources: list, made: list, keys: np.ndarray, ids: list[str],
                keygen: dict) -> dict[str, object]:
    ki = ExactIndex(keys)

    def blob_of(i: int) -> bytes:
        if i < len(ids):
            return zreg.blob(recs[ids[i]].fp_hash)
        si, tokens, _ = made[i - len(ids)]
        return _relabelled_blob(sources[si][3], tokens)

    pairs = [p for p in zoo.pairs("derived") if p.a in recs and p.b in recs and recs[p.a].fp_hash != recs[p.b].fp_hash]
    ranks = {m: {ids[n.id]: r for r, n in enumerate(ki.search(keys[i], 10, exclude=[i])) if n.id < len(ids)}
             for i, m in enumerate(ids)}
    rec = {f"query@{k}": sum(ranks[p.b].get(p.a, 99) < k for p in pairs) / len(pairs) for k in KS}
    gen_cos = keys[len(ids):len(ids) + 2000] @ keys[: len(ids)].T
    return {"size": len(keys), "generated": len(made), "key_dim": int(keys.shape[1]), "key_generation": keygen,
            "search": "exact (brute force; --exact)", "derived_pairs": len(pairs), "recall": rec,
            "grouped_query": _grouped_recall(ki, keys, ids, recs, pairs, blob_of, zreg),
            "generated_vs_zoo_cos_sd": float(gen_cos.std()), "generated_vs_zoo_cos_max": float(gen_cos.max())}


def index_part(zoo: Zoo, zreg: Registry, recs: dict, sources: list, size: int, tmp: Path, exact: bool = False
               ) -> dict[str, object]:
    ids = sorted(recs)
    n_gen = size - len(ids)
    c0, t0 = _cpu(), time.perf_counter()
    made = [(si, tokens, k) for si, _, tokens, k in _generated_ix(sources, n_gen, seed=1)]
    gen = np.stack([k for _, _, k in made])
    keygen = {"wall_s": time.perf_counter() - t0, "cpu_s": _cpu() - c0}
    keys = np.concatenate([np.stack([recs[m].key for m in ids]), gen])
    if exact:
        return _exact_part(zoo, zreg, recs, sources, made, keys, ids, keygen)
    c0, t0 = _cpu(), time.perf_counter()
    idx = new_index()
    idx.add(np.arange(len(keys), dtype=np.uint64), keys, threads=2)
    build = {"wall_s": time.perf_counter() - t0, "cpu_s": _cpu() - c0}
    idx.save(str(tmp / "index.usearch"))
    nbytes = (tmp / "index.usearch").stat().st_size
    from usearch.index import Index

    t0 = time.perf_counter()
    ki = KeyIndex(Index.restore(str(tmp / "index.usearch"), view=True))  # memory-mapped, as a query opens it
    view_s = time.perf_counter() - t0

    def blob_of(i: int) -> bytes:
        if i < len(ids):
            return zreg.blob(recs[ids[i]].fp_hash)
        si, tokens, _ = made[i - len(ids)]
        return _relabelled_blob(sources[si][3], tokens)

    lat = []
    ranks: dict[str, dict[str, int]] = {}
    for i, m in enumerate(ids):
        t = time.perf_counter()
        ns = ki.search(keys[i], 10, exclude=[i])
        lat.append(time.perf_counter() - t)
        ranks[m] = {ids[n.id]: r for r, n in enumerate(ns) if n.id < len(ids)}
    pairs = [p for p in zoo.pairs("derived") if p.a in recs and p.b in recs and recs[p.a].fp_hash != recs[p.b].fp_hash]
    rec = {}
    for k in KS:
        rec[f"query@{k}"] = sum(ranks[p.b].get(p.a, 99) < k for p in pairs) / len(pairs)
        rec[f"scan@{k}"] = sum(ranks[p.b].get(p.a, 99) < k or ranks[p.a].get(p.b, 99) < k for p in pairs) / len(pairs)
    gen_cos = gen[:2000] @ keys[: len(ids)].T
    grouped = _grouped_recall(ki, keys, ids, recs, pairs, blob_of, zreg)
    return {"size": len(keys), "generated": n_gen, "key_dim": int(keys.shape[1]), "key_generation": keygen,
            "index_build": build, "index_open_view_seconds": view_s, "grouped_query": grouped,
            "index_bytes": nbytes, "index_bytes_per_model": nbytes / len(keys),
            "search_seconds_median": statistics.median(lat), "search_seconds_p90": float(np.quantile(lat, 0.9)),
            "derived_pairs": len(pairs), "recall": rec,
            "missed_at_10": [(p.a, p.b, p.relation, float(recs[p.a].key @ recs[p.b].key)) for p in pairs
                             if ranks[p.b].get(p.a, 99) >= 10 and ranks[p.a].get(p.b, 99) >= 10],
            "generated_vs_zoo_cos_sd": float(gen_cos.std()), "generated_vs_zoo_cos_max": float(gen_cos.max())}


def db_part(zoo: Zoo, zreg: Registry, recs: dict, sources: list, size: int, n_queries: int) -> dict[str, object]:
    db = cache_dir("registry") / f"sim{size}-{zoo.root.name}.sqlite"
    for p in db.parent.glob(db.name + "*"):
        p.unlink()
    shutil.copy(zreg.path, db)
    reg = Registry(db)
    reg._conn().execute("DELETE FROM pairs")
    n_gen = size - reg.count()
    batch: list[NewModel] = []
    t0 = time.perf_counter()
    for g, (src, tokens, key) in enumerate(_generated(sources, n_gen, seed=2)):
        name = f"sim/independent-{g:06d}"
        m = NewModel(f"sim:{g}", name, name, "simulated", name, None, (), _relabelled_blob(src[3], tokens), key, (),
                     json.loads(src[0].info))
        if g < n_gen - 1000:
            batch.append(m)
            if len(batch) == 500 or g == n_gen - 1001:
                reg.put_models(batch)
                batch = []
            continue
        if g == n_gen - 1000:
            bulk_s = time.perf_counter() - t0
            open_index(reg)
            c0, t0 = _cpu(), time.perf_counter()
        reg.put_model(**{f: getattr(m, f) for f in m.__dataclass_fields__})
    t_db = time.perf_counter() - t0
    open_index(reg)
    add_1000 = {"wall_s": time.perf_counter() - t0, "db_write_s": t_db, "index_update_s": time.perf_counter() - t0 - t_db,
                "cpu_s": _cpu() - c0}
    pairs = [p for p in zoo.pairs("derived") if p.hops == 1 and p.a in recs and p.b in recs
             and recs[p.a].fp_hash != recs[p.b].fp_hash]
    pick = [pairs[i] for i in np.random.default_rng(0).choice(len(pairs), size=min(n_queries, len(pairs)), replace=False)]
    eng = LocalEngine(2)
    rows = []
    for p in pick:
        c0 = _cpu()
        res = query(reg, zoo.path(p.b), eng, policy=QueryPolicy())
        rows.append({"query": p.b, "parent": p.a, "cpu_s": _cpu() - c0, **res.timing,
                     "parent_found": any(h.label == p.a and h.related for h in res.hits)})
    st = reg.stats()
    reg.close()
    for p in db.parent.glob(db.name + "*"):
        p.unlink()
    med = {k: statistics.median(r[k] for r in rows) for k in ("query_s", "index_s", "confirm_s", "cpu_s", "tested",
                                                              "groups", "expanded")}
    return {"size": size, "bulk_seconds": bulk_s, "add_1000": add_1000, "db_bytes": st["file_bytes"],
            "fingerprint_bytes_per_model": st["fingerprint_bytes"] / max(1, st["fingerprints"]), "queries": len(rows),
            "median": med, "query_seconds_p90": float(np.quantile([r["query_s"] for r in rows], 0.9)),
            "parent_found_and_linked": sum(r["parent_found"] for r in rows) / max(1, len(rows)), "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--zoo", type=Path)
    ap.add_argument("--subset", default="full", choices=("small", "full"))
    ap.add_argument("--size", type=int, default=100_000)
    ap.add_argument("--db-size", type=int, default=10_000)
    ap.add_argument("--queries", type=int, default=30)
    ap.add_argument("--exact", action="store_true",
                    help="index part by brute-force search (no HNSW build: recall ceiling, when CPU is short)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    zoo = Zoo(args.zoo) if args.zoo else cached_zoo(args.subset)
    zreg, recs, _ = register_zoo(zoo, cache_dir("registry") / f"{zoo.root.name}.sqlite")
    sources = []
    for rec in recs.values():
        blob = zreg.blob(rec.fp_hash)
        fp = fingerprint_from_bytes(blob)
        sources.append((rec, list(fp.tokens), layer_sums(fp), blob))
    tmp = cache_dir("registry", "tmp-scale")
    res = {"zoo": str(zoo.root), "zoo_models": len(recs),
           "generation": "zoo fingerprints with randomly permuted probe-token labels (the test's null)",
           "index": index_part(zoo, zreg, recs, sources, args.size, tmp, args.exact)}
    shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(res, indent=1), flush=True)
    res["database"] = db_part(zoo, zreg, recs, sources, args.db_size, args.queries)
    idx, db = res["index"], res["database"]
    res["query_seconds_at_index_size_estimate"] = (db["median"]["query_s"] - db["median"]["index_s"]
                                                   + idx["grouped_query"]["shortlist_seconds_median"])
    res["query_seconds_at_index_size_estimate_note"] = (
        "database-part query minus its index time plus the index part's shortlist time"
        + (" (exact brute-force search, slower than the HNSW index)" if args.exact else ""))
    res["loadavg_at_end"] = os.getloadavg()
    write_result("registry_scale", res)
    print(json.dumps({k: v for k, v in res["database"].items() if k != "rows"}, indent=1))


if __name__ == "__main__":
    main()
