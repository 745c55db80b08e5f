"""Stage 2 (entry) — anchor the two residual streams on shared tokens: probe rows, Grams, residual map, frame.

Peak memory: the two embeddings; each output head is loaded, folded, sliced and freed in turn.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lineage.canon.align import Frame
from lineage.canon.arch import CanonArch, LayeredModel, Tensor
from lineage.canon.config import FIT_ROWS_PER_DIM, MAX_FIT_ROWS, MIN_FIT_ROWS
from lineage.canon.fold import fold_globals
from lineage.canon.residual import ResidualMap, fit_residual_map, probe_rows, token_pairs
from lineage.errors import ArchitectureError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Anchors:
    """Where the per-layer stages read the two models: each model's own probe rows and their Grams,
    the residual map B → A, and the comparison frame built from it."""

    Xa: Tensor
    Xb: Tensor
    Ka: Tensor
    Kb: Tensor
    residual: ResidualMap
    frame: Frame
    n_shared_tokens: int
    notes: tuple[str, ...] = ()


def _embed(model: LayeredModel) -> Tensor:
    embed = model.global_tensor("embed.weight")
    if embed is None:
        raise ArchitectureError("canonical comparison needs the token embedding (embed.weight)")
    return embed.float()


def _head_rows(model: LayeredModel, arch: CanonArch, n_vocab: int, idx: Tensor) -> Tensor | None:
    """Rows ``idx`` of the folded output head (None when tied or absent); the full head is freed at once."""
    if arch.tied:
        return None
    head = model.global_tensor("lm_head.weight")
    if head is None or head.shape[0] != n_vocab:
        return None
    _, h = fold_globals(head[:1], head, model.global_tensor("final_norm.weight"),
                        model.global_tensor("final_norm.bias"), arch)
    return None if h is None else h[idx].float().clone()


def _anchor_rows(e: Tensor, h: Tensor | None) -> Tensor:
    if h is None:
        return e
    # give the head the same total weight as the embedding rows
    return torch.cat([e, h * (e.norm() / h.norm().clamp_min(1e-12))], 0)


def anchor(model_a: LayeredModel, model_b: LayeredModel, aa: CanonArch, ab: CanonArch,
           vocab_a: Sequence[str] | None, vocab_b: Sequence[str] | None, n_probes: int) -> Anchors:
    """Shared tokens, probe rows and the residual map (token-anchored embedding and untied head rows)."""
    notes: list[str] = []
    Ea, Eb = _embed(model_a), _embed(model_b)
    n_va, n_vb = Ea.shape[0], Eb.shape[0]
    pairs = token_pairs(vocab_a, vocab_b, n_va, n_vb)
    if len(pairs) < max(8, 2 * ab.hidden) and len(pairs) < 64:
        raise ArchitectureError(f"only {len(pairs)} shared tokens: cannot anchor the residual stream")
    if len(pairs) < 2 * ab.hidden:
        notes.append(f"only {len(pairs)} shared tokens for a {ab.hidden}-wide residual: map is under-determined")
    fit = pairs[:min(MAX_FIT_ROWS, max(MIN_FIT_ROWS, FIT_ROWS_PER_DIM * ab.hidden))]
    ia = torch.as_tensor([p[0] for p in fit])
    ib = torch.as_tensor([p[1] for p in fit])
    probes = pairs[:n_probes]
    Xa = probe_rows(Ea, [p[0] for p in probes], aa)
    Xb = probe_rows(Eb, [p[1] for p in probes], ab)
    ea, eb = Ea[ia].clone(), Eb[ib].clone()
    del Ea, Eb
    ha = _head_rows(model_a, aa, n_va, ia)
    hb = _head_rows(model_b, ab, n_vb, ib) if ha is not None else None
    use_head = ha is not None and hb is not None
    rm = fit_residual_map(_anchor_rows(ea, ha if use_head else None), _anchor_rows(eb, hb if use_head else None))
    log.info("%s (unexplained %.3f; perm %.3f, rotation %.3f)", rm.describe(), rm.residual, rm.residual_perm,
             rm.residual_rot)
    return Anchors(Xa, Xb, Xa @ Xa.T, Xb @ Xb.T, rm, Frame.build(rm.M, Xa), len(pairs), tuple(notes))
