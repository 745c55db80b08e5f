"""Which of two related models is the parent?

Evidence, strongest first (each gives a vote "a", "b" or None and a score):

1. **sparsity** — pruning creates exact zeros; the model with clearly more exact
   zeros (≥ 5 points more, where the other is not zero) is the child.
2. **grid** — quantisation is one-way: a model on an integer quantisation grid
   whose relative is not is the child.
3. **precision** — a model stored in a narrower float format (bf16/fp16) than
   its fp32 relative is usually the re-encoded child (weaker: people also
   up-cast).
4. **variance growth** — an update that is independent of the weights it is
   added to makes the variance grow: ``var(child) = var(parent) + var(δ)`` when
   ``cov(parent, δ) = 0``, whereas in the wrong direction ``cov(child, −δ) =
   −var(δ)``.  Per module the vote goes to the lower-variance side, with a z
   score ``(var_b − var_a) / (2 σ_a σ_δ / √N)`` (the sampling spread of
   ``2 cov(parent, δ)`` under independence).  This covers fine-tunes, merged
   LoRAs, re-quantisation noise and continued pre-training alike, as long as
   training did not shrink the weights by more than half the update's own
   variance (strong weight decay would break it; so would distillation).
   It votes when the combined z is at least 1 (weak evidence is still better
   than kurtosis on the zoo: see below).
5. **kurtosis** (MoTHer) — excess kurtosis grows in pre-training and shrinks in
   fine-tuning, so its vote depends on the edge type: for ``relation`` =
   "continued pre-training" the higher-kurtosis side is the child, otherwise
   the parent.  Used only when the stronger evidence is silent.  On the small
   zoo (weights barely trained, excess kurtosis negative) kurtosis fell on
   fine-tune *and* continued-pre-training edges and was wrong on tiny
   perturbations (adding noise moves kurtosis toward 0, i.e. up when negative),
   so the flip for continued pre-training is only applied when the caller asks.

The result says which evidence decided and how sure it is.  Validation on the
zoo's chains (fine-tune, LoRA, quantised, continued pre-training edges) is the
real test of these rules; the unit tests only show that each rule does what it
says on planted data.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import torch

from lineage.lazyroles import is_lazy, map_roles, numel_of, shape_of
from lineage.signals.floatgrid import float_grid
from lineage.signals.pairstats import memo_pair_stats
from lineage.signals.quantgrid import detect_grid

if TYPE_CHECKING:
    from lineage.stream.screen import ModuleScreen

log = logging.getLogger(__name__)

_RANK = {"fp32": 3, "fp16": 2, "bf16": 2}


@dataclass(frozen=True)
class Direction:
    """``parent`` is "a", "b" or None (undecided)."""

    parent: str | None
    confidence: float
    decided_by: str | None
    evidence: dict[str, dict[str, object]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _kurtosis(x: torch.Tensor) -> float:
    x = x.double().flatten()
    x = x - x.mean()
    v = float((x * x).mean())
    return float((x**4).mean()) / (v * v) - 3.0 if v > 0 else 0.0


def _other(side: str) -> str:
    return "b" if side == "a" else "a"


# ----------------------------------------------------------------------------- structural evidence
#
# Surgery that changes shapes is one-way in a recognisable manner:
# * depth — dropping layers leaves the shallower model's layers a subset of the deeper one's;
#   stacking/duplicating layers (frankenmerges, depth up-scaling) leaves two strongly correlated
#   layers in the deeper child, and block expansion (LLaMA-Pro) leaves layers with zero output
#   projections.  Distinct layers of a trained model are uncorrelated (independent initialisation).
# * width — pruning keeps a subset of neurons; growing a layer (net2net) duplicates neurons or adds
#   zero-output ones.
# * vocabulary — extending initialises the new rows at (or near) the mean embedding
#   (``resize_token_embeddings``) or at zero; pruning removes trained rows, which are far from the mean.
# In each case the default is the common direction (removal) unless the larger side carries the
# fingerprint of growth.

#: ``between``: with ``r_p = corr(p, c − p)`` (median over modules), an update independent of
#: the parent (fine-tune, LoRA, noise, re-quantisation) gives ``r_parent ≈ 0`` while the child
#: side is strongly negative, ``r_child ≈ −σ_δ/σ_child``; an interpolation between the pair and a
#: third model (a linear/SLERP/TIES merge seen from one of its parents) shrinks *both* sides
#: along the difference.  When the side variance growth picked has a negative ``r`` larger than
#: this fraction of the other side's, neither is an independent-update ancestor of the other
#: and the pair is left undecided.  Full zoo: ratio ≤ 0.12 on all 58 one-hop fine-tune, CPT,
#: LoRA and noise edges; 0.21–0.76 on 9 of the 12 merge edges (the other 3 have ratio ≤ 0.02
#: or a positive ``r``: a merge that is mostly one parent looks like a fine-tune of it).
BETWEEN_RATIO = 0.16

#: Mean Pearson between two layers of one model above which they are copies of each other.
DUP_LAYER_PEARSON = 0.5
#: Cosine between two neurons' input rows above which one duplicates the other.
DUP_UNIT_COSINE = 0.99
#: A vocabulary row closer to the mean row than this fraction of the median distance is "fresh".
FRESH_ROW_DISTANCE = 0.25


def _layers(m: Mapping[str, torch.Tensor]) -> dict[int, dict[str, str]]:
    out: dict[int, dict[str, str]] = {}
    for r in m:
        if r.startswith("L") and "." in r:
            head, rest = r.split(".", 1)
            if head[1:].isdigit():
                out.setdefault(int(head[1:]), {})[rest] = r
    return out


def _corr(x: torch.Tensor, y: torch.Tensor) -> float:
    x = x.double().flatten()
    y = y.double().flatten()
    x = x - x.mean()
    y = y - y.mean()
    den = float(x.norm() * y.norm())
    return float((x * y).sum()) / den if den > 0 else 0.0


def _grown_layers(m: Mapping[str, torch.Tensor]) -> tuple[float, int]:
    """(highest mean Pearson between two of the model's layers, number of zero-output layers)."""
    layers = _layers(m)
    idx = sorted(layers)
    best = 0.0
    for k, i in enumerate(idx):
        for j in idx[k + 1:]:
            shared = [s for s in layers[i] if s.endswith("weight") and s in layers[j]
                      and len(shape_of(m, layers[i][s])) == 2
                      and shape_of(m, layers[i][s]) == shape_of(m, layers[j][s])]
            if shared:
                best = max(best, sum(_corr(m[layers[i][s]], m[layers[j][s]]) for s in shared) / len(shared))
    zero = sum(1 for i in idx if all(s in layers[i] and not bool(m[layers[i][s]].any())
                                     for s in ("attn.o.weight", "mlp.down.weight")))
    return best, zero


def _grown_units(m: Mapping[str, torch.Tensor], layer: dict[str, str], max_rows: int = 512) -> int:
    """Neurons of one MLP that duplicate another neuron or have a zero output column."""
    up = m[layer["mlp.up.weight"]].double()
    n = up.shape[0]
    rows = up / up.norm(dim=1, keepdim=True).clamp_min(1e-30)
    pick = torch.arange(n)[:: max(1, n // max_rows)]
    cos = rows[pick] @ rows.T
    cos[torch.arange(len(pick)), pick] = 0.0
    dup = int((cos.max(dim=1).values > DUP_UNIT_COSINE).sum()) * n // max(len(pick), 1)
    zero = 0
    if "mlp.down.weight" in layer:
        zero = int((m[layer["mlp.down.weight"]].abs().sum(dim=0) == 0).sum())
    return dup + zero


def _fresh_rows(e: torch.Tensor) -> int:
    """Rows of an embedding matrix that sit near the mean row (fresh token initialisation)."""
    e = e.double()
    dist = (e - e.mean(dim=0, keepdim=True)).norm(dim=1)
    med = float(dist.median())
    return int((dist < FRESH_ROW_DISTANCE * med).sum()) if med > 0 else 0


def structure_evidence(full_a: Mapping[str, torch.Tensor], full_b: Mapping[str, torch.Tensor]
                       ) -> dict[str, object]:
    """Direction evidence from shape changes between two models' full role maps (see above).

    Returns ``{"vote": "a"|"b"|None, "kind": "depth"|"width"|"vocab"|None, ...}``; the vote names
    the parent.  No shape change gives no vote.
    """
    la, lb = _layers(full_a), _layers(full_b)
    if len(la) != len(lb):
        deep, other = ("a", "b") if len(la) > len(lb) else ("b", "a")
        best, zero = _grown_layers(full_a if deep == "a" else full_b)
        grown = best >= DUP_LAYER_PEARSON or zero > 0
        return {"vote": other if grown else deep, "kind": "depth", "layers_a": len(la), "layers_b": len(lb),
                "duplicate_layer_pearson": best, "zero_output_layers": zero,
                "reading": "layers duplicated/inserted in the deeper child" if grown
                else "layers dropped from the deeper parent"}
    for i in sorted(set(la) & set(lb)):
        ra, rb = la[i].get("mlp.up.weight"), lb[i].get("mlp.up.weight")
        if ra is None or rb is None:
            continue
        wa, wb = shape_of(full_a, ra)[0], shape_of(full_b, rb)[0]
        if wa != wb:
            wide, other = ("a", "b") if wa > wb else ("b", "a")
            grown = _grown_units(full_a if wide == "a" else full_b, la[i] if wide == "a" else lb[i])
            is_grown = grown >= 0.5 * abs(wa - wb)
            return {"vote": other if is_grown else wide, "kind": "width", "width_a": wa, "width_b": wb,
                    "grown_units": grown, "reading": "neurons added in the wider child" if is_grown
                    else "neurons pruned from the wider parent"}
    if "embed.weight" in full_a and "embed.weight" in full_b:
        va, vb = shape_of(full_a, "embed.weight")[0], shape_of(full_b, "embed.weight")[0]
        if va != vb:
            big, other = ("a", "b") if va > vb else ("b", "a")
            fresh = _fresh_rows((full_a if big == "a" else full_b)["embed.weight"])
            ext = fresh >= 0.5 * abs(va - vb)
            return {"vote": other if ext else big, "kind": "vocab", "vocab_a": va, "vocab_b": vb,
                    "fresh_rows": fresh, "reading": "tokens added (fresh rows) in the larger child" if ext
                    else "tokens removed from the larger parent"}
    return {"vote": None, "kind": None}


def direction(
    a: Mapping[str, torch.Tensor],
    b: Mapping[str, torch.Tensor],
    *,
    relation: str | None = None,
    max_grid_modules: int = 6,
    full_a: Mapping[str, torch.Tensor] | None = None,
    full_b: Mapping[str, torch.Tensor] | None = None,
    screens: Mapping[str, ModuleScreen] | None = None,
) -> Direction:
    """Decide which of two aligned role-keyed models is the parent (see module docstring).

    ``a`` and ``b`` hold the paired, equally shaped modules.  ``full_a``/``full_b`` (optional)
    are the models' complete role maps: when the shapes differ (depth, width or vocabulary
    surgery) :func:`structure_evidence` orients the pair first.  ``screens`` (streamed per-module
    statistics of exactly ``a`` and ``b``, :mod:`lineage.stream.screen`) replace reading the modules
    they cover.
    """
    screens = screens or {}
    roles = [r for r in a if r in b and shape_of(a, r) == shape_of(b, r) and numel_of(a, r) > 1]
    mats = [r for r in roles if len(shape_of(a, r)) == 2]
    ev: dict[str, dict[str, object]] = {}
    if not roles:
        return Direction(None, 0.0, None, {})
    sample = mats[:: max(1, len(mats) // max_grid_modules)][:max_grid_modules]

    # One pass over the modules (each read once: the mappings may read from disk on access,
    # see lineage.lazyroles); every statistic below is reduced from these per-module results.
    in_sample = set(sample)

    def visit(r: str):
        grid = None
        sc = screens.get(r)
        if sc is not None and sc.quant_a is not None and sc.quant_b is not None and sc.grid_a and sc.grid_b:
            if r in in_sample:
                grid = (sc.quant_a.on_grid, sc.quant_b.on_grid, _RANK[sc.grid_a], _RANK[sc.grid_b])
            return sc.stats, grid
        if sc is not None and r not in in_sample:
            return sc.stats, None
        if r in in_sample:
            x, y = a[r], b[r]
            grid = (detect_grid(x, max_rows=64).on_grid, detect_grid(y, max_rows=64).on_grid,
                    _RANK[float_grid(x)], _RANK[float_grid(y)])
        return memo_pair_stats(a, b, r), grid  # shared with the caller's own pass when memoised

    stats = dict(map_roles(visit, roles, workers=None if is_lazy(a, b) else 1))

    # 1. sparsity
    za = zb = tot = 0
    for r in roles:
        za += stats[r][0].zeros_only_x
        zb += stats[r][0].zeros_only_y
        tot += stats[r][0].n
    fa, fb = za / tot, zb / tot

    # 2. grid (computed first: rounding to a coarse grid also creates zeros)
    ga = [stats[r][1][0] for r in sample]
    gb = [stats[r][1][1] for r in sample]
    qa = sum(ga) / max(len(ga), 1)
    qb = sum(gb) / max(len(gb), 1)
    gvote = None
    if abs(qa - qb) >= 0.5:
        gvote = "a" if qa < qb else "b"  # the side on the grid is the child
    vote = None
    if abs(fa - fb) >= 0.05:
        sparser_on_grid = qa >= 0.5 if fa > fb else qb >= 0.5
        if not sparser_on_grid:
            vote = "b" if fa > fb else "a"  # more fresh zeros = pruned child
    ev["sparsity"] = {"vote": vote, "zeros_only_in_a": fa, "zeros_only_in_b": fb}
    ev["grid"] = {"vote": gvote, "on_grid_a": qa, "on_grid_b": qb}
    pa = min((stats[r][1][2] for r in sample), default=3)
    pb = min((stats[r][1][3] for r in sample), default=3)
    ev["precision"] = {"vote": None if pa == pb else ("a" if pa > pb else "b"),
                       "finest_a": pa, "finest_b": pb}

    # 4. variance growth and 5. kurtosis
    zs, votes_b = [], 0
    ka, kb, w = 0.0, 0.0, 0
    grow_a, grow_b = [], []  # corr(a, b − a) and corr(b, a − b) per module (see BETWEEN_R)
    for r in mats or roles:
        st = stats[r][0]
        n = st.n
        va, vb, vd = st.var("x"), st.var("y"), st.var("d")
        if vd <= 0:
            continue
        se = 2 * math.sqrt(va * vd / n) + 1e-300
        z = (vb - va) / se
        zs.append(z)
        votes_b += z > 0  # b has more variance: a is the parent
        if st.sxx > 0 and st.syy > 0 and st.sdd > 0:
            grow_a.append((st.sxy - st.sxx) / math.sqrt(st.sxx * st.sdd))
            grow_b.append((st.sxy - st.syy) / math.sqrt(st.syy * st.sdd))
        ka += st.kurtosis("x") * n
        kb += st.kurtosis("y") * n
        w += n
    if zs:
        zsum = sum(max(-5.0, min(5.0, z)) for z in zs) / math.sqrt(len(zs))
        frac_a = votes_b / len(zs)
        vvote = ("a" if zsum > 0 else "b") if abs(zsum) >= 1 else None
        ra = sorted(grow_a)[len(grow_a) // 2] if grow_a else 0.0
        rb = sorted(grow_b)[len(grow_b) // 2] if grow_b else 0.0
        rp, rc = (ra, rb) if vvote == "a" else (rb, ra)
        between = vvote is not None and rp < 0 and rc < 0 and rp / rc > BETWEEN_RATIO
        ev["variance_growth"] = {"vote": None if between else vvote, "z": zsum, "modules": len(zs),
                                 "fraction_voting_a": frac_a, "growth_corr_a": ra, "growth_corr_b": rb,
                                 "between": between}
    else:
        ev["variance_growth"] = {"vote": None, "z": 0.0, "modules": 0, "fraction_voting_a": None}
    if w:
        ka, kb = ka / w, kb / w
        hi = "a" if ka > kb else "b"
        kvote = (_other(hi) if relation == "continued pre-training" else hi) if abs(ka - kb) > 1e-9 * max(abs(ka), 1.0) else None
        ev["kurtosis"] = {"vote": kvote, "kurtosis_a": ka, "kurtosis_b": kb, "relation": relation}
    else:
        ev["kurtosis"] = {"vote": None}

    if full_a is not None and full_b is not None:
        ev["structure"] = structure_evidence(full_a, full_b)
        if ev["structure"]["vote"] is not None:
            return Direction(ev["structure"]["vote"], 0.9, "structure", ev)
    for name, conf in (("sparsity", 0.99), ("grid", 0.99), ("precision", 0.8)):
        v = ev[name]["vote"]
        if v is not None:
            return Direction(v, conf, name, ev)
    vg = ev["variance_growth"]
    if vg["vote"] is not None:
        f = vg["fraction_voting_a"] if vg["vote"] == "a" else 1 - vg["fraction_voting_a"]
        conf = 0.5 + 0.5 * (1 - math.exp(-abs(vg["z"]) / 10)) * f
        return Direction(vg["vote"], round(conf, 4), "variance_growth", ev)
    # kurtosis is reported, never decisive: on the full zoo it voted against the truth on most
    # fine-tune edges (fine-tuning raised kurtosis there) and on re-orderings it votes on nothing.
    return Direction(None, 0.0, None, ev)


# ----------------------------------------------------------------------------- merges in context


#: A model is the interpolation of two others when its position along their difference is in
#: (MERGE_ALPHA, 1 − MERGE_ALPHA) and what the line leaves over is below MERGE_RESIDUAL of its
#: distance to the nearer end.
MERGE_ALPHA = 0.05
MERGE_RESIDUAL = 0.25
#: The same bound in task-vector space (relative to ‖c − base‖).
MERGE_RESIDUAL_BASE = 0.6


@dataclass(frozen=True)
class Between:
    """Where ``c`` sits relative to the segment ``p2 → p1``: ``c ≈ p2 + alpha·(p1 − p2)``.

    ``residual`` is ‖c − p2 − alpha(p1 − p2)‖ / min(‖c − p1‖, ‖c − p2‖): small when ``c`` lies on
    the segment.  ``interpolates`` says whether ``c`` is a merge of ``p1`` and ``p2``.
    """

    alpha: float
    residual: float
    interpolates: bool
    weights: tuple[float, float] = (0.0, 0.0)
    #: cosine of the two parents' task vectors over ``base`` (when a base was given): parents
    #: trained independently from that base have weakly correlated updates; a strongly shared
    #: component means the base is not their common parent (e.g. a sibling taken as base)
    task_cos: float | None = None

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def between(c: Mapping[str, torch.Tensor], p1: Mapping[str, torch.Tensor], p2: Mapping[str, torch.Tensor],
            base: Mapping[str, torch.Tensor] | None = None) -> Between:
    """Is ``c`` an interpolation (linear, SLERP, TIES-like merge) of ``p1`` and ``p2``?

    Pairwise, a merge of two siblings is second-moment indistinguishable from a fine-tune the
    other way round (see ``BETWEEN_RATIO``); with the three models in view it is not: of three
    points, exactly one lies *between* the other two, and training does not extrapolate past its
    parent.  Without ``base`` the fit is the segment ``p2 → p1``; with the parents' common
    ``base`` it is in task-vector space, ``c − base ≈ w1 (p1 − base) + w2 (p2 − base)`` with both
    weights positive (sparsified merges such as TIES leave the segment but not that cone);
    ``alpha`` is then ``w1 / (w1 + w2)`` and ``residual`` relative to ‖c − base‖.
    Float64 sums over all shared, equally shaped matrices.
    """
    ms = [c, p1, p2] + ([base] if base is not None else [])
    roles = [r for r in c if all(r in m for m in ms) and len(shape_of(c, r)) == 2
             and all(shape_of(m, r) == shape_of(c, r) for m in ms)]
    if base is not None:
        G = torch.zeros(2, 2, dtype=torch.float64)
        h = torch.zeros(2, dtype=torch.float64)
        uu = 0.0
        for r in roles:
            b0 = base[r].double()
            u = c[r].double() - b0
            v = [p1[r].double() - b0, p2[r].double() - b0]
            for i in range(2):
                h[i] += float((u * v[i]).sum())
                for j in range(2):
                    G[i, j] += float((v[i] * v[j]).sum())
            uu += float((u * u).sum())
        if uu <= 0 or float(torch.linalg.det(G)) <= 0:
            return Between(0.0, float("inf"), False)
        w = torch.linalg.solve(G, h)
        resid = math.sqrt(max(uu - float(w @ h), 0.0) / uu)
        w1, w2 = float(w[0]), float(w[1])
        ok = w1 > MERGE_ALPHA and w2 > MERGE_ALPHA and resid < MERGE_RESIDUAL_BASE
        tcos = float(G[0, 1]) / math.sqrt(float(G[0, 0]) * float(G[1, 1]))
        return Between(w1 / (w1 + w2) if w1 + w2 > 0 else 0.0, resid, ok, (w1, w2), tcos)
    num = den = cc = c1 = 0.0
    for r in roles:
        x, y, z = c[r].double(), p1[r].double(), p2[r].double()
        u, v = x - z, y - z          # c − p2, p1 − p2
        num += float((u * v).sum())
        den += float((v * v).sum())
        cc += float((u * u).sum())
        c1 += float(((x - y) ** 2).sum())
    if den <= 0 or cc <= 0:
        return Between(0.0, float("inf"), False)
    alpha = num / den
    resid2 = max(cc - alpha * num, 0.0)     # ‖u − αv‖² = ‖u‖² − α⟨u, v⟩ at the optimum
    near = math.sqrt(min(cc, c1)) or 1e-300
    res = math.sqrt(resid2) / near
    ok = MERGE_ALPHA < alpha < 1 - MERGE_ALPHA and res < MERGE_RESIDUAL
    return Between(alpha, res, ok, (alpha, 1 - alpha))
