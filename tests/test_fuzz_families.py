"""The mechanisms behind the fuzz families, one planted case each (fast, in-process)."""

from __future__ import annotations

import json
import re
import struct
import time
from pathlib import Path

import pytest
import torch

from lineage.errors import CheckpointError, HeaderError, LineageError, ShardError
from lineage.io import open_checkpoint
from lineage.io.adapter import read_adapter
from lineage.io.adapterconfig import pattern_matches
from lineage.io.safejson import loads_bounded
from lineage.io.tokenizer import load_vocab
from lineage.pairing import assign_roles
from lineage.testing.fuzz import build_seeds


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    return build_seeds(tmp_path_factory.mktemp("seeds"))


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("text, words", [
    ('{"a": ' + "9" * 5000 + "}", "digits"),
    ("[" * 100000 + "]" * 100000, "nested"),
    ("[" * 70 + "]" * 70, "nested"),
    ('{"a": 1, "a": 2}', "duplicate"),
    ("{", "not valid JSON"),
])
def test_safe_json_caps(text: str, words: str) -> None:
    with pytest.raises(HeaderError, match=words) as info:
        loads_bounded(text, path="x.json", unique_keys=True)
    assert str(info.value).startswith("x.json: ")


def test_safetensors_length_one_short_is_a_format_error(seeds, tmp_path) -> None:
    d = _copy(seeds.base, tmp_path / "m")
    p = d / "model.safetensors"
    data = p.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    p.write_bytes(struct.pack("<Q", n - 1) + data[8:])
    with pytest.raises(HeaderError, match=str(p)):
        open_checkpoint(d)
    p.write_bytes(data + b"\0" * 4)  # trailing bytes no tensor accounts for
    with pytest.raises(HeaderError, match="account"):
        open_checkpoint(d)


def test_gguf_tensor_count_one_low_is_a_format_error(seeds, tmp_path) -> None:
    data = seeds.gguf.read_bytes()
    n = struct.unpack("<Q", data[8:16])[0]
    p = tmp_path / "m.gguf"
    p.write_bytes(data[:8] + struct.pack("<Q", n - 1) + data[16:])
    with pytest.raises(HeaderError, match="unaccounted|not accounted|overlaps"):
        open_checkpoint(p)


def test_huge_layer_number_costs_nothing() -> None:
    shapes = {"model.layers.0.self_attn.q_proj.weight": (8, 8),
              "model.layers.1000000000.self_attn.q_proj.weight": (8, 8),
              "model.layers." + "9" * 5000 + ".mlp.up_proj.weight": (8, 8)}
    rm = assign_roles(shapes)
    assert rm.n_layers == 1
    assert "model.layers.1000000000.self_attn.q_proj.weight" in rm.unassigned
    assert any("beyond" in n for n in rm.notes)


def test_tokenizer_id_beyond_entries_is_ignored(seeds, tmp_path) -> None:
    d = _copy(seeds.base, tmp_path / "m")
    tok = json.loads((d / "tokenizer.json").read_text())
    tok["model"]["vocab"]["t5"] = 10**12
    (d / "tokenizer.json").write_text(json.dumps(tok))
    assert load_vocab(str(d)) is None
    assert len(load_vocab(str(seeds.base))) == 64


@pytest.mark.parametrize("key, module", [
    ("q_proj", "model.layers.0.self_attn.q_proj"), ("q_proj", "model.layers.0.self_attn.xq_proj"),
    ("layers.0.self_attn.q_proj", "model.layers.0.self_attn.q_proj"),
    (r"layers\.[01]\.self_attn\.q_proj", "model.layers.1.self_attn.q_proj"),
    (r"(q|v)_proj", "model.layers.1.self_attn.v_proj"), ("self_attn.*", "model.layers.1.self_attn.q_proj"),
    ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.q_proj"), ("q_pro", "a.q_proj"),
])
def test_pattern_keys_match_as_peft_does(key: str, module: str) -> None:
    assert pattern_matches(key, module) == bool(re.match(rf"(.*\.)?({key})$", module))


