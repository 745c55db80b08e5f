"""Held-out null calibration: independently trained models the test was NOT calibrated on.

The canonical test's z-inflation factor was fitted on the full zoo's independent pairs.  This
script trains fresh independent models with another width, depth, learning rate, step count and
training text (stdlib docstrings instead of the language reference), then compares every pair
and reports the p-value distribution.  Validity needs P(p <= a) <= a.

    python benchmarks/holdout_null.py [--per-family 10] [--steps 150] [--zoo PATH]

``--zoo PATH`` takes the tokenizer and text from an already built full zoo instead of calling
``cached_zoo("full")`` (lineage.testing.zoocache).  The fingerprint test's held-out null is run by
``benchmarks/fingerprint_accuracy.py --holdout`` over the same cached models.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from scipy import stats

from lineage.compare import compare
from lineage.testing.bpe import BPETokenizer
from lineage.testing.models import TinyConfig, init_weights, save_model
from lineage.testing.train import Schedule, train
from lineage.testing.zoocache import cached_zoo  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cache_dir, write_result  # noqa: E402


@dataclass(frozen=True)
class HoldoutConfig:
    per_family: int = 10
    steps: int = 150
    lr: float = 2e-3
    seed0: int = 9001
    version: int = 1


def _configs(vocab: int) -> dict[str, TinyConfig]:
    return {
        "llama": TinyConfig(family="llama", vocab=vocab, hidden=64, n_layers=3, n_heads=4, n_kv_heads=2,
                            intermediate=176, max_pos=128),
        "gpt2": TinyConfig(family="gpt2", vocab=vocab, hidden=80, n_layers=3, n_heads=4, n_kv_heads=4,
                           intermediate=320, max_pos=128, tie_embeddings=True),
    }


def build(cfg: HoldoutConfig, zoo_root: Path | None = None) -> dict[str, list[Path]]:
    """Train (or reuse from the cache) the held-out models; ``zoo_root`` is a built full zoo (its tokenizer and text)."""
    data = (Path(zoo_root) if zoo_root is not None else cached_zoo("full").root) / "data"
    tok = BPETokenizer.load(data)
    ids = torch.load(data / "docstrings.pt", weights_only=True)
    out = cache_dir("holdout", f"v{cfg.version}-{cfg.per_family}-{cfg.steps}-{cfg.lr}-{cfg.seed0}")
    models: dict[str, list[Path]] = {}
    for fam, mc in _configs(len(tok)).items():
        models[fam] = []
        for k in range(cfg.per_family):
            d = out / f"{fam}-{k:02d}"
            if not (d / "model.safetensors").exists():
                seed = cfg.seed0 + 1000 * (fam == "gpt2") + k
                w, _ = train(mc, init_weights(mc, seed), ids, Schedule(steps=cfg.steps, lr=cfg.lr), seed)
                save_model(d, mc, w, tok)
            models[fam].append(d)
    return models


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--per-family", type=int, default=HoldoutConfig.per_family)
    ap.add_argument("--steps", type=int, default=HoldoutConfig.steps)
    ap.add_argument("--zoo", type=Path, help="an already built full zoo folder (opened as is)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = HoldoutConfig(per_family=args.per_family, steps=args.steps)
    t0 = time.perf_counter()
    models = build(cfg, args.zoo)
    t_build = time.perf_counter() - t0
    rows = []
    for fam, paths in models.items():
        for x, y in itertools.combinations(paths, 2):
            r = compare(x, y)
            rows.append({"family": fam, "a": x.name, "b": y.name, "p": r.verdict.p_value, "log10_p": r.verdict.log10_p,
                         "relation": r.verdict.relation})
    ps = [r["p"] for r in rows]
    anti = stats.kstest(ps, "uniform", alternative="greater")
    res = {
        "config": asdict(cfg), "pairs": len(rows), "build_seconds": t_build,
        "min_p": min(ps), "fraction_p_le_0.05": sum(p <= 0.05 for p in ps) / len(ps),
        "fraction_p_le_0.01": sum(p <= 0.01 for p in ps) / len(ps),
        "called_derived": sum(r["relation"] not in ("unrelated", "inconclusive") for r in rows),
        "ks_anticonservative": {"statistic": float(anti.statistic), "p": float(anti.pvalue)},
        "rows": rows,
    }
    write_result("holdout_null", res)
    print(json.dumps({k: v for k, v in res.items() if k != "rows"}, indent=1))


if __name__ == "__main__":
    main()
