"""Is a child a merge of parents P1..Pk, and with which weights?

Per module, in task-vector space when the parents' common base B is given
(``y = C − B``, ``x_i = P_i − B``), otherwise on the raw tensors, the mixing
weights are the least-squares solution of ``y ≈ Σ w_i x_i`` (a k×k system built
from float64 dot products, so the cost is k+1 passes over each tensor).

* **linear / task arithmetic**: the weights themselves (``Σ w`` near 1 for a
  linear merge; free for task arithmetic).
* **SLERP** (two parents): on the raw tensors the child is ``a·P1 + b·P2`` with
  ``a = sin((1−t)θ)/sin θ``, ``b = sin(tθ)/sin θ`` and ``θ`` the angle between
  P1 and P2.  ``t`` is read from ``b`` and from ``a`` separately; the two agree
  for a SLERP and the fitted point lies on the SLERP curve rather than on the
  line ``a + b = 1``.  The merge is called SLERP when its distance to the SLERP
  curve is much smaller than to the line (they coincide when θ → 0, and the
  result is then reported as linear with the same weights).
* **TIES / DARE** (needs the base): sparsified merges leave many entries of the
  child's task vector exactly zero (to the child's float rounding).  DARE drops
  entries at random (the dropped entries have the same magnitude profile as the
  kept ones); TIES trims the smallest ones (dropped entries are much smaller).
  Reported: zero fraction, the parents' own zero fraction, the magnitude ratio,
  the implied density, and the agreement of the child's signs with the elected
  sign ``sign(Σ x_i)``.

Uncertainty: per-module weights, their spread across modules, and a bootstrap
over row blocks within each module (standard error of the weights).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch

from lineage.signals.floatgrid import float_grid, half_ulp

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModuleMerge:
    """Fit on one module."""

    weights: tuple[float, ...]
    weights_se: tuple[float, ...]
    residual: float
    slerp_t: float | None = None
    slerp_dist: float | None = None
    linear_dist: float | None = None
    theta: float | None = None

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class MergeFit:
    """Merge fit across modules (``method`` in linear, task-arithmetic, slerp, ties, dare, none)."""

    method: str
    weights: tuple[float, ...]
    weights_std: tuple[float, ...]
    weights_se: tuple[float, ...]
    t: float | None
    t_std: float | None
    residual: float
    explains: bool
    sparsity: dict[str, float | str | None] = field(default_factory=dict)
    per_module: dict[str, ModuleMerge] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["per_module"] = {k: v.to_dict() for k, v in self.per_module.items()}
        return d


def _flat_blocks(t: torch.Tensor, n_blocks: int) -> list[torch.Tensor]:
    x = t.detach().to(torch.float32)
    x = x.reshape(x.shape[0], -1) if x.dim() >= 2 else x.reshape(1, -1)
    if x.shape[0] < n_blocks:
        x = x.reshape(-1)
        return list(torch.tensor_split(x, min(n_blocks, max(x.numel(), 1))))
    return [b.reshape(-1) for b in torch.tensor_split(x, n_blocks)]


def _gram_blocks(y: torch.Tensor, xs: Sequence[torch.Tensor], n_blocks: int):
    """Per row block: G_b (k×k) and h_b (k), float64; plus ‖y_b‖²."""
    yb = _flat_blocks(y, n_blocks)
    xb = [_flat_blocks(x, n_blocks) for x in xs]
    k = len(xs)
    G = torch.zeros(len(yb), k, k, dtype=torch.float64)
    h = torch.zeros(len(yb), k, dtype=torch.float64)
    yy = torch.zeros(len(yb), dtype=torch.float64)
    for b in range(len(yb)):
        yy[b] = torch.dot(yb[b], yb[b]).double()
        for i in range(k):
            h[b, i] = torch.dot(xb[i][b], yb[b]).double()
            for j in range(i, k):
                G[b, i, j] = G[b, j, i] = torch.dot(xb[i][b], xb[j][b]).double()
    return G, h, yy


def _solve(G: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    k = G.shape[-1]
    ridge = 1e-12 * torch.diagonal(G, dim1=-2, dim2=-1).sum(-1).clamp_min(1e-300)
    return torch.linalg.solve(G + ridge[..., None, None] * torch.eye(k, dtype=G.dtype), h)


def _fit_module(y, xs, n_blocks: int, n_boot: int, gen: torch.Generator):
    G, h, yy = _gram_blocks(y, xs, n_blocks)
    Gs, hs, ys = G.sum(0), h.sum(0), float(yy.sum())
    w = _solve(Gs, hs)
    res2 = ys - 2 * float(w @ hs) + float(w @ Gs @ w)
    residual = math.sqrt(max(res2, 0.0) / ys) if ys > 0 else 0.0
    nb = G.shape[0]
    if n_boot > 0 and nb > 1:
        idx = torch.randint(0, nb, (n_boot, nb), generator=gen)
        wb = _solve(G[idx].sum(1), h[idx].sum(1))
        se = wb.std(0)
    else:
        se = torch.zeros_like(w)
    return w, se, residual, Gs


def _slerp_t(a: float, b: float, theta: float) -> tuple[float, float, float]:
    """(t, distance of (a,b) to the SLERP curve, distance to the line a + b = 1)."""
    st = math.sin(theta)
    t_b = math.asin(max(-1.0, min(1.0, b * st))) / theta
    t_a = 1.0 - math.asin(max(-1.0, min(1.0, a * st))) / theta
    t = 0.5 * (t_a + t_b)
    ca, cb = math.sin((1 - t) * theta) / st, math.sin(t * theta) / st
    return t, math.hypot(a - ca, b - cb), abs(a + b - 1.0) / math.sqrt(2)


def _sparsity(child: Mapping[str, torch.Tensor], parents, base, roles) -> dict:
    zero = total = pz = 0
    mag_zero = mag_kept = 0.0
    n_zero_m = n_kept_m = 0
    agree = nz = 0
    for role in roles:
        c = child[role].detach().float()
        b = base[role].detach().float()
        y = c - b
        grid = float_grid(c)
        tol = half_ulp(c, grid) * (1 + 1e-6) if grid != "fp32" else torch.zeros_like(c)
        yz = y.abs() <= tol
        xs = [p[role].detach().float() - b for p in parents]
        allz = torch.ones_like(yz)
        for x in xs:
            allz &= x.abs() <= tol
        zero += int(yz.sum())
        pz += int(allz.sum())
        total += y.numel()
        a1 = xs[0].abs()
        mag_zero += float(a1[yz & ~allz].sum())
        n_zero_m += int((yz & ~allz).sum())
        mag_kept += float(a1[~yz].sum())
        n_kept_m += int((~yz).sum())
        elected = torch.sign(sum(xs))
        keep = ~yz & (elected != 0)
        agree += int((torch.sign(y)[keep] == elected[keep]).sum())
        nz += int(keep.sum())
    zf = zero / max(total, 1)
    pzf = pz / max(total, 1)
    ratio = (mag_zero / max(n_zero_m, 1)) / (mag_kept / max(n_kept_m, 1)) if n_kept_m and n_zero_m \
        and mag_kept > 0 else None
    k = len(parents)
    excess = max(zf - pzf, 0.0)
    kind = None
    if excess > 0.05:
        kind = "ties" if ratio is not None and ratio < 0.6 else "dare"
    density = 1.0 - excess ** (1.0 / k) if excess > 0 else 1.0
    return {"zero_fraction": zf, "parents_zero_fraction": pzf, "magnitude_ratio": ratio,
            "density": density, "sign_agreement": agree / max(nz, 1), "kind": kind}


def fit_merge(
    child: Mapping[str, torch.Tensor],
    parents: Sequence[Mapping[str, torch.Tensor]],
    base: Mapping[str, torch.Tensor] | None = None,
    *,
    n_blocks: int = 16,
    n_boot: int = 64,
    seed: int = 0,
    max_residual: float = 0.2,
) -> MergeFit:
    """Fit mixing weights of ``child`` over ``parents`` (role-keyed tensors)."""
    if len(parents) < 1:
        raise ValueError("fit_merge: need at least one parent")
    roles = [r for r in child if all(r in p for p in parents) and (base is None or r in base)
             and all(p[r].shape == child[r].shape for p in parents) and child[r].numel() > 1]
    if base is not None:
        roles = [r for r in roles if base[r].shape == child[r].shape]
    if not roles:
        raise ValueError("fit_merge: no role shared by the child and every parent")
    gen = torch.Generator().manual_seed(seed)
    k = len(parents)
    per: dict[str, ModuleMerge] = {}
    for role in roles:
        c = child[role].float()
        ps = [p[role].float() for p in parents]
        if base is not None:
            b = base[role].float()
            y, xs = c - b, [p - b for p in ps]
        else:
            y, xs = c, ps
        if float(y.abs().max()) == 0 and base is not None:
            continue
        w, se, residual, _ = _fit_module(y, xs, n_blocks, n_boot, gen)
        extra = {}
        if k == 2:
            # SLERP lives on the raw tensors.
            wr, _, _, Gr = _fit_module(c, ps, 1, 0, gen) if base is not None else (w, se, residual, _)
            if base is None:
                Gr = _gram_blocks(c, ps, 1)[0][0]
            cos = float(Gr[0, 1] / math.sqrt(float(Gr[0, 0] * Gr[1, 1]))) if Gr[0, 0] > 0 and Gr[1, 1] > 0 else 1.0
            theta = math.acos(max(-1.0, min(1.0, cos)))
            if theta > 1e-4:
                t, ds, dl = _slerp_t(float(wr[0]), float(wr[1]), theta)
                extra = dict(slerp_t=t, slerp_dist=ds, linear_dist=dl, theta=theta)
        per[role] = ModuleMerge(tuple(float(v) for v in w), tuple(float(v) for v in se), residual,
                                **extra)
    if not per:
        return MergeFit("none", (), (), (), None, None, 1.0, False, {}, {})
    W = torch.tensor([m.weights for m in per.values()], dtype=torch.float64)
    SE = torch.tensor([m.weights_se for m in per.values()], dtype=torch.float64)
    weights = tuple(float(v) for v in W.median(0).values)
    wstd = tuple(float(v) for v in (W.std(0) if W.shape[0] > 1 else torch.zeros(k)))
    wse = tuple(float(v) for v in SE.mean(0))
    residual = float(torch.tensor([m.residual for m in per.values()]).median())
    method = "linear" if abs(sum(weights) - 1.0) < 0.05 else "task-arithmetic"
    t = t_std = None
    sl = [m for m in per.values() if m.slerp_t is not None]
    if k == 2 and sl:
        ds = sorted(m.slerp_dist for m in sl)[len(sl) // 2]
        dl = sorted(m.linear_dist for m in sl)[len(sl) // 2]
        ts = torch.tensor([m.slerp_t for m in sl], dtype=torch.float64)
        if ds < 0.25 * dl and dl > 1e-4:
            method = "slerp"
            t, t_std = float(ts.median()), float(ts.std()) if len(sl) > 1 else 0.0
    sparsity = _sparsity(child, parents, base, list(per)) if base is not None else {}
    if sparsity.get("kind"):
        method = sparsity["kind"]
    explains = residual <= max_residual or method in ("ties", "dare")
    log.debug("merge: method=%s weights=%s residual=%.3g", method, weights, residual)
    return MergeFit(method, weights, wstd, wse, t, t_std, residual, explains, sparsity, per)
