"""LoRA rank and module recovery on the zoo: exact rank, exact modules, dense changes not low-rank.

For every zoo pair whose child is a LoRA merge (trained ``loraN`` and synthetic ``lorasynN``, both
families), and for its child cast to BF16, quantised int8 per row and int8 per column (a transposed
layout quantised per stored row), runs the anatomy
(:func:`lineage.anatomy.explain`) and checks the relation is "lora merge" with exactly the true rank
on exactly the true modules.  Then a synthetic sweep of ranks 1–64 on one base per family (all three
child encodings).  Fine-tune, continued pre-training and noise pairs must not come out low-rank.
The anatomy runs on the streamed path (:class:`lineage.lazyroles.LazyRoles`, as ``lineage compare``
does) and, with ``--check-memory-path``, also on in-memory dicts, and the two must agree.

    python benchmarks/lora_check.py [--zoo ~/.cache/lineage/zoo/full-…] [--no-sweep] [--encoded-negatives]

Writes ``benchmarks/results/lora_check.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

from lineage.anatomy import AlignedPair, explain  # noqa: E402
from lineage.io.checkpoint import open_checkpoint  # noqa: E402
from lineage.lazyroles import LazyRoles  # noqa: E402
from lineage.roles import pair_models, read_role, roles_for  # noqa: E402
from lineage.testing.reencode import int8_round  # noqa: E402
from lineage.testing.zoo import Zoo  # noqa: E402

log = logging.getLogger("lora_check")

def _default_zoo() -> Path:
    """Where the full zoo of the current code is cached (never builds it: fixtures/build_zoo.py does)."""
    from lineage.testing.zoocache import zoo_dir

    return zoo_dir("full")


DEFAULT_ZOO = _default_zoo()

#: PEFT target module name -> roles it touches.
MODULE_ROLES = {
    "q_proj": ("attn.q",), "k_proj": ("attn.k",), "v_proj": ("attn.v",), "o_proj": ("attn.o",),
    "gate_proj": ("mlp.gate",), "up_proj": ("mlp.up",), "down_proj": ("mlp.down",),
    "c_attn": ("attn.q", "attn.k", "attn.v"), "c_proj": ("attn.o", "mlp.down"), "c_fc": ("mlp.up",),
}
SWEEP_RANKS = (1, 2, 3, 5, 8, 12, 16, 24, 32, 48, 64)


def load_pair(path_a: str, path_b: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Role-keyed float32 tensors of both models (equal shapes only), as compare's anatomy pairs them."""
    ca, cb = open_checkpoint(path_a), open_checkpoint(path_b)
    pr = pair_models(roles_for(ca), roles_for(cb))
    a, b = {}, {}
    for m in pr.matched:
        if tuple(m.shape_a) == tuple(m.shape_b):
            a[m.role], b[m.role] = read_role(ca, m.view_a), read_role(cb, m.view_b)
    return a, b


def lazy(d: dict[str, torch.Tensor]) -> LazyRoles:
    """A read-on-access view of ``d`` (exercises the streamed anatomy path)."""
    return LazyRoles(lambda r: d[r].clone(), {k: tuple(v.shape) for k, v in d.items()})


def encode(child: dict[str, torch.Tensor], how: str) -> dict[str, torch.Tensor]:
    if how == "as stored":
        return child
    if how == "bf16":
        return {k: v.bfloat16().float() for k, v in child.items()}
    if how in ("int8-per-row", "int8-per-column"):
        # per column: what quantising a transposed layout per stored row gives (GPT-2 Conv1D weights)
        dim = 1 if how == "int8-per-row" else 0
        return {k: int8_round(v, dim) if v.dim() == 2 and not k.startswith("pos_embed") else v
                for k, v in child.items()}
    raise ValueError(how)


def true_roles(base: dict[str, torch.Tensor], modules: list[str], rank: int | None) -> list[str]:
    """Roles a LoRA on ``modules`` makes low-rank: a module no wider than the rank is full rank
    (nothing tells it from a dense change), so it is not expected among the low-rank modules."""
    kinds = {r for m in modules for r in MODULE_ROLES[m]}
    out = []
    for k, v in base.items():
        if v.dim() != 2 or not k.startswith("L") or (rank is not None and min(v.shape) <= rank):
            continue
        kind = k.split(".", 1)[1].removesuffix(".weight")
        if kind in kinds:
            out.append(k)
    return sorted(out)


def synth_lora(base: dict[str, torch.Tensor], roles: list[str], rank: int, seed: int,
               scale: float = 0.05) -> dict[str, torch.Tensor]:
    """base + a random rank-``rank`` update with a decaying spectrum on ``roles`` (as derive.lora_merge)."""
    g = torch.Generator().manual_seed(seed)
    out = dict(base)
    for k in roles:
        W = base[k].double()
        n_out, n_in = W.shape
        r = min(rank, n_out, n_in)
        A = torch.randn(r, n_in, generator=g, dtype=torch.float64) / math.sqrt(n_in)
        B = torch.randn(n_out, r, generator=g, dtype=torch.float64)
        B = B * (1.0 / (1.0 + torch.arange(r, dtype=torch.float64)))[None, :] ** 0.5
        d = B @ A
        out[k] = (W + d * (scale * W.norm() / d.norm())).float()
    return out


