"""Benchmark: whole-process `lineage compare` on a TinyLlama-1.1B-shaped BF16 pair.

Reports medians of several runs: wall time and peak RSS of `lineage compare`, the
floor (`cat A B > /dev/null` on a warm page cache), `import torch` alone, and a
naive baseline (load each tensor, `.float()`, cosine), with their ratios.

    python benchmarks/bench_compare.py [--runs 3] [--mode elementwise|full]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, TINYLLAMA, build_llama_pair, cache_dir, median_runs, write_result  # noqa: E402


@dataclass(frozen=True)
class BenchConfig:
    runs: int = 3
    noise: float = 0.01
    seed: int = 0
    mode: str = "elementwise"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--mode", choices=["elementwise", "full"], default="elementwise",
                    help="elementwise: --no-canon; full: the canonicalised comparison")
    args = ap.parse_args()
    cfg = BenchConfig(runs=args.runs, mode=args.mode)
    a, b = build_llama_pair(cache_dir("bench", "tinyllama-pair"), cfg.noise, cfg.seed)
    fa, fb = a / "model.safetensors", b / "model.safetensors"
    lineage = shutil.which("lineage", path=str(Path(sys.executable).parent)) or "lineage"
    cmd = [lineage, "compare", str(a), str(b), "--json", "--no-progress"]
    if cfg.mode == "elementwise":
        cmd.append("--no-canon")
    res = {
        "config": asdict(cfg),
        "shape": TINYLLAMA,
        "bytes_per_model": fa.stat().st_size,
        "machine": {"cpu_count": __import__("os").cpu_count(), "platform": platform.platform()},
        "floor_cat": median_runs(["sh", "-c", f"cat '{fa}' '{fb}' > /dev/null"], cfg.runs),
        "import_torch": median_runs([sys.executable, "-c", "import torch"], cfg.runs),
        "lineage_compare": median_runs(cmd, cfg.runs),
        "naive_loop": median_runs([sys.executable, str(REPO / "benchmarks" / "naive_compare.py"), str(fa), str(fb)], cfg.runs),
    }
    floor = res["floor_cat"]["wall_s"]
    res["ratios"] = {
        "lineage_over_floor": res["lineage_compare"]["wall_s"] / floor,
        "naive_over_lineage": res["naive_loop"]["wall_s"] / res["lineage_compare"]["wall_s"],
    }
    out = write_result(f"bench_compare_{cfg.mode}", res)
    print(json.dumps(res, indent=2))
    print(f"written to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
