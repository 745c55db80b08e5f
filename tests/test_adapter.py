"""PEFT LoRA adapter folders: merge-on-read over a base, raw factors, base resolution."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from lineage.errors import CheckpointError, ShapeMismatchError, UnsupportedFormatError
from lineage.io import open_checkpoint
from lineage.io.adapter import open_adapter_folder, read_adapter

H, FF, V, R = 16, 24, 20, 4


def _base(folder, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {"model.embed_tokens.weight": torch.randn(V, H, generator=g),
          "lm_head.weight": torch.randn(V, H, generator=g),
          "model.norm.weight": torch.ones(H)}
    for i in range(2):
        sd[f"model.layers.{i}.self_attn.q_proj.weight"] = torch.randn(H, H, generator=g)
        sd[f"model.layers.{i}.self_attn.v_proj.weight"] = torch.randn(H, H, generator=g)
        sd[f"model.layers.{i}.mlp.up_proj.weight"] = torch.randn(FF, H, generator=g).to(torch.bfloat16)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": H}))
    return sd


def _adapter(folder, base_path, *, rslora=False, embed=False, save_head=False, alpha=8,
             alpha_pattern=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    sd, mods = {}, {}
    for i in range(2):
        for proj, out in (("self_attn.q_proj", H), ("mlp.up_proj", FF)):
            m = f"model.layers.{i}.{proj}"
            a, b = torch.randn(R, H, generator=g), torch.randn(out, R, generator=g)
            sd[f"base_model.model.{m}.lora_A.weight"] = a
            sd[f"base_model.model.{m}.lora_B.weight"] = b
            mods[m] = (a, b)
    if embed:
        a, b = torch.randn(R, V, generator=g), torch.randn(H, R, generator=g)
        sd["base_model.model.model.embed_tokens.lora_embedding_A"] = a
        sd["base_model.model.model.embed_tokens.lora_embedding_B"] = b
        mods["model.embed_tokens"] = (a, b)
    if save_head:
        sd["base_model.model.lm_head.weight"] = torch.full((V, H), 0.5)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(folder / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "r": R, "lora_alpha": alpha, "use_rslora": rslora,
           "base_model_name_or_path": str(base_path), "target_modules": ["q_proj", "up_proj"],
           "fan_in_fan_out": False}
    if alpha_pattern:
        cfg["alpha_pattern"] = alpha_pattern
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return mods


@pytest.fixture()
def base(tmp_path):
    return tmp_path / "base", _base(tmp_path / "base")


def test_merge_on_read(tmp_path, base):
    bpath, bsd = base
    mods = _adapter(tmp_path / "ad", bpath)
    ck = open_checkpoint(tmp_path / "ad")
    assert ck.format == "peft+safetensors"
    assert ck.config["model_type"] == "llama"
    assert ck.metadata["adapter.r"] == R
    scale = 8 / R
    for m, (a, b) in mods.items():
        want = bsd[m + ".weight"].float() + scale * b @ a
        got = ck.read(m + ".weight")
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(ck.read(m + ".weight", 3, 7), want[3:7])
        delta = got - bsd[m + ".weight"].float()
        assert torch.linalg.matrix_rank(delta).item() == R
    # untouched tensors read through unchanged
    assert torch.equal(ck.read("model.layers.0.self_attn.v_proj.weight"),
                       bsd["model.layers.0.self_attn.v_proj.weight"])


def test_rslora_alpha_pattern_embedding_and_saved_modules(tmp_path, base):
    bpath, bsd = base
    mods = _adapter(tmp_path / "ad", bpath, rslora=True, embed=True, save_head=True,
                    alpha_pattern={"up_proj": 2})
    f = read_adapter(tmp_path / "ad")
    assert f.modules["model.layers.0.self_attn.q_proj"].scale == pytest.approx(8 / math.sqrt(R))
    assert f.modules["model.layers.1.mlp.up_proj"].scale == pytest.approx(2 / math.sqrt(R))
    assert f.modules["model.embed_tokens"].kind == "embedding"
    assert f.to_dict()["saved"] == ["lm_head.weight"]
    ck = open_adapter_folder(str(tmp_path / "ad"), base=str(bpath))
    a, b = mods["model.embed_tokens"]
    want = bsd["model.embed_tokens.weight"] + (8 / math.sqrt(R)) * (b @ a).T
    torch.testing.assert_close(ck.read("model.embed_tokens.weight"), want)
    torch.testing.assert_close(ck.read("model.embed_tokens.weight", 5, 9), want[5:9])
    assert torch.equal(ck.read("lm_head.weight"), torch.full((V, H), 0.5))
    a, b = mods["model.layers.1.mlp.up_proj"]
    torch.testing.assert_close(
        ck.read("model.layers.1.mlp.up_proj.weight"),
        bsd["model.layers.1.mlp.up_proj.weight"].float() + (2 / math.sqrt(R)) * b @ a,
    )


def test_raw_factors(tmp_path, base):
    bpath, _ = base
    mods = _adapter(tmp_path / "ad", bpath)
    f = read_adapter(tmp_path / "ad")
    assert set(f.modules) == set(mods)
    m = f.modules["model.layers.0.self_attn.q_proj"]
    assert m.rank == R and m.scale == 2.0
    assert torch.equal(m.a, mods["model.layers.0.self_attn.q_proj"][0])
    assert m.delta().shape == (H, H)
    assert f.base_model == str(bpath)


def test_base_resolution_errors(tmp_path, base):
    bpath, _ = base
    _adapter(tmp_path / "ad", tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="base model"):
        open_checkpoint(tmp_path / "ad")
    # explicit base overrides the config
    ck = open_adapter_folder(str(tmp_path / "ad"), base=str(bpath))
    assert "model.layers.0.mlp.up_proj.weight" in ck.tensors
    # wrong base (shapes differ)
    other = tmp_path / "other"
    other.mkdir()
    save_file({"model.layers.0.self_attn.q_proj.weight": torch.zeros(3, 3),
               "model.layers.1.self_attn.q_proj.weight": torch.zeros(3, 3),
               "model.layers.0.mlp.up_proj.weight": torch.zeros(3, 3),
               "model.layers.1.mlp.up_proj.weight": torch.zeros(3, 3)},
              str(other / "model.safetensors"))
    with pytest.raises(ShapeMismatchError, match="expects a base weight"):
        open_adapter_folder(str(tmp_path / "ad"), base=str(other))


def test_unsupported_adapters(tmp_path, base):
    bpath, _ = base
    _adapter(tmp_path / "ad", bpath)
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(UnsupportedFormatError, match="DoRA"):
        read_adapter(tmp_path / "ad")
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    with pytest.raises(UnsupportedFormatError, match="IA3"):
        read_adapter(tmp_path / "ad")


def test_lora_bias_and_named_adapter_keys(tmp_path, base):
    bpath, bsd = base
    g = torch.Generator().manual_seed(3)
    a, b, bias = torch.randn(R, H, generator=g), torch.randn(H, R, generator=g), torch.randn(H, generator=g)
    d = tmp_path / "ad"
    d.mkdir()
    m = "model.layers.0.self_attn.v_proj"
    save_file({f"base_model.model.{m}.lora_A.default.weight": a,
               f"base_model.model.{m}.lora_B.default.weight": b,
               f"base_model.model.{m}.lora_B.bias": bias}, str(d / "adapter_model.safetensors"))
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": R, "lora_alpha": R}))
    f = read_adapter(d)
    assert torch.equal(f.modules[m].b, b) and torch.equal(f.modules[m].bias, bias)
    base_ck = open_checkpoint(bpath)
    ck = open_adapter_folder(str(d), base=base_ck)
    torch.testing.assert_close(ck.read(m + ".weight"), bsd[m + ".weight"] + b @ a)
