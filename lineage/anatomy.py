"""Explain how model B relates to model A: a typed relation with its evidence.

Input is an :class:`AlignedPair`: role-keyed tensors of both models after pairing
and canonicalisation (same roles, same shapes, nn.Linear orientation), plus what
upstream stages already know (the independence p-value, layer and width maps).
:func:`explain` combines the signals in a fixed order:

1. **unrelated** — the upstream p-value is not small (or, without one, the median
   per-module Pearson correlation is within noise of zero);
2. **pruned** — depth or width differs, or one side has many fresh exact zeros;
3. direction (:mod:`lineage.signals.direction`) orients the pair as parent → child;
4. **identical** — every module equal, or equal up to float re-encoding rounding;
5. **lora merge** — the delta is low-rank on the changed modules (rank, modules;
   a quantisation of the child afterwards is named too);
6. **quantised copy** — the child sits on a quantisation grid and its error against
   the parent is what that grid's rounding produces;
7. **merge** — when candidate parents are given and a merge fit explains the child;
8. **fine-tune** vs **continued pre-training** — a dense or noise-like change,
   split by the median relative size of the delta (``cpt_rel_delta``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch

from lineage.lazyroles import PairView, is_lazy, map_roles, numel_of, recall, remember, shape_of
from lineage.signals.direction import direction
from lineage.signals.lowrank import LowRankConfig, lowrank, lowrank_modules
from lineage.signals.lowrank_summary import summarise
from lineage.signals.memo import DETECT_ROWS, detect_key, lowrank_key, pair_stats_key
from lineage.signals.merge import fit_merge
from lineage.progress import ProgressFn
from lineage.signals.pairstats import memo_pair_stats, pair_stats
from lineage.signals.quantgrid import detect_grid, detect_modules, rounds_exactly
from lineage.stream.screen import ModuleScreen

log = logging.getLogger(__name__)

RELATIONS: tuple[str, ...] = ("identical", "quantised copy", "lora merge", "fine-tune",
                              "continued pre-training", "pruned", "merge", "unrelated")


@dataclass(frozen=True)
class AlignedPair:
    """What :func:`explain` needs about a pair of models (A = reference, B = other)."""

    a: Mapping[str, torch.Tensor]
    b: Mapping[str, torch.Tensor]
    p_value: float | None = None              # independence test; small = related
    layers_a: int | None = None
    layers_b: int | None = None
    dropped_layers: tuple[int, ...] = ()      # layers of the larger model with no partner
    width_changes: Mapping[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    #: complete role maps of both models (all shapes), for the direction of shape surgery
    full_a: Mapping[str, torch.Tensor] | None = None
    full_b: Mapping[str, torch.Tensor] | None = None
    #: per-module screening statistics from the streaming pass (:mod:`lineage.stream.screen`): modules
    #: they settle get no exact work (they must describe exactly ``a`` and ``b`` as given)
    screens: Mapping[str, ModuleScreen] = field(default_factory=dict)


@dataclass(frozen=True)
class AnatomyConfig:
    alpha: float = 0.01               # p-value above which the pair is unrelated
    min_pearson: float = 0.05         # without a p-value: median Pearson needed to be related
    # median ‖δ‖/‖parent‖ from which a dense change is continued pre-training: midway between the full zoo's
    # longest fine-tune (0.246) and shortest continued pre-training (0.306); a magnitude convention, not a law
    cpt_rel_delta: float = 0.27
    quant_consistent: float = 0.9     # fraction of modules whose error matches the grid
    lowrank: LowRankConfig = field(default_factory=LowRankConfig)


@dataclass(frozen=True)
class Relation:
    """``relation`` is one of :data:`RELATIONS`; ``parent`` is "a", "b" or None."""

    relation: str
    parent: str | None
    confidence: float
    details: dict[str, object] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _pearson(x: torch.Tensor, y: torch.Tensor) -> float | None:
    x = x.double().flatten()
    y = y.double().flatten()
    x = x - x.mean()
    y = y - y.mean()
    den = float(x.norm() * y.norm())
    return float((x * y).sum()) / den if den > 0 else None


def explain(
    pair: AlignedPair,
    *,
    parents: Sequence[Mapping[str, torch.Tensor]] | None = None,
    base: Mapping[str, torch.Tensor] | None = None,
    config: AnatomyConfig | None = None,
    progress: ProgressFn | None = None,
) -> Relation:
    """Name the relation of ``pair.b`` to ``pair.a`` with evidence (see module docstring).

    ``parents`` (and optionally their common ``base``) make the merge hypothesis
    testable: B is then fitted as a merge of them.  ``pair.screens`` (streamed per-module
    statistics) let modules they settle skip the exact signals; ``progress`` is called as
    ``progress(done, total, "anatomy: role")`` per module of the first pass.
    """
    cfg = config or AnatomyConfig()
    a, b = pair.a, pair.b
    # ``a`` and ``b`` may read on access (lineage.lazyroles): shapes come from shape_of and
    # every pass below visits each module once.
    roles = [r for r in a if r in b and shape_of(a, r) == shape_of(b, r) and numel_of(a, r) > 1]
    workers = None if is_lazy(a, b) else 1
    details: dict[str, object] = {"modules_compared": len(roles)}
    if not roles:
        return Relation("unrelated", None, 0.0, {**details, "reason": "no shared module"})

    # 1. related at all?
    speculate = workers is None and isinstance(getattr(a, "memo", None), dict)

    screens = pair.screens

    def screened(r: str) -> tuple[bool, float | None]:
        """``(settled, pearson)``: the module's first-pass results from its screen (not settled: exact work)."""
        sc = screens[r]
        st = remember(a, pair_stats_key(b, r), lambda: sc.stats)
        if len(shape_of(a, r)) != 2:
            return True, st.pearson
        for child, pm, cm in (("b", a, b), ("a", b, a)):  # both orientations, when the screen settles them
            lr, qg = sc.lowrank(child), sc.quant(child)
            if lr is not None and qg is not None:
                remember(pm, detect_key(cm, r), lambda qg=qg: qg)
                remember(pm, lowrank_key(cm, r, cfg.lowrank), lambda lr=lr: lr)
        return recall(a, lowrank_key(b, r, cfg.lowrank)) is not None, st.pearson

    def first_pass(r: str) -> float | None:
        # Read-on-access models: each module is read once here.  Besides its correlation, the
        # per-module results later steps need are computed now for the orientation a → b (the
        # usual one) and remembered on ``a``; if B turns out to be the parent they are recomputed.
        # Modules the streamed screen settles are not read at all.
        if not speculate:
            return memo_pair_stats(a, b, r).pearson
        if r in screens:
            settled, p = screened(r)
            if settled:
                return p
        x, y = a[r], b[r]
        st = remember(a, pair_stats_key(b, r), lambda: pair_stats(x, y))
        if x.dim() == 2:
            qg = remember(a, detect_key(b, r), lambda: detect_grid(y, x, max_rows=DETECT_ROWS))
            # a module that is exactly the parent quantised needs no decomposition (int8 children:
            # every module changed by rounding, most of them by nothing else)
            only = qg.consistent_with_parent is True and rounds_exactly(y, x, qg)
            remember(a, lowrank_key(b, r, cfg.lowrank),
                     lambda: lowrank(x, y, config=cfg.lowrank, quantised_only=only, quant_grid=qg))
        return st.pearson

    pears = []
    for i, (r, p) in enumerate(map_roles(first_pass, roles, workers=workers), start=1):
        if p is not None:
            pears.append(p)
        if progress is not None:
            progress(i, len(roles), f"anatomy: {r}")
    sizes = sorted(numel_of(a, r) for r in roles)
    med_r = sorted(pears)[len(pears) // 2] if pears else 0.0
    details["pearson_median"] = med_r
    if pair.p_value is not None:
        details["p_value"] = pair.p_value
        if pair.p_value > cfg.alpha:
            return Relation("unrelated", None, 1.0 - cfg.alpha, details)
    elif med_r < max(cfg.min_pearson, 6.0 / math.sqrt(sizes[len(sizes) // 2])):
        return Relation("unrelated", None, 0.9, details)

    # 2. depth / width surgery
    surgery = bool(pair.dropped_layers or pair.width_changes) or (
        pair.layers_a is not None and pair.layers_b is not None and pair.layers_a != pair.layers_b)
    dirn = direction(a, b, full_a=pair.full_a, full_b=pair.full_b, screens=screens) if surgery \
        else direction(a, b, screens=screens)
    details["direction"] = dirn.to_dict()
    if surgery:
        parent = dirn.parent
        if dirn.decided_by != "structure" and pair.layers_a is not None and pair.layers_b is not None \
                and pair.layers_a != pair.layers_b:
            parent = "a" if pair.layers_a > pair.layers_b else "b"  # removal is the common surgery
        details.update(layers=(pair.layers_a, pair.layers_b), dropped_layers=list(pair.dropped_layers),
                       width_changes={k: [list(s) for s in v] for k, v in pair.width_changes.items()})
        return Relation("pruned", parent, 0.9, details)
    if dirn.decided_by == "sparsity":
        sp = dirn.evidence["sparsity"]
        details["sparsity"] = max(sp["zeros_only_in_a"], sp["zeros_only_in_b"])
        return Relation("pruned", dirn.parent, dirn.confidence, details)

    # 3. orient parent → child
    parent_side = dirn.parent or "a"
    P, C = (a, b) if parent_side == "a" else (b, a)

    # 4. identical / re-encoded
    if all(screens[r].changed == 0 if r in screens else torch.equal(P[r], C[r]) for r in roles):
        return Relation("identical", None, 1.0, {**details, "encoding": "same values"})
    mats = PairView(P, C, [r for r in roles if len(shape_of(P, r)) == 2])
    lr, summ = lowrank_modules(mats, cfg.lowrank)
    details["lowrank"] = summ.to_dict()
    rel = sorted(x.rel_delta for x in lr.values() if x.rel_delta is not None)
    rel_med = rel[len(rel) // 2] if rel else None
    details["rel_delta_median"] = rel_med
    if summ.kind in ("unchanged", "rounding"):
        grids = sorted({x.child_float_grid for x in lr.values() if x.status == "rounding"} - {None})
        return Relation("identical", dirn.parent, 0.99,
                        {**details, "encoding": f"re-encoded ({', '.join(grids)})" if grids else "same"})

    _, qsum = detect_modules(mats)
    details["quant"] = qsum.to_dict()
    quantised = qsum.fraction_on_grid >= 0.5
    if quantised:
        summ = summarise(lr, noise_is_untouched=True)
        details["lowrank"] = summ.to_dict()

    # 5. merged LoRA (possibly quantised afterwards)
    if summ.kind == "low-rank":
        details.update(rank=summ.rank, modules=list(summ.modules), modules_description=summ.description,
                       quant_format=qsum.format if quantised else None)
        return Relation("lora merge", parent_side, max(dirn.confidence, 0.5), details)

    # 6. quantised copy
    if quantised and (qsum.fraction_consistent or 0.0) >= cfg.quant_consistent:
        details["quant_format"] = qsum.format
        return Relation("quantised copy", parent_side, 0.95, details)

    # 7. merge of given parents
    if parents:
        fit = fit_merge(b, parents, base)
        details["merge"] = {k: v for k, v in fit.to_dict().items() if k != "per_module"}
        if fit.explains:
            return Relation("merge", None, 0.9, details)

    # 8. dense change: fine-tune or continued pre-training
    details["quant_format"] = qsum.format if quantised else None
    # An iid-looking (noise-like) perturbation is not training; a structured dense change
    # as large as ``cpt_rel_delta`` is continued pre-training.
    kind = ("continued pre-training" if summ.kind == "dense" and rel_med is not None
            and rel_med >= cfg.cpt_rel_delta else "fine-tune")
    # MoTHer's kurtosis flip for continued pre-training is not applied: on the zoo's
    # short continued-pre-training edges kurtosis did not grow (see direction.py).
    details["change"] = "noise-like perturbation" if summ.kind == "noise-like" else "structured dense update"
    parent = dirn.parent
    conf = dirn.confidence if parent is not None else 0.5
    return Relation(kind, parent, conf, details)
