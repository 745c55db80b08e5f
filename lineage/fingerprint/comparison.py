"""Comparing two fingerprints: a Mantel-type test on shared probe tokens, layer by layer, with a layer map."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lineage import depth as depth_mod
from lineage.canon import sketch_null_sd, sketch_residuals, sketch_scores
from lineage.errors import FingerprintError
from lineage.fingerprint.config import CONFIG
from lineage.fingerprint.sketch import Fingerprint
from lineage.stattest import combine, log10_normal_sf


@dataclass(frozen=True)
class FingerprintLayer:
    layer_a: int
    layer_b: int
    scores: dict[str, float]
    z: float
    log10_p: float

    def to_dict(self) -> dict[str, Any]:
        return {"layer_a": self.layer_a, "layer_b": self.layer_b, "scores": self.scores, "z": self.z,
                "log10_p": self.log10_p}


CAN_CONCLUDE = (
    "A small p-value means B's layers compute token-anchored maps that match A's far beyond independent "
    "initialisation, whatever residual rotation, permutation, norm refolding or head/neuron reshuffling was applied; "
    "the layer map shows dropped, duplicated or reordered layers."
)
CANNOT_CONCLUDE = (
    "A fingerprint sees only the shared probe tokens: it is weaker than a weight comparison on weak relations "
    "(continued pre-training, prune + distil), cannot name the transforms undone, LoRA ranks, quantisation or merge "
    "weights, and a large p-value does not prove independence."
)


@dataclass(frozen=True)
class FingerprintComparison:
    """Outcome of :func:`compare_fingerprints`."""

    log10_p: float
    z: float
    n_shared_probes: int
    layers: tuple[FingerprintLayer, ...]
    layer_map: depth_mod.LayerMap
    seconds: float
    notes: tuple[str, ...] = ()

    @property
    def p_value(self) -> float:
        return 10.0 ** self.log10_p if self.log10_p > -308 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"p_value": self.p_value, "log10_p": self.log10_p, "z": self.z, "null": "independent initialisation",
                "n_shared_probes": self.n_shared_probes, "layers": [r.to_dict() for r in self.layers],
                "layer_map": self.layer_map.to_dict(), "seconds": self.seconds, "notes": list(self.notes),
                "can_conclude": CAN_CONCLUDE, "cannot_conclude": CANNOT_CONCLUDE}


def _restrict(fp: Fingerprint, idx: torch.Tensor) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    K = fp.K[idx][:, idx]
    return K, [{k: v[idx][:, idx] for k, v in layer.items()} for layer in fp.layers]


def compare_fingerprints(fa: Fingerprint, fb: Fingerprint, *, n_perm: int = CONFIG.n_perm, depth: str = "auto",
                         z_inflation: float | None = None) -> FingerprintComparison:
    """Test lineage from fingerprints alone (Mantel-type null on shared probe tokens).

    ``z_inflation`` (default ``CONFIG.z_inflation``, :mod:`lineage.fingerprint.config`) divides each layer's z: the
    token-relabelling null is exact for randomly initialised models only.  The
    p-value is two-sided on the combined z (see the comment at the end).
    """
    infl = CONFIG.z_inflation if z_inflation is None else float(z_inflation)
    t0 = time.perf_counter()
    pos_b = {t: j for j, t in enumerate(fb.tokens)}
    shared = [(i, pos_b[t]) for i, t in enumerate(fa.tokens) if t in pos_b]
    notes: list[str] = []
    if len(shared) < CONFIG.min_shared:
        raise FingerprintError(f"only {len(shared)} probe tokens are shared (need {CONFIG.min_shared}): "
                               "different tokenizers?")
    ia = torch.as_tensor([s[0] for s in shared])
    ib = torch.as_tensor([s[1] for s in shared])
    Ka, La = _restrict(fa, ia)
    Kb, Lb = _restrict(fb, ib)
    ra = [sketch_residuals(layer, Ka) for layer in La]
    rb = [sketch_residuals(layer, Kb) for layer in Lb]
    m = len(shared)
    S = np.zeros((len(ra), len(rb)))
    for i in range(len(ra)):
        for j in range(len(rb)):
            sc = sketch_scores(ra[i], rb[j])
            S[i, j] = float(np.mean(list(sc.values()))) if sc else 0.0
    lmap = depth_mod.layer_map(S, n_entries=m * (m - 1))
    searched = depth == "search" or len(ra) != len(rb) or not lmap.is_identity
    pairs = [(s, j) for j, s in enumerate(lmap.source) if s is not None] if searched else [(i, i) for i in range(len(ra))]
    if searched:
        notes.append(f"layer map searched over {len(ra)} candidate layers: per-layer p-values Bonferroni-corrected")
    rows = []
    for i, j in pairs:
        sc = sketch_scores(ra[i], rb[j])
        sd = sketch_null_sd(ra[i], rb[j], m, n_perm=n_perm, seed=1000 * i + j)
        zs = [sc[k] / sd[k] for k in sc]
        z = float(sum(zs) / math.sqrt(len(zs))) / infl if zs else 0.0
        lp = log10_normal_sf(z) + (math.log10(len(ra)) if searched else 0.0)
        rows.append(FingerprintLayer(i, j, sc, z, min(0.0, lp)))
    c = combine([r.log10_p for r in rows], "stouffer", zs=None if searched else [r.z for r in rows])
    # Two-sided: 2·P(Z > |z|).  Exact (uniform) when the calibrated z is N(0, 1) under the null, conservative at
    # every level when the inflation over-corrects (a one-sided p of a shrunken z would crowd around 0.5 and be
    # anti-conservative at large levels); costs log10(2) on derived pairs.
    lp = min(0.0, log10_normal_sf(abs(float(c.z))) + math.log10(2.0)) if math.isfinite(c.z) else float(c.log10_p)
    return FingerprintComparison(lp, float(c.z), m, tuple(rows), lmap, time.perf_counter() - t0, tuple(notes))