def _adapter(seeds, tmp_path: Path, **cfg) -> Path:
    d = _copy(seeds.adapter, tmp_path / "ad")
    c = json.loads((d / "adapter_config.json").read_text())
    c.update(cfg)
    (d / "adapter_config.json").write_text(json.dumps(c))
    return d


@pytest.mark.parametrize("cfg, words", [
    ({"lora_alpha": "8"}, "lora_alpha"), ({"lora_alpha": [8]}, "lora_alpha"), ({"r": 0}, "r must"),
    ({"base_model_name_or_path": 12}, "base_model_name_or_path"),
    ({"alpha_pattern": {"(a+)+$": 2}}, "nested repetition"), ({"alpha_pattern": {"(a|a)*$": 2}}, "alternation"),
    ({"alpha_pattern": {"[": 2}}, "not a regular expression"), ({"rank_pattern": {"q_proj": "x"}}, "rank_pattern"),
])
def test_adapter_config_is_type_checked(seeds, tmp_path, cfg, words) -> None:
    d = _adapter(seeds, tmp_path, **cfg)
    t0 = time.monotonic()
    with pytest.raises(HeaderError, match=words) as info:
        read_adapter(d)
    assert "adapter_config.json" in str(info.value)
    assert time.monotonic() - t0 < 5


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e30])
def test_adapter_nonfinite_or_absurd_factors_are_refused(seeds, tmp_path, value) -> None:
    from safetensors.torch import load_file, save_file

    d = _adapter(seeds, tmp_path)
    w = load_file(str(d / "adapter_model.safetensors"))
    k = sorted(w)[0]
    w[k][0, 0] = value
    save_file(w, str(d / "adapter_model.safetensors"))
    with pytest.raises(HeaderError, match="NaN|cap"):
        open_checkpoint(d)


def test_adapter_rank_zero_and_self_base(seeds, tmp_path) -> None:
    d = _adapter(seeds, tmp_path)
    c = json.loads((d / "adapter_config.json").read_text())
    c["base_model_name_or_path"] = str(d)
    (d / "adapter_config.json").write_text(json.dumps(c))
    with pytest.raises(CheckpointError, match="loops back"):
        open_checkpoint(d)


def test_shard_index_with_a_long_name(seeds, tmp_path) -> None:
    d = _copy(seeds.shards, tmp_path / "s")
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    idx["weight_map"][sorted(idx["weight_map"])[0]] = "a" * 5000 + ".safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(ShardError, match="characters"):
        open_checkpoint(d)


def test_torch_tensor_larger_than_its_storage_is_refused(tmp_path) -> None:
    p = tmp_path / "m.bin"
    torch.save({"model.embed_tokens.weight": torch.zeros(1).expand(10**6, 1000)}, p)
    with pytest.raises(LineageError, match="storage"):
        open_checkpoint(p)


@pytest.mark.parametrize("argv", [
    ["compare", "{m}", "{m}", "--html", "{t}/missing/r.html"],
    ["fingerprint", "{m}", "-o", "{t}/missing/x.lfp"],
    ["tree", "{m}", "{m}", "--html", "{t}/missing/t.html"],
    ["scan", "{m}", "--html", "{t}/missing/s.html"],
])
def test_output_path_checked_before_work(seeds, tmp_path, capsys, argv) -> None:
    from lineage.cli import main

    argv = [a.format(m=tmp_path / "no-such-model", t=tmp_path) for a in argv]
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing" in err[0] and "does not exist" in err[0], err


def test_legacy_pickle_length_fields_cannot_allocate(tmp_path) -> None:
    import tracemalloc

    from lineage.io.torchbin import LEGACY_MAGIC

    p = tmp_path / "m.pt"
    p.write_bytes(LEGACY_MAGIC + b"\x80\x02X" + struct.pack("<I", 0xF0000000) + b"abc")
    tracemalloc.start()
    try:
        with pytest.raises(LineageError, match=str(p)):
            open_checkpoint(p)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20
    p.write_bytes(b"X" + struct.pack("<I", 0xF0000000) + b"abc")  # not even torch's format
    with pytest.raises(LineageError, match="refused"):
        open_checkpoint(p)
