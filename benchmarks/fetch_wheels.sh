#!/bin/sh
# Download the pure-Python (and binary) wheels that lineage needs besides torch into benchmarks/wheels/
# (git-ignored), so that benchmarks/gpu_check.sh can install the package on a machine without network.
# Run here, on a machine with network; carry benchmarks/wheels/ with the checkout.
#   sh benchmarks/fetch_wheels.sh [python-version, default 3.11]
set -eu
cd "$(dirname "$0")/.."
PYV="${1:-3.11}"
PIP="${PIP:-.venv/bin/pip}"
mkdir -p benchmarks/wheels
# the runtime dependencies (torch comes with the GPU machine) and pytest for the agreement test
$PIP download -q -d benchmarks/wheels --only-binary=:all: --python-version "$PYV" \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    "numpy>=1.24" "scipy>=1.10" "safetensors>=0.4" "click>=8.1" "huggingface-hub>=0.23" "gguf>=0.10" "numba>=0.59" \
    "pytest>=7" "jsonschema>=4" setuptools wheel
ls benchmarks/wheels | wc -l
