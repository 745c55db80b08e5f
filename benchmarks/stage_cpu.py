"""CPU seconds per stage of one `lineage.compare` call (wraps the stage functions, so it runs on any tree).

    python benchmarks/stage_cpu.py A B [--no-canon]            # this tree
    PYTHONPATH=/path/to/other/checkout python benchmarks/stage_cpu.py A B   # another tree (e.g. main)
"""
import json, sys, time, resource
import lineage.compare as C
from lineage.compare import compare, CompareOptions
cpu = {}
def wrap(name):
    f = getattr(C, name)
    def g(*a, **k):
        t = time.process_time()
        try:
            return f(*a, **k)
        finally:
            cpu[name] = cpu.get(name, 0.0) + time.process_time() - t
    setattr(C, name, g)
for n in ("_reduce_blocks", "_canonical", "_anatomy", "_realigned_anatomy"):
    wrap(n)
canon = "--no-canon" not in sys.argv
t = time.process_time(); w = time.perf_counter()
r = compare(sys.argv[1], sys.argv[2], options=CompareOptions(canonicalise=canon))
an = r.anatomy or {}
print(json.dumps({"cpu_total_s": round(time.process_time() - t, 2), "wall_s": round(time.perf_counter() - w, 1),
                  "cpu_stages_s": {k: round(v, 2) for k, v in cpu.items()}, "relation": an.get("relation"),
                  "summary": an.get("summary"), "exact_reads": an.get("exact_reads"),
                  "bytes_read": [r.a.bytes_read, r.b.bytes_read], "verdict": r.verdict.relation,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
