"""PyTorch .bin/.pt: weights-only loading, sharding, and refusal of hostile pickles."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch

from lineage.errors import ShardError, UnsupportedFormatError
from lineage.io import open_checkpoint


def _sd(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "model.embed_tokens.weight": torch.randn(10, 8, generator=g),
        "model.layers.0.mlp.up_proj.weight": torch.randn(12, 8, generator=g).to(torch.bfloat16),
        "model.norm.weight": torch.ones(8, dtype=torch.float16),
    }


def test_zip_bin_roundtrip_and_accounting(tmp_path):
    sd = _sd()
    torch.save(sd, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    ck = open_checkpoint(tmp_path)
    assert ck.format == "torch" and ck.config == {"model_type": "llama"}
    assert ck.tensors["model.layers.0.mlp.up_proj.weight"].dtype == "BF16"
    assert ck.tensors["model.layers.0.mlp.up_proj.weight"].shape == (12, 8)
    for k, v in sd.items():
        assert torch.equal(ck.read_raw(k), v)
    assert torch.equal(ck.read("model.layers.0.mlp.up_proj.weight", 2, 5), sd["model.layers.0.mlp.up_proj.weight"][2:5].float())
    assert ck.bytes_read == sum(v.numel() * v.element_size() for v in sd.values()) + 3 * 8 * 2


def test_pt_file_and_legacy_format(tmp_path):
    sd = _sd(1)
    torch.save(sd, tmp_path / "w.pt", _use_new_zipfile_serialization=False)
    ck = open_checkpoint(tmp_path / "w.pt")
    assert torch.equal(ck.read_raw("model.norm.weight"), sd["model.norm.weight"])


def test_sharded_index(tmp_path):
    sd = _sd(2)
    keys = list(sd)
    torch.save({k: sd[k] for k in keys[:2]}, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save({k: sd[k] for k in keys[2:]}, tmp_path / "pytorch_model-00002-of-00002.bin")
    wm = {k: ("pytorch_model-00001-of-00002.bin" if i < 2 else "pytorch_model-00002-of-00002.bin")
          for i, k in enumerate(keys)}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": wm}))
    ck = open_checkpoint(tmp_path)
    assert set(ck.tensors) == set(sd)
    assert len({m.file for m in ck.tensors.values()}) == 2
    wm["extra.weight"] = "pytorch_model-00003-of-00002.bin"
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": wm}))
    with pytest.raises(ShardError, match="missing shard"):
        open_checkpoint(tmp_path)


def test_non_state_dicts_refused(tmp_path):
    torch.save({"a": torch.zeros(2), "step": 3}, tmp_path / "mixed.bin")
    with pytest.raises(UnsupportedFormatError, match="'step' is int"):
        open_checkpoint(tmp_path / "mixed.bin")
    torch.save([torch.zeros(2)], tmp_path / "list.bin")
    with pytest.raises(UnsupportedFormatError, match="found list"):
        open_checkpoint(tmp_path / "list.bin")
    torch.save({"state_dict": {"w": torch.ones(3)}, "epoch": 1}, tmp_path / "nested.pt")
    assert torch.equal(open_checkpoint(tmp_path / "nested.pt").read("w"), torch.ones(3))


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("zipped", [True, False])
def test_malicious_reduce_is_refused_without_running(tmp_path, zipped):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    payload = {"w": torch.zeros(2), "x": _Evil(marker)}
    if zipped:
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f, protocol=2)
    with pytest.raises(UnsupportedFormatError, match="refused|not a plain"):
        open_checkpoint(path)
    assert not marker.exists()
