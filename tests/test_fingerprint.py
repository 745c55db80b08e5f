"""Fingerprints: invariant to disguises, compact, validated on load, calibrated on unrelated pairs."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

from lineage.canon import CheckpointModel, WeightsModel
from lineage.errors import FingerprintError
from lineage.fingerprint import (
    FORMAT,
    SKETCH_KINDS,
    VERSION,
    compare_fingerprints,
    compute_fingerprint,
    load_fingerprint,
    probe_tokens,
    sampled_units,
    save_fingerprint,
)
from lineage.io.checkpoint import open_checkpoint
from lineage.roles import roles_for
from lineage.stattest import ks_uniform
from lineage.testing import transforms as T
from lineage.testing.derive import drop_layers
from lineage.testing.models import TinyConfig, init_weights, save_model

LLAMA = TinyConfig(family="llama", vocab=384, hidden=48, n_layers=3, n_heads=4, n_kv_heads=2, intermediate=96)


def _fp(cfg: TinyConfig, w: dict[str, torch.Tensor], vocab=None):
    m = WeightsModel(w, cfg.to_hf_config())
    return compute_fingerprint(m, m.arch, vocab, n_probes=48)


@pytest.fixture(scope="module")
def base() -> dict[str, torch.Tensor]:
    return init_weights(LLAMA, 1)


@pytest.mark.parametrize("name", T.disguises_for("llama"))
def test_sketches_invariant_under_each_disguise(base, name) -> None:
    """Every sketch is unchanged by each disguise; neuron permutation only re-samples ``gs``."""
    fa = _fp(LLAMA, base)
    wb, info = T.apply(name, LLAMA, base, 11)
    fb = _fp(T.config_after(LLAMA, info), wb)
    for la, lb in zip(fa.layers, fb.layers):
        assert set(la) == set(SKETCH_KINDS)
        for k in la:
            if k == "gs" and name == "mlp_permutation":
                assert not torch.allclose(la[k], lb[k], rtol=2e-3, atol=2e-4)  # other neurons sampled
                continue
            torch.testing.assert_close(la[k], lb[k], rtol=2e-3, atol=2e-4)
    r = compare_fingerprints(fa, fb)
    assert r.log10_p < -10 and r.layer_map.is_identity


def test_all_disguises_combined_gpt2() -> None:
    cfg = TinyConfig(family="gpt2", vocab=384, hidden=48, n_layers=3, n_heads=4, n_kv_heads=4, intermediate=192,
                     tie_embeddings=True)
    w = init_weights(cfg, 5)
    wb, info = T.combine(cfg, w, 7)
    fa, fb = _fp(cfg, w), _fp(T.config_after(cfg, info), wb)
    for la, lb in zip(fa.layers, fb.layers):
        assert set(la) == {"kp", "vp"}  # plain MLP: no gate sample
        for k in la:
            torch.testing.assert_close(la[k], lb[k], rtol=2e-3, atol=2e-4)
    assert compare_fingerprints(fa, fb).log10_p < -10


def test_all_disguises_combined_detected(base) -> None:
    fa = _fp(LLAMA, base)
    wb, info = T.combine(LLAMA, base, 3)
    fb = _fp(T.config_after(LLAMA, info), wb)
    for la, lb in zip(fa.layers, fb.layers):
        for k in ("kp", "vp"):
            torch.testing.assert_close(la[k], lb[k], rtol=2e-3, atol=2e-4)
    r = compare_fingerprints(fa, fb)
    assert r.log10_p < -10 and r.layer_map.is_identity


def test_reads_only_the_sample(base, tmp_path: Path) -> None:
    """From a checkpoint only probe rows, K, V, norms and the first gate rows are read; same result as in memory."""
    cfg = LLAMA.with_(intermediate=1024, vocab=2048)
    w = init_weights(cfg, 2)
    save_model(tmp_path / "m", cfg, w)
    ref = _fp(cfg, w)
    with open_checkpoint(str(tmp_path / "m")) as ck:
        rm = roles_for(ck)
        header = ck.bytes_read
        fp = compute_fingerprint(CheckpointModel(ck, rm), rm.arch, None, n_probes=48)
        ck_read = ck.bytes_read
        frac = ck_read / ck.total_bytes
    assert fp.tokens == ref.tokens
    for la, lb in zip(ref.layers, fp.layers):
        for k in la:
            torch.testing.assert_close(la[k], lb[k], rtol=1e-4, atol=1e-5)
    h, n, kvd = cfg.hidden, cfg.intermediate, cfg.n_kv_heads * cfg.head_dim
    # at most: the whole embedding (probe rows are coalesced on small files), and per layer K, V, two norms
    # and the 64 sampled gate rows; at least K and V of every layer
    most = cfg.vocab * h + cfg.n_layers * (2 * kvd * h + sampled_units(n) * h + 2 * h)
    least = cfg.n_layers * 2 * kvd * h
    assert sampled_units(n) == 64
    assert 4 * least <= ck_read - header <= 4 * most
    assert frac < 0.25


def test_derived_detected_unrelated_not(base) -> None:
    """A fine-tuned-like child (small noise) is detected; an unrelated model of the same shape is not."""
    fa = _fp(LLAMA, base)
    child = {k: v + 0.3 * v.std() * torch.randn(v.shape, generator=torch.Generator().manual_seed(9)) if v.ndim == 2 else v
             for k, v in base.items()}
    assert compare_fingerprints(fa, _fp(LLAMA, child)).log10_p < -6
    assert compare_fingerprints(fa, _fp(LLAMA, init_weights(LLAMA, 77))).log10_p > -3


def test_roundtrip_file_is_small_and_equal(base, tmp_path: Path) -> None:
    fa = _fp(LLAMA, base)
    size = save_fingerprint(fa, tmp_path / "a.lfp")
    assert size < 2 * (1 + len(SKETCH_KINDS) * LLAMA.n_layers) * fa.m * fa.m + 4096  # float16 payload + header
    fb = load_fingerprint(tmp_path / "a.lfp")
    assert fb.tokens == fa.tokens and fb.arch == fa.arch and fb.n_layers == fa.n_layers
    for la, lb in zip(fa.layers, fb.layers):
        for k in la:
            torch.testing.assert_close(lb[k], la[k], rtol=0, atol=2e-3)
    assert compare_fingerprints(fa, fb).log10_p < -10


def test_unrelated_not_detected_and_null_roughly_uniform() -> None:
    cfg = LLAMA.with_(n_layers=2, hidden=32, intermediate=64)
    ps = []
    for k in range(10):
        r = compare_fingerprints(_fp(cfg, init_weights(cfg, 300 + 2 * k)), _fp(cfg, init_weights(cfg, 301 + 2 * k)),
                                 n_perm=24, z_inflation=1.0)
        ps.append(r.p_value)
        assert "cannot_conclude" in r.to_dict()
    assert min(ps) > 1e-3
    assert ks_uniform(ps) > 0.01


def test_depth_change_seen_from_fingerprints(base) -> None:
    cfg_d, wd, _ = drop_layers(LLAMA, base, [1])
    r = compare_fingerprints(_fp(LLAMA, base), _fp(cfg_d, wd))
    assert r.layer_map.source == (0, 2)
    assert r.log10_p < -6


def test_probe_tokens_shared_across_tokenizers(base) -> None:
    va = [f"tok{i}" for i in range(LLAMA.vocab)]
    vb = list(reversed(va))  # same strings, other ids
    wb = dict(base)
    emb = "model.embed_tokens.weight"
    wb[emb] = base[emb].flip(0)
    wb["lm_head.weight"] = base["lm_head.weight"].flip(0)
    fa, fb = _fp(LLAMA, base, va), _fp(LLAMA, wb, vb)
    assert fa.tokens == fb.tokens
    assert compare_fingerprints(fa, fb).log10_p < -10
    assert [t for t, _ in probe_tokens(["x", "x", "", "y"], 4, 10)] in (["x", "y"], ["y", "x"])


def _write_raw(path: Path, header: dict, payload: bytes = b"") -> None:
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + payload)


def test_load_rejects_bad_files(base, tmp_path: Path) -> None:
    with pytest.raises(FingerprintError):
        load_fingerprint(tmp_path / "missing.lfp")
    junk = tmp_path / "junk.lfp"
    junk.write_bytes(b"\x00" * 3)
    with pytest.raises(FingerprintError):
        load_fingerprint(junk)
    wrong_fmt = tmp_path / "wrong.lfp"
    _write_raw(wrong_fmt, {"__metadata__": {"format": "something-else", "version": "1"}})
    with pytest.raises(FingerprintError, match="format"):
        load_fingerprint(wrong_fmt)
    future = tmp_path / "future.lfp"
    _write_raw(future, {"__metadata__": {"format": FORMAT, "version": "99", "meta": "{}"}})
    with pytest.raises(FingerprintError, match="version"):
        load_fingerprint(future)
    old = tmp_path / "old.lfp"
    _write_raw(old, {"__metadata__": {"format": FORMAT, "version": "1", "meta": "{}"}})
    with pytest.raises(FingerprintError, match="older lineage"):
        load_fingerprint(old)
    badmeta = tmp_path / "badmeta.lfp"
    _write_raw(badmeta, {"__metadata__": {"format": FORMAT, "version": VERSION, "meta": "{not json"}})
    with pytest.raises(FingerprintError, match="meta"):
        load_fingerprint(badmeta)
    # right metadata, tensor of the wrong shape
    meta = json.dumps({"tokens": ["a", "b", "c"], "arch": {}, "n_layers": 0, "meta": {}})
    shape = tmp_path / "shape.lfp"
    _write_raw(shape, {"__metadata__": {"format": FORMAT, "version": VERSION, "meta": meta},
                       "K": {"dtype": "F16", "shape": [2, 2], "data_offsets": [0, 8]}}, b"\x00" * 8)
    with pytest.raises(FingerprintError, match="shape"):
        load_fingerprint(shape)
    nan = tmp_path / "nan.lfp"
    _write_raw(nan, {"__metadata__": {"format": FORMAT, "version": VERSION, "meta": meta},
                     "K": {"dtype": "F32", "shape": [3, 3], "data_offsets": [0, 36]}},
               struct.pack("<9f", *([float("nan")] + [0.0] * 8)))
    with pytest.raises(FingerprintError, match="NaN"):
        load_fingerprint(nan)


def test_too_few_shared_probes_raises(base) -> None:
    fa = _fp(LLAMA, base, [f"a{i}" for i in range(LLAMA.vocab)])
    fb = _fp(LLAMA, base, [f"b{i}" for i in range(LLAMA.vocab)])
    with pytest.raises(FingerprintError, match="shared"):
        compare_fingerprints(fa, fb)


def test_cli_fingerprint_and_compare_with_files(tiny_models, tmp_path: Path, capsys) -> None:
    """`lineage fingerprint`, then `compare A.lfp B.lfp` and `compare A B.lfp`; an old-version file is refused."""
    from lineage.cli import main

    files = {}
    for k in ("base", "derived", "unrelated"):
        files[k] = tmp_path / f"{k}.lfp"
        with pytest.raises(SystemExit) as e:
            main(["fingerprint", str(tiny_models[k]), "-o", str(files[k]), "--json", "--no-progress"])
        assert e.value.code == 0
        info = json.loads(capsys.readouterr().out)
        assert 0 < info["bytes_read"] < info["model_bytes"] and info["requests"] == 0
    for a, b in ((files["base"], files["derived"]), (tiny_models["base"], files["derived"])):
        with pytest.raises(SystemExit) as e:
            main(["compare", str(a), str(b), "--json", "--no-progress"])
        rep = json.loads(capsys.readouterr().out)
        assert rep["verdict"]["method"] == "fingerprint" and rep["verdict"]["derived"] is True
        assert rep["verdict"]["log10_p"] < -6
    with pytest.raises(SystemExit) as e:
        main(["compare", str(files["base"]), str(files["unrelated"]), "--json", "--no-progress"])
    assert json.loads(capsys.readouterr().out)["verdict"]["derived"] is not True
    old = tmp_path / "old.lfp"
    _write_raw(old, {"__metadata__": {"format": FORMAT, "version": "1", "meta": "{}"}})
    with pytest.raises(SystemExit) as e:
        main(["compare", str(old), str(files["base"])])
    assert e.value.code == 2 and "older lineage" in capsys.readouterr().err
