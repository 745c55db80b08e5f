"""The canonical test's entry point: anchor (stage 2), per-layer alignment and held-out test (3–4),
sketches and the depth map (5), combination.  Each stage lives in its own module of this package."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lineage import depth as depth_mod
from lineage.canon.anchor import Anchors, anchor
from lineage.canon.arch import CanonArch, LayerDict, LayeredModel, ProgressFn, arch_from
from lineage.canon.config import IDENTITY_LAYER_LOG10_P, N_PROBES, REPORT_TRANSFORMS_LOG10_P, Z_INFLATION
from lineage.canon.fold import fold_layer
from lineage.canon.heldout import CanonResult, LayerRow, evaluate_layer, layer_z, transform_notes
from lineage.canon.sketch import layer_sketch, sketch_residuals, sketch_scores
from lineage.errors import ShapeMismatchError
from lineage.stattest import combine, log10_normal_sf

Sketch = dict[str, Any]


@dataclass(frozen=True)
class _Pair:
    """Both models, their architectures and anchors: what every per-layer stage reads."""

    a: LayeredModel
    b: LayeredModel
    aa: CanonArch
    ab: CanonArch
    anc: Anchors
    inflation: float

    def run(self, i: int, j: int, la: LayerDict, lb: LayerDict) -> LayerRow:
        """Align layer ``i`` of A with layer ``j`` of B and test the held-out parameters."""
        stats, found, units = evaluate_layer(la, lb, self.anc.Xa, self.anc.Xb, self.aa, self.ab, self.anc.frame)
        z = layer_z(stats) / self.inflation
        return LayerRow(i, j, tuple(stats), z, log10_normal_sf(z), None, found, units)

    def sketch(self, side: str, ld: LayerDict) -> Sketch:
        X, K, arch = (self.anc.Xa, self.anc.Ka, self.aa) if side == "a" else (self.anc.Xb, self.anc.Kb, self.ab)
        return sketch_residuals(layer_sketch(ld, X, arch), K)


def _layer_pass(p: _Pair, search: bool, progress: ProgressFn | None
                ) -> tuple[dict[tuple[int, int], LayerRow], list[Sketch], list[Sketch]]:
    """One read of every layer: sketches of both sides, and (equal depths, no forced search) the
    identity-paired test rows from the same folded layers."""
    La, Lb = p.a.n_layers, p.b.n_layers
    total = La + Lb if search else La
    rows: dict[tuple[int, int], LayerRow] = {}
    sk_a: list[Sketch] = [{} for _ in range(La)]
    sk_b: list[Sketch] = [{} for _ in range(Lb)]
    if not search:
        for i in range(La):
            la, lb = fold_layer(p.a.layer(i), p.aa), fold_layer(p.b.layer(i), p.ab)
            sk_a[i], sk_b[i] = p.sketch("a", la), p.sketch("b", lb)
            rows[(i, i)] = p.run(i, i, la, lb)
            if progress is not None:
                progress(i + 1, total, f"layer {i}")
        return rows, sk_a, sk_b
    for i in range(La):
        sk_a[i] = p.sketch("a", fold_layer(p.a.layer(i), p.aa))
        if progress is not None:
            progress(i + 1, total, f"A layer {i}")
    for j in range(Lb):
        sk_b[j] = p.sketch("b", fold_layer(p.b.layer(j), p.ab))
        if progress is not None:
            progress(La + j + 1, total, f"B layer {j}")
    return rows, sk_a, sk_b


def _score_matrix(sk_a: Sequence[Sketch], sk_b: Sequence[Sketch]) -> np.ndarray:
    S = np.zeros((len(sk_a), len(sk_b)))
    for i, a in enumerate(sk_a):
        for j, b in enumerate(sk_b):
            sc = sketch_scores(a, b)
            S[i, j] = float(np.mean(list(sc.values()))) if sc else 0.0
    return S


def _layer_map(S: np.ndarray, rows: dict[tuple[int, int], LayerRow], n_probes: int, search: bool,
               notes: list[str]) -> tuple[depth_mod.LayerMap, bool]:
    """The layer map from the sketch scores, and whether it was searched (then p-values are corrected)."""
    La, Lb = S.shape
    lmap = depth_mod.layer_map(S, n_entries=n_probes * (n_probes - 1))
    if not search and not lmap.is_identity and all(rows[(i, i)].log10_p <= IDENTITY_LAYER_LOG10_P for i in range(La)):
        # Sketch correlations are a coarse search signal (weak after long training); every layer already
        # passing its own canonical test against the same index is far stronger evidence for the identity.
        notes.append(f"sketches suggested {lmap.describe()}; kept the identity: every layer matches its own "
                     f"index (per-layer p ≤ 1e{IDENTITY_LAYER_LOG10_P:.0f})")
        lmap = depth_mod.LayerMap(tuple(range(La)), La, "identity", lmap.threshold,
                                  tuple(float(S[i, i]) for i in range(La)))
    searched = search or not lmap.is_identity
    if searched:
        notes.append(f"layer map searched over {La} candidate source layers: per-layer p-values Bonferroni-corrected")
    return lmap, searched


def _final_rows(p: _Pair, rows: dict[tuple[int, int], LayerRow], S: np.ndarray, lmap: depth_mod.LayerMap,
                searched: bool) -> list[LayerRow]:
    """Test rows of the mapped layer pairs (reading the pairs the identity pass did not cover)."""
    La = p.a.n_layers
    pairs = [(src, j) for j, src in enumerate(lmap.source) if src is not None] if searched else \
        [(i, i) for i in range(La)]
    out: list[LayerRow] = []
    for i, j in pairs:
        row = rows.get((i, j))
        if row is None:
            row = p.run(i, j, fold_layer(p.a.layer(i), p.aa), fold_layer(p.b.layer(j), p.ab))
        lp = row.log10_p + (math.log10(La) if searched else 0.0)
        out.append(LayerRow(row.layer_a, row.layer_b, row.stats, row.z, min(0.0, lp), float(S[i, j]),
                            row.transforms, row.units))
    return out


def canonical_compare(
    model_a: LayeredModel, model_b: LayeredModel, arch_a: Any, arch_b: Any,
    vocab_a: Sequence[str] | None = None, vocab_b: Sequence[str] | None = None,
    *, progress: ProgressFn | None = None, method: str = "stouffer", n_probes: int = N_PROBES,
    depth: str = "auto", z_inflation: float | None = None,
) -> CanonResult:
    """Canonicalise B onto A and test lineage under the independent-initialisation null.

    ``z_inflation`` divides every layer's z-score before combination (default
    :data:`~lineage.canon.config.Z_INFLATION`, measured on independently trained zoo pairs; ``1.0``
    gives the analytic null, exact for randomly initialised pairs).  ``depth``: ``"identity"`` pairs
    layer i with layer i; ``"search"`` always builds the layer map from sketches; ``"auto"`` searches
    when the layer counts differ or the identity map is contradicted by the sketches.
    A must be at least as wide as B (swap otherwise).
    """
    aa, ab = arch_from(arch_a), arch_from(arch_b)
    infl = Z_INFLATION if z_inflation is None else float(z_inflation)
    if infl <= 0:
        raise ValueError(f"z_inflation must be positive, got {infl}")
    if ab.hidden > aa.hidden:
        raise ShapeMismatchError(f"model B is wider than A ({ab.hidden} > {aa.hidden}); pass the wider model as A")
    anc = anchor(model_a, model_b, aa, ab, vocab_a, vocab_b, n_probes)
    notes = list(anc.notes)
    p = _Pair(model_a, model_b, aa, ab, anc, infl)
    search = depth == "search" or model_a.n_layers != model_b.n_layers
    rows, sk_a, sk_b = _layer_pass(p, search, progress)
    S = _score_matrix(sk_a, sk_b)
    lmap, searched = _layer_map(S, rows, anc.Xa.shape[0], search, notes)
    final = _final_rows(p, rows, S, lmap, searched)
    if not final:
        notes.append("no layer of B could be paired with a layer of A")
    zs = None if searched else [r.z for r in final]
    comb = {m: float(combine([r.log10_p for r in final], m, zs=zs).log10_p)
            for m in ("stouffer", "fisher", "cauchy", "bonferroni")}
    chosen = combine([r.log10_p for r in final], method, zs=zs)
    transforms: list[str] = []
    if chosen.log10_p <= REPORT_TRANSFORMS_LOG10_P:
        transforms = transform_notes(anc.residual, final)
        if not lmap.is_identity:
            transforms.append(lmap.describe())
    else:
        notes.append("no significant lineage: the best alignments found are not reported as transforms")
    return CanonResult(float(chosen.log10_p), float(chosen.z), method, anc.residual, tuple(final), lmap,
                       tuple(transforms), anc.n_shared_tokens, tuple(notes), comb)
