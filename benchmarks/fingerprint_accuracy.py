"""Fingerprint-only accuracy on the zoo: each model fingerprinted once, every labelled pair compared.

    python benchmarks/fingerprint_accuracy.py [--zoo PATH | --subset full] [--max-null 300] [--holdout]

``--zoo PATH`` opens an already built zoo folder as is (no rebuild, whatever the zoo code's
cache key is now); without it ``build_zoo(--subset)`` is used.  ``--holdout`` also compares the
fingerprints of the held-out independent models of ``benchmarks/holdout_null.py`` (built there,
with another width, depth, learning rate and text; the calibration never saw them).

Writes benchmarks/results/fingerprint_accuracy.json and prints a summary per relation.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from scipy import stats

from lineage.fingerprint import CONFIG, SKETCH_KINDS, compare_fingerprints, save_fingerprint
from lineage.fingerprint_workflow import fingerprint_model
from lineage.testing.zoo import Zoo, build_zoo
from lineage.testing.zoocache import cached_zoo  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402


def _ks_anticonservative(ps: list[float]) -> dict[str, float]:
    r = stats.kstest(ps, "uniform", alternative="greater")
    return {"statistic": float(r.statistic), "p": float(r.pvalue)}


def _holdout(zoo_root: Path) -> dict[str, object]:
    from holdout_null import HoldoutConfig, build

    models = build(HoldoutConfig(), zoo_root)
    rows = []
    for fam, paths in models.items():
        fps = {p: fingerprint_model(str(p))[0] for p in paths}
        for x, y in itertools.combinations(paths, 2):
            r = compare_fingerprints(fps[x], fps[y])
            rows.append({"family": fam, "a": x.name, "b": y.name, "log10_p": r.log10_p, "z": r.z})
    ps = [10 ** r["log10_p"] for r in rows]
    return {"pairs": len(rows), "min_log10_p": min(r["log10_p"] for r in rows), "max_z": max(r["z"] for r in rows),
            "fraction_p_le_0.01": sum(p <= 0.01 for p in ps) / len(ps), "ks_anticonservative": _ks_anticonservative(ps),
            "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--zoo", type=Path, help="an already built zoo folder (opened as is, never rebuilt)")
    ap.add_argument("--subset", default="full", choices=("small", "full"))
    ap.add_argument("--max-null", type=int, default=300)
    ap.add_argument("--holdout", action="store_true", help="also the held-out null of benchmarks/holdout_null.py")
    args = ap.parse_args()
    torch.set_num_threads(1)
    zoo = Zoo(args.zoo) if args.zoo else cached_zoo(args.subset)
    pairs = [p for p in zoo.pairs() if p.relation != "lora_adapter"]
    nulls = [p for p in pairs if p.group == "independent_null"][: args.max_null]
    pairs = [p for p in pairs if p.group != "independent_null"] + nulls
    fps: dict[str, object] = {}
    sizes: list[int] = []
    fractions: list[float] = []
    t_fp = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for mid in sorted({x for p in pairs for x in (p.a, p.b)}):
            t0 = time.perf_counter()
            try:
                fp, summary = fingerprint_model(zoo.path(mid))
            except Exception as e:  # noqa: BLE001 - a model the fingerprint cannot read is reported
                print(f"skip {mid}: {e}", file=sys.stderr)
                continue
            t_fp += time.perf_counter() - t0
            fps[mid] = fp
            fractions.append(summary.bytes_read / max(1, summary.total_bytes))
            sizes.append(save_fingerprint(fp, Path(tmp) / f"{mid}.lfp"))
    rows = []
    t_cmp = time.perf_counter()
    for p in pairs:
        if p.a not in fps or p.b not in fps:
            continue
        r = compare_fingerprints(fps[p.a], fps[p.b])
        rows.append({"a": p.a, "b": p.b, "label": p.label, "relation": p.relation, "group": p.group,
                     "log10_p": r.log10_p, "z": r.z})
    t_cmp = time.perf_counter() - t_cmp
    by = defaultdict(list)
    for r in rows:
        by[(r["label"], r["relation"] if r["label"] != "independent" else r["group"])].append(r["log10_p"])
    summary = {
        f"{k[0]}:{k[1]}": {"n": len(v), "max_log10_p": max(v), "median_log10_p": statistics.median(v),
                            "detected_at_1e-3": sum(x <= -3 for x in v) / len(v)}
        for k, v in sorted(by.items())
    }
    indep = [r for r in rows if r["label"] == "independent"]
    res = {"zoo": str(zoo.root), "pairs": len(rows), "kinds": list(SKETCH_KINDS), "unit_fraction": CONFIG.unit_fraction,
           "z_inflation": CONFIG.z_inflation, "models": len(fps), "fingerprint_bytes_median": statistics.median(sizes),
           "fingerprint_seconds_total": t_fp, "fingerprint_seconds_per_model": t_fp / max(1, len(fps)),
           "zoo_read_fraction_median": statistics.median(fractions),
           "compare_seconds_per_pair": t_cmp / max(1, len(rows)),
           "independent_pairs": len(indep),
           "min_independent_log10_p": min(r["log10_p"] for r in indep) if indep else None,
           "max_independent_z": max(r["z"] for r in indep) if indep else None,
           "independent_ks_anticonservative": _ks_anticonservative([10 ** r["log10_p"] for r in indep]) if indep else None,
           "by_relation": summary}
    if args.holdout:
        res["holdout_null"] = _holdout(zoo.root)
    res["rows"] = rows
    write_result("fingerprint_accuracy", res)
    print(json.dumps({k: v for k, v in res.items() if k != "rows"}, indent=1, default=str)[:6000])


if __name__ == "__main__":
    main()
