#!/bin/bash
# The GPU checks of issues 13 and 17, for a fresh GPU machine holding only this checkout (no network).
#
#   bash benchmarks/gpu_check.sh                      # every phase (about 6-8 minutes on an H200)
#   PHASES=kernels,agree bash benchmarks/gpu_check.sh # a subset
#
# Set-up without network: the machine's python3 already has torch (CUDA), triton, numpy, scipy, safetensors,
# click, huggingface-hub, tqdm, matplotlib and pytest; the few pure-Python/binary dependencies it lacks travel
# as wheels in benchmarks/wheels/ (fill it here first: sh benchmarks/fetch_wheels.sh; carry that folder) and
# are unpacked into a private folder; lineage itself is imported from the checkout (no install).
# Phases:
#   kernels  Triton kernels compiled on the GPU against their float64 references, then
#            `lineage bench --device cuda --json --html` (benchmarks/gpu_kernels.sh)
#   agree    the cuda-vs-cpu agreement tests of the compare (statistics to 1e-5 relative, same verdict)
#   compare  builds the 1.1B-shaped bf16 pairs, then benchmarks/bench_compare.py --device cuda (one table)
# Each phase runs under `timeout` (KERNELS_TIMEOUT, AGREE_TIMEOUT, seconds) so that one slow phase cannot eat the
# others' time. Results go to $OUT (default benchmarks/results): bench_kernels.{json,txt,html}, gpu_check_*.txt,
# bench_compare_cuda.json.
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
PY="${PYTHON:-python3}"
PHASES="${PHASES:-kernels,agree,compare}"
CHILDREN="${CHILDREN:-noise,no-canon,finetune,lora16-qv}"
RUNS="${RUNS:-1}"
export OUT="${OUT:-benchmarks/results}"
export LINEAGE_CACHE="${LINEAGE_CACHE:-/tmp/lineage-cache}"
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
elapsed() { echo "[$(( $(date +%s) - START )) s] $*"; }
has() { case ",$PHASES," in *",$1,"*) return 0;; *) return 1;; esac; }
status=0

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
SITE="$(mktemp -d)"
WHEELS="${WHEELS:-benchmarks/wheels}"
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$WHEELS"/*.whl \
        || { echo "wheel install failed"; exit 2; }
fi
ln -s "$PWD/kernels" "$SITE/lineage_kernels"
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$SITE/bin"
printf '#!/bin/sh\nexec "%s" -m lineage "$@"\n' "$(command -v "$PY")" > "$SITE/bin/lineage"
chmod +x "$SITE/bin/lineage"
export PATH="$SITE/bin:$PATH"
"$PY" -c "import torch, triton, lineage, lineage_kernels; import os; assert torch.cuda.is_available() or os.environ.get('REQUIRE_CUDA') == '0', 'no CUDA device';
print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')" || exit 2
elapsed "set up"

if has kernels; then
    PY="$PY" timeout "${KERNELS_TIMEOUT:-200}" bash benchmarks/gpu_kernels.sh 2>&1 | tee "$OUT/gpu_check_kernels.txt" || status=1
    elapsed "kernels done"
fi
if has agree; then
    LINEAGE_TEST_DEVICE=cuda timeout "${AGREE_TIMEOUT:-120}" "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_screen.py -k cuda 2>&1 \
        | tee "$OUT/gpu_check_agreement.txt" || status=1
    elapsed "agreement test done"
fi
if has compare; then
    "$PY" benchmarks/bench_compare.py --build-only --children "$CHILDREN" || status=1
    elapsed "pairs built"
    "$PY" benchmarks/bench_compare.py --device cuda --runs "$RUNS" --children "$CHILDREN" --no-peers \
        2>&1 | tee "$OUT/gpu_check_table.txt" || status=1
    [ "$OUT" = benchmarks/results ] || cp benchmarks/results/bench_compare_cuda.json "$OUT/" || status=1
    elapsed "compare benchmark done"
fi
elapsed "gpu_check finished (status $status)"
exit $status
