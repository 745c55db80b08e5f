"""Shared helpers for benchmark scripts: cache folder, timing of whole commands, peak RSS."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from lineage.io.writer import SafetensorsWriter

REPO = Path(__file__).resolve().parent.parent


def cache_dir(*parts: str) -> Path:
    """Lineage's cache folder (:func:`lineage.io.cachedir.cache_root`) joined with ``parts`` (created)."""
    from lineage.io.cachedir import cache_path

    return cache_path(*parts, create=True)


def run_measured(argv: list[str], stdout=subprocess.DEVNULL) -> tuple[float, int]:
    """Run ``argv`` in a fresh child; return (wall seconds, peak RSS in bytes of that child)."""
    probe = (
        "import resource, subprocess, sys, time\n"
        "t = time.perf_counter()\n"
        "r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL)\n"
        "dt = time.perf_counter() - t\n"
        "print(dt, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r.returncode)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, check=True)
    dt, rss_kb, rc = out.stdout.split()
    if int(rc) != 0:
        raise RuntimeError(f"command failed ({rc}): {' '.join(argv)}")
    return float(dt), int(rss_kb) * 1024


def median_runs(argv: list[str], runs: int) -> dict[str, float]:
    """Median wall time and peak RSS over ``runs`` runs (one warm-up run first)."""
    run_measured(argv)
    res = [run_measured(argv) for _ in range(runs)]
    return {
        "wall_s": statistics.median(r[0] for r in res),
        "peak_rss_mb": statistics.median(r[1] for r in res) / 2**20,
        "runs": runs,
    }


def llama_specs(hidden: int, layers: int, inter: int, heads: int, kv: int, vocab: int) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a Llama-architecture checkpoint, in file order."""
    hd = hidden // heads
    s: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        s.update({
            p + "input_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (hidden, hidden),
            p + "self_attn.k_proj.weight": (kv * hd, hidden),
            p + "self_attn.v_proj.weight": (kv * hd, hidden),
            p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "post_attention_layernorm.weight": (hidden,),
            p + "mlp.gate_proj.weight": (inter, hidden),
            p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
        })
    s["model.norm.weight"] = (hidden,)
    s["lm_head.weight"] = (vocab, hidden)
    return s


TINYLLAMA = dict(hidden=2048, layers=22, inter=5632, heads=32, kv=4, vocab=32000)


def build_llama_pair(folder: Path, noise: float = 0.01, seed: int = 0, shape: dict | None = None) -> tuple[Path, Path]:
    """A base and base+noise pair of BF16 Llama-shaped checkpoints, written tensor by tensor (cached)."""
    shape = shape or TINYLLAMA
    a_dir, b_dir = folder / "base", folder / "noisy"
    stamp = folder / "done.json"
    recipe = {"shape": shape, "noise": noise, "seed": seed, "version": 1}
    if stamp.exists() and json.loads(stamp.read_text()) == recipe:
        return a_dir, b_dir
    a_dir.mkdir(parents=True, exist_ok=True)
    b_dir.mkdir(parents=True, exist_ok=True)
    specs = llama_specs(**shape)
    decl = {n: (torch.bfloat16, s) for n, s in specs.items()}
    g = torch.Generator().manual_seed(seed)
    with SafetensorsWriter(a_dir / "model.safetensors", decl) as wa, SafetensorsWriter(b_dir / "model.safetensors", decl) as wb:
        for name, s in specs.items():
            if len(s) == 1:
                base = 1.0 + 0.1 * torch.randn(s, generator=g)
            else:
                base = torch.randn(s, generator=g) * (1.0 / s[1] ** 0.5)
            child = base + noise * base.std() * torch.randn(s, generator=g)
            wa.write(name, base.bfloat16())
            wb.write(name, child.bfloat16())
            del base, child
    cfg = {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": shape["hidden"],
        "num_hidden_layers": shape["layers"], "intermediate_size": shape["inter"],
        "num_attention_heads": shape["heads"], "num_key_value_heads": shape["kv"], "vocab_size": shape["vocab"],
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    }
    for d in (a_dir, b_dir):
        (d / "config.json").write_text(json.dumps(cfg, indent=1))
    stamp.write_text(json.dumps(recipe))
    return a_dir, b_dir


def write_result(name: str, result: dict) -> Path:
    """Write a benchmark's JSON result under benchmarks/results/."""
    out = REPO / "benchmarks" / "results" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return out


def now() -> float:
    return time.perf_counter()
