#!/usr/bin/env bash
# GPU kernel checks (issue 17), called by benchmarks/gpu_check.sh on the CUDA machine:
# the Triton kernels compiled on the GPU against their float64 references, then
# `lineage bench --device cuda` (limits + every kernel, 1B..70B layer sizes).
# Writes $OUT/bench_kernels.json, .html and .txt (default OUT=benchmarks/results).  ~2-3 min on an H200.
# Needs only python with torch + triton (+ pytest for the tests, matplotlib for the HTML page): the
# package need not be installed (the tree is imported in place), and without click the benchmark runs
# through lineage.bench directly instead of the CLI.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
PY="${PY:-.venv/bin/python}"
[ -x "$PY" ] || PY=python
mkdir -p "$OUT"
# Not installed (offline GPU machine)? Import the tree in place: lineage/ from the root, kernels/ as lineage_kernels.
if ! "$PY" -c "import lineage_kernels, lineage" 2>/dev/null; then
    SHIM="$(mktemp -d)"; ln -s "$PWD/kernels" "$SHIM/lineage_kernels"
    export PYTHONPATH="$PWD:$SHIM${PYTHONPATH:+:$PYTHONPATH}"
    echo "gpu_kernels: package not installed; importing the tree in place (PYTHONPATH shim)"
fi
"$PY" -c "import torch, triton; assert torch.cuda.is_available(), 'no CUDA device visible to torch'; \
print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(0))"
if "$PY" -c "import pytest" 2>/dev/null; then
    LINEAGE_TEST_DEVICE=cuda "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels_triton.py \
        | tee "$OUT/bench_kernels_tests.txt"
else
    echo "gpu_kernels: pytest not installed: cuda-vs-reference tests SKIPPED" | tee "$OUT/bench_kernels_tests.txt"
fi
HTML=(--html "$OUT/bench_kernels.html")
"$PY" -c "import matplotlib" 2>/dev/null || { HTML=(); echo "gpu_kernels: no matplotlib, no HTML page"; }
if "$PY" -c "import click, lineage.cli" 2>/dev/null; then
    "$PY" -m lineage.cli bench --device cuda --json "${HTML[@]}" > "$OUT/bench_kernels.json"
else
    echo "gpu_kernels: lineage.cli not importable (missing dependencies): running lineage.bench directly"
    "$PY" - "$OUT/bench_kernels.json" "${HTML[@]}" <<'PYEOF'
import json, sys
from lineage.bench import BenchConfig, render_html, run_bench, to_dict
report = run_bench(BenchConfig(device="cuda"))
with open(sys.argv[1], "w") as f:
    json.dump(to_dict(report), f, indent=2)
if len(sys.argv) > 3:
    with open(sys.argv[3], "w") as f:
        f.write(render_html(report))
PYEOF
fi
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
