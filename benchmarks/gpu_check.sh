#!/bin/bash
# GPU check of issue 13, for a fresh GPU machine holding only this checkout (no network), in about 6 minutes:
# installs the package from wheels carried in benchmarks/wheels/ (fill it here first: sh benchmarks/fetch_wheels.sh;
# torch, CUDA and triton come with the machine), builds the TinyLlama-1.1B-shaped pairs, runs the benchmark's GPU
# mode and the cuda-vs-cpu agreement test, and prints one table.
#   bash benchmarks/gpu_check.sh            (CHILDREN=noise,no-canon,... to choose; RUNS=1 by default)
set -euo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
PY="${PYTHON:-python3}"
VENV="${VENV:-.gpuvenv}"
export LINEAGE_CACHE="${LINEAGE_CACHE:-/tmp/lineage-cache}"
CHILDREN="${CHILDREN:-noise,no-canon,finetune,lora16-qv}"
RUNS="${RUNS:-1}"
OUT="${OUT:-benchmarks/results}"
elapsed() { echo "[$(( $(date +%s) - START )) s] $*"; }

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
"$PY" -m venv --system-site-packages "$VENV"
"$VENV/bin/pip" install -q --no-index --find-links benchmarks/wheels --no-build-isolation -e . pytest jsonschema
"$VENV/bin/python" -c "import torch, lineage; assert torch.cuda.is_available(), 'no CUDA device'; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
elapsed "installed"

# 1. the pairs (cached under $LINEAGE_CACHE/bench), then the benchmark's GPU mode (one table)
"$VENV/bin/python" benchmarks/bench_compare.py --build-only --children "$CHILDREN"
elapsed "pairs built"
"$VENV/bin/python" benchmarks/bench_compare.py --device cuda --runs "$RUNS" --children "$CHILDREN" --no-peers \
    | tee "$OUT/gpu_check_table.txt"
elapsed "benchmark done"

# 2. cuda and cpu reports agree (statistics to 1e-5 relative, same verdict and relation)
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_screen.py -k cuda -rs | tee "$OUT/gpu_check_agreement.txt"
elapsed "agreement test done"

# 3. ---- issue 17 (kernels): `lineage bench --device cuda --json` goes here ----
# "$VENV/bin/lineage" bench --device cuda --json > "$OUT/gpu_check_kernels.json"
# ---------------------------------------------------------------------------------

elapsed "gpu_check finished"
