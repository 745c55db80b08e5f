"""Training loops for the tiny models: full training, partial training, LoRA.

Deterministic given the seed and the thread count (the zoo runs each job with
one thread).  Weights go in and out as dicts of Hugging Face-named tensors.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lineage.testing.corpus import batches
from lineage.testing.derive import as_linear, is_conv1d, lora_targets
from lineage.testing.models import TinyConfig, lm_loss

log = logging.getLogger(__name__)

Weights = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Schedule:
    """Optimiser settings of one training run."""

    steps: int
    lr: float = 3e-3
    batch: int = 8
    seq: int = 64
    warmup: int = 20
    weight_decay: float = 0.01
    min_lr_frac: float = 0.1
    clip: float = 1.0


def _lr_at(s: Schedule, step: int) -> float:
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    frac = (step - s.warmup) / max(1, s.steps - s.warmup)
    return s.lr * (s.min_lr_frac + (1 - s.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


@torch.no_grad()
def eval_loss(cfg: TinyConfig, weights: Weights, windows: torch.Tensor) -> float:
    """Mean next-token loss over evaluation windows ``(k, batch, seq + 1)``."""
    tot = 0.0
    for b in windows:
        tot += lm_loss(cfg, weights, b).item()
    return tot / max(1, len(windows))


def _run(
    cfg: TinyConfig,
    make_weights: Callable[[], Weights],
    params: list[torch.Tensor],
    decay: list[bool],
    ids: torch.Tensor,
    sched: Schedule,
    seed: int,
) -> list[float]:
    groups = [
        {"params": [p for p, d in zip(params, decay) if d], "weight_decay": sched.weight_decay},
        {"params": [p for p, d in zip(params, decay) if not d], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=sched.lr, betas=(0.9, 0.95), eps=1e-8, foreach=True)
    data = batches(ids, sched.steps, sched.batch, sched.seq, seed)
    curve = []
    for step in range(sched.steps):
        for g in opt.param_groups:
            g["lr"] = _lr_at(sched, step)
        loss = lm_loss(cfg, make_weights(), data[step])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, sched.clip)
        opt.step()
        curve.append(loss.item())
    return curve


def train(
    cfg: TinyConfig,
    weights: Weights,
    ids: torch.Tensor,
    sched: Schedule,
    seed: int,
    trainable: Callable[[str], bool] | None = None,
) -> tuple[Weights, list[float]]:
    """Train (a copy of) ``weights`` on windows of ``ids``; returns the new weights
    and the per-step training loss.  ``trainable(name)`` freezes the others."""
    p = {k: v.detach().float().clone().requires_grad_(trainable is None or trainable(k)) for k, v in weights.items()}
    names = [k for k in sorted(p) if p[k].requires_grad]
    curve = _run(cfg, lambda: p, [p[k] for k in names], [p[k].dim() >= 2 for k in names], ids, sched, seed)
    return {k: v.detach() for k, v in p.items()}, curve


def train_lora(
    cfg: TinyConfig,
    weights: Weights,
    ids: torch.Tensor,
    sched: Schedule,
    seed: int,
    rank: int,
    modules: list[str] | tuple[str, ...],
    alpha: float | None = None,
) -> tuple[Weights, dict[str, torch.Tensor], list[float]]:
    """Train LoRA factors only (base frozen): ``W + (alpha/r) B A`` on every module in
    ``modules`` (PEFT ``target_modules`` names).  Returns the merged weights, the
    PEFT adapter tensors (``lora_A`` ``(r, in)``, ``lora_B`` ``(out, r)``; the
    scaling is folded into B so ``lora_alpha = r`` reproduces the merge) and the
    training curve."""
    g = torch.Generator().manual_seed(int(seed) + 7919)
    alpha = float(alpha if alpha is not None else 2 * rank)
    scaling = alpha / rank
    base = {k: v.detach().float() for k, v in weights.items()}
    targets = lora_targets(base, modules)
    if not targets:
        raise ValueError(f"no module matches {list(modules)}")
    A: dict[str, torch.Tensor] = {}
    B: dict[str, torch.Tensor] = {}
    for k in targets:
        n_out, n_in = as_linear(k, base[k]).shape
        A[k] = (torch.rand(rank, n_in, generator=g) * 2 - 1).div_(math.sqrt(n_in)).requires_grad_(True)
        B[k] = torch.zeros(n_out, rank, requires_grad=True)

    def merged() -> Weights:
        out = dict(base)
        for k in targets:
            d = scaling * (B[k] @ A[k])
            out[k] = base[k] + (d.T if is_conv1d(k) else d)
        return out

    params = [t for k in targets for t in (A[k], B[k])]
    curve = _run(cfg, merged, params, [False] * len(params), ids, sched, seed)
    with torch.no_grad():
        final = {k: v.detach().clone() for k, v in merged().items()}
        adapter = {}
        for k in targets:
            mod = k[: -len(".weight")]
            adapter[f"base_model.model.{mod}.lora_A.weight"] = A[k].detach().contiguous()
            adapter[f"base_model.model.{mod}.lora_B.weight"] = (scaling * B[k]).detach().contiguous()
    return final, adapter, curve
