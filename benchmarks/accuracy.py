#!/usr/bin/env python
"""Accuracy of lineage verdicts on the zoo of trained models with known lineage.

    python benchmarks/accuracy.py [--subset full|small] [--max-null 300] [--limit N] [--out benchmarks/results]

Runs ``lineage.compare.compare`` (the public API) on every labelled pair of the
zoo (derived pairs of every relation and transform, PEFT adapters against their
base, independent pairs among the bases, among the cheap null models and
between a derivative and another base, and the same-initialisation pairs) and
writes ``accuracy.md``, ``accuracy.json`` and ``accuracy.html`` (with the QQ
plot of null p-values).  Fields the tool does not fill yet are reported as
"not implemented".  Baselines in the same tables: the naive per-tensor cosine
(same name and shape, mean over matrices) and the tool's own median Pearson.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from lineage.testing.zoo import Pair, Zoo  # noqa: E402
from lineage.testing.zoocache import cached_zoo  # noqa: E402

ALPHA = 1e-3  # the p-value threshold of the issue
NI = "not implemented"


@dataclass(frozen=True)
class Config:
    subset: str = "full"
    max_null: int = 300  # independent_null pairs sampled (seeded)
    limit: int = 0  # 0 = all pairs; otherwise a seeded sample of that many (for smoke runs)
    per_stratum: int = 0  # 0 = all; otherwise at most this many pairs per (label, group, relation, variant)
    family: str | None = None  # only pairs of this family
    seed: int = 0
    canonicalise: bool = True
    out: str = str(REPO / "benchmarks" / "results")
    zoo_dir: str | None = None


@dataclass
class Record:
    """One pair: the truth and what the tool and the baselines said."""

    a: str
    b: str
    family: str
    label: str  # derived | independent | same_init
    relation: str  # true relation ("finetune", "finetune+disguised", "independent", …)
    group: str
    hops: int
    variant: str  # what was done to get b (id suffix, e.g. "int8_per_row", "combined", "lora16")
    transforms: list[str]
    truth: dict[str, Any] = field(default_factory=dict)
    derived: bool | None = None
    pred_relation: str | None = None
    p_value: float | None = None
    log10_p: float | None = None
    details: dict[str, Any] = field(default_factory=dict)
    median_pearson: float | None = None
    naive_cosine: float | None = None
    seconds: float | None = None
    error: str | None = None
    parents: list[str] = field(default_factory=list)  # candidate merge parents given to the tool (--parents)
    merge_base: str | None = None


# --------------------------------------------------------------------------- pairs

def _variant(entry: dict[str, Any]) -> str:
    parts = entry["id"].split("-", 2)
    return parts[2] if len(parts) == 3 else entry["relation"]


def collect_pairs(zoo: Zoo, cfg: Config) -> list[Record]:
    rng = random.Random(cfg.seed)
    pairs = zoo.pairs()
    null = [p for p in pairs if p.group == "independent_null"]
    if len(null) > cfg.max_null:
        keep = set(map(id, rng.sample(null, cfg.max_null)))
        pairs = [p for p in pairs if p.group != "independent_null" or id(p) in keep]
    recs = [_record(zoo, p, zoo.model(p.b)["path"]) for p in pairs]
    for m in zoo.models():  # PEFT adapter folders against their base
        if m.get("adapter_path"):
            p = Pair(m["parents"][0], m["id"], "derived", "lora", 1, "adapter")
            r = _record(zoo, p, m["adapter_path"])
            r.variant = _variant(m) + "(adapter)"
            r.relation = "lora_adapter"
            recs.append(r)
    recs.extend(_merge_controls(zoo))
    if cfg.family:
        recs = [r for r in recs if r.family == cfg.family]
    if cfg.per_stratum:
        strata: dict[tuple[str, ...], list[Record]] = defaultdict(list)
        for r in recs:
            strata[(r.label, r.group, r.relation, r.variant)].append(r)
        recs = [r for k in sorted(strata) for r in
                (strata[k] if len(strata[k]) <= cfg.per_stratum else rng.sample(strata[k], cfg.per_stratum))]
    if cfg.limit and len(recs) > cfg.limit:
        recs = rng.sample(recs, cfg.limit)
    return recs


def _merge_controls(zoo: Zoo) -> list[Record]:
    """Fine-tunes given two sibling derivatives as decoy merge parents: must not be called merges."""
    out = []
    ids = set(zoo.ids)
    for fam in sorted({m["family"] for m in zoo.models()}):
        child, decoys = f"{fam}-b0-ft", [f"{fam}-b0-cpt100", f"{fam}-b0-lora16"]
        if child in ids and all(d in ids for d in decoys):
            r = _record(zoo, Pair(f"{fam}-b0", child, "derived", "finetune", 1, "merge_control"), zoo.model(child)["path"])
            r.variant = "ft (decoy merge parents)"
            r.parents, r.merge_base = decoys, f"{fam}-b0"
            out.append(r)
    return out


def _record(zoo: Zoo, p: Pair, path_b: str) -> Record:
    mb = zoo.model(p.b)
    truth: dict[str, Any] = {}
    if p.label == "derived" and p.hops == 1:
        for k in ("lora", "merge", "layer_map", "quant", "width", "vocab"):
            if k in mb:
                truth[k] = mb[k]
        if "merge" in mb:
            # the weight of this parent in the merge
            i = mb["merge"]["parents"].index(p.a)
            w = mb["merge"].get("weights")
            truth["merge_weight"] = w[i] if w else (1 - mb["merge"]["t"] if i == 0 else mb["merge"]["t"])
    rec = Record(a=p.a, b=p.b, family=mb["family"], label=p.label, relation=p.relation, group=p.group, hops=p.hops,
                  variant=_variant(mb) if p.label != "independent" else p.group, transforms=list(mb["transforms"]),
                  truth=truth, details={"path_b": path_b})
    if "merge" in mb and p.label == "derived":
        # the user names the candidate parents (`lineage compare A B --parents P1 --parents P2`)
        rec.parents, rec.merge_base = list(mb["merge"]["parents"]), mb["merge"].get("base")
    return rec


# --------------------------------------------------------------------------- running

def naive_cosine(path_a: str, path_b: str) -> float | None:
    """Mean cosine over 2-D tensors with the same name and shape (safetensors only)."""
    from safetensors import safe_open

    fa, fb = Path(path_a) / "model.safetensors", Path(path_b) / "model.safetensors"
    if not (fa.is_file() and fb.is_file()):
        return None
    cos = []
    with safe_open(str(fa), "pt") as A, safe_open(str(fb), "pt") as B:
        names = set(A.keys()) & set(B.keys())
        for n in sorted(names):
            x, y = A.get_tensor(n).float(), B.get_tensor(n).float()
            if x.dim() == 2 and x.shape == y.shape:
                cos.append(torch.nn.functional.cosine_similarity(x.flatten(), y.flatten(), dim=0).item())
    return sum(cos) / len(cos) if cos else None


def run_pair(zoo: Zoo, rec: Record, cfg: Config) -> None:
    from lineage.compare import CompareOptions, compare

    path_a = zoo.model(rec.a)["path"]
    path_b = rec.details.pop("path_b")
    rec.naive_cosine = naive_cosine(path_a, path_b)
    t0 = time.perf_counter()
    try:
        report = compare(path_a, path_b, options=CompareOptions(canonicalise=cfg.canonicalise))
        if rec.parents:
            from lineage.mergefit import apply_merge, merge_evidence

            base = zoo.model(rec.merge_base)["path"] if rec.merge_base else None
            report = apply_merge(report, merge_evidence(path_b, [zoo.model(x)["path"] for x in rec.parents], base))
    except Exception as e:  # noqa: BLE001 - a benchmark records failures and goes on
        rec.seconds = time.perf_counter() - t0
        rec.error = f"{type(e).__name__}: {e}"[:300]
        return
    rec.seconds = time.perf_counter() - t0
    v = report.verdict
    rec.derived = v.derived
    rec.pred_relation = v.relation
    rec.p_value = v.p_value
    rec.log10_p = v.log10_p
    rec.details = _jsonable(dict(v.details or {}))
    # structure the tool recovered (report.anatomy / report.canon), under the keys summarise() reads
    anat = getattr(report, "anatomy", None) or {}
    ad = anat.get("details", {}) or {}
    if anat:
        rec.details["anatomy"] = _jsonable(anat)
        if anat.get("relation") == "lora merge" and ad.get("rank") is not None:
            rec.details["lora_rank"] = ad.get("rank")
        parent = anat.get("parent")
        if parent in ("a", "b"):
            rec.details["direction"] = "a->b" if parent == "a" else "b->a"
    merge = getattr(report, "merge", None)
    if merge:
        rec.details["merge_fit"] = {k: merge.get(k) for k in ("method", "weights", "weights_std", "t", "t_std",
                                                               "residual", "explains")}
        if rec.a in rec.parents:
            i = rec.parents.index(rec.a)
            if merge.get("t") is not None and len(rec.parents) == 2:
                rec.details["merge_weight"] = (1 - merge["t"]) if i == 0 else merge["t"]
            else:
                rec.details["merge_weight"] = merge["weights"][i]
    canon = getattr(report, "canon", None) or {}
    lm = canon.get("layer_map") if isinstance(canon, dict) else None
    if isinstance(lm, dict):
        lm = lm.get("source") or lm.get("map") or lm.get("b_to_a")
    if isinstance(lm, (list, tuple)):
        rec.details["layer_map"] = list(lm)
    pear = [r.pearson for r in report.layers if getattr(r, "evidence", False) and r.pearson is not None]
    rec.median_pearson = statistics.median(pear) if pear else None


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float):
        return x if math.isfinite(x) else str(x)
    if isinstance(x, (int, str, bool)) or x is None:
        return x
    return str(x)


# --------------------------------------------------------------------------- metrics

def auc(pos: list[float], neg: list[float]) -> float | None:
    """ROC AUC = P(score_pos > score_neg) + 0.5 P(tie) (Mann-Whitney)."""
    if not pos or not neg:
        return None
    allv = sorted([(s, 1) for s in pos] + [(s, 0) for s in neg])
    i = 0
    rank_sum = 0.0
    while i < len(allv):
        j = i
        while j < len(allv) and allv[j][0] == allv[i][0]:
            j += 1
        r = (i + j + 1) / 2  # average 1-based rank
        rank_sum += r * sum(1 for k in range(i, j) if allv[k][1] == 1)
        i = j
    n1, n0 = len(pos), len(neg)
    return (rank_sum - n1 * (n1 + 1) / 2) / (n1 * n0)


def tool_score(r: Record) -> float:
    """Larger = more evidence of derivation: -log10 p (0 when absent)."""
    return -r.log10_p if r.log10_p is not None else 0.0


def ks_uniform(ps: list[float]) -> dict[str, Any]:
    if len(ps) < 2:
        return {"n": len(ps), "statistic": None, "p": None}
    from scipy import stats

    two = stats.kstest(ps, "uniform")
    # Validity needs P(p <= a) <= a: test only the anti-conservative side (empirical CDF above uniform).
    anti = stats.kstest(ps, "uniform", alternative="greater")
    return {"n": len(ps), "statistic": float(two.statistic), "p": float(two.pvalue),
            "anticonservative_statistic": float(anti.statistic), "anticonservative_p": float(anti.pvalue),
            "fraction_below_0.05": sum(p <= 0.05 for p in ps) / len(ps),
            "fraction_below_0.01": sum(p <= 0.01 for p in ps) / len(ps)}


def _median_p(rs: list[Record]) -> float | None:
    logs = [r.log10_p for r in rs if r.log10_p is not None]
    return 10 ** statistics.median(logs) if logs else None


def _fmt_p(p: float | None) -> str:
    if p is None:
        return NI
    return "0 (underflow)" if p == 0 else f"{p:.2g}"


def _detect_stats(rs: list[Record]) -> dict[str, Any]:
    ok = [r for r in rs if r.error is None]
    return {
        "n": len(rs),
        "errors": len(rs) - len(ok),
        "detected": sum(1 for r in ok if r.derived is True) / len(rs) if rs else None,
        "p_le_alpha": sum(1 for r in ok if r.p_value is not None and r.p_value <= ALPHA) / len(rs) if rs else None,
        "median_p": _median_p(ok),
        "median_log10_p": statistics.median([r.log10_p for r in ok if r.log10_p is not None])
        if any(r.log10_p is not None for r in ok) else None,
        "median_naive_cosine": statistics.median([r.naive_cosine for r in rs if r.naive_cosine is not None])
        if any(r.naive_cosine is not None for r in rs) else None,
    }


def _lookup(d: dict[str, Any], *keys: str) -> Any:
    for k in keys:
        if k in d and d[k] is not None:
            return d[k]
    return None


#: Relation classes of issue 5's typing figure: zoo relation (one hop) → accepted predicted relations.
#: Noise and vocabulary edits are not among the issue's classes and are reported in the confusion only.
TYPING_CLASSES: dict[str, tuple[str, ...]] = {
    "copy": ("identical", "re-encoded copy"),
    "quantised": ("quantised copy",),
    "lora": ("lora merge",),
    "lora_adapter": ("lora merge",),
    "finetune": ("fine-tune",),
    "continued_pretraining": ("continued pre-training",),
    "depth_change": ("pruned",),
    "width_pruned": ("pruned",),
    "merge": ("merge",),
    "disguised": ("identical (disguised)",),
    "independent": ("unrelated",),
}


def typing_accuracy(recs: list[Record]) -> dict[str, Any]:
    """Fraction of pairs (one-hop derived, and independent) whose predicted relation is the true class."""
    per: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for r in recs:
        if r.error is not None or (r.label == "derived" and r.hops != 1):
            continue
        key = "independent" if r.label == "independent" else r.relation
        ok = TYPING_CLASSES.get(key)
        if ok is None:
            continue
        pred = r.pred_relation or ""
        hit = pred in ok
        per[key][0] += hit
        per[key][1] += 1
    tot = sum(v[0] for v in per.values()), sum(v[1] for v in per.values())
    no_ind = sum(v[0] for k, v in per.items() if k != "independent"), sum(v[1] for k, v in per.items() if k != "independent")
    return {"accuracy": tot[0] / max(1, tot[1]), "n": tot[1],
            "accuracy_derived_only": no_ind[0] / max(1, no_ind[1]), "n_derived": no_ind[1],
            "per_class": {k: {"correct": v[0], "n": v[1]} for k, v in sorted(per.items())}}


def summarise(recs: list[Record]) -> dict[str, Any]:
    pos = [r for r in recs if r.label == "derived"]
    neg = [r for r in recs if r.label == "independent"]
    same = [r for r in recs if r.label == "same_init"]
    s: dict[str, Any] = {"n_pairs": len(recs), "n_derived": len(pos), "n_independent": len(neg),
                         "n_same_init": len(same), "errors": sum(r.error is not None for r in recs)}
    s["auc_tool"] = auc([tool_score(r) for r in pos], [tool_score(r) for r in neg])
    mp = lambda r: r.median_pearson if r.median_pearson is not None else 0.0  # noqa: E731
    s["auc_median_pearson"] = auc([mp(r) for r in pos], [mp(r) for r in neg])
    nc = lambda r: r.naive_cosine if r.naive_cosine is not None else 0.0  # noqa: E731
    s["auc_naive_cosine"] = auc([nc(r) for r in pos], [nc(r) for r in neg])
    s["tpr_at_alpha"] = sum(1 for r in pos if r.p_value is not None and r.p_value <= ALPHA) / len(pos) if pos else None
    s["fpr_at_alpha"] = sum(1 for r in neg if r.p_value is not None and r.p_value <= ALPHA) / len(neg) if neg else None
    s["tpr_verdict"] = sum(1 for r in pos if r.derived is True) / len(pos) if pos else None
    s["fpr_verdict"] = sum(1 for r in neg if r.derived is True) / len(neg) if neg else None
    # naive baseline at the threshold of the largest independent cosine (FPR 0 on this set)
    neg_cos = [r.naive_cosine for r in neg if r.naive_cosine is not None]
    if neg_cos:
        thr = max(neg_cos)
        s["naive_cosine_threshold"] = thr
        s["tpr_naive_at_fpr0"] = sum(1 for r in pos if r.naive_cosine is not None and r.naive_cosine > thr) / len(pos)
    smallest = min((r for r in neg if r.log10_p is not None), key=lambda r: r.log10_p, default=None)
    s["smallest_p_independent"] = (
        {"p": smallest.p_value, "log10_p": smallest.log10_p, "a": smallest.a, "b": smallest.b, "group": smallest.group}
        if smallest else None)
    null_ps = [r.p_value for r in neg if r.p_value is not None]
    s["ks_all_independent"] = ks_uniform(null_ps)
    s["ks_null_models"] = ks_uniform([r.p_value for r in neg if r.group == "independent_null" and r.p_value is not None])
    s["same_init"] = _detect_stats(same)
    by_rel: dict[str, list[Record]] = defaultdict(list)
    by_var: dict[str, list[Record]] = defaultdict(list)
    by_group: dict[str, list[Record]] = defaultdict(list)
    for r in pos:
        by_rel[r.relation].append(r)
        by_var[f"{r.relation} | {r.variant}" + ("" if r.hops == 1 else f" (hops {r.hops})")].append(r)
    for r in neg:
        by_group[r.group].append(r)
    s["by_relation"] = {k: _detect_stats(v) for k, v in sorted(by_rel.items())}
    s["by_variant"] = {k: _detect_stats(v) for k, v in sorted(by_var.items())}
    s["independent_by_group"] = {
        k: {"n": len(v), "false_positive_rate": sum(1 for r in v if r.derived is True) / len(v),
            "p_le_alpha": sum(1 for r in v if r.p_value is not None and r.p_value <= ALPHA) / len(v),
            "min_p": min((r.p_value for r in v if r.p_value is not None), default=None),
            "median_naive_cosine": statistics.median([r.naive_cosine for r in v if r.naive_cosine is not None])
            if any(r.naive_cosine is not None for r in v) else None}
        for k, v in sorted(by_group.items())}
    # confusion of relations (one-hop pairs, plus the negatives and same-init)
    conf: dict[str, Counter] = defaultdict(Counter)
    for r in recs:
        truth = r.relation if r.label != "derived" or r.hops == 1 else f"chain({r.hops})"
        conf[truth][r.pred_relation if r.error is None else "error"] += 1
    s["confusion"] = {k: dict(v) for k, v in sorted(conf.items())}
    s["typing"] = typing_accuracy(recs)
    # LoRA rank, merge weights, layer map, direction
    lora = [r for r in pos if r.hops == 1 and "lora" in r.truth]
    s["lora_rank"] = [{"a": r.a, "b": r.b, "variant": r.variant, "true": r.truth["lora"]["rank"],
                       "recovered": _lookup(r.details, "lora_rank", "rank")} for r in lora]
    merges = [r for r in pos if r.hops == 1 and "merge" in r.truth]
    s["merge_weights"] = [{"a": r.a, "b": r.b, "method": r.truth["merge"]["method"], "true": r.truth["merge_weight"],
                           "recovered": _lookup(r.details, "merge_weight"),
                           "fit": r.details.get("merge_fit")}
                          for r in merges]
    ctl = [r for r in recs if r.group == "merge_control"]
    s["merge_controls"] = {"n": len(ctl), "called_merge": sum(1 for r in ctl if (r.pred_relation or "").startswith("merge")),
                           "pairs": [{"a": r.a, "b": r.b, "decoys": r.parents, "predicted": r.pred_relation} for r in ctl]}
    depth = [r for r in pos if r.hops == 1 and "layer_map" in r.truth]
    s["layer_map"] = [{"a": r.a, "b": r.b, "true": r.truth["layer_map"],
                       "recovered": _lookup(r.details, "layer_map")} for r in depth]
    # pure re-parameterisations (and a vocabulary reorder) are invertible and involve no training:
    # no weight statistic says which of the two came first, so they are left out of the figure
    undecidable = [r for r in pos if r.relation == "disguised" or r.variant == "vocab-perm"]
    dirs = [(r, _lookup(r.details, "direction")) for r in pos
            if r.relation != "lora_adapter" and r.group != "merge_control" and r not in undecidable]
    known = [(r, d) for r, d in dirs if d is not None]
    s["direction"] = {"n": len(dirs), "reported": len(known), "excluded_undecidable": len(undecidable),
                      "correct": sum(1 for r, d in known if str(d).lower() in ("a->b", "a→b", "a", "forward")),
                      "wrong": [f"{r.a} -> {r.b} ({r.relation})" for r, d in known
                                if str(d).lower() not in ("a->b", "a→b", "a", "forward")],
                      "undecided": [f"{r.a} -> {r.b} ({r.relation})" for r, d in dirs if d is None]}
    secs = [r.seconds for r in recs if r.seconds is not None]
    s["seconds_per_pair"] = {"median": statistics.median(secs) if secs else None,
                             "p90": sorted(secs)[int(0.9 * (len(secs) - 1))] if secs else None,
                             "total": sum(secs)}
    return s


# --------------------------------------------------------------------------- output

def _pct(x: float | None) -> str:
    return NI if x is None else f"{100 * x:.0f}%"


def _num(x: float | None, nd: int = 3) -> str:
    return NI if x is None else f"{x:.{nd}f}"


def _na(x: float | None) -> str:
    """Baseline cell: the naive baseline cannot read GGUF files or adapters."""
    return "n/a" if x is None else f"{x:.3f}"


def write_markdown(path: Path, s: dict[str, Any], cfg: Config, meta: dict[str, Any]) -> None:
    L: list[str] = []
    L.append("# Accuracy on the zoo of trained models with known lineage\n")
    L.append(f"Zoo `{meta['zoo_key']}` ({meta['n_models']} models), subset `{cfg.subset}`, "
             f"{s['n_pairs']} pairs ({s['n_derived']} derived, {s['n_independent']} independent, "
             f"{s['n_same_init']} same-init; independent null pairs capped at {cfg.max_null}"
             f"{f'; at most {cfg.per_stratum} per stratum' if cfg.per_stratum else ''}"
             f"{f'; family {cfg.family}' if cfg.family else ''}). "
             f"Generated by `python benchmarks/accuracy.py --subset {cfg.subset}` on {meta['date']} "
             f"(commit {meta['commit']}). Threshold α = {ALPHA:g}. Errors: {s['errors']}.\n")
    L.append("## Headline\n")
    L.append("| measure | lineage (p-value) | lineage median Pearson | naive per-tensor cosine |")
    L.append("|---|---|---|---|")
    L.append(f"| ROC AUC (derived vs independent) | {_num(s['auc_tool'])} | {_num(s['auc_median_pearson'])} | "
             f"{_num(s['auc_naive_cosine'])} |")
    L.append(f"| TPR at p ≤ {ALPHA:g} | {_pct(s['tpr_at_alpha'])} | – | "
             f"{_pct(s.get('tpr_naive_at_fpr0'))} (at FPR 0: cosine > {_num(s.get('naive_cosine_threshold'))}) |")
    L.append(f"| FPR at p ≤ {ALPHA:g} | {_pct(s['fpr_at_alpha'])} | – | – |")
    L.append(f"| verdict `derived` TPR / FPR | {_pct(s['tpr_verdict'])} / {_pct(s['fpr_verdict'])} | – | – |")
    sp = s["smallest_p_independent"]
    if sp:
        where = f"{_fmt_p(sp['p'])} (log10 p = {sp['log10_p']:.1f}; {sp['a']} vs {sp['b']})"
    else:
        where = NI
    L.append(f"| smallest p on an independent pair | {where} | – | – |")
    ks = s["ks_all_independent"]
    ksn = s["ks_null_models"]
    L.append(f"| KS vs uniform, all independent p | D = {_num(ks['statistic'])}, p = {_fmt_p(ks['p'])} (n {ks['n']}) | – | – |")
    L.append(f"| KS vs uniform, null-model pairs | D = {_num(ksn['statistic'])}, p = {_fmt_p(ksn['p'])} (n {ksn['n']}) | – | – |")
    if ks.get("anticonservative_p") is not None:
        L.append(f"| one-sided KS (anti-conservative side), all independent p | D+ = {_num(ks['anticonservative_statistic'])}, "
                 f"p = {_fmt_p(ks['anticonservative_p'])}; fraction p ≤ 0.05: {ks['fraction_below_0.05']:.3f}, "
                 f"≤ 0.01: {ks['fraction_below_0.01']:.3f} | – | – |")
    sec = s["seconds_per_pair"]
    L.append(f"| seconds per pair (median / p90) | {_num(sec['median'], 2)} / {_num(sec['p90'], 2)} | – | – |\n")
    L.append("## Detection by relation (derived pairs)\n")
    L.append("| true relation | pairs | detected (`derived`) | p ≤ α | median p | median naive cosine | errors |")
    L.append("|---|---|---|---|---|---|---|")
    for k, v in s["by_relation"].items():
        L.append(f"| {k} | {v['n']} | {_pct(v['detected'])} | {_pct(v['p_le_alpha'])} | {_fmt_p(v['median_p'])} | "
                 f"{_na(v['median_naive_cosine'])} | {v['errors']} |")
    L.append("\n## Detection by transform / variant\n")
    L.append("| relation · variant | pairs | detected | p ≤ α | median p | median naive cosine |")
    L.append("|---|---|---|---|---|---|")
    for k, v in s["by_variant"].items():
        L.append(f"| {k} | {v['n']} | {_pct(v['detected'])} | {_pct(v['p_le_alpha'])} | {_fmt_p(v['median_p'])} | "
                 f"{_na(v['median_naive_cosine'])} |")
    L.append("\n## Independent pairs\n")
    L.append("| group | pairs | called `derived` | p ≤ α | min p | median naive cosine |")
    L.append("|---|---|---|---|---|---|")
    for k, v in s["independent_by_group"].items():
        L.append(f"| {k} | {v['n']} | {_pct(v['false_positive_rate'])} | {_pct(v['p_le_alpha'])} | "
                 f"{_fmt_p(v['min_p'])} | {_num(v['median_naive_cosine'])} |")
    si = s["same_init"]
    L.append(f"\nSame initialisation, different data (dependent under the null; own class): {si['n']} pairs, "
             f"called derived {_pct(si['detected'])}, median p {_fmt_p(si['median_p'])}.\n")
    L.append("## Relation typing (confusion: truth × predicted `verdict.relation`)\n")
    preds = sorted({p for row in s["confusion"].values() for p in row}, key=str)
    L.append("| truth \\ predicted | " + " | ".join(str(p) for p in preds) + " |")
    L.append("|---|" + "---|" * len(preds))
    for t, row in s["confusion"].items():
        L.append(f"| {t} | " + " | ".join(str(row.get(p, "")) for p in preds) + " |")
    ty = s["typing"]
    L.append(f"\nTyping accuracy over the issue's classes (one-hop derived pairs and independent pairs): "
             f"{_pct(ty['accuracy'])} of {ty['n']}; derived pairs only: {_pct(ty['accuracy_derived_only'])} of "
             f"{ty['n_derived']}. Per class: " + ", ".join(f"{k} {v['correct']}/{v['n']}" for k, v in ty["per_class"].items())
             + ". Merge children are compared with the candidate parents named (`--parents`, as a user would); "
             f"controls: {s['merge_controls']['called_merge']}/{s['merge_controls']['n']} fine-tunes given two "
             "sibling derivatives as decoy parents were called merges. Pure disguises count as correct only as "
             "`identical (disguised)`.")
    L.append("\n## Structure recovery\n")

    def frac(items: list[dict[str, Any]], eq) -> str:
        rep = [x for x in items if x["recovered"] is not None]
        if not rep:
            return f"{NI} ({len(items)} pairs)"
        return f"{sum(1 for x in rep if eq(x))}/{len(items)} correct ({len(rep)} reported)"

    L.append(f"- LoRA rank recovered: {frac(s['lora_rank'], lambda x: x['recovered'] == x['true'])}")
    lin = [x for x in s["merge_weights"] if x["method"] in ("linear", "slerp")]
    L.append(f"- Merge weights within 0.02 (linear and SLERP; SLERP as t): "
             f"{frac(lin, lambda x: isinstance(x['recovered'], (int, float)) and abs(x['recovered'] - x['true']) <= 0.02)}"
             + "; per pair: " + ", ".join(f"{x['b']} ({x['a']}): {x['true']} → "
                                          + (f"{x['recovered']:.3f}" if isinstance(x['recovered'], (int, float)) else "n/i")
                                          for x in s["merge_weights"]))
    L.append(f"- Layer map exact: {frac(s['layer_map'], lambda x: list(x['recovered']) == list(x['true']))}")
    d = s["direction"]
    L.append("- Direction (parent → child): " + (f"{d['correct']}/{d['n']} correct ({d['reported']} reported)"
                                                  if d["reported"] else f"{NI} ({d['n']} pairs)")
             + f"; {d.get('excluded_undecidable', 0)} pure re-parameterisations (disguises, vocabulary reorder) "
             "left out: invertible without training, no weight statistic orders them"
             + (f"; wrong: {', '.join(d['wrong'])}" if d.get("wrong") else "")
             + (f"; undecided: {', '.join(d['undecided'])}" if d.get("undecided") else ""))
    L.append("\nLoRA ranks (true → recovered): " + ", ".join(
        f"{x['b']}{' (adapter)' if 'adapter' in x['variant'] else ''}: {x['true']} → {x['recovered'] if x['recovered'] is not None else 'n/i'}" for x in s["lora_rank"]))
    L.append("\nSee `accuracy.json` for every pair and `accuracy.html` for the QQ plot of null p-values.\n")
    path.write_text("\n".join(L) + "\n")


def write_html(path: Path, s: dict[str, Any], recs: list[Record], md: str) -> None:
    """The accuracy page: the Markdown report rendered (tables, headings) with labelled QQ plots.

    Self-contained: matplotlib SVG inline, CSS inline, no external request."""
    import markdown

    from lineage.render.plots import mpl_qq, page

    null_ps = [r.p_value for r in recs if r.label == "independent" and r.p_value is not None]
    nm = [r.p_value for r in recs if r.group == "independent_null" and r.p_value is not None]
    qq = mpl_qq({"all independent pairs": null_ps, "null-model pairs": nm},
                title="QQ plot of p-values on independent pairs")
    text = markdown.markdown(md, extensions=["tables"], output_format="html")
    intro, _, rest = text.partition("</h1>")
    body = (f"{intro}</h1>" if rest else "") + (
        f'<figure class="plot">{qq}<figcaption>Observed against expected −log10 p under the null '
        f"(independent pairs: {len(null_ps)}; null-model pairs: {len(nm)}). Points on or below the dashed "
        f"diagonal: calibrated or conservative; above it: anti-conservative.</figcaption></figure>"
    ) + (rest or text)
    path.write_text(page("lineage accuracy", body), encoding="utf-8")


def _commit() -> str:
    import subprocess

    try:
        return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except Exception:  # noqa: BLE001
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subset", choices=("small", "full"), default="full")
    ap.add_argument("--max-null", type=int, default=Config.max_null)
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--per-stratum", type=int, default=0, help="at most K pairs per (label, group, relation, variant)")
    ap.add_argument("--family", choices=("llama", "gpt2"), default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-canon", action="store_true")
    ap.add_argument("--out", default=Config.out)
    ap.add_argument("--zoo", default=None, help="zoo folder (default: build or reuse the cached one)")
    args = ap.parse_args(argv)
    cfg = Config(subset=args.subset, max_null=args.max_null, limit=args.limit, seed=args.seed,
                 per_stratum=args.per_stratum, family=args.family,
                 canonicalise=not args.no_canon, out=args.out, zoo_dir=args.zoo)
    import logging

    logging.basicConfig(level=logging.WARNING)
    zoo = Zoo(cfg.zoo_dir) if cfg.zoo_dir else cached_zoo(cfg.subset)
    recs = collect_pairs(zoo, cfg)
    print(f"zoo {zoo.root}: {len(recs)} pairs", file=sys.stderr)
    t0 = time.perf_counter()
    for i, r in enumerate(recs):
        run_pair(zoo, r, cfg)
        if (i + 1) % 25 == 0 or i + 1 == len(recs):
            print(f"  {i + 1}/{len(recs)} pairs, {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    s = summarise(recs)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        zoo_key = json.loads((zoo.root / "build_info.json").read_text()).get("key", zoo.root.name)
    except (OSError, ValueError):
        zoo_key = zoo.root.name
    meta = {"zoo_key": zoo_key, "n_models": len(zoo.ids), "commit": _commit(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "wall_seconds": time.perf_counter() - t0}
    (out / "accuracy.json").write_text(json.dumps(
        {"config": asdict(cfg), "meta": meta, "summary": s, "pairs": [asdict(r) for r in recs]},
        indent=1, default=str) + "\n")
    write_markdown(out / "accuracy.md", s, cfg, meta)
    write_html(out / "accuracy.html", s, recs, (out / "accuracy.md").read_text())
    print((out / "accuracy.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
