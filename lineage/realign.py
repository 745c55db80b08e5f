"""Undo a disguise: express model B's weights in model A's coordinates.

The canonical test (:mod:`lineage.canon`) decides *whether* B descends from A
without ever building B in A's basis: its evidence is held out from the
alignment.  To say *how* a disguised B was derived (a plain copy, a fine-tune,
a merged LoRA…), the anatomy stage needs the two models' weights side by side.
:func:`realign_layer` builds them from what the canonical test found:

1. both layers have their norm gains folded (:func:`lineage.canon.fold_layer`);
2. B's residual basis is mapped onto A's with the fitted ``M`` (``E_b ≈ E_a M``):
   input-side weights ``W_b Mᵀ``, output-side weights and their biases ``M W_b``;
3. MLP neurons are put in A's order (with the sign flips found), and, when the
   matching saw per-neuron scale trading, B's up rows and down columns are
   rescaled to A's up-row norms (GLU only: the gate is not homogeneous);
4. heads are put in A's order (kv groups, q heads within them);
5. per kv group, an invertible ``T`` on the head dimension is fitted by least
   squares (``T Q_b ≈ Q_a``, then ``K_b ← T⁻ᵀ K_b``: Q/K scale trading and
   RoPE-commuting rotations) and likewise for values (``V_b ← T V_b``,
   ``O_b ← O_b T⁻¹``), each kept only when it removes most of the difference
   (:data:`FIT_GAIN`), so that an undisguised attention block is left alone.

The result is a role-keyed dict of float32 tensors for both sides (keys
``L{i}.attn.q.weight``…, globals ``embed.weight`` / ``lm_head.weight``).  Folded
LayerNorm biases (``*.bias_folded``) are not returned: they are functions of
other parameters.  For a pure function-preserving disguise the two dicts agree
up to float rounding (:class:`Closeness` measures it).
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

from lineage.canon import (
    SCALE_TRADING_SPREAD,
    CanonArch,
    CanonResult,
    LayerDict,
    LayeredModel,
    LayerUnits,
    UnitAlignment,
    fold_globals,
    fold_layer,
    scale_spread,
)

from lineage.signals.roundnoise import rounding_noise

log = logging.getLogger(__name__)

Tensor = torch.Tensor

#: A per-group head fit is applied only if it leaves at most this fraction of the difference's energy.
FIT_GAIN = 0.25

_INPUT_SIDE = ("attn.q", "attn.k", "attn.v", "mlp.gate", "mlp.up")
_OUTPUT_SIDE = ("attn.o", "mlp.down")


class ResidualOp:
    """Applies ``M`` (``(d_a, d_b)``, orthonormal columns) cheaply: by indexing when it is a signed permutation."""

    def __init__(self, M: Tensor) -> None:
        self.M = M.float()
        self.d_a, self.d_b = M.shape
        nz = M.abs() > 0.5
        self.rows: Tensor | None = None
        self.signs: Tensor | None = None
        self.identity = False
        if self.d_a == self.d_b and int(nz.sum()) == self.d_b and bool((nz.sum(0) == 1).all()):
            rows = nz.float().argmax(0)  # B channel j sits at A channel rows[j]
            if bool(((M[rows, torch.arange(self.d_b)].abs() - 1).abs() < 1e-6).all()):
                self.rows = rows
                self.signs = torch.sign(M[rows, torch.arange(self.d_b)]).float()
                self.identity = bool((rows == torch.arange(self.d_b)).all() and (self.signs > 0).all())

    def inp(self, w: Tensor) -> Tensor:
        """Input-side weight ``(out, d_b)`` → ``(out, d_a)``: ``W Mᵀ``."""
        if self.identity:
            return w
        if self.rows is not None and self.signs is not None:
            out = torch.empty(w.shape[0], self.d_a, dtype=w.dtype)
            out[:, self.rows] = w * self.signs[None, :]
            return out
        return w @ self.M.T

    def out(self, v: Tensor) -> Tensor:
        """Output-side weight ``(d_b, …)`` (or bias) → ``(d_a, …)``: ``M W``."""
        if self.identity:
            return v
        if self.rows is not None and self.signs is not None:
            out = torch.empty((self.d_a,) + tuple(v.shape[1:]), dtype=v.dtype)
            out[self.rows] = v * (self.signs.reshape((-1,) + (1,) * (v.dim() - 1)))
            return out
        return self.M @ v


def _map_residual(lb: LayerDict, op: ResidualOp) -> LayerDict:
    """B's layer with its residual axis expressed in A's basis."""
    out: LayerDict = {}
    for k, v in lb.items():
        name = k.rsplit(".", 1)[0]
        if k.endswith(".weight") and name in _INPUT_SIDE and v.dim() == 2 and v.shape[1] == op.d_b:
            out[k] = op.inp(v)
        elif name in _OUTPUT_SIDE and v.shape[0] == op.d_b:
            out[k] = op.out(v)
        else:
            out[k] = v
    return out


def _order(units: UnitAlignment, n: int) -> Tensor | None:
    """Index ``p`` with ``new_b = old_b[p]`` (None unless the matching is a full permutation of ``n``)."""
    if units.idx_a.numel() != n or units.idx_b.numel() != n:
        return None
    p = torch.empty(n, dtype=torch.int64)
    p[units.idx_a] = units.idx_b
    return p


def _blocks(perm: Tensor, size: int) -> Tensor:
    """Row index expanding a unit permutation to blocks of ``size`` rows."""
    return (perm[:, None] * size + torch.arange(size)[None, :]).reshape(-1)


def _permute_mlp(la: LayerDict, lb: LayerDict, al: UnitAlignment, arch: CanonArch, scale_trading: bool) -> None:
    up = lb.get("mlp.up.weight")
    if up is None:
        return
    p = _order(al, up.shape[0])
    if p is None:
        return
    signs = torch.ones(up.shape[0])
    signs[al.idx_a] = al.signs.float()
    for k in ("mlp.up.weight", "mlp.up.bias", "mlp.gate.weight", "mlp.gate.bias"):
        if k in lb:
            v = lb[k][p]
            if k.startswith("mlp.up"):
                v = v * (signs[:, None] if v.dim() == 2 else signs)
            lb[k] = v
    if "mlp.down.weight" in lb:
        lb["mlp.down.weight"] = lb["mlp.down.weight"][:, p] * signs[None, :]
    if scale_trading and arch.mlp == "glu" and "mlp.up.weight" in la and "mlp.down.weight" in lb:
        s = la["mlp.up.weight"].norm(dim=1) / lb["mlp.up.weight"].norm(dim=1).clamp_min(1e-12)
        lb["mlp.up.weight"] = lb["mlp.up.weight"] * s[:, None]
        if "mlp.up.bias" in lb:
            lb["mlp.up.bias"] = lb["mlp.up.bias"] * s
        lb["mlp.down.weight"] = lb["mlp.down.weight"] / s.clamp_min(1e-12)[None, :]


def _permute_heads(lb: LayerDict, kv: UnitAlignment, q: UnitAlignment, arch: CanonArch) -> None:
    hd = arch.head_dim
    pq, pk = _order(q, arch.n_heads), _order(kv, arch.n_kv_heads)
    if pq is None or pk is None:
        return
    rq, rk = _blocks(pq, hd), _blocks(pk, hd)
    for k in list(lb):
        if k.endswith("bias_folded"):
            continue
        if k.startswith("attn.q.") and lb[k].shape[0] == rq.numel():
            lb[k] = lb[k][rq]
        elif (k.startswith("attn.k.") or k.startswith("attn.v.")) and lb[k].shape[0] == rk.numel():
            lb[k] = lb[k][rk]
    o = lb.get("attn.o.weight")
    if o is not None and o.shape[1] == rq.numel():
        lb["attn.o.weight"] = o[:, rq]


def _fit(target: Tensor, source: Tensor) -> Tensor | None:
    """``T`` minimising ``‖T source − target‖`` (rows are the head dimension), if well conditioned."""
    g = (source @ source.T).double()
    c = (target @ source.T).double()
    ridge = 1e-9 * float(torch.diagonal(g).mean().clamp_min(1e-30))
    try:
        t = torch.linalg.solve(g + ridge * torch.eye(g.shape[0], dtype=g.dtype), c.T).T
    except RuntimeError:
        return None
    return t.float() if bool(torch.isfinite(t).all()) else None


def _energy(x: Tensor) -> float:
    return float(x.double().pow(2).sum())


def _fit_heads(la: LayerDict, lb: LayerDict, arch: CanonArch) -> dict[str, int]:
    """Per kv group, undo invertible head-dimension transforms on Q/K and V/O where they explain the difference."""
    hd, grp = arch.head_dim, arch.group
    q_a, q_b = la.get("attn.q.weight"), lb.get("attn.q.weight")
    k_b = lb.get("attn.k.weight")
    v_a, v_b = la.get("attn.v.weight"), lb.get("attn.v.weight")
    o_b = lb.get("attn.o.weight")
    done = {"qk_groups": 0, "vo_groups": 0}
    if q_a is None or q_b is None or q_a.shape != q_b.shape or q_b.shape[0] != arch.n_heads * hd:
        return done
    q_b, k_b = q_b.clone(), None if k_b is None else k_b.clone()
    v_b, o_b = (None if v_b is None else v_b.clone()), (None if o_b is None else o_b.clone())
    for g in range(arch.n_kv_heads):
        heads = range(g * grp, (g + 1) * grp)
        qa = torch.cat([q_a[h * hd:(h + 1) * hd] for h in heads], 1)
        qb = torch.cat([q_b[h * hd:(h + 1) * hd] for h in heads], 1)
        t = _fit(qa, qb)
        if t is not None and k_b is not None and _energy(t @ qb - qa) < FIT_GAIN * _energy(qb - qa):
            for h in heads:
                q_b[h * hd:(h + 1) * hd] = t @ q_b[h * hd:(h + 1) * hd]
            k_b[g * hd:(g + 1) * hd] = torch.linalg.solve(t.double().T, k_b[g * hd:(g + 1) * hd].double()).float()
            done["qk_groups"] += 1
        if v_a is None or v_b is None or o_b is None or v_a.shape != v_b.shape:
            continue
        va, vb = v_a[g * hd:(g + 1) * hd], v_b[g * hd:(g + 1) * hd]
        t = _fit(va, vb)
        if t is not None and _energy(t @ vb - va) < FIT_GAIN * _energy(vb - va):
            v_b[g * hd:(g + 1) * hd] = t @ vb
            t_inv = torch.linalg.inv(t.double()).float()
            for h in heads:
                o_b[:, h * hd:(h + 1) * hd] = o_b[:, h * hd:(h + 1) * hd] @ t_inv
            done["vo_groups"] += 1
    lb["attn.q.weight"] = q_b
    if k_b is not None:
        lb["attn.k.weight"] = k_b
    if v_b is not None:
        lb["attn.v.weight"] = v_b
    if o_b is not None:
        lb["attn.o.weight"] = o_b
    return done


def realign_layer(la: LayerDict, lb: LayerDict, arch_a: CanonArch, arch_b: CanonArch, M: Tensor | ResidualOp,
                  units: LayerUnits | None, scale_trading: bool = False) -> tuple[LayerDict, LayerDict, dict[str, int]]:
    """Folded A layer and B layer in A's coordinates (see module docstring), plus counts of head fits applied.

    ``la``/``lb`` are raw layer dicts (norms not folded); ``M`` the residual map (or its :class:`ResidualOp`).
    """
    op = M if isinstance(M, ResidualOp) else ResidualOp(M)
    fa, fb = fold_layer(la, arch_a), fold_layer(lb, arch_b)
    fa = {k: v.float() for k, v in fa.items() if not k.endswith("bias_folded")}
    fb = _map_residual({k: v.float() for k, v in fb.items() if not k.endswith("bias_folded")}, op)
    done = {"qk_groups": 0, "vo_groups": 0}
    if units is not None and arch_a.n_heads == arch_b.n_heads and arch_a.n_kv_heads == arch_b.n_kv_heads:
        if units.mlp is not None:
            _permute_mlp(fa, fb, units.mlp, arch_a, scale_trading)
        if units.kv is not None and units.q is not None:
            _permute_heads(fb, units.kv, units.q, arch_a)
            done = _fit_heads(fa, fb, arch_a)
    return fa, fb, done


def _scale_trading(canon: CanonResult) -> bool:
    return scale_spread(canon.layers) > SCALE_TRADING_SPREAD


@dataclass
class Closeness:
    """Energies of ``B − A`` over shared 2-D weights, before (raw names, unfolded) and after realignment."""

    raw_delta: float = 0.0
    raw_norm: float = 0.0
    aligned_delta: float = 0.0
    aligned_norm: float = 0.0
    max_aligned_rel: float = 0.0
    head_fits: int = 0
    #: sum and count of the per-matrix ``min(1, ‖B′ − A‖ / √(‖A‖‖B′‖))`` after realignment (the
    #: distance :func:`lineage.family.elementwise_evidence` uses, so the two are comparable)
    aligned_rel_sum: float = 0.0
    aligned_count: int = 0

    def add(self, a: Tensor, b: Tensor, aligned: bool) -> None:
        """Account one matrix pair."""
        d, n = _energy(b - a), _energy(a)
        if aligned:
            self.aligned_delta += d
            self.aligned_norm += n
            if n > 0:
                self.max_aligned_rel = max(self.max_aligned_rel, (d / n) ** 0.5)
            nb = _energy(b)
            self.aligned_rel_sum += min(1.0, d ** 0.5 / max((n * nb) ** 0.25, 1e-30)) if d > 0 else 0.0
            self.aligned_count += 1
        else:
            self.raw_delta += d
            self.raw_norm += n

    @property
    def raw_rel(self) -> float:
        """``‖B − A‖ / ‖A‖`` over all shared matrices as stored."""
        return (self.raw_delta / self.raw_norm) ** 0.5 if self.raw_norm > 0 else 0.0

    @property
    def aligned_rel(self) -> float:
        """``‖B′ − A‖ / ‖A‖`` after folding and realignment."""
        return (self.aligned_delta / self.aligned_norm) ** 0.5 if self.aligned_norm > 0 else 0.0

    @property
    def aligned_mean_rel(self) -> float:
        """Mean per-matrix relative change after realignment (see ``aligned_rel_sum``)."""
        return self.aligned_rel_sum / self.aligned_count if self.aligned_count else 0.0

    def to_dict(self) -> dict[str, float]:
        return {"raw_rel": self.raw_rel, "aligned_rel": self.aligned_rel, "max_aligned_rel": self.max_aligned_rel,
                "aligned_mean_rel": self.aligned_mean_rel, "head_fits": self.head_fits}


def realigned_layers(model_a: LayeredModel, model_b: LayeredModel, arch_a: Any, arch_b: Any,
                     canon: CanonResult, closeness: Closeness | None = None) -> Iterator[tuple[str, Tensor, Tensor]]:
    """``(role, tensor_a, tensor_b_in_A's_basis)`` for every shared role, one layer in memory at a time.

    Layers are paired by the canonical test's layer rows; the globals (embedding,
    folded output head) come last and only when both models have the same vocabulary size.
    ``closeness``, if given, accumulates the raw and realigned distances.
    """
    from lineage.canon import arch_from

    aa, ab = arch_from(arch_a), arch_from(arch_b)
    if canon.residual is None:
        raise ValueError("canonical result without a residual map")
    op = ResidualOp(canon.residual.M)
    trading = _scale_trading(canon)
    acc = closeness if closeness is not None else Closeness()
    for row in canon.layers:
        la, lb = model_a.layer(row.layer_a), model_b.layer(row.layer_b)
        for k, va in la.items():
            vb = lb.get(k)
            if va.dim() == 2 and vb is not None and vb.shape == va.shape:
                acc.add(va.float(), vb.float(), aligned=False)
        fa, fb, done = realign_layer(la, lb, aa, ab, op, row.units, trading)
        del la, lb
        acc.head_fits += done["qk_groups"] + done["vo_groups"]
        for k, va in fa.items():
            vb = fb.get(k)
            if vb is not None and vb.shape == va.shape:
                if va.dim() == 2:
                    acc.add(va, vb, aligned=True)
                yield f"L{row.layer_a}.{k}", va, vb
    ea, eb = model_a.global_tensor("embed.weight"), model_b.global_tensor("embed.weight")
    if ea is not None and eb is not None and ea.shape[0] == eb.shape[0] and eb.shape[1] == op.d_b:
        ea, eb = ea.float(), eb.float()
        if ea.shape == eb.shape:
            acc.add(ea, eb, aligned=False)
        eb = op.inp(eb)
        acc.add(ea, eb, aligned=True)
        yield "embed.weight", ea, eb
    if aa.tied or ab.tied:
        return
    ha, hb = model_a.global_tensor("lm_head.weight"), model_b.global_tensor("lm_head.weight")
    if ha is None or hb is None or ha.shape[0] != hb.shape[0] or hb.shape[1] != op.d_b:
        return
    _, ha = fold_globals(ha[:1], ha, model_a.global_tensor("final_norm.weight"),
                         model_a.global_tensor("final_norm.bias"), aa)
    _, hb = fold_globals(hb[:1], hb, model_b.global_tensor("final_norm.weight"),
                         model_b.global_tensor("final_norm.bias"), ab)
    if ha is not None and hb is not None:
        if ha.shape == hb.shape:
            acc.add(ha, hb, aligned=False)
        hb = op.inp(hb)
        acc.add(ha, hb, aligned=True)
        yield "lm_head.weight", ha, hb


# --------------------------------------------------------------------------- storage rounding through a realignment


class NoisyModel:
    """A :class:`LayeredModel` that adds simulated storage rounding to another one.

    Every 2-D tensor whose values have a known rounding (bf16/fp16 spacing or a quantisation lattice,
    :func:`lineage.signals.roundnoise.rounding_noise`; vectors: float spacing only) gets uniform noise
    of that variance, seeded by its role, so that realigning this model and the plain one shows what the child's own rounding
    becomes once the disguise is undone.
    """

    def __init__(self, model: LayeredModel, seed: int = 0) -> None:
        self.model = model
        self.seed = seed
        self.noisy = 0  # tensors that received noise
        self.formats: dict[str, str] = {}

    @property
    def n_layers(self) -> int:
        return self.model.n_layers

    def _add(self, role: str, t: Tensor | None) -> Tensor | None:
        if t is None or t.dim() not in (1, 2):
            return t
        nz = rounding_noise(t)
        if nz is None:
            return t
        g = torch.Generator().manual_seed(zlib.crc32(role.encode()) + self.seed)
        u = torch.rand(t.shape, generator=g).mul_(2.0).sub_(1.0).mul_(math.sqrt(3.0))
        if t.dim() == 2:
            self.noisy += 1
            self.formats[role] = nz.name
        return t.float() + u * nz.variance.sqrt()

    def global_tensor(self, role: str) -> Tensor | None:
        return self._add(role, self.model.global_tensor(role))

    def layer(self, i: int) -> LayerDict:
        return {k: self._add(f"L{i}.{k}", v) for k, v in self.model.layer(i).items()}


@dataclass(frozen=True)
class RoundingCheck:
    """Is a realigned difference the child's own storage rounding, carried through the realignment?

    ``ratio[role]`` = ‖realigned B − A‖² / ‖realigned simulated rounding‖² per 2-D role: about 1 when
    the child is a re-encoded (quantised, bf16) copy under the disguise, far above 1 after training.
    """

    ratios: dict[str, float]
    median_ratio: float | None
    within: tuple[str, ...]   # roles whose ratio is at most 2 × ROUNDING_RATIO[1]
    fraction_within: float
    explains: bool
    formats: tuple[str, ...]

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


#: The rounding explains a realigned difference when the median energy ratio is within these bounds …
ROUNDING_RATIO = (0.6, 1.6)
#: … and at least this fraction of the matrices have a ratio at most ``2 × ROUNDING_RATIO[1]``.
ROUNDING_FRACTION = 0.9


def rounding_through_realignment(model_a: LayeredModel, model_b: LayeredModel, arch_a: Any, arch_b: Any,
                                 canon: CanonResult, aligned_a: Mapping[str, Tensor],
                                 aligned_b: Mapping[str, Tensor], noisy: str = "b") -> RoundingCheck:
    """Compare the realigned difference with the ``noisy`` side's own rounding, realigned the same way.

    ``aligned_a``/``aligned_b`` are :func:`realigned_layers` of the plain models (role → tensor).  The
    models are realigned once more with :class:`NoisyModel` on the ``noisy`` side ("a" or "b"); the
    change it makes per role is that side's storage rounding as the realignment carries it.
    """
    if noisy not in ("a", "b"):
        raise ValueError(f"noisy must be 'a' or 'b', got {noisy!r}")
    nm = NoisyModel(model_a if noisy == "a" else model_b)
    ma, mb = (nm, model_b) if noisy == "a" else (model_a, nm)
    ratios: dict[str, float] = {}
    for role, ta, tb in realigned_layers(ma, mb, arch_a, arch_b, canon):
        if nm.noisy == 0:
            break  # the first layer read has no stored rounding to carry: full-precision weights
        xa, xb = aligned_a.get(role), aligned_b.get(role)
        if ta.dim() != 2 or xa is None or xb is None or xa.shape != ta.shape or xb.shape != tb.shape:
            continue
        noise = float(((ta - xa).double() ** 2).sum() + ((tb - xb).double() ** 2).sum())
        if noise <= 0:
            continue
        ratios[role] = float(((xb - xa).double() ** 2).sum()) / noise
    vals = sorted(ratios.values())
    med = vals[len(vals) // 2] if vals else None
    within = tuple(r for r, v in ratios.items() if v <= 2 * ROUNDING_RATIO[1])
    frac = len(within) / len(vals) if vals else 0.0
    explains = med is not None and ROUNDING_RATIO[0] <= med <= ROUNDING_RATIO[1] and frac >= ROUNDING_FRACTION
    return RoundingCheck(ratios, med, within, frac, explains, tuple(sorted(set(nm.formats.values()))))
