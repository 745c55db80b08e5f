"""Compact, transform-invariant fingerprints (``.lfp``) and their comparison.

A fingerprint holds, for a fixed set of probe tokens (the ``m`` token strings
of the model's vocabulary with the smallest SHA-1 hash, so two tokenizers pick
mostly the same strings), the model's own folded and normalised embedding
Gram ``K = X Xᵀ`` and, per layer, the token-anchored sketches of
:func:`lineage.canon.layer_sketch` (``qk``, ``ov``, ``ud``, ``gg``; each
``m × m``).  They are unchanged by residual signed permutations and rotations,
norm-gain refolding, MLP neuron permutation with up/down scale trading, head
permutation, Q/K scale trading and rotations commuting with RoPE, and per-head
V/O transforms.  Size: ``(1 + 4 L) m²`` half floats (≈ 1.5 MB for 22 layers at
``m = 96``), whatever the width.

File format: a safetensors file whose ``__metadata__`` holds
``{"format": "lineage-fingerprint", "version": "1", "meta": <JSON>}``; tensors
``K`` and ``L{i}.{kind}`` in float16, each scaled to unit Frobenius norm.

What a fingerprint-only comparison can conclude: whether the two models' layers
compute the same token-anchored maps beyond what independent initialisation
gives (a Mantel-type test on shared probe tokens: relabelling B's probe tokens
is the null), and a layer map.  What it cannot: it sees only ``m`` probe tokens,
so it has far less power than the weight comparison on weak relations
(continued pre-training, prune + distil); it cannot name the transforms that
were undone, LoRA ranks, quantisation or merge weights, and its null assumes
the probe-token structure of independently trained models is unrelated, which
shared training data can weaken (calibrated on the zoo, see the figures note).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lineage import depth as depth_mod
from lineage.canon import (
    SKETCH_KINDS,
    LayeredModel,
    ProgressFn,
    _stable_key,
    arch_from,
    fold_globals,
    fold_layer,
    layer_sketch,
    probe_rows,
    sketch_null_sd,
    sketch_residuals,
    sketch_scores,
)
from lineage.errors import ArchitectureError, FingerprintError
from lineage.stattest import combine, log10_normal_sf

log = logging.getLogger(__name__)

FORMAT = "lineage-fingerprint"
VERSION = "1"
#: Probe tokens stored in a fingerprint.
FP_PROBES = 96
#: Refuse fingerprint files larger than this (a fingerprint is a few MB at most).
MAX_FILE_BYTES = 64 << 20
#: Empirical null calibration: layer z-scores are divided by this.  Independently trained models share
#: token structure beyond the embedding Gram (measured on the full zoo: raw fingerprint z of independent
#: gpt2 bases up to 16, sd ≈ 4–5; llama sd ≈ 3–4).  With 6, no independent zoo pair reaches p < 1e-3,
#: at the cost of power: weak relations (continued pre-training) drop to p ≈ 1e-6.
Z_INFLATION = 6.0
#: Minimum shared probe tokens for a comparison.
MIN_SHARED = 24


@dataclass(frozen=True)
class Fingerprint:
    """A model's fingerprint (see module docstring)."""

    tokens: tuple[str, ...]
    K: torch.Tensor  # (m, m)
    layers: tuple[dict[str, torch.Tensor], ...]
    arch: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def m(self) -> int:
        return len(self.tokens)

    @property
    def n_layers(self) -> int:
        return len(self.layers)


def probe_tokens(vocab: Sequence[str] | None, n_rows: int, m: int) -> list[tuple[str, int]]:
    """The ``m`` probe tokens ``(string, row)``: smallest SHA-1 of the string (``#i`` when no vocabulary)."""
    if vocab is None:
        items = [(f"#{i}", i) for i in range(n_rows)]
    else:
        seen: set[str] = set()
        items = []
        for i, t in enumerate(vocab[:n_rows]):
            if t and t not in seen:
                seen.add(t)
                items.append((t, i))
    items.sort(key=lambda x: _stable_key(x[0]))
    return items[:m]


def _unit(t: torch.Tensor) -> torch.Tensor:
    return (t.double() / t.double().norm().clamp_min(1e-300)).float()


def compute_fingerprint(model: LayeredModel, arch: Any, vocab: Sequence[str] | None = None, *,
                        n_probes: int = FP_PROBES, progress: ProgressFn | None = None,
                        source: str = "") -> Fingerprint:
    """Fingerprint of a model read lazily (one layer in memory at a time)."""
    a = arch_from(arch)
    embed = model.global_tensor("embed.weight")
    if embed is None:
        raise ArchitectureError("a fingerprint needs the token embedding (embed.weight)")
    E, _ = fold_globals(embed, None, None, None, a)
    probes = probe_tokens(vocab, E.shape[0], n_probes)
    X = probe_rows(E, [r for _, r in probes], a)
    del E, embed
    layers = []
    for i in range(model.n_layers):
        sk = layer_sketch(fold_layer(model.layer(i), a), X, a)
        layers.append({k: _unit(v) for k, v in sk.items()})
        if progress is not None:
            progress(i + 1, model.n_layers, f"layer {i}")
    arch_d = {k: getattr(a, k) for k in ("hidden", "n_layers", "n_heads", "n_kv_heads", "head_dim", "norm", "mlp", "tied")}
    meta = {"source": source, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "vocab": vocab is not None}
    return Fingerprint(tuple(t for t, _ in probes), _unit(X @ X.T), tuple(layers), arch_d, meta)


