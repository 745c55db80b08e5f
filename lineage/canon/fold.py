"""Stage 1 — fold norm gains (and LayerNorm biases) into the projections that read the normalised stream.

A LayerNorm bias ``β`` becomes a bias ``Wβ`` of the projection (kept under ``*.bias_folded``, not
used as evidence); LayerNorm output is orthogonal to the all-ones vector, so the input weights'
component along it is projected out (adding ``c·1ᵀ`` to a row is function-preserving there).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from lineage.canon.arch import CanonArch, LayerDict, Tensor

_ATTN_IN = ("attn.q", "attn.k", "attn.v")
_MLP_IN = ("mlp.gate", "mlp.up")


def _fold_into(out: LayerDict, names: Sequence[str], gain: Tensor | None, bias: Tensor | None, layer_norm: bool) -> None:
    for nm in names:
        w = out.get(nm + ".weight")
        if w is None:
            continue
        w = w.float()
        if bias is not None:
            out[nm + ".bias_folded"] = w @ bias.float()
        if gain is not None:
            w = w * gain.float()[None, :]
        if layer_norm:
            w = w - w.mean(dim=1, keepdim=True)
        out[nm + ".weight"] = w


def fold_layer(ld: Mapping[str, Tensor], arch: CanonArch) -> LayerDict:
    """Fold ``norm.attn`` / ``norm.mlp`` gains (and LayerNorm biases) into the next projections.

    Returns a new dict without the norm entries; the folded weights are exactly
    what a model with unit gains would hold.
    """
    out: LayerDict = {k: v for k, v in ld.items() if not k.startswith("norm.attn") and not k.startswith("norm.mlp")}
    ln = arch.norm == "layer"
    _fold_into(out, _ATTN_IN, ld.get("norm.attn.weight"), ld.get("norm.attn.bias"), ln)
    _fold_into(out, _MLP_IN, ld.get("norm.mlp.weight"), ld.get("norm.mlp.bias"), ln)
    return out


def fold_globals(embed: Tensor, lm_head: Tensor | None, final_norm: Tensor | None, final_bias: Tensor | None,
                 arch: CanonArch) -> tuple[Tensor, Tensor | None]:
    """``(embed, lm_head)`` with the final norm folded into the head (embed is never scaled)."""
    if lm_head is None:
        return embed.float(), None
    h = lm_head.float()
    if final_norm is not None:
        h = h * final_norm.float()[None, :]
    if arch.norm == "layer":
        h = h - h.mean(dim=1, keepdim=True)
    return embed.float(), h
