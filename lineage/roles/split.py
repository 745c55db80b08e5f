"""Splitting fused tensors: row ranges of q, k, v inside a fused QKV tensor."""

from __future__ import annotations

from lineage.roles.config import Cfg
from lineage.roles.keys import RowRanges
from lineage.roles.tables import Layout


def ranges(*spans: tuple[int, int]) -> RowRanges:
    """Row ranges as a tuple of int pairs."""
    return tuple((int(s), int(e)) for s, e in spans)


def split_qkv(
    layout: Layout, out: int, cfg: Cfg, hidden: int | None
) -> tuple[dict[str, RowRanges] | None, str | None]:
    """Row ranges of q, k, v inside a fused tensor with ``out`` rows, or (None, reason)."""
    nh, nkv, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    if hd is None and nh and hidden and hidden % nh == 0:
        hd = hidden // nh
    if layout == Layout.QKV_HEADS or (layout == Layout.QKV_FALCON and not (cfg.falcon_new_arch or cfg.falcon_multi_query)):
        # (heads, 3, head_dim, in): GPT-NeoX, BLOOM, Falcon-RW
        if not nh or out % (3 * nh):
            return None, f"fused QKV with {out} rows needs the head count (config num_attention_heads)"
        d = out // (3 * nh)
        parts = {
            s: tuple((h * 3 * d + j * d, h * 3 * d + (j + 1) * d) for h in range(nh))
            for j, s in enumerate(("q", "k", "v"))
        }
        return parts, None
    if layout == Layout.QKV_FALCON and cfg.falcon_new_arch:
        # (kv_heads, q_per_kv + 2, head_dim, in)
        if not (nh and nkv and hd) or nh % nkv or out != (nh + 2 * nkv) * hd:
            return None, f"Falcon grouped QKV with {out} rows does not match the config head counts"
        g = nh // nkv
        step = (g + 2) * hd
        return {
            "q": tuple((k * step, k * step + g * hd) for k in range(nkv)),
            "k": tuple((k * step + g * hd, k * step + (g + 1) * hd) for k in range(nkv)),
            "v": tuple((k * step + (g + 1) * hd, (k + 1) * step) for k in range(nkv)),
        }, None
    # contiguous q | k | v (GPT-2 c_attn, Phi-3 qkv_proj, GGUF attn_qkv, Falcon multi-query)
    if nh and hd:
        kv = nkv or nh
        q_rows, kv_rows = nh * hd, kv * hd
        if q_rows + 2 * kv_rows == out:
            return {
                "q": ranges((0, q_rows)),
                "k": ranges((q_rows, q_rows + kv_rows)),
                "v": ranges((q_rows + kv_rows, out)),
            }, None
    if out % 3 == 0 and (nkv is None or nkv == nh) and (hidden is None or out == 3 * hidden):
        t = out // 3
        return {"q": ranges((0, t)), "k": ranges((t, 2 * t)), "v": ranges((2 * t, out))}, None
    return None, f"fused QKV with {out} rows does not split with the known head counts"
