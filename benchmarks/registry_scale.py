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
from lineage.fpcompare import fingerprint_from_bytes
from lineage.registry import Registry
from lineage.registry.ann import KeyIndex, new_index, open_index
from lineage.registry.keys import key_from_sums, layer_sums
from lineage.registry.query import query
from lineage.registry.search import CandidatePolicy
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
    rng = np.random.default_rng(seed)
    for _ in range(count):
        src = sources[int(rng.integers(len(sources)))]
        tokens = [src[1][i] for i in rng.permutation(len(src[1]))]  # row r now carries another token
        yield src, tokens, key_from_sums(tokens, src[2])


def index_part(zoo: Zoo, recs: dict, sources: list, size: int, tmp: Path) -> dict[str, object]:
    ids = sorted(recs)
    n_gen = size - len(ids)
    c0, t0 = _cpu(), time.perf_counter()
    gen = np.stack([k for _, _, k in _generated(sources, n_gen, seed=1)])
    keygen = {"wall_s": time.perf_counter() - t0, "cpu_s": _cpu() - c0}
    keys = np.concatenate([np.stack([recs[m].key for m in ids]), gen])
    c0, t0 = _cpu(), time.perf_counter()
    idx = new_index()
    idx.add(np.arange(len(keys), dtype=np.uint64), keys, threads=2)
    build = {"wall_s": time.perf_counter() - t0, "cpu_s": _cpu() - c0}
    idx.save(str(tmp / "index.usearch"))
    nbytes = (tmp / "index.usearch").stat().st_size
    ki = KeyIndex(idx)
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
    return {"size": len(keys), "generated": n_gen, "key_generation": keygen, "index_build": build,
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
        res = query(reg, zoo.path(p.b), eng, policy=CandidatePolicy(k=10, k_max=10))
        rows.append({"query": p.b, "parent": p.a, "cpu_s": _cpu() - c0, **res.timing,
                     "parent_found": any(h.label == p.a and h.related for h in res.hits)})
    st = reg.stats()
    reg.close()
    for p in db.parent.glob(db.name + "*"):
        p.unlink()
    med = {k: statistics.median(r[k] for r in rows) for k in ("query_s", "index_s", "confirm_s", "cpu_s", "tested")}
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
           "index": index_part(zoo, recs, sources, args.size, tmp)}
    shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(res, indent=1), flush=True)
    res["database"] = db_part(zoo, zreg, recs, sources, args.db_size, args.queries)
    idx, db = res["index"], res["database"]
    res["query_seconds_at_index_size_estimate"] = (db["median"]["query_s"] - db["median"]["index_s"]
                                                   + idx["search_seconds_median"])
    res["loadavg_at_end"] = os.getloadavg()
    write_result("registry_scale", res)
    print(json.dumps({k: v for k, v in res["database"].items() if k != "rows"}, indent=1))


if __name__ == "__main__":
    main()
