#!/usr/bin/env python
"""Direction (which side is the parent) on every derived pair of the zoo.

    .venv/bin/python benchmarks/direction_check.py [--zoo PATH] [--out benchmarks/results/direction.json]

For each derived pair (a = ancestor, b = descendant; one-hop edges and multi-hop
chains such as ``base → chain2`` or ``base → ft-int4``) both checkpoints are opened,
their roles paired (``roles.roles_for`` / ``pair_models`` / ``read_role``, as the
compare pipeline does) and :func:`lineage.signals.direction.direction` is called on
the paired tensors, with the full role maps so that structural evidence (depth,
width, vocabulary changes) is available.  Pairs whose path contains a
function-preserving disguise cannot be compared element-wise: they go through
:func:`lineage.compare.compare`, whose realignment undoes the disguise first.

Counting: a *pure* function-preserving reparametrisation (permutation, rotation,
norm refolding, qk scaling, vocabulary reordering, with no training and no change
of storage format) is an invertible map between two equally valid parametrisations
of one function: neither side carries a trace of being second, so such edges are
**excluded** from the accuracy (the honest answer there is "undecided"; the table
reports how often the tool said so).  Every other edge counts; undecided counts
as not correct.  Merge edges (child of two parents) are shown separately as well:
pairwise, a linear merge of two siblings is second-moment-indistinguishable from
a fine-tune in the other direction, so the tool is expected to say so (low
confidence) and the family tree resolves merges with three models in view.

Writes ``benchmarks/results/direction.json`` (per-pair evidence and the table by
relation) and prints the table.  No zoo is built here: pass an existing one.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from lineage.io.checkpoint import open_checkpoint  # noqa: E402
from lineage.roles import pair_models, read_role, roles_for  # noqa: E402
from lineage.signals.direction import direction  # noqa: E402
from lineage.testing.zoo import Zoo  # noqa: E402

log = logging.getLogger("direction_check")

def _default_zoo() -> Path:
    """Where the full zoo of the current code is cached (never builds it: fixtures/build_zoo.py does)."""
    from lineage.testing.zoocache import zoo_dir

    return zoo_dir("full")


DEFAULT_ZOO = _default_zoo()
#: Transforms that preserve the function exactly and involve no training.
FUNCTION_PRESERVING = {"residual_permutation", "residual_rotation", "norm_refold", "mlp_permutation",
                       "head_permutation", "qk_scale", "qk_rotation", "vo_mixing", "vocab_reorder"}


class ModelCache:
    """Full role maps of zoo models (float32, canonical orientation), read once."""

    def __init__(self, zoo: Zoo) -> None:
        self.zoo = zoo
        self._roles: dict[str, dict[str, torch.Tensor]] = {}

    def roles(self, id_: str) -> dict[str, torch.Tensor]:
        if id_ not in self._roles:
            ck = open_checkpoint(self.zoo.path(id_))
            rm = roles_for(ck)
            self._roles[id_] = {r: read_role(ck, v) for r, v in rm.roles.items()}
            # tied heads: pair_models matches lm_head against the embedding
            if "lm_head.weight" not in self._roles[id_] and rm.tied_embeddings and "embed.weight" in rm.roles:
                self._roles[id_]["lm_head.weight"] = self._roles[id_]["embed.weight"]
        return self._roles[id_]


def path_transforms(zoo: Zoo, a: str, b: str) -> list[str]:
    """Transforms applied on the way from ancestor ``a`` down to ``b`` (nearest last)."""
    out: list[str] = []
    cur = b
    while cur != a:
        m = zoo.model(cur)
        out = list(m.get("transforms") or []) + out
        if not m["parents"]:
            break
        cur = m["parents"][0] if a not in m["parents"] else a
    return out


def edge_class(zoo: Zoo, a: str, b: str) -> str:
    """"pure-disguise" (no observable direction), "disguised+trained" or "plain"."""
    tr = path_transforms(zoo, a, b)
    disguised = [t for t in tr if t in FUNCTION_PRESERVING]
    if disguised and len(disguised) == len(tr):
        return "pure-disguise"
    if disguised:
        return "disguised+trained"
    return "plain"


def evaluate_pair(cache: ModelCache, zoo: Zoo, a: str, b: str) -> dict[str, Any]:
    """Direction evidence of one pair (a is the true ancestor)."""
    cls = edge_class(zoo, a, b)
    t0 = time.perf_counter()
    if cls == "plain":
        A, B = cache.roles(a), cache.roles(b)
        pa = {r: A[r] for r in A if r in B and A[r].shape == B[r].shape}
        pb = {r: B[r] for r in pa}
        d = direction(pa, pb, full_a=A, full_b=B)
        parent, conf, by, ev = d.parent, d.confidence, d.decided_by, d.evidence
    else:
        from lineage.compare import compare

        rep = compare(zoo.path(a), zoo.path(b))
        an = rep.anatomy or {}
        parent = an.get("parent")
        conf = float(an.get("confidence") or 0.0)
        dd = (an.get("details") or {}).get("direction") or {}
        by = dd.get("decided_by") or ("disguise undone (identical)" if rep.verdict.relation.startswith("identical")
                                      else None)
        ev = dd.get("evidence") or {}
        if rep.verdict.relation.startswith("identical"):
            parent, conf = None, 0.0  # a pure reparametrisation: nothing orients it
    return {"parent": parent, "confidence": conf, "decided_by": by, "evidence": ev, "edge_class": cls,
            "seconds": time.perf_counter() - t0}


def _category(p: Any) -> str:
    return p.relation if p.hops == 1 else f"chain:{p.relation}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", type=Path, default=DEFAULT_ZOO)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/direction.json")
    ap.add_argument("--only", default=None, help="substring filter on 'a b relation'")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    zoo = Zoo(args.zoo)
    cache = ModelCache(zoo)
    pairs = [p for p in zoo.pairs("derived") if p.relation != "lora_adapter"]
    if args.only:
        pairs = [p for p in pairs if args.only in f"{p.a} {p.b} {p.relation}"]
    recs = []
    t0 = time.perf_counter()
    for p in pairs:
        r = evaluate_pair(cache, zoo, p.a, p.b)
        merge_edge = zoo.model(p.b)["relation"] == "merge" and p.hops == 1
        r.update(a=p.a, b=p.b, relation=p.relation, hops=p.hops, category=_category(p),
                 merge_edge=merge_edge, correct=r["parent"] == "a", wrong=r["parent"] == "b")
        recs.append(r)
        print(f"{p.a:24s} {p.b:30s} {r['category']:30s} {r['edge_class']:18s} "
              f"parent={r['parent']!s:5s} conf={r['confidence']:.3f} by={r['decided_by']}", flush=True)
    table: dict[str, dict[str, int]] = defaultdict(lambda: {"n": 0, "correct": 0, "wrong": 0, "undecided": 0})
    for r in recs:
        key = r["category"] if r["edge_class"] != "pure-disguise" else f"excluded:{r['category']}"
        t = table[key]
        t["n"] += 1
        t["correct"] += r["correct"]
        t["wrong"] += r["wrong"]
        t["undecided"] += r["parent"] is None
    counted = [r for r in recs if r["edge_class"] != "pure-disguise"]
    excluded = [r for r in recs if r["edge_class"] == "pure-disguise"]
    wrong_conf = sorted(r["confidence"] for r in counted if r["wrong"])
    right_conf = sorted(r["confidence"] for r in counted if r["correct"])
    summary = {
        "counted": len(counted),
        "correct": sum(r["correct"] for r in counted),
        "wrong": sum(r["wrong"] for r in counted),
        "undecided": sum(r["parent"] is None for r in counted),
        "accuracy": sum(r["correct"] for r in counted) / max(len(counted), 1),
        "excluded_pure_disguises": len(excluded),
        "excluded_said_undecided": sum(r["parent"] is None for r in excluded),
        "excluded_reason": ("function-preserving reparametrisation without training or re-encoding: an invertible "
                            "map between two equally valid parametrisations of one function, with no trace of which "
                            "came first"),
        "one_hop": {"n": sum(1 for r in counted if r["hops"] == 1),
                    "correct": sum(r["correct"] for r in counted if r["hops"] == 1)},
        "multi_hop": {"n": sum(1 for r in counted if r["hops"] > 1),
                      "correct": sum(r["correct"] for r in counted if r["hops"] > 1)},
        "confidence_of_wrong": wrong_conf,
        "median_confidence_of_correct": right_conf[len(right_conf) // 2] if right_conf else None,
        "seconds": time.perf_counter() - t0,
    }
    print()
    print(f"{'relation':34s} {'n':>4s} {'correct':>8s} {'wrong':>6s} {'undecided':>10s}")
    for k in sorted(table):
        t = table[k]
        print(f"{k:34s} {t['n']:4d} {t['correct']:8d} {t['wrong']:6d} {t['undecided']:10d}")
    print(f"\ncounted edges: {summary['correct']}/{summary['counted']} correct "
          f"({100 * summary['accuracy']:.1f} %), {summary['wrong']} wrong, {summary['undecided']} undecided; "
          f"{summary['excluded_pure_disguises']} pure disguises excluded "
          f"({summary['excluded_said_undecided']} called undecided)")
    if not args.only:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"zoo": str(args.zoo), "summary": summary, "by_relation": dict(table),
                                        "pairs": recs}, indent=1, default=float))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
