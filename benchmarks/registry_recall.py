"""Candidate recall of the registry's retrieval keys on the zoo: is each true relative shortlisted?

    python benchmarks/registry_recall.py [--zoo PATH | --subset full|small]

Every zoo model is registered (fingerprint, retrieval key) in a registry kept under the benchmark
cache (reused by ``registry_scale.py``); each model's neighbours come from the usearch index of all
zoo keys.  For every derived pair (parent a, descendant b; all relations: fine-tunes, LoRA merges,
quantised, GGUF, disguised, depth- and vocabulary-changed, pruned, merged, chains):

* ``query`` recall@k: a is among b's k nearest keys (the raw ranking of the index);
* ``grouped`` recall@k: a is among the models ``lineage registry query b -k K`` tests
  (:mod:`lineage.registry.shortlist`: the 64 nearest keys grouped into near-duplicates at cosine
  ≥ 0.95, the leaders of the first k groups tested, every linked group's members tested too, at most
  32 tests) — leaders are linked by the calibrated test at the query's threshold (1e-3 / models);
* ``scan`` recall@k: a is among b's or b among a's (a scan tests the pair either way);
* ``policy``: the scan's default shortlist (k = 10, plus keys with cosine ≥ 0.3 up to 32);
* ``linked``: shortlisted by the policy *and* the calibrated fingerprint test links the pair at the
  scan's Bonferroni threshold (1e-3 / all pairs) — what a scan of the whole zoo reports.

Writes benchmarks/results/registry_recall.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from lineage.engine import LocalEngine
from lineage.io.discover import ModelEntry
from lineage.registry import CandidatePolicy, Registry, ingest
from lineage.registry.ann import KeyIndex, upgrade_keys
from lineage.registry.shortlist import QueryPolicy, expansion, group_neighbours
from lineage.registry.search import confirm, pair_p
from lineage.testing.zoo import Zoo
from lineage.testing.zoocache import cached_zoo  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cache_dir, write_result  # noqa: E402

KS = (1, 5, 10)


def _group(relation: str) -> str:
    for g in ("disguised", "depth_change", "vocab_change", "quantised", "gguf", "merge", "lora", "width_pruned", "noise",
              "continued_pretraining", "copy"):
        if g in relation:
            return g
    return relation


def register_zoo(zoo: Zoo, db: Path, workers: int = 2) -> tuple[Registry, dict[str, object], float]:
    """Register every zoo model (resumable: a second run reuses the entries)."""
    reg = Registry(db)
    upgrade_keys(reg)
    entries = [ModelEntry(zoo.path(i), i, "zoo") for i in zoo.ids]
    t0 = time.perf_counter()
    done = ingest(LocalEngine(workers), reg, entries)
    secs = time.perf_counter() - t0
    for d in done:
        if not d.ok:
            print(f"skip {d.entry.label}: {d.error}", file=sys.stderr)
    return reg, {d.entry.label: d.record for d in done if d.ok}, secs


def _grouped(reg: Registry, recs: dict, ids: list[str], index: KeyIndex, keys: np.ndarray, neigh_fetch: dict
             ) -> tuple[dict[str, dict], list[int]]:
    """Per model, what ``registry query`` tests at k = 1, 5, 10 groups, and each model's group ranks."""
    pol = QueryPolicy()
    thr = math.log10(1e-3 / (len(ids) - 1))
    groups = {i: group_neighbours(ns, keys[[n.id for n in ns]], pol.group_cos)[:max(KS)] for i, ns in neigh_fetch.items()}
    lead = [(recs[ids[i]].fp_hash, recs[ids[g.leader.id]].fp_hash) for i, gs in groups.items() for g in gs]
    conf = confirm(LocalEngine(2), reg, lead)
    out, tests = {}, []
    for i, gs in groups.items():
        linked = {g.leader.id for g in gs
                  if (lp := pair_p(conf, recs[ids[i]].fp_hash, recs[ids[g.leader.id]].fp_hash)) is not None and lp <= thr}
        tested = {}
        for k in KS:
            t = [g.leader for g in gs[:k]] + expansion(gs[:k], linked, pol.max_tests - min(k, len(gs)))
            tested[k] = {ids[n.id] for n in t}
        tests.append(len(tested[max(KS)]))
        out[ids[i]] = {"tested": tested, "group_rank": {ids[n.id]: r for r, g in enumerate(gs) for n in g.members}}
    more = confirm(LocalEngine(2), reg, [(recs[m].fp_hash, recs[o].fp_hash) for m, v in out.items()
                                         for o in v["tested"][max(KS)]])
    for m, v in out.items():  # the test's verdict on every pair the query policy tests (k = 10)
        v["linked"] = {o for o in v["tested"][max(KS)]
                       if (lp := pair_p(more, recs[m].fp_hash, recs[o].fp_hash)) is not None and lp <= thr}
    return out, tests


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--zoo", type=Path, help="an already built zoo folder (opened as is)")
    ap.add_argument("--subset", default="full", choices=("small", "full"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    zoo = Zoo(args.zoo) if args.zoo else cached_zoo(args.subset)
    db = cache_dir("registry") / f"{zoo.root.name}.sqlite"
    reg, recs, reg_s = register_zoo(zoo, db)
    ids = sorted(recs)
    keys = np.stack([recs[m].key for m in ids])
    index = KeyIndex.from_keys(list(range(len(ids))), keys)
    t0 = time.perf_counter()
    neigh = index.search_many(list(range(len(ids))), keys, 32)
    search_s = time.perf_counter() - t0
    rank = {ids[i]: {ids[n.id]: r for r, n in enumerate(ns)} for i, ns in neigh.items()}
    policy = CandidatePolicy()
    picked = {ids[i]: {ids[n.id] for n in policy.pick(ns)} for i, ns in neigh.items()}
    pairs = [p for p in zoo.pairs("derived") if p.a in recs and p.b in recs and recs[p.a].fp_hash != recs[p.b].fp_hash]
    n_all = len(ids) * (len(ids) - 1) // 2
    thr = math.log10(1e-3 / n_all)
    conf = confirm(LocalEngine(2), reg, [(recs[p.a].fp_hash, recs[p.b].fp_hash) for p in pairs])

    grouped, tests = _grouped(reg, recs, ids, index, keys, neigh_fetch=index.search_many(
        list(range(len(ids))), keys, QueryPolicy().fetch))

    def hit(p, k: int, either: bool) -> bool:
        q = rank[p.b].get(p.a, 99) < k
        return q or (either and rank[p.a].get(p.b, 99) < k)

    rows = []
    for p in pairs:
        lp = pair_p(conf, recs[p.a].fp_hash, recs[p.b].fp_hash)
        shortlisted = p.a in picked[p.b] or p.b in picked[p.a]
        cos = float(recs[p.a].key @ recs[p.b].key)
        rows.append({"a": p.a, "b": p.b, "relation": p.relation, "group": _group(p.relation), "hops": p.hops,
                     "cos": cos, "rank_query": rank[p.b].get(p.a), "rank_reverse": rank[p.a].get(p.b),
                     "policy": shortlisted, "log10_p": lp, "linked": bool(shortlisted and lp is not None and lp <= thr),
                     "group_rank": grouped[p.b]["group_rank"].get(p.a),
                     **{f"query@{k}": hit(p, k, False) for k in KS},
                     **{f"grouped@{k}": p.a in grouped[p.b]["tested"][k] for k in KS},
                     **{f"scan@{k}": hit(p, k, True) for k in KS}})
    indep = [float(recs[p.a].key @ recs[p.b].key) for p in zoo.pairs("independent") if p.a in recs and p.b in recs]

    truth_indep = {frozenset((p.a, p.b)) for p in zoo.pairs("independent")}
    null = {"independent_pairs_tested_by_query": sum(frozenset((m, o)) in truth_indep for m, v in grouped.items()
                                                     for o in v["tested"][10]),
            "independent_pairs_linked_by_query": sum(frozenset((m, o)) in truth_indep for m, v in grouped.items()
                                                     for o in v["linked"])}

    def frac(sel: list[dict], col: str) -> float:
        return sum(bool(r[col]) for r in sel) / max(1, len(sel))

    cols = ([f"query@{k}" for k in KS] + [f"grouped@{k}" for k in KS] + [f"scan@{k}" for k in KS]
            + ["policy", "linked"])
    by = defaultdict(list)
    for r in rows:
        by[r["group"]].append(r)
    res = {"zoo": str(zoo.root), "models": len(ids), "derived_pairs": len(rows),
           "identical_fingerprint_pairs_left_out": len([p for p in zoo.pairs("derived") if p.a in recs and p.b in recs])
           - len(rows),
           "register_seconds": reg_s, "null_check": null, "index_search_seconds_all_models": search_s,
           "recall": {c: frac(rows, c) for c in cols},
           "by_group": {g: {"n": len(v), **{c: frac(v, c) for c in cols}} for g, v in sorted(by.items())},
           "derived_cos": {"min": min(r["cos"] for r in rows), "median": float(np.median([r["cos"] for r in rows]))},
           "independent_cos": {"n": len(indep), "max": max(indep) if indep else None,
                               "sd": float(np.std(indep)) if indep else None},
           "missed_by_policy": [r for r in rows if not r["policy"]],
           "missed_by_grouped_query@10": [r for r in rows if not r["grouped@10"]],
           "grouped_query_tests_per_model": {"k": 10, "median": float(np.median(tests)), "p90": float(np.quantile(tests, 0.9)),
                                             "max": int(max(tests))},
           "rows": rows}
    write_result("registry_recall", res)
    print(json.dumps({k: v for k, v in res.items() if k not in ("rows",)}, indent=1)[:5000])


if __name__ == "__main__":
    main()
