"""Compact, transform-invariant fingerprints (``.lfp``) read from a few percent of a checkpoint.

A fingerprint holds, for a fixed set of probe tokens (the ``m`` token strings
of the model's vocabulary with the smallest SHA-1 hash, so two tokenizers pick
mostly the same strings), the model's own normalised embedding Gram
``K = X Xᵀ`` and, per layer, token-anchored ``m × m`` sketches
(:func:`sampled_layer_sketch`): ``kp`` and ``vp``, the probes projected on the
row spaces of the key / value heads, and ``gs``, the Gram of a fixed sample of
unit gate rows (gated MLPs).  Size: ``(1 + 3 L) m²`` half floats (≈ 1.2 MB for
22 layers at ``m = 96``), whatever the width.

What is read (version 2): the ``m`` probe rows of the embedding (coalesced row
spans), the norm gains, the whole K and V matrices, and the first
:func:`sampled_units` rows of each gate matrix — nothing of Q, O, up, down or
the LM head.  On a TinyLlama-1.1B-shaped checkpoint (GQA 32/4, bf16) that is
≈ 3.6 % of the bytes, which is what makes a remote fingerprint cheap
(``benchmarks/bench_remote.py``).  Row-major (``(out, in)``) storage is read by
row spans; GPT-2 ``Conv1D`` (transposed, fused QKV) storage has to be read whole
for the tensors used.

Invariance: ``kp``/``vp`` are unchanged by residual signed permutations and
rotations, norm-gain refolding, head permutation, Q/K scale trading and
rotations commuting with RoPE, and any per-head V/O map (a row space is the
maximal invariant of an invertible per-head map); ``gs`` by all of these too,
except MLP neuron permutation, which changes the sampled neurons: then ``gs``
only loses its signal (its null is unaffected) and the attention sketches carry
the evidence.

File format: a safetensors file whose ``__metadata__`` holds
``{"format": "lineage-fingerprint", "version": "2", "meta": <JSON>}``; tensors
``K`` and ``L{i}.{kind}`` in float16, each scaled to unit Frobenius norm.
Version-1 files (full-layer sketches ``qk``/``ov``/``ud``/``gg``) are refused
with a :class:`~lineage.errors.FingerprintError` asking to re-create them.

What a fingerprint-only comparison can conclude: whether the two models' layers
hold the same token-anchored structure beyond what independent initialisation
gives (a Mantel-type test on shared probe tokens: relabelling B's probe tokens
is the null), and a layer map.  What it cannot: it sees only ``m`` probe tokens
and a sample of each layer, so it cannot name the transforms that were undone,
LoRA ranks, quantisation or merge weights, and its null assumes the probe-token
structure of independently trained models is unrelated, which shared training
data can weaken (calibrated on the zoo: :data:`Z_INFLATION`).
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
from typing import Any, Protocol

import numpy as np
import torch

from lineage import depth as depth_mod
from lineage.canon import (
    LayeredModel,
    ProgressFn,
    _stable_key,
    arch_from,
    fold_layer,
    probe_rows,
    sketch_null_sd,
    sketch_residuals,
    sketch_scores,
)
from lineage.errors import ArchitectureError, FingerprintError
from lineage.stattest import combine, log10_normal_sf

log = logging.getLogger(__name__)

FORMAT = "lineage-fingerprint"
VERSION = "2"
#: Probe tokens stored in a fingerprint.
FP_PROBES = 96
#: Sketch kinds of a version-2 fingerprint (see module docstring).
SKETCH_KINDS = ("kp", "vp", "gs")
#: MLP neurons sampled per layer: the first ``max(MIN_UNITS, ceil(UNIT_FRACTION · n))`` (at most all).
UNIT_FRACTION = 1.0 / 16.0
MIN_UNITS = 64
#: Refuse fingerprint files larger than this (a fingerprint is a few MB at most).
MAX_FILE_BYTES = 64 << 20
#: Empirical null calibration: layer z-scores are divided by this.  Independently trained models share
#: token structure the relabelling null does not know about (full zoo, 429 independent pairs, version-2
#: sketches: raw combined z of gpt2 pairs mean 0.5, sd 1.9, max 7.7; llama sd 1.0, max 3.5; held-out
#: null max 4.2).  With 3 and the two-sided p, the smallest independent p is ≈ 0.01 and derived pairs
#: stay far below 1e-3 (weakest: noise σ = 0.5, continued pre-training; see benchmarks/README.md).
Z_INFLATION = 3.0
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


def sampled_units(n: int) -> int:
    """How many MLP neurons (the first ones, one contiguous row span) a fingerprint reads out of ``n``."""
    return min(n, max(MIN_UNITS, math.ceil(UNIT_FRACTION * n)))


# --------------------------------------------------------------------------- sampled reads


class RowSource(Protocol):
    """Row-span access to a model's role tensors (what a fingerprint reads; nothing else is touched)."""

    @property
    def n_layers(self) -> int: ...

    def shape(self, role: str) -> tuple[int, ...] | None:
        """Canonical shape of role ``role`` (full key, e.g. ``L3.mlp.up.weight``) or None when absent."""
        ...

    def rows(self, role: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows ``[start, stop)`` of the role's canonical tensor as float32 (a vector is read whole)."""
        ...

    def row_set(self, role: str, idx: Sequence[int]) -> torch.Tensor:
        """Rows ``idx`` (in that order) of a matrix role as float32."""
        ...


class CheckpointRows:
    """:class:`RowSource` over an open checkpoint: reads only the requested row spans.

    Untransposed roles (Llama-style ``(out, in)`` storage, fused tensors split by
    rows, GGUF) read exactly the spans asked for; transposed (GPT-2 ``Conv1D``) or
    head-permuted views are read whole once and sliced (one tensor cached).
    """

    def __init__(self, ckpt: Any, rolemap: Any) -> None:
        self.ckpt = ckpt
        self.rolemap = rolemap
        self._cache: tuple[str, torch.Tensor] | None = None

    @property
    def n_layers(self) -> int:
        return int(self.rolemap.n_layers)

    def shape(self, role: str) -> tuple[int, ...] | None:
        v = self.rolemap.roles.get(role)
        return None if v is None else tuple(v.shape)

    def _whole(self, role: str) -> torch.Tensor:
        from lineage.roles import apply_view

        v = self.rolemap.roles[role]
        if self._cache is None or self._cache[0] != v.tensor:
            self._cache = (v.tensor, self.ckpt.read(v.tensor))
        return apply_view(self._cache[1], v).float()

    def _spans(self, role: str, start: int, stop: int) -> list[tuple[int, int]] | None:
        """Stored row spans of canonical rows ``[start, stop)``, or None when the view is not row-addressable."""
        v = self.rolemap.roles[role]
        meta = self.ckpt.tensors.get(v.tensor)
        if meta is None or len(meta.shape) < 2 or v.transpose or v.unpermute_heads:
            return None
        ranges = v.rows if v.rows is not None else ((0, meta.shape[0]),)
        out, pos = [], 0
        for a, b in ranges:
            lo, hi = max(start, pos), min(stop, pos + (b - a))
            if lo < hi:
                out.append((a + lo - pos, a + hi - pos))
            pos += b - a
        return out

    def rows(self, role: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        shape = self.shape(role)
        if shape is None:
            raise ArchitectureError(f"no role {role!r}")
        if len(shape) < 2:
            from lineage.roles import read_role

            return read_role(self.ckpt, self.rolemap.roles[role])
        stop = shape[0] if stop is None else stop
        spans = self._spans(role, start, stop)
        if spans is None:
            return self._whole(role)[start:stop].contiguous()
        v = self.rolemap.roles[role]
        parts = [self.ckpt.read(v.tensor, a, b) for a, b in spans]
        return (torch.cat(parts) if len(parts) > 1 else parts[0]).float().contiguous()

    def row_set(self, role: str, idx: Sequence[int]) -> torch.Tensor:
        from lineage.io.checkpoint import read_row_set

        v = self.rolemap.roles[role]
        spans = self._spans(role, 0, v.shape[0])
        if spans is None or len(spans) != 1:
            return self._whole(role)[torch.as_tensor(list(idx), dtype=torch.int64)].contiguous()
        a0 = spans[0][0]
        return read_row_set(self.ckpt, v.tensor, [a0 + int(i) for i in idx])


class LayeredRows:
    """:class:`RowSource` over any in-memory :class:`~lineage.canon.LayeredModel` (tests, zoo tools)."""

    def __init__(self, model: LayeredModel) -> None:
        self.model = model
        self._layer: tuple[int, dict[str, torch.Tensor]] | None = None

    @property
    def n_layers(self) -> int:
        return int(self.model.n_layers)

    def _get(self, role: str) -> torch.Tensor | None:
        head, _, rest = role.partition(".")
        if head.startswith("L") and head[1:].isdigit():
            i = int(head[1:])
            if self._layer is None or self._layer[0] != i:
                self._layer = (i, self.model.layer(i))
            return self._layer[1].get(rest)
        return self.model.global_tensor(role)

    def shape(self, role: str) -> tuple[int, ...] | None:
        t = self._get(role)
        return None if t is None else tuple(t.shape)

    def rows(self, role: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        t = self._get(role)
        if t is None:
            raise ArchitectureError(f"no role {role!r}")
        return t.float() if t.ndim < 2 else t[start:stop].float()

    def row_set(self, role: str, idx: Sequence[int]) -> torch.Tensor:
        t = self._get(role)
        if t is None:
            raise ArchitectureError(f"no role {role!r}")
        return t[torch.as_tensor(list(idx), dtype=torch.int64)].float()


class DeviceRows:
    """:class:`RowSource` whose rows arrive on ``device`` (``--device``): the files are read on the CPU,
    the sketches' arithmetic (per-head SVDs, projections, Grams) runs where the rows are."""

    def __init__(self, inner: RowSource, device: torch.device) -> None:
        self.inner = inner
        self.device = device

    @property
    def n_layers(self) -> int:
        return self.inner.n_layers

    def shape(self, role: str) -> tuple[int, ...] | None:
        return self.inner.shape(role)

    def rows(self, role: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        return self.inner.rows(role, start, stop).to(self.device)

    def row_set(self, role: str, idx: Sequence[int]) -> torch.Tensor:
        return self.inner.row_set(role, idx).to(self.device)


def row_source(model: Any) -> RowSource:
    """The cheapest :class:`RowSource` for ``model`` (checkpoint-backed models read row spans only)."""
    if isinstance(model, (CheckpointRows, LayeredRows, DeviceRows)):
        return model
    ck, rm = getattr(model, "ckpt", None), getattr(model, "rolemap", None)
    if ck is not None and rm is not None and hasattr(ck, "read") and hasattr(ck, "tensors"):
        return CheckpointRows(ck, rm)
    return LayeredRows(model)


# --------------------------------------------------------------------------- sketches


def _row_space(W: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis ``(d, r)`` of the row space of ``W`` (rank by a relative tolerance)."""
    U, S, _ = torch.linalg.svd(W.double().T, full_matrices=False)
    keep = S > S.max().clamp_min(1e-300) * 1e-6 if S.numel() else S > 0
    return U[:, keep]


def _head_projections(W: torch.Tensor, n_heads: int, X: torch.Tensor) -> list[torch.Tensor]:
    """Per head ``h``: ``X P_h Xᵀ`` with ``P_h`` the projector on head ``h``'s row space."""
    hd = W.shape[0] // n_heads
    out = []
    Xd = X.double()
    for h in range(n_heads):
        B = _row_space(W[h * hd:(h + 1) * hd])
        xb = Xd @ B
        out.append(xb @ xb.T)
    return out


def _unit_rows(W: torch.Tensor) -> torch.Tensor:
    return W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)


def sampled_layer_sketch(src: RowSource, i: int, X: torch.Tensor, arch: Any) -> dict[str, torch.Tensor]:
    """Token-anchored ``(m, m)`` sketches of layer ``i`` from the few rows a fingerprint reads.

    * ``kp`` / ``vp``: ``Σ_g X P_g Xᵀ`` with ``P_g`` the projector on the row space of kv head
      ``g``'s (norm-folded) key / value rows; the whole K and V matrices are read (small under
      GQA).  A row space is the maximal invariant of an invertible per-head map (Q/K scale
      trading, RoPE-commuting rotations, V/O mixing), the sum is invariant to head permutation,
      and ``X`` (the model's own normalised probe embeddings) carries the residual basis, so
      residual rotations and signed permutations cancel.
    * ``gs`` (gated MLPs): Gram of unit gate rows ``X Ĝ_Sᵀ Ĝ_S Xᵀ`` over the sampled neurons
      ``S`` (the first :func:`sampled_units` rows, one range read).  Unit rows make it invariant
      to norm refolding; neuron permutation changes which neurons are sampled, so ``gs`` carries
      lineage for unpermuted pairs only (its null is unaffected).
    """
    a = arch_from(arch)
    p = f"L{i}."
    ld: dict[str, torch.Tensor] = {}
    for key in ("attn.k.weight", "attn.v.weight", "norm.attn.weight", "norm.attn.bias",
                "norm.mlp.weight", "norm.mlp.bias"):
        if src.shape(p + key) is not None:
            ld[key] = src.rows(p + key)
    g_shape = src.shape(p + "mlp.gate.weight")
    if a.mlp == "glu" and g_shape is not None and len(g_shape) == 2:
        ld["mlp.gate.weight"] = src.rows(p + "mlp.gate.weight", 0, sampled_units(g_shape[0]))
    f = fold_layer(ld, a)
    out: dict[str, torch.Tensor] = {}
    for nm, w in (("kp", f.get("attn.k.weight")), ("vp", f.get("attn.v.weight"))):
        if w is not None and w.shape[0] == a.n_kv_heads * a.head_dim:
            out[nm] = torch.stack(_head_projections(w, a.n_kv_heads, X)).sum(0)
    g = f.get("mlp.gate.weight")
    if g is not None:
        gx = X @ _unit_rows(g).T
        out["gs"] = gx @ gx.T
    return {k: v.float() for k, v in out.items()}


def compute_fingerprint(model: LayeredModel | RowSource, arch: Any, vocab: Sequence[str] | None = None, *,
                        n_probes: int = FP_PROBES, progress: ProgressFn | None = None,
                        source: str = "", device: str | torch.device | None = None) -> Fingerprint:
    """Fingerprint of a model, reading only probe-token embedding rows, K, V and a few MLP neuron rows.

    ``model`` is a :class:`~lineage.canon.LayeredModel` (a checkpoint-backed
    :class:`~lineage.canon.CheckpointModel` is read by row spans, nothing else) or a :class:`RowSource`.
    ``device`` (``cpu``, ``cuda``, ``auto`` or a torch device) is where the sketches are computed;
    the fingerprint itself is returned on the CPU.
    """
    from lineage.device import resolve_device

    a = arch_from(arch)
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    src = row_source(model)
    if dev.type != "cpu":
        src = DeviceRows(src, dev)
    shape = src.shape("embed.weight")
    if shape is None or len(shape) != 2:
        raise ArchitectureError("a fingerprint needs the token embedding (embed.weight)")
    probes = probe_tokens(vocab, shape[0], n_probes)
    E_p = src.row_set("embed.weight", [r for _, r in probes])
    X = probe_rows(E_p, list(range(len(probes))), a)
    del E_p
    layers = []
    n = src.n_layers
    for i in range(n):
        sk = sampled_layer_sketch(src, i, X, a)
        layers.append({k: _unit(v).cpu() for k, v in sk.items()})
        if progress is not None:
            progress(i + 1, n, f"layer {i}")
    arch_d = {k: getattr(a, k) for k in ("hidden", "n_layers", "n_heads", "n_kv_heads", "head_dim", "norm", "mlp", "tied")}
    meta = {"source": source, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "vocab": vocab is not None,
            "sampling": {"unit_fraction": UNIT_FRACTION, "min_units": MIN_UNITS}}
    return Fingerprint(tuple(t for t, _ in probes), _unit(X @ X.T).cpu(), tuple(layers), arch_d, meta)


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
        old = md.get("version") in {"1"}
        hint = " (made by an older lineage from whole layers; re-create it with `lineage fingerprint`)" if old else ""
        raise FingerprintError(f"unsupported fingerprint version {md.get('version')!r}{hint}; this build reads "
                               f"version {VERSION!r}", path=p)
    meta, tokens, n_layers, arch = _read_meta(md.get("meta", ""), p)
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
    return Fingerprint(tuple(tokens), tensors["K"].float(), layers, arch, meta)


#: Cap on the JSON metadata of a ``.lfp`` file (the probe tokens and a few settings: ~10 KB in practice).
MAX_META_BYTES = 1 << 20


def _read_meta(raw: object, p: str) -> tuple[dict[str, Any], list[Any], int, dict[str, Any]]:
    """The ``meta`` JSON of a ``.lfp`` header through the bounded loader (size, depth, integer length):
    ``(meta, tokens, n_layers, arch)``, or :class:`FingerprintError` naming what is wrong."""
    from lineage.errors import HeaderError
    from lineage.io.safejson import loads_bounded

    if not isinstance(raw, str):
        raise FingerprintError("metadata 'meta' is missing", path=p)
    try:
        meta = loads_bounded(raw, path=p, what="fingerprint metadata 'meta'", max_bytes=MAX_META_BYTES)
    except HeaderError as e:
        raise FingerprintError(str(e).removeprefix(f"{p}: "), path=p) from None
    if not isinstance(meta, dict):
        raise FingerprintError(f"metadata 'meta' must be a JSON object, found {type(meta).__name__}", path=p)
    tokens, n_layers, arch, extra = meta.get("tokens"), meta.get("n_layers"), meta.get("arch"), meta.get("meta", {})
    if not isinstance(n_layers, int) or isinstance(n_layers, bool):
        raise FingerprintError(f"metadata n_layers must be an integer, found {type(n_layers).__name__}", path=p)
    if not isinstance(arch, dict) or not isinstance(extra, dict):
        raise FingerprintError("metadata 'arch' and 'meta' must be JSON objects", path=p)
    if not isinstance(tokens, list):
        raise FingerprintError("metadata tokens must be a list of distinct strings", path=p)
    return extra, tokens, n_layers, arch


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
    token-relabelling null is exact for randomly initialised models only.  The
    p-value is two-sided on the combined z (see the comment at the end).
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
    # Two-sided: 2·P(Z > |z|).  Exact (uniform) when the calibrated z is N(0, 1) under the null, conservative at
    # every level when the inflation over-corrects (a one-sided p of a shrunken z would crowd around 0.5 and be
    # anti-conservative at large levels); costs log10(2) on derived pairs.
    lp = min(0.0, log10_normal_sf(abs(float(c.z))) + math.log10(2.0)) if math.isfinite(c.z) else float(c.log10_p)
    return FingerprintComparison(lp, float(c.z), m, tuple(rows), lmap, time.perf_counter() - t0, tuple(notes))
