"""lineage.inspect: formats, tensors, roles and claimed lineage, without reading tensor data."""

from __future__ import annotations

import json

import gguf
import numpy as np
import torch
from safetensors.torch import save_file

from lineage.inspect import inspect


def _folder(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    sd = {"model.embed_tokens.weight": torch.zeros(10, 8, dtype=torch.bfloat16),
          "model.layers.0.self_attn.q_proj.weight": torch.zeros(8, 8, dtype=torch.bfloat16),
          "model.layers.0.mlp.up_proj.weight": torch.zeros(16, 8),
          "model.norm.weight": torch.ones(8)}
    save_file(sd, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8,
                                               "num_attention_heads": 2, "num_hidden_layers": 1,
                                               "_name_or_path": "org/parent"}))
    (d / "README.md").write_text("---\nbase_model:\n- org/base-a\n- org/base-b\n"
                                 "base_model_relation: finetune\n---\n# hi\n")
    return d


def test_inspect_local_folder(tmp_path):
    d = _folder(tmp_path)
    r = inspect(str(d))
    assert r.format == "safetensors"
    assert len(r.files) == 1 and r.files[0].size == (d / "model.safetensors").stat().st_size
    assert r.n_params == 80 + 64 + 128 + 8
    assert r.dtypes == {"BF16": 288, "F32": 544}
    assert r.bytes_read < r.files[0].size  # header only
    models = [(c.source, c.model) for c in r.claims]
    assert ("model_card", "org/base-a") in models and ("model_card", "org/base-b") in models
    assert ("config", "org/parent") in models
    assert r.claims[0].details == {"base_model_relation": "finetune"}
    t = {x.name: x for x in r.tensors}
    assert t["model.layers.0.self_attn.q_proj.weight"].shape == (8, 8)
    assert "L0.attn.q.weight" in t["model.layers.0.self_attn.q_proj.weight"].roles
    assert r.architecture is not None and r.architecture["n_layers"] == 1
    d2 = r.to_dict()
    json.dumps(d2)
    assert d2["claimed_lineage"][0]["model"] == "org/base-a" and d2["n_tensors"] == 4


def test_inspect_gguf_claims(tmp_path):
    p = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(p), "llama")
    w.add_uint32("general.base_model.count", 1)
    w.add_string("general.base_model.0.name", "Base")
    w.add_string("general.base_model.0.organization", "Org")
    w.add_string("general.base_model.0.repo_url", "https://huggingface.co/org/base")
    w.add_token_list(["a", "b", "c"])
    w.add_tensor("token_embd.weight", np.zeros((3, 32), dtype=np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    r = inspect(str(p))
    assert r.format == "gguf" and r.vocab_size == 3
    assert r.claims[0].source == "gguf"
    assert r.claims[0].model == "https://huggingface.co/org/base"
    assert r.claims[0].details["organization"] == "Org"
    assert r.tensors[0].shape == (3, 32)
    json.dumps(r.to_dict())
