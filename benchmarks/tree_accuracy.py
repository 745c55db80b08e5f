#!/usr/bin/env python
"""Family trees of the zoo's families against the manifest's truth.

    .venv/bin/python benchmarks/tree_accuracy.py [--zoo PATH] [--only NAME] [--out benchmarks/results/tree_accuracy.json]

Sets (model ids are the names the tree sees):

* one family per base ``llama-b0 … b4`` and ``gpt2-b0 … b4``: the base and every model
  descending from it (chains, quantised fine-tunes, disguises of fine-tunes, merges …);
* ``mixed``: several bases with a few descendants each, the spare bases ``*-b5`` and null
  models (independently trained), to check that unrelated models stay separate roots.

Scoring: a predicted edge ``p → c`` is correct when ``p`` is a true parent of ``c`` (a merge
child has two: either counts; the benchmark also reports whether the merge was recognised
with both parents).  An edge of a *pure* function-preserving disguise (permutation, rotation,
refolding; no training) is accepted in either orientation: nothing orients it (see
``benchmarks/direction_check.py``).  Precision = correct / predicted edges, recall = correct /
true edges; roots are compared too.  Wall time per set is reported (not asserted anywhere).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from lineage.family import family_tree  # noqa: E402
from lineage.testing.zoo import Zoo  # noqa: E402
from lineage.render.tree import render_html, render_text  # noqa: E402

def _default_zoo() -> Path:
    """Where the full zoo of the current code is cached (never builds it: fixtures/build_zoo.py does)."""
    from lineage.testing.zoocache import zoo_dir

    return zoo_dir("full")


DEFAULT_ZOO = _default_zoo()
FUNCTION_PRESERVING = {"residual_permutation", "residual_rotation", "norm_refold", "mlp_permutation",
                       "head_permutation", "qk_scale", "qk_rotation", "vo_mixing", "vocab_reorder"}


def descendants(zoo: Zoo, base: str) -> list[str]:
    """``base`` and every model with a chain of parents leading to it (manifest order)."""
    out = [base]
    changed = True
    while changed:
        changed = False
        for i in zoo.ids:
            if i not in out and any(p in out for p in zoo.model(i)["parents"]):
                out.append(i)
                changed = True
    return [i for i in zoo.ids if i in out]


def family_sets(zoo: Zoo) -> dict[str, list[str]]:
    sets = {b: descendants(zoo, b) for fam in ("llama", "gpt2") for b in (f"{fam}-b{k}" for k in range(5))}
    nulls = [i for i in zoo.ids if "-null" in i]
    mixed = (["llama-b0", "llama-b0-ft", "llama-b0-int4_per_group", "llama-b1", "llama-b1-ftd", "llama-b1-combined",
              "llama-b4", "llama-b4-chain1", "gpt2-b0", "gpt2-b0-lora4", "gpt2-b3", "gpt2-b3-fta",
              "llama-b5", "gpt2-b5"]
             + [n for n in nulls if n.startswith("llama")][:4] + [n for n in nulls if n.startswith("gpt2")][:4])
    sets["mixed"] = mixed
    return sets


def truth_edges(zoo: Zoo, ids: list[str]) -> dict[str, tuple[str, ...]]:
    """child → its true parents inside the set."""
    s = set(ids)
    return {i: tuple(p for p in zoo.model(i)["parents"] if p in s) for i in ids
            if any(p in s for p in zoo.model(i)["parents"])}


def score(zoo: Zoo, ids: list[str], tree: Any) -> dict[str, Any]:
    truth = truth_edges(zoo, ids)
    pure = {c for c in truth if zoo.model(c)["transforms"]
            and all(t in FUNCTION_PRESERVING for t in zoo.model(c)["transforms"])}
    pred = [(e.parent, e.child, e.relation, e.other_parents) for e in tree.edges]
    correct_pred = []
    wrong = []
    for p, c, rel, others in pred:
        ok = p in truth.get(c, ()) or (c in pure and p in truth.get(c, ())) or (p in pure and c in truth.get(p, ()))
        (correct_pred if ok else wrong).append({"parent": p, "child": c, "relation": rel,
                                                "other_parents": list(others),
                                                "true_parents": list(truth.get(c, ()))})
    found = {(d["parent"], d["child"]) for d in correct_pred}
    recalled = sum(1 for c, ps in truth.items()
                   if any((p, c) in found for p in ps) or (c in pure and any((c, p) in found for p in ps)))
    true_roots = sorted(i for i in ids if i not in truth)
    merges = {c: ps for c, ps in truth.items() if len(ps) > 1}
    merge_found = {c: sorted({e.parent, *e.other_parents}) == sorted(ps)
                   for c, ps in merges.items() for e in tree.edges if e.child == c}
    return {
        "n_models": len(ids), "true_edges": len(truth), "predicted_edges": len(pred),
        "correct_edges": len(correct_pred), "precision": len(correct_pred) / max(len(pred), 1),
        "recall": recalled / max(len(truth), 1),
        "true_roots": true_roots, "predicted_roots": sorted(tree.roots),
        "roots_exact": sorted(tree.roots) == true_roots,
        "merges_with_both_parents": merge_found,
        "wrong_edges": wrong,
        "edge_relations": {f"{p}->{c}": rel for p, c, rel, _ in pred},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", type=Path, default=DEFAULT_ZOO)
    ap.add_argument("--only", default=None, help="run only this set (e.g. llama-b0, mixed)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/tree_accuracy.json")
    ap.add_argument("--html", type=Path, default=None, help="folder for one HTML drawing per set")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    zoo = Zoo(args.zoo)
    sets = family_sets(zoo)
    if args.only:
        sets = {args.only: sets[args.only]}
    results: dict[str, Any] = {}
    for name, ids in sets.items():
        t0 = time.perf_counter()
        res = family_tree([zoo.path(i) for i in ids], names=ids)
        secs = time.perf_counter() - t0
        sc = score(zoo, ids, res.tree)
        sc["seconds"] = secs
        sc["canonical_comparisons"] = len(res.reports)
        sc["pairs"] = len(ids) * (len(ids) - 1) // 2
        results[name] = sc
        print(f"== {name}: {sc['n_models']} models, {sc['pairs']} pairs ({sc['canonical_comparisons']} canonical), "
              f"{secs:.1f} s; precision {sc['correct_edges']}/{sc['predicted_edges']} = {sc['precision']:.3f}, "
              f"recall {sc['recall']:.3f}, roots {'ok' if sc['roots_exact'] else sc['predicted_roots']}",
              flush=True)
        for w in sc["wrong_edges"]:
            print(f"   wrong: {w['parent']} -> {w['child']} [{w['relation']}] (true parents {w['true_parents']})")
        print(render_text(res.tree))
        if args.html:
            args.html.mkdir(parents=True, exist_ok=True)
            (args.html / f"tree-{name}.html").write_text(render_html(res.tree, f"zoo family {name}"))
    tot_pred = sum(r["predicted_edges"] for r in results.values())
    tot_ok = sum(r["correct_edges"] for r in results.values())
    tot_true = sum(r["true_edges"] for r in results.values())
    tot_rec = sum(r["recall"] * r["true_edges"] for r in results.values())
    summary = {"precision": tot_ok / max(tot_pred, 1), "recall": tot_rec / max(tot_true, 1),
               "predicted_edges": tot_pred, "correct_edges": tot_ok, "true_edges": tot_true,
               "sets_with_exact_roots": sum(r["roots_exact"] for r in results.values()), "sets": len(results),
               "seconds": sum(r["seconds"] for r in results.values())}
    print(f"\nall sets: precision {tot_ok}/{tot_pred} = {summary['precision']:.3f}, recall {summary['recall']:.3f}, "
          f"exact roots {summary['sets_with_exact_roots']}/{summary['sets']}, {summary['seconds']:.0f} s")
    if not args.only:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"zoo": str(args.zoo), "summary": summary, "sets": results}, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
