"""Our Q4_K / Q6_K writers: llama.cpp's byte layout (checked against the gguf package's
independent decoder and a loop-by-loop transcription of the C packing), error levels,
edge blocks, the Q4_K_M mix, a Q4_K_M file read back, and the quantgrid names."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from lineage.testing import kquants as K


def _gauss(shape: tuple[int, ...], seed: int = 0, scale: float = 0.02) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def _gguf(q: np.ndarray, name: str, shape: tuple[int, ...]) -> np.ndarray:
    return np.asarray(dequantize(q, GGMLQuantizationType[name]), dtype=np.float32).reshape(shape)


def _rel_rms(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(((a - b) ** 2).mean() / (b**2).mean()))


@pytest.mark.parametrize("name, lo, hi", [("Q4_K", 0.05, 0.09), ("Q6_K", 0.01, 0.025)])
def test_round_trip_through_independent_decoder(name: str, lo: float, hi: float) -> None:
    x = _gauss((48, 512))
    q = K.quantize(x, name)
    assert q.dtype == np.uint8
    assert q.shape == (48, 2 * (K.Q4_K_BLOCK_BYTES if name == "Q4_K" else K.Q6_K_BLOCK_BYTES))
    theirs = _gguf(q, name, x.shape)
    ours = K.DEQUANTIZERS[name](q)
    assert np.array_equal(theirs, ours)  # bit-exact agreement of two decoders
    err = _rel_rms(theirs, x)
    assert lo < err < hi, err
    # the scale search beats the naive grid of the same family
    from gguf.quants import quantize as gq

    naive = "Q4_0" if name == "Q4_K" else "Q8_0"
    nerr = _rel_rms(_gguf(gq(x, GGMLQuantizationType[naive]), naive, x.shape), x)
    assert (err < nerr) if name == "Q4_K" else (err > nerr)  # Q6_K has fewer bits than Q8_0


def test_rows_must_hold_whole_superblocks() -> None:
    with pytest.raises(ValueError, match="multiple of 256"):
        K.quantize_q4_k(np.zeros((4, 128), np.float32))
    with pytest.raises(ValueError, match="multiple of 256"):
        K.quantize_q6_k(np.zeros((4, 96), np.float32))


# --------------------------------------------------------------------------- byte layout

def _ref_pack_q4_k(L: list[int], ls: list[int], lm: list[int]) -> bytes:
    """quantize_row_q4_K_ref's packing, transcribed loop by loop (scales and qs only)."""
    scales = [0] * 12
    for j in range(8):
        if j < 4:
            scales[j] = ls[j]
            scales[j + 4] = lm[j]
        else:
            scales[j + 4] = (ls[j] & 0xF) | ((lm[j] & 0xF) << 4)
            scales[j - 4] |= (ls[j] >> 4) << 6
            scales[j - 0] |= (lm[j] >> 4) << 6
    qs = []
    for j in range(0, 256, 64):
        qs += [L[j + l] | (L[j + l + 32] << 4) for l in range(32)]
    return bytes(scales + qs)


def test_q4_k_layout_matches_llama_cpp() -> None:
    # every sub-block spans codes 0..15 exactly with unit step: codes are known
    p = np.arange(256)
    sub = p // 32
    codes = np.where(sub % 2 == 0, p % 16, 15 - p % 16)
    x = codes.astype(np.float32)[None]
    q = K.quantize_q4_k(x)[0]
    d = np.frombuffer(q[0:2].tobytes(), np.float16)[0]
    dmin = np.frombuffer(q[2:4].tobytes(), np.float16)[0]
    assert d == np.float16(1 / 63) and dmin == 0
    assert q[4:].tobytes() == _ref_pack_q4_k(codes.tolist(), [63] * 8, [0] * 8)
    assert np.allclose(_gguf(q[None], "Q4_K", x.shape), x, rtol=1e-3)


def test_q4_k_scale_packing_against_gguf_unpacker() -> None:
    from gguf.quants import Q4_K

    rng = np.random.default_rng(1)
    ls = rng.integers(0, 64, (50, 8)).astype(np.uint8)
    lm = rng.integers(0, 64, (50, 8)).astype(np.uint8)
    packed = K.pack_q4_k_scales(ls, lm)
    assert [packed[0].tobytes()] == [_ref_pack_q4_k([0] * 256, ls[0].tolist(), lm[0].tolist())[:12]]
    sc, mn = Q4_K.get_scale_min(packed)
    assert np.array_equal(sc, ls) and np.array_equal(mn, lm)
    sc2, mn2 = K.unpack_q4_k_scales(packed)
    assert np.array_equal(sc2, ls) and np.array_equal(mn2, lm)


