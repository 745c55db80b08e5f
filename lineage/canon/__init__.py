"""Canonicalisation: undo function-preserving transforms, then test lineage on aligned weights.

Everything here is a pure function over *role-keyed* tensors (layer dicts keyed
``"attn.q.weight"``, ``"mlp.up.weight"``, ``"norm.attn.weight"``…, globals
``"embed.weight"``, ``"lm_head.weight"``, ``"final_norm.weight"``; linear
weights in ``nn.Linear`` orientation ``(out, in)``) plus a :class:`CanonArch`.

Pipeline of :func:`canonical_compare`, one module per stage:

1. **Fold norm gains** (:func:`fold_layer`, :func:`fold_globals`) into the
   projections that read the normalised stream (q, k, v after ``norm.attn``;
   gate, up after ``norm.mlp``; lm_head after ``final_norm``).  A LayerNorm
   bias ``β`` becomes a bias ``Wβ`` of the projection (kept under
   ``*.bias_folded``, not used as evidence), and because LayerNorm output is
   orthogonal to the all-ones vector, the input weights' component along it is
   projected out (adding ``c·1ᵀ`` to a row is function-preserving there).
2. **Residual map** (:func:`fit_residual_map`) from token-anchored rows of the
   embedding (and the untied lm_head) on shared tokens: a signed assignment on
   the column correlations and an orthogonal Procrustes fit; the simpler
   signed permutation is chosen when it explains nearly as much.  ``E_b ≈ E_a M``
   with ``M`` ``(d_a, d_b)`` having orthonormal columns (``d_b < d_a``: width
   pruned).  B's input weights map into A's basis as ``W_b Mᵀ``, output
   weights as ``M W_b``.
3. **Per-layer alignment** (:func:`align_layer`): MLP neurons matched on the
   *input side* (directions of gate and up rows, per-neuron scale and up/down
   sign trading normalised away); attention heads matched on token-anchored
   ``X W_qᵀ W_k Xᵀ`` products (invariant to Q/K scale trading and to per-head
   rotations commuting with RoPE), kv groups first, then q heads within them.
4. **Held-out test**: the evidence is computed on parameters *not used* by the
   alignment — MLP ``down`` columns and the per-head value→output maps
   ``O_h V_g Xᵀ`` on probe tokens — with :func:`lineage.stattest.aligned_z`
   (learned spikes deflated, alignment-free null variance).  Under the null
   (independent initialisation) the searched alignment is a function of other
   parameters, so the LAP search does not inflate the statistic for randomly
   initialised pairs (exact there); independently *trained* pairs share some
   aligned structure, measured on the zoo and absorbed by :data:`Z_INFLATION`.
   For wide models the residual axis is compared through a fixed random
   ``K_TEST``-dimensional projection (:class:`Frame`).
5. **Depth**: per-layer transform-invariant sketches (:func:`layer_sketch`) give
   an all-pairs layer score matrix; :mod:`lineage.depth` turns it into a
   layer map.  When the map was searched, each layer's p-value is multiplied
   by the number of candidate source layers (Bonferroni).

Models are accessed lazily through :class:`LayeredModel` (one layer in memory
at a time).

Modules: :mod:`~lineage.canon.arch` (what is known of a model, lazy access), :mod:`~lineage.canon.fold` (1),
:mod:`~lineage.canon.residual` and :mod:`~lineage.canon.anchor` (2), :mod:`~lineage.canon.align` (3),
:mod:`~lineage.canon.heldout` (4, result types), :mod:`~lineage.canon.sketch` (5), :mod:`~lineage.canon.canonical`
(the entry point), :mod:`~lineage.canon.gate` (whether the test can change a compare's answer),
:mod:`~lineage.canon.config` (every calibrated constant, with the benchmark that set it).
"""

from __future__ import annotations

from lineage import depth as depth_mod
from lineage.canon.align import Frame, UnitAlignment, align_heads, align_mlp, head_products
from lineage.canon.anchor import Anchors, anchor
from lineage.canon.arch import (
    CanonArch,
    CheckpointModel,
    DictModel,
    LayerDict,
    LayeredModel,
    ProgressFn,
    Tensor,
    WeightsModel,
    arch_from,
)
from lineage.canon.canonical import canonical_compare
from lineage.canon.config import (
    IDENTITY_LAYER_LOG10_P,
    K_MATCH,
    K_TEST,
    LAP_MAX_UNITS,
    N_PROBES,
    REPORT_TRANSFORMS_LOG10_P,
    SCALE_TRADING_SPREAD,
    Z_INFLATION,
)
from lineage.canon.fold import fold_globals, fold_layer
from lineage.canon.heldout import CanonResult, LayerRow, LayerUnits, evaluate_layer, scale_spread
from lineage.canon.residual import (
    ResidualMap,
    fit_residual_map,
    polar_factor,
    probe_rows,
    procrustes_fit,
    signed_permutation_fit,
    stable_key,
    token_pairs,
)
from lineage.canon.sketch import SKETCH_KINDS, layer_sketch, sketch_null_sd, sketch_residuals, sketch_scores

#: The former private name, still read by :mod:`lineage.fingerprint`.
_stable_key = stable_key

__all__ = [
    "IDENTITY_LAYER_LOG10_P", "K_MATCH", "K_TEST", "LAP_MAX_UNITS", "N_PROBES", "REPORT_TRANSFORMS_LOG10_P",
    "SCALE_TRADING_SPREAD", "SKETCH_KINDS", "Z_INFLATION", "Anchors", "CanonArch", "CanonResult", "CheckpointModel",
    "DictModel", "Frame", "LayerDict", "LayerRow", "LayerUnits", "LayeredModel", "ProgressFn", "ResidualMap",
    "Tensor", "UnitAlignment", "WeightsModel", "align_heads", "align_mlp", "anchor", "arch_from",
    "canonical_compare", "depth_mod", "evaluate_layer", "fit_residual_map", "fold_globals", "fold_layer",
    "head_products", "layer_sketch", "polar_factor", "probe_rows", "procrustes_fit", "scale_spread",
    "signed_permutation_fit", "sketch_null_sd", "sketch_residuals", "sketch_scores", "stable_key", "token_pairs",
]