def run(a: dict, b: dict, check_memory: bool) -> tuple[dict, bool | None]:
    rel = explain(AlignedPair(lazy(a), lazy(b)))
    agree = None
    if check_memory:
        rel2 = explain(AlignedPair(a, b))
        agree = (rel2.relation, rel2.details.get("rank"), rel2.details.get("modules")) == (
            rel.relation, rel.details.get("rank"), rel.details.get("modules"))
    d = rel.details
    return {"relation": rel.relation, "parent": rel.parent, "rank": d.get("rank"),
            "modules": sorted(d.get("modules") or []), "quant_format": d.get("quant_format"),
            "lowrank_kind": (d.get("lowrank") or {}).get("kind")}, agree


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--zoo", default=str(DEFAULT_ZOO))
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--check-memory-path", action="store_true", help="also run on in-memory dicts and compare")
    ap.add_argument("--encoded-negatives", action="store_true",
                    help="also re-encode fine-tune, continued pre-training and noise children (bf16, int8): "
                         "none may read low-rank")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    z = Zoo(args.zoo)
    rows: list[dict] = []
    t0 = time.perf_counter()
    encodings = ("as stored", "bf16", "int8-per-row", "int8-per-column")
    for p in z.pairs("derived"):
        if p.hops != 1 or p.relation not in ("lora", "finetune", "continued_pretraining", "noise"):
            continue
        a, b = load_pair(z.path(p.a), z.path(p.b))
        params = z.model(p.b).get("params", {})
        for enc in encodings if p.relation == "lora" or args.encoded_negatives else ("as stored",):
            res, agree = run(a, encode(b, enc), args.check_memory_path)
            row = {"pair": f"{p.a} -> {p.b}", "truth": p.relation, "encoding": enc, **res, "memory_path_agrees": agree}
            if p.relation == "lora":
                want = true_roles(a, params["modules"], params["rank"])
                # a module narrower than the rank is full rank: the LoRA rank is what the wider modules show
                row["true_rank"] = params["rank"]
                row["true_modules"] = len(want)
                row["ok"] = (res["relation"] == "lora merge" and res["rank"] == params["rank"]
                             and res["modules"] == want)
            else:
                row["ok"] = res["relation"] != "lora merge" and res["lowrank_kind"] != "low-rank"
            rows.append(row)
            log.warning("%s %s: %s rank %s (%s)", row["pair"], enc, res["relation"], res["rank"],
                        "ok" if row["ok"] else "WRONG")
    if not args.no_sweep:
        for base_id, roles_kinds in (("gpt2-b0", ("c_attn", "c_fc")), ("llama-b0", ("q_proj", "v_proj", "down_proj"))):
            a, _ = load_pair(z.path(base_id), z.path(base_id))
            touched = true_roles(a, list(roles_kinds), None)
            for rank in SWEEP_RANKS:
                child = synth_lora(a, touched, rank, seed=1000 + rank)
                want = true_roles(a, list(roles_kinds), rank)
                for enc in encodings:
                    res, agree = run(a, encode(child, enc), args.check_memory_path)
                    ok = res["relation"] == "lora merge" and res["rank"] == rank and res["modules"] == want
                    rows.append({"pair": f"{base_id} + synthetic rank {rank} on {','.join(roles_kinds)}",
                                 "truth": "lora (sweep)", "encoding": enc, **res, "true_rank": rank,
                                 "true_modules": len(want), "ok": ok, "memory_path_agrees": agree})
                    log.warning("sweep %s r%d %s: %s rank %s (%s)", base_id, rank, enc, res["relation"], res["rank"],
                                "ok" if ok else "WRONG")
    n_ok = sum(r["ok"] for r in rows)
    summary = {"checked": len(rows), "ok": n_ok, "seconds": time.perf_counter() - t0,
               "wrong": [r for r in rows if not r["ok"]]}
    out = write_result("lora_check", {"zoo": args.zoo, "summary": summary, "rows": rows})
    print("| pair | truth | child encoding | relation | rank (true) | modules (true) | ok |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['pair']} | {r['truth']} | {r['encoding']} | {r['relation']} | {r['rank']} ({r.get('true_rank', '-')}) "
              f"| {len(r['modules'])} ({r.get('true_modules', '-')}) | {'yes' if r['ok'] else '**no**'} |")
    print(f"\n{n_ok}/{len(rows)} ok in {summary['seconds']:.0f} s; written to {out}")


if __name__ == "__main__":
    main()
