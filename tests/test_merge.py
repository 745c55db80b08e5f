"""Merge fitting: planted linear, task-arithmetic, SLERP, TIES and DARE merges with known weights."""

from __future__ import annotations

import math

import pytest
import torch

from lineage.signals.merge import fit_merge


ROLES = [f"L{i}.{p}.weight" for i in range(4) for p in ("attn.q", "mlp.up")]


def _family(seed: int = 0, k: int = 2, ft: float = 0.05):
    g = torch.Generator().manual_seed(seed)
    base = {r: 0.02 * torch.randn(64, 96, generator=g) for r in ROLES}
    parents = [{r: b + ft * b.std() * torch.randn(b.shape, generator=g) for r, b in base.items()}
               for _ in range(k)]
    return base, parents


def _slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    cos = float((a * b).sum() / (a.norm() * b.norm()))
    th = math.acos(cos)
    return (math.sin((1 - t) * th) * a + math.sin(t * th) * b) / math.sin(th)


@pytest.mark.parametrize("w", [(0.5, 0.5), (0.3, 0.7), (0.85, 0.15)])
@pytest.mark.parametrize("cast", [False, True])
def test_linear_weights(w, cast):
    base, ps = _family(1)
    child = {r: w[0] * ps[0][r] + w[1] * ps[1][r] for r in ROLES}
    if cast:
        child = {r: v.bfloat16().float() for r, v in child.items()}
    fit = fit_merge(child, ps, base)
    assert fit.method == "linear"
    assert all(abs(a - b) < 0.02 for a, b in zip(fit.weights, w))
    assert fit.explains
    assert all(s < 0.02 for s in fit.weights_se)


def test_three_parents_without_base():
    base, ps = _family(2, k=3)
    w = (0.2, 0.5, 0.3)
    child = {r: sum(wi * p[r] for wi, p in zip(w, ps)) for r in ROLES}
    fit = fit_merge(child, ps)
    assert all(abs(a - b) < 0.02 for a, b in zip(fit.weights, w))


def test_task_arithmetic():
    base, ps = _family(3)
    child = {r: base[r] + 0.7 * (ps[0][r] - base[r]) + 0.9 * (ps[1][r] - base[r]) for r in ROLES}
    fit = fit_merge(child, ps, base)
    assert fit.method == "task-arithmetic"
    assert abs(fit.weights[0] - 0.7) < 0.02 and abs(fit.weights[1] - 0.9) < 0.02


@pytest.mark.parametrize("t", [0.25, 0.5, 0.7])
def test_slerp_t(t):
    base, ps = _family(4, ft=0.8)  # parents far enough apart that SLERP differs from a line
    child = {r: _slerp(ps[0][r], ps[1][r], t) for r in ROLES}
    fit = fit_merge(child, ps, base)
    assert fit.method == "slerp", fit.to_dict()["per_module"]
    assert abs(fit.t - t) < 0.02
    # a linear merge of the same parents is not mistaken for SLERP
    lin = fit_merge({r: (1 - t) * ps[0][r] + t * ps[1][r] for r in ROLES}, ps, base)
    assert lin.method == "linear"


def test_dare_and_ties_recognised():
    base, ps = _family(5)
    g = torch.Generator().manual_seed(9)
    p_drop = 0.7
    dare = {}
    for r in ROLES:
        acc = torch.zeros_like(base[r])
        for p in ps:
            m = (torch.rand(base[r].shape, generator=g) > p_drop).float()
            acc += 0.5 * m * (p[r] - base[r]) / (1 - p_drop)
        dare[r] = base[r] + acc
    fit = fit_merge(dare, ps, base)
    assert fit.method == "dare"
    assert abs(fit.sparsity["density"] - (1 - p_drop)) < 0.05
    assert all(abs(a - 0.5) < 0.05 for a in fit.weights)

    ties = {}
    for r in ROLES:
        tvs = []
        for p in ps:
            tv = p[r] - base[r]
            thr = tv.abs().flatten().kthvalue(int(0.7 * tv.numel())).values
            tvs.append(torch.where(tv.abs() > thr, tv, torch.zeros_like(tv)))
        stack = torch.stack(tvs)
        sign = torch.sign(stack.sum(0))
        agree = (torch.sign(stack) == sign) & (stack != 0)
        num = (stack * agree).sum(0)
        den = agree.sum(0).clamp_min(1)
        ties[r] = base[r] + num / den
    fit = fit_merge(ties, ps, base)
    assert fit.method == "ties"
    assert fit.sparsity["sign_agreement"] > 0.99


def test_unrelated_child_is_not_explained():
    base, ps = _family(6)
    g = torch.Generator().manual_seed(1)
    child = {r: 0.02 * torch.randn(b.shape, generator=g) for r, b in base.items()}
    fit = fit_merge(child, ps, base)
    assert not fit.explains and fit.residual > 0.5
    with pytest.raises(ValueError):
        fit_merge(child, [])
