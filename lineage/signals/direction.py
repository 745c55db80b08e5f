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

import torch

from lineage.signals.lowrank import float_grid
from lineage.signals.quantgrid import detect_grid

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


def direction(
    a: Mapping[str, torch.Tensor],
    b: Mapping[str, torch.Tensor],
    *,
    relation: str | None = None,
    max_grid_modules: int = 6,
) -> Direction:
    """Decide which of two aligned role-keyed models is the parent (see module docstring)."""
    roles = [r for r in a if r in b and a[r].shape == b[r].shape and a[r].numel() > 1]
    mats = [r for r in roles if a[r].dim() == 2]
    ev: dict[str, dict[str, object]] = {}
    if not roles:
        return Direction(None, 0.0, None, {})

    # 1. sparsity
    za = zb = tot = 0
    for r in roles:
        x, y = a[r], b[r]
        za += int(((x == 0) & (y != 0)).sum())
        zb += int(((y == 0) & (x != 0)).sum())
        tot += x.numel()
    fa, fb = za / tot, zb / tot

    # 2. grid (computed first: rounding to a coarse grid also creates zeros)
    sample = mats[:: max(1, len(mats) // max_grid_modules)][:max_grid_modules]
    ga = [detect_grid(a[r], max_rows=64).on_grid for r in sample]
    gb = [detect_grid(b[r], max_rows=64).on_grid for r in sample]
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
    pa = min((_RANK[float_grid(a[r])] for r in sample), default=3)
    pb = min((_RANK[float_grid(b[r])] for r in sample), default=3)
    ev["precision"] = {"vote": None if pa == pb else ("a" if pa > pb else "b"),
                       "finest_a": pa, "finest_b": pb}

    # 4. variance growth and 5. kurtosis
    zs, votes_b = [], 0
    ka, kb, w = 0.0, 0.0, 0
    for r in mats or roles:
        x, y = a[r].double().flatten(), b[r].double().flatten()
        d = y - x
        n = x.numel()
        va, vb, vd = float(x.var()), float(y.var()), float(d.var())
        if vd <= 0:
            continue
        se = 2 * math.sqrt(va * vd / n) + 1e-300
        z = (vb - va) / se
        zs.append(z)
        votes_b += z > 0  # b has more variance: a is the parent
        ka += _kurtosis(x) * n
        kb += _kurtosis(y) * n
        w += n
    if zs:
        zsum = sum(max(-5.0, min(5.0, z)) for z in zs) / math.sqrt(len(zs))
        frac_a = votes_b / len(zs)
        vvote = ("a" if zsum > 0 else "b") if abs(zsum) >= 1 else None
        ev["variance_growth"] = {"vote": vvote, "z": zsum, "modules": len(zs),
                                 "fraction_voting_a": frac_a}
    else:
        ev["variance_growth"] = {"vote": None, "z": 0.0, "modules": 0, "fraction_voting_a": None}
    if w:
        ka, kb = ka / w, kb / w
        hi = "a" if ka > kb else "b"
        kvote = (_other(hi) if relation == "continued pre-training" else hi) if abs(ka - kb) > 1e-9 * max(abs(ka), 1.0) else None
        ev["kurtosis"] = {"vote": kvote, "kurtosis_a": ka, "kurtosis_b": kb, "relation": relation}
    else:
        ev["kurtosis"] = {"vote": None}

    for name, conf in (("sparsity", 0.99), ("grid", 0.99), ("precision", 0.8)):
        v = ev[name]["vote"]
        if v is not None:
            return Direction(v, conf, name, ev)
    vg = ev["variance_growth"]
    if vg["vote"] is not None:
        f = vg["fraction_voting_a"] if vg["vote"] == "a" else 1 - vg["fraction_voting_a"]
        conf = 0.5 + 0.5 * (1 - math.exp(-abs(vg["z"]) / 10)) * f
        return Direction(vg["vote"], round(conf, 4), "variance_growth", ev)
    if ev["kurtosis"]["vote"] is not None:
        return Direction(ev["kurtosis"]["vote"], 0.55, "kurtosis", ev)
    return Direction(None, 0.0, None, ev)
