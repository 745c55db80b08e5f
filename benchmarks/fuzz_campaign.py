"""Fuzz campaign: hostile model files through `lineage compare` and `lineage inspect`.

Generates ``--cases`` seeded hostile cases (see lineage/testing/fuzz.py: safetensors, GGUF,
PEFT folders, shards + index, .bin/.pt, JSON side files), runs each in a forked child with a
time limit and an address-space limit (benchmarks/fuzzrun.py), and writes counts per
family (cases, typed errors, verdicts, wrong verdicts, crashes, hangs, blow-ups) to
benchmarks/results/fuzz.json, with every failing case and how to replay it.

    .venv/bin/python benchmarks/fuzz_campaign.py --cases 5000 --seed 7 --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "fuzz.json"
OUTCOMES = ("typed", "verdict", "wrong", "crash", "hang", "blowup")


def run_workers(seed: int, cases: int, workers: int, timeout: float, allowance_mb: int,
                workdir: Path) -> list[dict]:
    """Split ``cases`` over ``workers`` fuzzrun processes; return every case's JSON record."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MALLOC_ARENA_MAX="2",
               HF_HUB_CACHE=str(workdir / "hf"))
    per = -(-cases // workers)
    procs = []
    for w in range(workers):
        start, count = w * per, min(per, cases - w * per)
        if count <= 0:
            continue
        out = open(workdir / f"worker{w}.jsonl", "w")
        cmd = [sys.executable, str(Path(__file__).with_name("fuzzrun.py")), "--seed", str(seed), "--start", str(start),
               "--count", str(count), "--workdir", str(workdir / f"w{w}"), "--timeout", str(timeout),
               "--allowance-mb", str(allowance_mb)]
        procs.append((subprocess.Popen(cmd, stdout=out, env=env), out))
    for p, out in procs:
        p.wait()
        out.close()
    records = []
    for w in range(workers):
        f = workdir / f"worker{w}.jsonl"
        if f.exists():
            records += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return records


def summarise(records: list[dict]) -> dict:
    """Counts per family and outcome, plus the failing cases."""
    fams: dict[str, Counter] = defaultdict(Counter)
    kinds: dict[str, Counter] = defaultdict(Counter)
    failures = []
    for r in records:
        fam = r["case"]["family"]
        fams[fam]["cases"] += 1
        fams[fam][r["outcome"]] += 1
        kinds[f"{fam}/{r['case']['kind']}"][r["outcome"]] += 1
        if r["outcome"] not in ("typed", "verdict"):
            failures.append(r)
    table = {f: {"cases": c["cases"], **{o: c[o] for o in OUTCOMES}} for f, c in sorted(fams.items())}
    total = {k: sum(t[k] for t in table.values()) for k in ("cases", *OUTCOMES)}
    return {"per_family": table, "total": total,
            "per_kind": {k: dict(v) for k, v in sorted(kinds.items())}, "failures": failures}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=25.0, help="seconds per command")
    ap.add_argument("--allowance-mb", type=int, default=1024, help="address space per command beyond the warm worker's")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--workdir", type=Path, help="keep the workers' JSON lines here (default: a temporary folder)")
    ap.add_argument("--summarise-only", action="store_true", help="summarise --workdir's JSON lines, run nothing")
    a = ap.parse_args()
    t0 = time.time()
    if a.summarise_only:
        records = [json.loads(line) for f in sorted(a.workdir.glob("worker*.jsonl"))
                   for line in f.read_text().splitlines() if line.strip()]
    elif a.workdir is not None:
        a.workdir.mkdir(parents=True, exist_ok=True)
        records = run_workers(a.seed, a.cases, a.workers, a.timeout, a.allowance_mb, a.workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="lineage-fuzz-") as wd:
            records = run_workers(a.seed, a.cases, a.workers, a.timeout, a.allowance_mb, Path(wd))
    summary = summarise(records)
    result = {"schema": "lineage.fuzz/1", "seed": a.seed, "cases_requested": a.cases,
              "workers": a.workers, "timeout_s": a.timeout, "allowance_mb": a.allowance_mb,
              "wall_s": round(time.time() - t0, 1),
              "replay": "python benchmarks/fuzzrun.py --seed SEED --start INDEX --count 1 --keep --workdir DIR",
              **summary}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({"seed": a.seed, "wall_s": result["wall_s"], "total": summary["total"],
                      "per_family": summary["per_family"]}, indent=1))
    for f in summary["failures"][:20]:
        print(f["case"]["index"], f["case"]["family"], f["case"]["kind"], f["outcome"],
              f["compare"]["detail"][:200], "|", f["inspect"]["detail"][:200])


if __name__ == "__main__":
    main()
