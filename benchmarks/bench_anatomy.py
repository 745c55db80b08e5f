"""Benchmark: streamed derivation anatomy (LoRA rank, modules, quantisation) on TinyLlama-1.1B-shaped pairs.

Builds once (cached in ``~/.cache/lineage/bench/tinyllama-anatomy``, deterministic, written tensor by
tensor) children of the BF16 TinyLlama-shaped base of ``bench_compare.py``:

* ``lora16-qv-bf16``  — base + a merged rank-16 LoRA on ``q_proj`` and ``v_proj`` of every layer, BF16;
* ``lora16-all-bf16`` — base + a merged rank-16 LoRA on all seven linear modules of every layer, BF16;
* ``lora16-qv-int8``  — ``lora16-qv-bf16`` quantised int8 per output row (every 2-D tensor, stored
  dequantised in float32, as the zoo's int8 children are).

Each LoRA delta follows :func:`lineage.testing.derive.lora_merge` (random ``B @ A`` with a decaying
spectrum, ``σ_i ∝ 1/√i``) with ‖δ‖ = ``scale`` × ‖W‖ per module.  Then runs ``lineage compare base child
--json`` end to end in a fresh process per child and reports wall time, the anatomy stage's own time
(``anatomy.details.timing_s``), peak RSS, the typed relation, recovered rank and modules against the truth.

    python benchmarks/bench_anatomy.py [--mode elementwise|full] [--children lora16-qv-bf16,...]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import TINYLLAMA, build_llama_pair, cache_dir, llama_specs, write_result  # noqa: E402

from lineage.io.checkpoint import open_checkpoint  # noqa: E402
from lineage.io.writer import SafetensorsWriter  # noqa: E402

log = logging.getLogger("bench_anatomy")

QV = ("q_proj", "v_proj")
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ROLE_OF = {"q_proj": "attn.q", "k_proj": "attn.k", "v_proj": "attn.v", "o_proj": "attn.o",
           "gate_proj": "mlp.gate", "up_proj": "mlp.up", "down_proj": "mlp.down"}


@dataclass(frozen=True)
class Child:
    name: str
    rank: int
    modules: tuple[str, ...]
    quant: str | None  # None or "int8-per-row"


CHILDREN = {
    "lora16-qv-bf16": Child("lora16-qv-bf16", 16, QV, None),
    "lora16-qv-int8": Child("lora16-qv-int8", 16, QV, "int8-per-row"),
    "lora16-all-bf16": Child("lora16-all-bf16", 16, ALL, None),
}


@dataclass(frozen=True)
class BenchConfig:
    mode: str = "elementwise"
    scale: float = 0.02     # ‖δ‖ / ‖W‖ per touched module
    seed: int = 1
    version: int = 1


def _lora_delta(W: torch.Tensor, rank: int, scale: float, g: torch.Generator) -> torch.Tensor:
    n_out, n_in = W.shape
    A = torch.randn(rank, n_in, generator=g, dtype=torch.float64) / math.sqrt(n_in)
    B = torch.randn(n_out, rank, generator=g, dtype=torch.float64)
    B = B * (1.0 / (1.0 + torch.arange(rank, dtype=torch.float64)))[None, :] ** 0.5
    d = B @ A
    return d * (scale * W.norm() / d.norm().clamp_min(1e-30))


def _int8_rows(w: torch.Tensor) -> torch.Tensor:
    s = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127.0
    return torch.round(w / s).clamp(-127, 127) * s


def build_child(base_dir: Path, folder: Path, child: Child, cfg: BenchConfig) -> Path:
    """Write ``child`` of the base under ``folder/child.name`` (cached by a recipe stamp)."""
    out = folder / child.name
    stamp = out / "done.json"
    recipe = json.loads(json.dumps({"child": asdict(child), "scale": cfg.scale, "seed": cfg.seed,
                                     "version": cfg.version, "shape": TINYLLAMA}))
    if stamp.exists() and json.loads(stamp.read_text()) == recipe:
        return out
    out.mkdir(parents=True, exist_ok=True)
    specs = llama_specs(**TINYLLAMA)
    dtype = torch.float32 if child.quant else torch.bfloat16
    decl = {n: (dtype, s) for n, s in specs.items()}
    base = open_checkpoint(str(base_dir))
    g = torch.Generator().manual_seed(cfg.seed)
    t0 = time.perf_counter()
    with SafetensorsWriter(out / "model.safetensors", decl) as w:
        for name, s in specs.items():
            x = base.read(name).double()
            mod = name.split(".")[-2]
            if len(s) == 2 and mod in child.modules:
                x = x + _lora_delta(x, child.rank, cfg.scale, g)
                x = x.to(torch.bfloat16).double()  # the merged LoRA child is a BF16 checkpoint
            if child.quant == "int8-per-row" and len(s) == 2:
                x = _int8_rows(x)
            w.write(name, x.to(dtype))
            del x
    base.close()
    cfgj = json.loads((base_dir / "config.json").read_text())
    cfgj["torch_dtype"] = "float32" if child.quant else "bfloat16"
    (out / "config.json").write_text(json.dumps(cfgj, indent=1))
    stamp.write_text(json.dumps(recipe))
    log.info("built %s in %.0f s", child.name, time.perf_counter() - t0)
    return out


def expected_modules(child: Child, layers: int) -> list[str]:
    return sorted(f"L{i}.{ROLE_OF[m]}.weight" for i in range(layers) for m in child.modules)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--mode", choices=["elementwise", "full"], default="full",
                    help="full: the default compare (canonical test, then the anatomy); elementwise: --no-canon, "
                         "which since issue 13 is the element-wise comparison alone (no anatomy)")
    ap.add_argument("--children", default=",".join(CHILDREN), help="comma-separated subset of " + ",".join(CHILDREN))
    ap.add_argument("--build-only", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = BenchConfig(mode=args.mode)
    base_dir, _ = build_llama_pair(cache_dir("bench", "tinyllama-pair"))
    folder = cache_dir("bench", "tinyllama-anatomy")
    names = [c for c in args.children.split(",") if c]
    dirs = {n: build_child(base_dir, folder, CHILDREN[n], cfg) for n in names}
    if args.build_only:
        return
    lineage = shutil.which("lineage", path=str(Path(sys.executable).parent)) or "lineage"
    results = {}
    for n in names:
        child = CHILDREN[n]
        cmd = [lineage, "compare", str(base_dir), str(dirs[n]), "--json", "--no-progress"]
        if cfg.mode == "elementwise":
            cmd.append("--no-canon")
        # Peak RSS of RUSAGE_CHILDREN is a running maximum: measure each child in its own probe process.
        probe = ("import json, resource, subprocess, sys, time\n"
                 "t = time.perf_counter(); r = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
                 "print(json.dumps({'wall': time.perf_counter() - t, 'rc': r.returncode, 'err': r.stderr[-2000:],\n"
                 "  'rss': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,\n"
                 "  'cpu': resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime + resource.getrusage(resource.RUSAGE_CHILDREN).ru_stime,\n"
                 "  'out': r.stdout}))\n")
        pr = subprocess.run([sys.executable, "-c", probe, *cmd], capture_output=True, text=True, check=True)
        o = json.loads(pr.stdout)
        if o["rc"] != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({o['rc']}): {o['err']}")
        rep = json.loads(o["out"])
        an = rep.get("anatomy") or {}
        det = an.get("details", {}) or {}
        want = expected_modules(child, TINYLLAMA["layers"])
        got = sorted(det.get("modules") or [])
        results[n] = {
            "truth": {"rank": child.rank, "modules": list(child.modules), "quant": child.quant,
                      "n_modules": len(want)},
            "wall_s": o["wall"],
            "cpu_s": o["cpu"],  # user + system CPU of the whole process (robust to other load on the machine)
            "peak_rss_mb": o["rss"] / 2**20,
            "timing": rep.get("timing"),
            "anatomy_s": an.get("timing_s"),
            "relation": an.get("relation"),
            "parent": an.get("parent"),
            "rank": det.get("rank"),
            "n_modules": len(got),
            "modules_exact": got == want,
            "rank_exact": det.get("rank") == child.rank,
            "quant_format": det.get("quant_format"),
            "summary": an.get("summary"),
            "verdict": (rep.get("verdict") or {}).get("relation"),
        }
        log.info("%s: %s", n, json.dumps(results[n]))
    res = {
        "load_average_at_end": os.getloadavg(),
        "config": asdict(cfg),
        "shape": TINYLLAMA,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
        "children": results,
    }
    out = write_result(f"bench_anatomy_{cfg.mode}" if cfg.mode != "elementwise" else "bench_anatomy", res)
    print(json.dumps(res, indent=2))
    print(f"written to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
