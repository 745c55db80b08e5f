"""Write a tiny model as a llama.cpp GGUF file (F32 / Q8_0 / Q4_0 / Q4_K_M) with the ``gguf`` package.

Names and layouts follow llama.cpp's converter: ``token_embd``, ``blk.N.attn_q``,
…, linear weights ``(out, in)`` (GPT-2 ``Conv1D`` transposed, ``c_attn`` kept
fused as ``attn_qkv``), and for Llama the Q/K rows permuted per head so the
rotary halves are interleaved.  Norms stay F32; for the single-type files a
matrix whose row length is not a multiple of the block size stays F32 too.
``Q4_K_M`` is llama.cpp's mixed file type (Q4_K, Q6_K for the output matrix and
some ``attn_v``/``ffn_down``, Q5_0/Q8_0 for rows shorter than a K-quant
super-block), written with :mod:`lineage.testing.kquants` since the ``gguf``
package cannot write K-quants.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from lineage.testing import kquants
from lineage.testing.bpe import BPETokenizer
from lineage.testing.derive import as_linear
from lineage.testing.models import TinyConfig, gpt2_layer_names, llama_layer_names

log = logging.getLogger(__name__)


def interleave_rotary_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's Q/K row order: within each head, row ``j`` of the first half
    and row ``j`` of the second half become neighbours."""
    rows, cols = w.shape
    hd = rows // n_head
    return w.reshape(n_head, 2, hd // 2, cols).transpose(1, 2).reshape(rows, cols)


def gguf_tensors(cfg: TinyConfig, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """GGUF name -> float32 tensor in GGUF layout."""
    out: dict[str, torch.Tensor] = {}
    if cfg.family == "llama":
        out["token_embd.weight"] = weights["model.embed_tokens.weight"]
        for i in range(cfg.n_layers):
            n = llama_layer_names(i)
            b = f"blk.{i}."
            out[b + "attn_norm.weight"] = weights[n["norm_attn"]]
            out[b + "attn_q.weight"] = interleave_rotary_rows(weights[n["q"]], cfg.n_heads)
            out[b + "attn_k.weight"] = interleave_rotary_rows(weights[n["k"]], cfg.n_kv_heads)
            out[b + "attn_v.weight"] = weights[n["v"]]
            out[b + "attn_output.weight"] = weights[n["o"]]
            out[b + "ffn_norm.weight"] = weights[n["norm_mlp"]]
            out[b + "ffn_gate.weight"] = weights[n["gate"]]
            out[b + "ffn_up.weight"] = weights[n["up"]]
            out[b + "ffn_down.weight"] = weights[n["down"]]
        out["output_norm.weight"] = weights["model.norm.weight"]
        if not cfg.tie_embeddings:
            out["output.weight"] = weights["lm_head.weight"]
    else:
        out["token_embd.weight"] = weights["transformer.wte.weight"]
        out["position_embd.weight"] = weights["transformer.wpe.weight"]
        for i in range(cfg.n_layers):
            n = gpt2_layer_names(i)
            b = f"blk.{i}."
            out[b + "attn_norm.weight"] = weights[n["ln1_w"]]
            out[b + "attn_norm.bias"] = weights[n["ln1_b"]]
            out[b + "attn_qkv.weight"] = as_linear(n["attn_w"], weights[n["attn_w"]])
            out[b + "attn_qkv.bias"] = weights[n["attn_b"]]
            out[b + "attn_output.weight"] = as_linear(n["proj_w"], weights[n["proj_w"]])
            out[b + "attn_output.bias"] = weights[n["proj_b"]]
            out[b + "ffn_norm.weight"] = weights[n["ln2_w"]]
            out[b + "ffn_norm.bias"] = weights[n["ln2_b"]]
            out[b + "ffn_up.weight"] = as_linear(n["fc_w"], weights[n["fc_w"]])
            out[b + "ffn_up.bias"] = weights[n["fc_b"]]
            out[b + "ffn_down.weight"] = as_linear(n["mproj_w"], weights[n["mproj_w"]])
            out[b + "ffn_down.bias"] = weights[n["mproj_b"]]
        out["output_norm.weight"] = weights["transformer.ln_f.weight"]
        out["output_norm.bias"] = weights["transformer.ln_f.bias"]
        if not cfg.tie_embeddings:
            out["output.weight"] = weights["lm_head.weight"]
    return {k: v.detach().float().contiguous() for k, v in out.items()}


def quantised_roundtrip(t: torch.Tensor, qtype_name: str) -> tuple[np.ndarray, torch.Tensor, bool]:
    """(bytes to store, dequantised float32 tensor, whether quantised).

    Quantised with :func:`lineage.testing.kquants.quantize` (K-quants are ours, other
    types the ``gguf`` package's) and decoded with ``gguf.quants.dequantize``.
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    arr = t.numpy().astype(np.float32)
    qt = GGMLQuantizationType[qtype_name]
    block = GGML_QUANT_SIZES[qt][0]
    if t.dim() != 2 or arr.shape[-1] % block:
        return arr, t.clone(), False
    q = kquants.quantize(arr, qtype_name)
    deq = np.asarray(dequantize(q, qt), dtype=np.float32).reshape(arr.shape)
    return q, torch.from_numpy(deq.copy()), True


#: File types this writer produces -> ``gguf.LlamaFileType`` name (the ``general.file_type`` value).
FILE_TYPES = {"F32": "ALL_F32", "Q8_0": "MOSTLY_Q8_0", "Q4_0": "MOSTLY_Q4_0", "Q4_K_M": "MOSTLY_Q4_K_M"}


def tensor_type(qtype: str, name: str, shape: tuple[int, ...], n_layers: int, has_output: bool) -> str:
    """GGML type of one tensor in a file of type ``qtype`` (see :data:`FILE_TYPES`)."""
    if qtype == "Q4_K_M":
        return kquants.q4_k_m_type(name, shape, n_layers, has_output)
    if qtype == "F32" or len(shape) != 2:
        return "F32"
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    return qtype if shape[-1] % GGML_QUANT_SIZES[GGMLQuantizationType[qtype]][0] == 0 else "F32"


def write_gguf(
    path: str | Path,
    cfg: TinyConfig,
    weights: dict[str, torch.Tensor],
    tok: BPETokenizer,
    qtype: str = "Q8_0",
    *,
    name: str = "",
    base_model: str | None = None,
    types_out: dict[str, str] | None = None,
) -> dict[str, torch.Tensor]:
    """Write ``path``; returns the dequantised tensors in Hugging Face names and layout
    (what a correct reader should get back), for loss evaluation.

    ``qtype`` is a key of :data:`FILE_TYPES`; ``types_out``, if given, receives the
    GGML type of every tensor written (GGUF name -> type name).
    """
    import gguf
    from gguf import GGMLQuantizationType, LlamaFileType

    if qtype not in FILE_TYPES:
        raise ValueError(f"unsupported GGUF file type {qtype!r} (supported: {', '.join(FILE_TYPES)})")

    arch = cfg.family
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name or Path(path).stem)
    if base_model:
        w.add_base_model_count(1)
        w.add_base_model_name(0, base_model)
    w.add_context_length(cfg.max_pos)
    w.add_embedding_length(cfg.hidden)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.intermediate)
    w.add_head_count(cfg.n_heads)
    if arch == "llama":
        w.add_head_count_kv(cfg.n_kv_heads)
        w.add_layer_norm_rms_eps(cfg.norm_eps)
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_rope_dimension_count(cfg.head_dim)
        w.add_vocab_size(cfg.vocab)
    else:
        w.add_layer_norm_eps(cfg.norm_eps)
    w.add_file_type(int(LlamaFileType[FILE_TYPES[qtype]]))
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tok.tokens)
    w.add_token_types([3 if t in tok.specials else 1 for t in tok.tokens])
    w.add_token_merges([f"{a} {b}" for a, b in tok.merges])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    deq: dict[str, torch.Tensor] = {}
    tensors = gguf_tensors(cfg, weights)
    for gname, t in tensors.items():
        tt = tensor_type(qtype, gname, tuple(t.shape), cfg.n_layers, "output.weight" in tensors)
        if types_out is not None:
            types_out[gname] = tt
        if tt == "F32":
            w.add_tensor(gname, t.numpy())
            deq[gname] = t
            continue
        data, back, did = quantised_roundtrip(t, tt)
        if not did:
            raise RuntimeError(f"{gname}: type {tt} cannot hold a tensor of shape {tuple(t.shape)}")
        w.add_tensor(gname, data, raw_shape=data.shape, raw_dtype=GGMLQuantizationType[tt])
        deq[gname] = back
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return _back_to_hf(cfg, deq)


def _back_to_hf(cfg: TinyConfig, g: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`gguf_tensors` (for evaluating the stored model)."""
    def uninterleave(w: torch.Tensor, n_head: int) -> torch.Tensor:
        rows, cols = w.shape
        hd = rows // n_head
        return w.reshape(n_head, hd // 2, 2, cols).transpose(1, 2).reshape(rows, cols)

    out: dict[str, torch.Tensor] = {}
    if cfg.family == "llama":
        out["model.embed_tokens.weight"] = g["token_embd.weight"]
        for i in range(cfg.n_layers):
            n = llama_layer_names(i)
            b = f"blk.{i}."
            out[n["norm_attn"]] = g[b + "attn_norm.weight"]
            out[n["q"]] = uninterleave(g[b + "attn_q.weight"], cfg.n_heads)
            out[n["k"]] = uninterleave(g[b + "attn_k.weight"], cfg.n_kv_heads)
            out[n["v"]] = g[b + "attn_v.weight"]
            out[n["o"]] = g[b + "attn_output.weight"]
            out[n["norm_mlp"]] = g[b + "ffn_norm.weight"]
            out[n["gate"]] = g[b + "ffn_gate.weight"]
            out[n["up"]] = g[b + "ffn_up.weight"]
            out[n["down"]] = g[b + "ffn_down.weight"]
        out["model.norm.weight"] = g["output_norm.weight"]
    else:
        out["transformer.wte.weight"] = g["token_embd.weight"]
        out["transformer.wpe.weight"] = g["position_embd.weight"]
        for i in range(cfg.n_layers):
            n = gpt2_layer_names(i)
            b = f"blk.{i}."
            out[n["ln1_w"]], out[n["ln1_b"]] = g[b + "attn_norm.weight"], g[b + "attn_norm.bias"]
            out[n["attn_w"]], out[n["attn_b"]] = g[b + "attn_qkv.weight"].T, g[b + "attn_qkv.bias"]
            out[n["proj_w"]], out[n["proj_b"]] = g[b + "attn_output.weight"].T, g[b + "attn_output.bias"]
            out[n["ln2_w"]], out[n["ln2_b"]] = g[b + "ffn_norm.weight"], g[b + "ffn_norm.bias"]
            out[n["fc_w"]], out[n["fc_b"]] = g[b + "ffn_up.weight"].T, g[b + "ffn_up.bias"]
            out[n["mproj_w"]], out[n["mproj_b"]] = g[b + "ffn_down.weight"].T, g[b + "ffn_down.bias"]
        out["transformer.ln_f.weight"] = g["output_norm.weight"]
        out["transformer.ln_f.bias"] = g["output_norm.bias"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = g["output.weight"]
    return {k: v.contiguous() for k, v in out.items()}