# --------------------------------------------------------------------------- file format


def save_fingerprint(fp: Fingerprint, path: str | os.PathLike[str]) -> int:
    """Write ``fp`` to ``path`` (``.lfp``); returns the file size in bytes."""
    from safetensors.torch import save_file

    tensors = {"K": fp.K.to(torch.float16).contiguous()}
    for i, layer in enumerate(fp.layers):
        for k, v in layer.items():
            tensors[f"L{i}.{k}"] = _unit(v).to(torch.float16).contiguous()
    meta = {"tokens": list(fp.tokens), "arch": fp.arch, "n_layers": fp.n_layers, "meta": fp.meta}
    save_file(tensors, os.fspath(path), metadata={"format": FORMAT, "version": VERSION, "meta": json.dumps(meta)})
    return Path(path).stat().st_size


def load_fingerprint(path: str | os.PathLike[str]) -> Fingerprint:
    """Read and validate a ``.lfp`` file; raises :class:`FingerprintError` naming what is wrong."""
    from safetensors import SafetensorError, safe_open

    p = os.fspath(path)
    try:
        size = Path(p).stat().st_size
    except OSError as e:
        raise FingerprintError(f"cannot read fingerprint ({e.strerror})", path=p) from e
    if size > MAX_FILE_BYTES:
        raise FingerprintError(f"file is {size} bytes, more than a fingerprint can be ({MAX_FILE_BYTES})", path=p)
    try:
        with safe_open(p, framework="pt") as f:
            md = f.metadata() or {}
            names = list(f.keys())
            tensors = {n: f.get_tensor(n) for n in names}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise FingerprintError(f"not a safetensors fingerprint file ({e})", path=p) from e
    if md.get("format") != FORMAT:
        raise FingerprintError(f"expected metadata format {FORMAT!r}, found {md.get('format')!r}", path=p)
    if md.get("version") != VERSION:
        raise FingerprintError(f"unsupported fingerprint version {md.get('version')!r} (this build reads {VERSION!r})", path=p)
    try:
        meta = json.loads(md.get("meta", ""))
        tokens = meta["tokens"]
        n_layers = int(meta["n_layers"])
        arch = dict(meta["arch"])
    except (ValueError, KeyError, TypeError) as e:
        raise FingerprintError(f"metadata 'meta' is not the expected JSON object ({e})", path=p) from e
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens) or len(set(tokens)) != len(tokens):
        raise FingerprintError("metadata tokens must be a list of distinct strings", path=p)
    m = len(tokens)
    if m < 2 or n_layers < 0 or n_layers > 10000:
        raise FingerprintError(f"implausible fingerprint: {m} tokens, {n_layers} layers", path=p)
    expected = {"K"} | {f"L{i}.{k}" for i in range(n_layers) for k in SKETCH_KINDS}
    unknown = set(tensors) - expected
    if unknown:
        raise FingerprintError(f"unexpected tensors {sorted(unknown)[:5]}", path=p)
    if "K" not in tensors:
        raise FingerprintError("missing tensor 'K'", path=p)
    for n, t in tensors.items():
        if tuple(t.shape) != (m, m):
            raise FingerprintError(f"tensor {n!r} has shape {tuple(t.shape)}, expected {(m, m)}", path=p)
        if t.dtype not in (torch.float16, torch.float32, torch.bfloat16):
            raise FingerprintError(f"tensor {n!r} has dtype {t.dtype}, expected a float type", path=p)
        if not bool(torch.isfinite(t).all()):
            raise FingerprintError(f"tensor {n!r} holds NaN or Inf", path=p)
    layers = tuple({k: tensors[f"L{i}.{k}"].float() for k in SKETCH_KINDS if f"L{i}.{k}" in tensors}
                   for i in range(n_layers))
    return Fingerprint(tuple(tokens), tensors["K"].float(), layers, arch, dict(meta.get("meta", {})))


# --------------------------------------------------------------------------- comparison


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


def compare_fingerprints(fa: Fingerprint, fb: Fingerprint, *, n_perm: int = 48, depth: str = "auto",
                         z_inflation: float | None = None) -> FingerprintComparison:
    """Test lineage from fingerprints alone (Mantel-type null on shared probe tokens).

    ``z_inflation`` (default :data:`Z_INFLATION`) divides each layer's z: the
    token-relabelling null is exact for randomly initialised models only.
    """
    infl = Z_INFLATION if z_inflation is None else float(z_inflation)
    t0 = time.perf_counter()
    pos_b = {t: j for j, t in enumerate(fb.tokens)}
    shared = [(i, pos_b[t]) for i, t in enumerate(fa.tokens) if t in pos_b]
    notes: list[str] = []
    if len(shared) < MIN_SHARED:
        raise FingerprintError(f"only {len(shared)} probe tokens are shared (need {MIN_SHARED}): different tokenizers?")
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
    return FingerprintComparison(float(c.log10_p), float(c.z), m, tuple(rows), lmap, time.perf_counter() - t0,
                                 tuple(notes))
