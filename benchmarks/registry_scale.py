"""A simulated registry of 100,000 models: query latency, index size per model, time to add 1,000 models.

    python benchmarks/registry_scale.py [--zoo PATH | --subset full|small] [--size 100000] [--queries 30] [--keep]

Models: every zoo model (registered by ``registry_recall.py``'s code), plus generated independent
ones.  A generated model is a zoo fingerprint whose probe-token labels are randomly permuted: its
tensors, spectra, sparsity and magnitudes are exactly those of a real fingerprint, but its
token-anchored structure is unrelated to every other model — precisely the fingerprint test's null
(a Mantel relabelling), which is how an independently trained model looks to the test.  Its retrieval
key is computed from it like any other key (the layer sums are permutation-equivariant, so only the
token → bucket assignment changes), and its fingerprint blob is stored in full (the test needs it
whenever it is shortlisted), so the database has the real size.

Measured: the 1,000 last models added through the registry's own write path (one transaction per
model, as ``registry add`` does) and the index update (the first ones are added 500 per transaction); the index's size per model; and, for ``--queries`` zoo models whose
parent is registered, ``lineage registry query`` excluding fingerprinting the query (index search,
record and fingerprint reads, k = 10 calibrated tests on 2 threads) with an empty pair cache, plus
whether the parent is among the 10 candidates out of 100,000.

Writes benchmarks/results/registry_scale.json.  The database (~size × fingerprint size) is deleted
unless ``--keep``.
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
from lineage.registry.ann import open_index
from lineage.registry.keys import key_from_sums, layer_sums
from lineage.registry.query import query
from lineage.registry.search import CandidatePolicy
from lineage.registry.store import NewModel
from lineage.testing.zoo import Zoo, build_zoo

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cache_dir, write_result  # noqa: E402
from registry_recall import register_zoo  # noqa: E402


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


def generate(reg: Registry, sources: list, count: int, seed: int, label0: int, batch: int = 1) -> float:
    """Add ``count`` generated independent models (``batch`` per transaction); returns the seconds taken."""
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    todo: list[NewModel] = []
    for g in range(count):
        rec, tokens, sums, blob = sources[int(rng.integers(len(sources)))]
        perm = rng.permutation(len(tokens))
        new_tokens = [tokens[i] for i in perm]           # row r now carries token perm[r]
        key = key_from_sums(new_tokens, sums)
        name = f"sim/independent-{label0 + g:06d}"
        todo.append(NewModel(f"sim:{seed}:{label0 + g}", name, name, "simulated", name, None, (),
                             _relabelled_blob(blob, new_tokens), key, (), json.loads(rec.info)))
        if len(todo) >= batch or g == count - 1:
            reg.put_models(todo)
            todo = []
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--zoo", type=Path)
    ap.add_argument("--subset", default="full", choices=("small", "full"))
    ap.add_argument("--size", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=30)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    zoo = Zoo(args.zoo) if args.zoo else build_zoo(args.subset)
    zreg, recs, _ = register_zoo(zoo, cache_dir("registry") / f"{zoo.root.name}.sqlite")
    db = cache_dir("registry") / f"sim{args.size}-{zoo.root.name}.sqlite"
    for p in db.parent.glob(db.name + "*"):
        p.unlink()
    shutil.copy(zreg.path, db)
    reg = Registry(db)
    reg._conn().execute("DELETE FROM pairs")
    sources = []
    for rec in recs.values():
        blob = zreg.blob(rec.fp_hash)
        fp = fingerprint_from_bytes(blob)
        sources.append((rec, list(fp.tokens), layer_sums(fp), blob))
    n_gen = args.size - reg.count()
    bulk = n_gen - 1000
    t_bulk = generate(reg, sources, bulk, seed=1, label0=0, batch=500)
    t0 = time.perf_counter()
    idx = open_index(reg)
    t_index_build = time.perf_counter() - t0
    c0, t0 = _cpu(), time.perf_counter()
    t_add = generate(reg, sources, 1000, seed=2, label0=bulk)
    t1 = time.perf_counter()
    idx = open_index(reg)
    add_1000 = {"wall_s": time.perf_counter() - t0, "db_write_s": t_add, "index_update_s": time.perf_counter() - t1,
                "cpu_s": _cpu() - c0}
    index_file = Path(str(db) + ".usearch")
    # queries: zoo descendants whose parent is registered
    pairs = [p for p in zoo.pairs("derived") if p.hops == 1 and p.a in recs and p.b in recs
             and recs[p.a].fp_hash != recs[p.b].fp_hash]
    rng = np.random.default_rng(0)
    pick = [pairs[i] for i in rng.choice(len(pairs), size=min(args.queries, len(pairs)), replace=False)]
    eng = LocalEngine(2)
    lat, cpu, found, tested = [], [], 0, []
    for p in pick:
        c0 = _cpu()
        res = query(reg, zoo.path(p.b), eng, policy=CandidatePolicy(k=10, k_max=10))
        cpu.append(_cpu() - c0)
        lat.append(res.timing["query_s"])
        tested.append(res.timing["tested"])
        found += any(h.label == p.a for h in res.hits)
    st = reg.stats()
    res = {"zoo": str(zoo.root), "registered": reg.count(), "zoo_models": len(recs), "generated": n_gen,
           "generation": "zoo fingerprints with randomly permuted probe-token labels (the test's null)",
           "bulk_add_seconds": t_bulk, "bulk_add_models": bulk, "index_build_seconds": t_index_build,
           "add_1000": add_1000, "index_bytes": index_file.stat().st_size,
           "index_bytes_per_model": index_file.stat().st_size / reg.count(),
           "db_bytes": st["file_bytes"], "fingerprint_bytes_per_model": st["fingerprint_bytes"] / max(1, st["fingerprints"]),
           "queries": len(pick), "query_seconds_median": statistics.median(lat), "query_seconds_p90": float(np.quantile(lat, 0.9)),
           "query_seconds_max": max(lat), "query_cpu_seconds_median": statistics.median(cpu),
           "query_tests_median": statistics.median(tested), "parent_in_top10_of_100k": found / max(1, len(pick)),
           "loadavg_at_end": os.getloadavg()}
    write_result("registry_scale", res)
    print(json.dumps(res, indent=1))
    if not args.keep:
        reg.close()
        for p in db.parent.glob(db.name + "*"):
            p.unlink()


if __name__ == "__main__":
    main()