def _ref_pack_q6_k(L: list[int]) -> bytes:
    """quantize_row_q6_K_ref's ql/qh packing, transcribed loop by loop."""
    ql, qh = [0] * 128, [0] * 64
    for h, j in enumerate(range(0, 256, 128)):
        for l in range(32):
            q1, q2, q3, q4 = (L[j + l + o] & 0xF for o in (0, 32, 64, 96))
            ql[64 * h + l] = q1 | (q3 << 4)
            ql[64 * h + l + 32] = q2 | (q4 << 4)
            qh[32 * h + l] = ((L[j + l] >> 4) | ((L[j + l + 32] >> 4) << 2) | ((L[j + l + 64] >> 4) << 4)
                              | ((L[j + l + 96] >> 4) << 6))
    return bytes(ql + qh)


def test_q6_k_layout_matches_llama_cpp() -> None:
    # integer values in -32..31 with -32 in every sub-block of 16: unit step, d = -1/128, scales -128
    p = np.arange(256)
    codes = (p * 37 + 5) % 64
    codes[p % 16 == 0] = 0
    x = (codes - 32).astype(np.float32)[None]
    q = K.quantize_q6_k(x)[0]
    assert q[:192].tobytes() == _ref_pack_q6_k(codes.tolist())
    assert np.array_equal(q[192:208].view(np.int8), np.full(16, -128, np.int8))
    assert np.frombuffer(q[208:210].tobytes(), np.float16)[0] == np.float16(-1 / 128)
    assert np.array_equal(_gguf(q[None], "Q6_K", x.shape), x)


# --------------------------------------------------------------------------- edge blocks

@pytest.mark.parametrize("name", ["Q4_K", "Q6_K"])
def test_all_zero_block(name: str) -> None:
    x = np.zeros((2, 256), np.float32)
    q = K.quantize(x, name)
    assert not q.any()
    assert not _gguf(q, name, x.shape).any()


@pytest.mark.parametrize("name", ["Q4_K", "Q6_K"])
@pytest.mark.parametrize("c", [0.37, -0.37])
def test_constant_block(name: str, c: float) -> None:
    x = np.full((1, 256), c, np.float32)
    y = _gguf(K.quantize(x, name), name, x.shape)
    assert np.allclose(y, c, rtol=2e-3), (y.min(), y.max())
    assert np.array_equal(y, K.DEQUANTIZERS[name](K.quantize(x, name)))


@pytest.mark.parametrize("name", ["Q4_K", "Q6_K"])
def test_negative_only_block(name: str) -> None:
    x = -np.abs(_gauss((8, 256), seed=3)) - 0.01
    q = K.quantize(x, name)
    y = _gguf(q, name, x.shape)
    assert np.array_equal(y, K.DEQUANTIZERS[name](q))
    assert _rel_rms(y, x) < (0.05 if name == "Q4_K" else 0.02)
    assert (y <= 1e-6).all()
    if name == "Q4_K":  # the min carries the offset: dmin > 0, and the block reaches its most negative value
        dmin = q[:, 2:4].copy().view(np.float16).astype(np.float32)
        assert (dmin > 0).all()


def test_mixed_scales_across_superblocks() -> None:
    # one row with a tiny and a huge super-block, and an outlier: each super-block has its own d
    x = _gauss((4, 768), seed=5)
    x[:, :256] *= 0.05
    x[:, 512 + 7] = 1.0
    for name in ("Q4_K", "Q6_K"):
        y = _gguf(K.quantize(x, name), name, x.shape)
        assert _rel_rms(y[:, :256], x[:, :256]) < 0.1
        assert abs(y[0, 512 + 7] - 1.0) < 0.02


# --------------------------------------------------------------------------- the Q4_K_M mix

def test_use_more_bits_matches_llama_cpp_for_32_layers() -> None:
    chosen = [i for i in range(32) if K.use_more_bits(i, 32)]
    assert chosen == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    assert [i for i in range(2) if K.use_more_bits(i, 2)] == [1]


