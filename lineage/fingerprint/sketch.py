"""Making a fingerprint: probe tokens, sampled row reads of a checkpoint, token-anchored layer sketches."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from lineage.canon import LayeredModel, ProgressFn, _stable_key, arch_from, fold_layer, probe_rows
from lineage.errors import ArchitectureError
from lineage.fingerprint.config import CONFIG

log = logging.getLogger(__name__)

#: Sketch kinds of a version-2 fingerprint (see :mod:`lineage.fingerprint`).
SKETCH_KINDS = ("kp", "vp", "gs")


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
    return min(n, max(CONFIG.min_units, math.ceil(CONFIG.unit_fraction * n)))


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
                        n_probes: int = CONFIG.probes, progress: ProgressFn | None = None,
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
            "sampling": {"unit_fraction": CONFIG.unit_fraction, "min_units": CONFIG.min_units}}
    return Fingerprint(tuple(t for t, _ in probes), _unit(X @ X.T).cpu(), tuple(layers), arch_d, meta)
