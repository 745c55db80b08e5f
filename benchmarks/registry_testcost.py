"""What a registry entry and a candidate test cost at TinyLlama size (22 layers), from local disk.

    python benchmarks/registry_testcost.py

The TinyLlama-1.1B-shaped BF16 pair of ``bench_compare.py`` (built once, cached): CPU seconds to
fingerprint one model, to derive its retrieval key, and of one calibrated fingerprint test
(:func:`lineage.fingerprint.compare_fingerprints`) — what a query pays per candidate at that size;
plus the fingerprint's size and the two keys' cosine.  Writes benchmarks/results/registry_testcost.json.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import torch

from lineage.fingerprint import compare_fingerprints
from lineage.fingerprint_workflow import fingerprint_bytes, fingerprint_model
from lineage.registry.keys import retrieval_key

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import build_llama_pair, cache_dir, write_result  # noqa: E402


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    torch.set_num_threads(1)
    a_dir, b_dir = build_llama_pair(cache_dir("bench", "tinyllama-pair"))
    c = _cpu()
    fa, _ = fingerprint_model(str(a_dir))
    fp_cpu = _cpu() - c
    fb, _ = fingerprint_model(str(b_dir))
    c = _cpu()
    ka = retrieval_key(fa)
    key_cpu = _cpu() - c
    c = _cpu()
    r = compare_fingerprints(fa, fb)
    test_cpu = _cpu() - c
    res = {"layers": fa.n_layers, "probes": fa.m, "fingerprint_cpu_s": fp_cpu, "key_cpu_s": key_cpu,
           "test_cpu_s": test_cpu, "test_log10_p": r.log10_p, "fingerprint_bytes": len(fingerprint_bytes(fa)),
           "key_cos_base_noisy": float(ka @ retrieval_key(fb))}
    write_result("registry_testcost", res)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