def test_q4_k_m_types() -> None:
    t = K.q4_k_m_type
    assert t("output.weight", (400, 256), 2, True) == "Q6_K"
    assert t("token_embd.weight", (400, 256), 2, True) == "Q4_K"
    assert t("token_embd.weight", (400, 256), 2, False) == "Q6_K"  # tied: the embedding is the output
    assert t("blk.0.attn_v.weight", (128, 256), 2, True) == "Q4_K"
    assert t("blk.1.attn_v.weight", (128, 256), 2, True) == "Q6_K"
    assert t("blk.1.ffn_down.weight", (256, 512), 2, True) == "Q6_K"
    assert t("blk.1.attn_q.weight", (256, 256), 2, True) == "Q4_K"
    assert t("blk.0.attn_norm.weight", (256,), 2, True) == "F32"
    # rows too short for a super-block: llama.cpp's fallbacks
    assert t("blk.0.ffn_up.weight", (64, 32), 2, True) == "Q5_0"
    assert t("output.weight", (400, 32), 2, True) == "Q8_0"
    assert t("blk.0.ffn_up.weight", (64, 40), 2, True) == "F32"


def test_q4_k_m_file_reads_back(tmp_path) -> None:
    from gguf import GGUFReader

    from lineage.io.checkpoint import open_checkpoint
    from lineage.testing.bpe import train_bpe
    from lineage.testing.gguf_export import gguf_tensors, write_gguf
    from lineage.testing.models import TinyConfig, init_weights

    tok = train_bpe("the quick brown fox jumps over the lazy dog " * 30, 270)
    cfg = TinyConfig(family="llama", vocab=len(tok), hidden=256, n_layers=2, n_heads=4, n_kv_heads=2,
                     intermediate=256, max_pos=32)
    w = init_weights(cfg, 0)
    types: dict[str, str] = {}
    path = tmp_path / "m.gguf"
    back = write_gguf(path, cfg, w, tok, "Q4_K_M", types_out=types)
    r = GGUFReader(str(path))
    assert {t.name: t.tensor_type.name for t in r.tensors} == types
    assert int(r.fields["general.file_type"].parts[-1][0]) == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    assert sorted(set(types.values())) == ["F32", "Q4_K", "Q6_K"]
    ck = open_checkpoint(str(path))
    g = gguf_tensors(cfg, w)
    for name, tt in types.items():
        got = ck.read(name)
        if name.endswith("attn_q.weight") or name.endswith("attn_k.weight"):
            continue  # the reader undoes the rotary permutation; compared below in HF layout
        ref = torch.from_numpy(_gguf(np.asarray(next(t for t in r.tensors if t.name == name).data), tt,
                                     tuple(g[name].shape))) if tt != "F32" else g[name]
        assert torch.equal(got, ref), name
    assert torch.equal(ck.read("blk.1.attn_q.weight"), back["model.layers.1.self_attn.q_proj.weight"])
    err = (back["model.layers.0.mlp.up_proj.weight"] - w["model.layers.0.mlp.up_proj.weight"]).norm() \
        / w["model.layers.0.mlp.up_proj.weight"].norm()
    assert 0.03 < float(err) < 0.1


# --------------------------------------------------------------------------- quantgrid names

@pytest.mark.parametrize("name, fmt, bits, g", [("Q4_K", "Q4_K", 4, 32), ("Q6_K", "Q6_K", 6, 16),
                                                ("Q5_0", "Q5_0", 5, 32), ("Q8_0", "Q8_0", 8, 32)])
def test_quantgrid_names_the_format(name: str, fmt: str, bits: int, g: int) -> None:
    from lineage.signals.quantgrid import detect_grid

    x = _gauss((200, 512), seed=7)
    y = _gguf(K.quantize(x, name), name, x.shape)
    res = detect_grid(torch.from_numpy(y), torch.from_numpy(x))
    assert (res.format, res.bits, res.group_size) == (fmt, bits, g)
    assert res.consistent_with_parent
    # rows of 128 cannot hold a super-block: the K-quants are named as their single-block cousins
    short = _gguf(K.quantize(x[:, :256], name), name, (200, 256)).reshape(-1, 128)
    expected = {"Q4_K": "Q4_1", "Q6_K": "int6-g16-sym"}.get(name, fmt)
    assert detect_grid(torch.from_numpy(short)).format == expected
