#!/usr/bin/env bash
# GPU kernel checks (issue 17), called by benchmarks/gpu_check.sh on the CUDA machine:
# the Triton kernels compiled on the GPU against their float64 references, then
# `lineage bench --device cuda` (limits + every kernel, 1B..70B layer sizes).
# Writes $OUT/bench_kernels.json and $OUT/bench_kernels.txt.  ~2-3 min on an H200.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
PY="${PY:-.venv/bin/python}"
[ -x "$PY" ] || PY=python
# Not installed (offline GPU machine)? Import the tree in place: lineage/ from the root, kernels/ as lineage_kernels.
if ! "$PY" -c "import lineage_kernels, lineage" 2>/dev/null; then
    SHIM="$(mktemp -d)"; ln -s "$PWD/kernels" "$SHIM/lineage_kernels"
    export PYTHONPATH="$PWD:$SHIM${PYTHONPATH:+:$PYTHONPATH}"
fi
LINEAGE_TEST_DEVICE=cuda "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels_triton.py
"$PY" -m lineage.cli bench --device cuda --json --html "$OUT/bench_kernels.html" > "$OUT/bench_kernels.json"
"$PY" - "$OUT/bench_kernels.json" > "$OUT/bench_kernels.txt" <<'PYEOF'
import json, sys
d = json.load(open(sys.argv[1]))
lim = d["limits"]
print(f"{lim['device_name']}: copy {lim['copy_bytes_per_s']/1e9:.0f} GB/s, matmul {lim['matmul_flops_per_s']/1e12:.0f} TFLOP/s")
for r in d["results"]:
    if r["skipped"]:
        print(r["kernel"], r["variant"], r["size"], "skipped:", r["skipped"]); continue
    print(f"{r['kernel']:<8} {r['variant']:<14} {r['size']:>5} {r['wall_s']*1e3:9.3f} ms "
          f"{r['bytes_per_s']/1e9:8.1f} GB/s {100*r['fraction']:5.1f} % of roofline")
PYEOF
cat "$OUT/bench_kernels.txt"
