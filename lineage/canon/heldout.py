"""Stage 4 — the held-out test of one aligned layer pair, and the result types of the canonical test.

The evidence is computed on parameters *not used* by the alignment — MLP ``down`` columns and the
per-head value→output maps ``O_h V_g Xᵀ`` on probe tokens — with :func:`lineage.stattest.aligned_z`
(learned spikes deflated, alignment-free null variance).  Under the null (independent
initialisation) the searched alignment is a function of other parameters, so the search does not
inflate the statistic for randomly initialised pairs; independently *trained* pairs share some
aligned structure, absorbed by :data:`lineage.canon.config.Z_INFLATION`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lineage import depth as depth_mod
from lineage.canon.align import Frame, UnitAlignment, align_heads, align_mlp
from lineage.canon.arch import CanonArch, LayerDict, Tensor
from lineage.canon.config import SCALE_TRADING_SPREAD
from lineage.canon.residual import ResidualMap
from lineage.stattest import MatrixStat, aligned_z

@dataclass(frozen=True)
class LayerUnits:
    """The unit matchings found for one layer pair (B's units onto A's), for :mod:`lineage.realign`."""

    mlp: UnitAlignment | None = None
    kv: UnitAlignment | None = None
    q: UnitAlignment | None = None


@dataclass(frozen=True)
class LayerRow:
    """Evidence for one aligned layer pair."""

    layer_a: int
    layer_b: int
    stats: tuple[MatrixStat, ...]
    z: float
    log10_p: float  # after any depth-search correction
    sketch_r: float | None
    transforms: dict[str, Any]
    units: LayerUnits | None = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"layer_a": self.layer_a, "layer_b": self.layer_b, "stats": [s.to_dict() for s in self.stats],
                "z": self.z, "log10_p": self.log10_p, "sketch_r": self.sketch_r, "transforms": self.transforms}


def _unit_cols(W: Tensor) -> Tensor:
    return W / W.norm(dim=0, keepdim=True).clamp_min(1e-12)


def evaluate_layer(la: LayerDict, lb: LayerDict, X_a: Tensor, X_b: Tensor, arch_a: CanonArch,
                   arch_b: CanonArch, frame: Frame) -> tuple[list[MatrixStat], dict[str, Any], LayerUnits]:
    """Align one folded layer pair and compute the held-out statistics (both layers in their own basis).

    Returns the statistics, a JSON summary of the transforms found, and the unit matchings.
    """
    stats: list[MatrixStat] = []
    found: dict[str, Any] = {}
    mlp = align_mlp(la, lb, arch_a, frame)
    if mlp is not None and "mlp.down.weight" in la and "mlp.down.weight" in lb:
        A = _unit_cols(frame.out(la["mlp.down.weight"][:, mlp.idx_a], "a"))
        B = _unit_cols(frame.out(lb["mlp.down.weight"][:, mlp.idx_b], "b")) * mlp.signs[None, :]
        stats.append(aligned_z("mlp.down", A, B))
        s = mlp.summary("mlp neurons")
        na = la["mlp.up.weight"][mlp.idx_a].norm(dim=1)
        nb = lb["mlp.up.weight"][mlp.idx_b].norm(dim=1)
        ratio = (nb / na.clamp_min(1e-12)).clamp_min(1e-12).log()
        s["log_scale_spread"] = float(ratio.std()) if ratio.numel() > 1 else 0.0
        found["mlp"] = s
    heads = align_heads(la, lb, X_a, X_b, arch_a, arch_b)
    units = LayerUnits(mlp, *(heads or (None, None)))
    if heads is not None:
        kv, qh = heads
        hd = arch_a.head_dim
        found["kv_groups"] = kv.summary("kv groups")
        found["q_heads"] = qh.summary("q heads")
        # Evidence: per-head value→output maps read on A's probe tokens, O_h V_g(h) Xᵀ (k × m per head),
        # invariant to any per-head invertible V/O transform.
        va, vb = la.get("attn.v.weight"), lb.get("attn.v.weight")
        oa, ob = la.get("attn.o.weight"), lb.get("attn.o.weight")
        if va is not None and vb is not None and oa is not None and ob is not None:
            pa, pb = frame.out(oa, "a"), frame.out(ob, "b")  # (k, H·hd)
            xva, xvb = va @ X_a.T, vb @ frame.XaM.T  # (KV·hd, m): values of A's probe tokens
            ga, gb = arch_a.group, arch_b.group
            blocks_a, blocks_b = [], []
            for i, j in zip(qh.idx_a.tolist(), qh.idx_b.tolist()):
                ka, kb = i // ga, j // gb
                blocks_a.append(pa[:, i * hd:(i + 1) * hd] @ xva[ka * hd:(ka + 1) * hd])
                blocks_b.append(pb[:, j * hd:(j + 1) * hd] @ xvb[kb * hd:(kb + 1) * hd])
            if blocks_a:
                stats.append(aligned_z("attn.ov", torch.cat(blocks_a, 1), torch.cat(blocks_b, 1)))
    return stats, found, units


def layer_z(stats: Sequence[MatrixStat]) -> float:
    if not stats:
        return 0.0
    return float(sum(s.z for s in stats) / math.sqrt(len(stats)))


# --------------------------------------------------------------------------- result


@dataclass(frozen=True)
class CanonResult:
    """Outcome of :func:`canonical_compare`."""

    log10_p: float
    z: float
    method: str
    residual: ResidualMap | None
    layers: tuple[LayerRow, ...]
    layer_map: depth_mod.LayerMap | None
    transforms: tuple[str, ...]
    n_shared_tokens: int
    notes: tuple[str, ...] = ()
    combined: dict[str, float] = field(default_factory=dict)

    @property
    def p_value(self) -> float:
        """The p-value as a float (0.0 when below ~1e-308; use ``log10_p``)."""
        return 10.0 ** self.log10_p if self.log10_p > -308 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "p_value": self.p_value, "log10_p": self.log10_p, "z": self.z, "method": self.method,
            "null": "independent initialisation",
            "residual": self.residual.to_dict() if self.residual is not None else None,
            "layers": [r.to_dict() for r in self.layers],
            "layer_map": self.layer_map.to_dict() if self.layer_map is not None else None,
            "transforms": list(self.transforms), "n_shared_tokens": self.n_shared_tokens,
            "notes": list(self.notes), "combined": dict(self.combined),
        }


def scale_spread(layers: Sequence[LayerRow]) -> float:
    """Largest per-layer spread of matched neurons' log up-row norm ratios (0 without MLP matchings)."""
    return max((r.transforms.get("mlp", {}).get("log_scale_spread", 0.0) for r in layers), default=0.0)


def transform_notes(rm: ResidualMap | None, layers: Sequence[LayerRow]) -> list[str]:
    out = []
    if rm is not None:
        out.append(rm.describe())
    if not layers:
        return out
    tot_n = sum(r.transforms.get("mlp", {}).get("matched", 0) for r in layers)
    moved = sum(r.transforms.get("mlp", {}).get("moved", 0) for r in layers)
    flips = sum(r.transforms.get("mlp", {}).get("sign_flips", 0) for r in layers)
    spread = scale_spread(layers)
    if tot_n:
        out.append(f"MLP neuron permutation, {moved} of {tot_n} neurons moved" + (f", {flips} sign flips" if flips else ""))
        if spread > SCALE_TRADING_SPREAD:
            out.append(f"per-neuron up/down scale trading (log-scale spread {spread:.2f})")
    hm = sum(r.transforms.get("q_heads", {}).get("moved", 0) for r in layers)
    gm = sum(r.transforms.get("kv_groups", {}).get("moved", 0) for r in layers)
    hn = sum(r.transforms.get("q_heads", {}).get("matched", 0) for r in layers)
    if hn:
        out.append(f"attention head permutation, {hm} of {hn} q heads moved ({gm} kv groups moved)")
    return out
