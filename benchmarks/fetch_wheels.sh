#!/bin/sh
# Download the wheels of the dependencies that the GPU machine's image lacks into benchmarks/wheels/ (git-ignored),
# so that benchmarks/gpu_check.sh runs there without network. That image's python3 (3.12) already holds torch,
# triton, numpy, scipy, safetensors, click, huggingface-hub, tqdm, matplotlib, pytest and hypothesis
# (/work/.library/device/KINDS.md lists it); the versions below are the ones the test suite runs with here.
# Run here, on a machine with network; pass `carry: ["benchmarks/wheels"]` to the device call.
#   sh benchmarks/fetch_wheels.sh [python-version, default 3.12]
set -eu
cd "$(dirname "$0")/.."
PYV="${1:-3.12}"
mkdir -p benchmarks/wheels
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d benchmarks/wheels \
    gguf==0.19.0 blake3==1.0.11 usearch==2.26.6 numkong==7.8.6 \
    jsonschema==4.26.0 referencing==0.37.0 jsonschema-specifications==2025.9.1 rpds-py==2026.9.1
ls benchmarks/wheels | wc -l
du -sh benchmarks/wheels
