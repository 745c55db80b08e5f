"""GGUF: header parsing, dequantisation, llama Q/K un-permutation, vocab and metadata."""

from __future__ import annotations

import struct

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import quantize

from lineage.errors import HeaderError, ShardError, UnsupportedFormatError
from lineage.io import open_checkpoint
from lineage.io.gguf import (
    ggml_types,
    QUANTISED,
    open_gguf_source,
    parse_gguf_header,
    permute_qk_rows,
    unpermute_qk_rows,
)
from lineage.io.sources import LocalFileSource

HIDDEN, N_HEAD, N_KV, FF, VOCAB, LAYERS = 64, 4, 2, 96, 40, 2
HD = HIDDEN // N_HEAD


def _model(seed=0):
    g = torch.Generator().manual_seed(seed)
    t = {"token_embd.weight": torch.randn(VOCAB, HIDDEN, generator=g),
         "output_norm.weight": 1 + 0.1 * torch.randn(HIDDEN, generator=g)}
    for i in range(LAYERS):
        t[f"blk.{i}.attn_q.weight"] = torch.randn(N_HEAD * HD, HIDDEN, generator=g)
        t[f"blk.{i}.attn_k.weight"] = torch.randn(N_KV * HD, HIDDEN, generator=g)
        t[f"blk.{i}.attn_v.weight"] = torch.randn(N_KV * HD, HIDDEN, generator=g)
        t[f"blk.{i}.attn_output.weight"] = torch.randn(HIDDEN, N_HEAD * HD, generator=g)
        t[f"blk.{i}.ffn_up.weight"] = torch.randn(FF, HIDDEN, generator=g)
        t[f"blk.{i}.ffn_gate.weight"] = torch.randn(FF, HIDDEN, generator=g)
        t[f"blk.{i}.ffn_down.weight"] = torch.randn(HIDDEN, FF, generator=g)
        t[f"blk.{i}.attn_norm.weight"] = 1 + 0.1 * torch.randn(HIDDEN, generator=g)
    return t


