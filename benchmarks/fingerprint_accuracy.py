"""Fingerprint-only accuracy on the zoo: each model fingerprinted once, every labelled pair compared.

    python benchmarks/fingerprint_accuracy.py [--subset full] [--max-null 300]

Writes benchmarks/results/fingerprint_accuracy.json and prints a summary per relation.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from lineage.fingerprint import compare_fingerprints
from lineage.fpcompare import fingerprint_model
from lineage.testing.zoo import build_zoo

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--subset", default="full", choices=("small", "full"))
    ap.add_argument("--max-null", type=int, default=300)
    args = ap.parse_args()
    zoo = build_zoo(args.subset)
    pairs = [p for p in zoo.pairs() if p.relation != "lora_adapter"]
    nulls = [p for p in pairs if p.group == "independent_null"][: args.max_null]
    pairs = [p for p in pairs if p.group != "independent_null"] + nulls
    fps: dict[str, object] = {}
    sizes: list[int] = []
    t_fp = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        from lineage.fingerprint import save_fingerprint

        for mid in sorted({x for p in pairs for x in (p.a, p.b)}):
            try:
                fp, _ = fingerprint_model(zoo.path(mid))
            except Exception as e:  # noqa: BLE001 - a model the fingerprint cannot read is reported
                print(f"skip {mid}: {e}", file=sys.stderr)
                continue
            fps[mid] = fp
            sizes.append(save_fingerprint(fp, Path(tmp) / f"{mid}.lfp"))
    t_fp = time.perf_counter() - t_fp
    rows = []
    t_cmp = time.perf_counter()
    for p in pairs:
        if p.a not in fps or p.b not in fps:
            continue
        r = compare_fingerprints(fps[p.a], fps[p.b])
        rows.append({"a": p.a, "b": p.b, "label": p.label, "relation": p.relation, "group": p.group, "log10_p": r.log10_p})
    t_cmp = time.perf_counter() - t_cmp
    by = defaultdict(list)
    for r in rows:
        by[(r["label"], r["relation"] if r["label"] != "independent" else r["group"])].append(r["log10_p"])
    summary = {
        f"{k[0]}:{k[1]}": {"n": len(v), "max_log10_p": max(v), "median_log10_p": statistics.median(v),
                            "detected_at_1e-3": sum(x <= -3 for x in v) / len(v)}
        for k, v in sorted(by.items())
    }
    indep = [r["log10_p"] for r in rows if r["label"] == "independent"]
    res = {"subset": args.subset, "pairs": len(rows), "fingerprint_bytes_median": statistics.median(sizes),
           "fingerprint_seconds_total": t_fp, "compare_seconds_per_pair": t_cmp / max(1, len(rows)),
           "min_independent_log10_p": min(indep) if indep else None, "by_relation": summary, "rows": rows}
    write_result("fingerprint_accuracy", res)
    print(json.dumps({k: v for k, v in res.items() if k != "rows"}, indent=1))


if __name__ == "__main__":
    main()