def write_gguf(path, tensors, qtype=None, arch="llama", permute=True, extra=None):
    """Write HF-layout ``tensors`` the way llama.cpp's converter would."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(LAYERS)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_KV)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"tok{i}" for i in range(VOCAB)])
    w.add_uint32("general.base_model.count", 1)
    w.add_string("general.base_model.0.name", "Tiny Base")
    w.add_string("general.base_model.0.organization", "Org")
    w.add_string("general.base_model.0.repo_url", "https://huggingface.co/org/tiny-base")
    for k, v in (extra or {}).items():
        w.add_string(k, v)
    for name, t in tensors.items():
        a = t.numpy().astype(np.float32)
        if permute and arch == "llama" and ".attn_q." in name:
            a = permute_qk_rows(torch.from_numpy(a), N_HEAD).numpy()
        if permute and arch == "llama" and ".attn_k." in name:
            a = permute_qk_rows(torch.from_numpy(a), N_KV).numpy()
        if qtype is not None and a.ndim == 2:
            w.add_tensor(name, quantize(a, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def model():
    return _model()


def test_type_table_matches_gguf_package():
    for tid, (name, bs, ts) in ggml_types().items():
        q = gguf.GGMLQuantizationType(tid)
        assert q.name == name
        assert gguf.GGML_QUANT_SIZES[q] == (bs, ts)


def test_permutation_roundtrip():
    w = torch.randn(N_KV * HD, 5)
    assert torch.equal(unpermute_qk_rows(permute_qk_rows(w, N_KV), N_KV), w)
    assert not torch.equal(permute_qk_rows(w, N_KV), w)


@pytest.mark.parametrize(
    "qtype,tol",
    [(None, 0.0), (gguf.GGMLQuantizationType.F16, 2e-3), (gguf.GGMLQuantizationType.BF16, 1e-2),
     (gguf.GGMLQuantizationType.Q8_0, 0.02), (gguf.GGMLQuantizationType.Q4_0, 0.3),
     (gguf.GGMLQuantizationType.Q4_1, 0.3), (gguf.GGMLQuantizationType.Q5_0, 0.15),
     (gguf.GGMLQuantizationType.Q5_1, 0.15)],
)
def test_roundtrip_within_quantisation_error(tmp_path, model, qtype, tol):
    path = write_gguf(tmp_path / "m.gguf", model, qtype)
    ck = open_checkpoint(path)
    assert ck.format == "gguf"
    assert set(ck.tensors) == set(model)
    for name, t in model.items():
        assert ck.tensors[name].shape == tuple(t.shape), name
        got = ck.read(name)
        err = (got - t).abs().max().item()
        rel = err / t.abs().max().item()
        assert rel <= tol + 1e-7, (name, rel)
        if t.ndim == 2:
            # row ranges, including ranges that cut through heads
            assert torch.equal(ck.read(name, 3, 21), got[3:21])
    if qtype is not None:
        qname = "F16" if qtype.name == "F16" else qtype.name
        assert ck.tensors["blk.0.ffn_up.weight"].dtype == qname
    ck.close()


def test_k_quants_dequantise(tmp_path, model):
    # gguf-py cannot quantise K-types; build Q4_K/Q6_K/... bytes directly and check the
    # reader agrees with gguf.quants.dequantize on a full tensor and on row ranges.
    rng = np.random.default_rng(0)
    names = {}
    w = gguf.GGUFWriter(str(tmp_path / "k.gguf"), "llama")
    for qn in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"):
        q = gguf.GGMLQuantizationType[qn]
        bs, ts = gguf.GGML_QUANT_SIZES[q]
        raw = rng.integers(0, 256, size=(6, 2 * ts), dtype=np.uint8)
        # keep the fp16 scales finite and small
        ref = gguf.quants.dequantize(raw, q)
        if not np.isfinite(ref).all():
            raw[..., :] = rng.integers(0, 60, size=raw.shape, dtype=np.uint8)
            ref = gguf.quants.dequantize(raw, q)
        w.add_tensor(f"t.{qn}", raw, raw_dtype=q)
        names[f"t.{qn}"] = ref
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    ck = open_checkpoint(tmp_path / "k.gguf")
    for name, ref in names.items():
        assert ck.tensors[name].shape == (6, 512)
        np.testing.assert_array_equal(ck.read(name).numpy(), ref)
        np.testing.assert_array_equal(ck.read(name, 2, 5).numpy(), ref[2:5])


def test_unsupported_type_is_clear(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "iq.gguf"), "llama")
    q = gguf.GGMLQuantizationType.IQ4_NL
    w.add_tensor("x", np.zeros((2, 18), dtype=np.uint8), raw_dtype=q)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    ck = open_checkpoint(tmp_path / "iq.gguf")
    assert ck.tensors["x"].dtype == "IQ4_NL"
    with pytest.raises(UnsupportedFormatError, match="IQ4_NL"):
        ck.read("x")


def test_metadata_vocab_config_and_reader_agreement(tmp_path, model):
    path = write_gguf(tmp_path / "m.gguf", model, gguf.GGMLQuantizationType.Q8_0)
    ck = open_checkpoint(path)
    assert ck.vocab() == [f"tok{i}" for i in range(VOCAB)]
    assert ck.metadata["general.base_model.0.repo_url"] == "https://huggingface.co/org/tiny-base"
    assert ck.metadata["general.architecture"] == "llama"
    assert ck.metadata["tokenizer.ggml.tokens"].startswith("<array of 40")
    assert ck.config["num_attention_heads"] == N_HEAD and ck.config["num_key_value_heads"] == N_KV
    assert ck.config["hidden_size"] == HIDDEN and ck.config["vocab_size"] == VOCAB
    # the gguf package's own reader sees the same tensors at the same offsets
    ref = gguf.GGUFReader(str(path))
    for t in ref.tensors:
        meta = ck.tensors[t.name]
        assert meta.shape == tuple(int(d) for d in reversed(t.shape.tolist()))
        assert meta.offset == t.data_offset and meta.nbytes == t.n_bytes
    assert ck.bytes_read < 4096 + sum(m.nbytes for m in ck.tensors.values())


def test_non_llama_arch_is_not_unpermuted(tmp_path, model):
    path = write_gguf(tmp_path / "q.gguf", model, arch="qwen2", permute=False)
    ck = open_checkpoint(path)
    assert ck.metadata["lineage.qk_unpermuted"] is False
    assert torch.equal(ck.read("blk.0.attn_q.weight"), model["blk.0.attn_q.weight"])


def _hostile(tmp_path, body: bytes):
    p = tmp_path / "h.gguf"
    p.write_bytes(body)
    return p


def _s(x: str) -> bytes:
    b = x.encode()
    return struct.pack("<Q", len(b)) + b


@pytest.mark.parametrize(
    "body,match",
    [
        (b"GGUF" + struct.pack("<IQQ", 3, 0, 0)[:6], "bad magic|past the end"),
        (b"GGUF" + struct.pack("<IQQ", 9, 0, 0), "version 9"),
        (b"GGUF" + struct.pack("<IQQ", 3, 1 << 40, 0), "hostile"),
        (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1 << 60), "cap"),
        (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + _s("k") + struct.pack("<I", 77), "unknown value type"),
        (b"GGUF" + struct.pack("<IQQ", 3, 1, 0) + _s("t") + struct.pack("<IQIQ", 1, 8, 0, 0),
         "truncated"),
        (b"GGUF" + struct.pack("<IQQ", 3, 1, 0) + _s("t") + struct.pack("<IQIQ", 1, 1 << 20, 0, 0)
         + b"\0" * 64, "truncated"),
        (b"GGUF" + struct.pack("<IQQ", 3, 2, 0) + (_s("t") + struct.pack("<IQIQ", 1, 1, 0, 0)) * 2
         + b"\0" * 64, "duplicate"),
        (b"GGUF" + struct.pack("<IQQ", 3, 1, 0) + _s("t") + struct.pack("<IQIQ", 1, 8, 2, 0) + b"\0" * 64,
         "block size"),
    ],
)
def test_hostile_headers(tmp_path, body, match):
    p = _hostile(tmp_path, body)
    with pytest.raises((HeaderError, UnsupportedFormatError), match=match):
        parse_gguf_header(LocalFileSource(p))


def test_supported_types_are_dequantisable():
    for qn in QUANTISED:
        assert hasattr(gguf.quants, qn)


def test_open_over_any_byte_source(tmp_path, model):
    path = write_gguf(tmp_path / "m.gguf", model)
    src = LocalFileSource(path)
    ck = open_gguf_source("x", src)
    assert torch.equal(ck.read("blk.1.attn_k.weight"), model["blk.1.attn_k.weight"])


def test_split_gguf_set(tmp_path, model):
    names = list(model)
    parts = [names[: len(names) // 2], names[len(names) // 2 :]]
    for i, part in enumerate(parts, 1):
        w = gguf.GGUFWriter(str(tmp_path / f"m-{i:05d}-of-00002.gguf"), "llama")
        w.add_uint16("split.no", i - 1)
        w.add_uint16("split.count", 2)
        if i == 1:
            w.add_head_count(N_HEAD)
            w.add_head_count_kv(N_KV)
            w.add_token_list([f"tok{j}" for j in range(VOCAB)])
        for n in part:
            a = model[n].numpy()
            if ".attn_q." in n:
                a = permute_qk_rows(model[n], N_HEAD).numpy()
            if ".attn_k." in n:
                a = permute_qk_rows(model[n], N_KV).numpy()
            w.add_tensor(n, a)
        w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    ck = open_checkpoint(tmp_path / "m-00002-of-00002.gguf")
    assert set(ck.tensors) == set(model) and len(ck.sources) == 2
    assert len(ck.vocab()) == VOCAB
    for n in ("blk.1.attn_k.weight", "token_embd.weight", "blk.0.attn_q.weight"):
        assert torch.equal(ck.read(n), model[n])
    (tmp_path / "m-00001-of-00002.gguf").unlink()
    with pytest.raises(ShardError, match="missing 1 file"):
        open_checkpoint(tmp_path / "m-00002-of-00002.gguf")
