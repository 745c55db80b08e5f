"""End-to-end compare on planted ground truth (Python API)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jsonschema
import pytest
import torch
from safetensors.torch import load_file, save_file

from lineage.compare import CompareOptions, compare
from lineage.errors import ConfigError
from lineage.report import JSON_SCHEMA, SCHEMA


@pytest.mark.parametrize("fam", ["", "gpt2_"])
def test_derived_pair_is_derived(tiny_models: dict[str, Path], fam: str) -> None:
    r = compare(tiny_models[f"{fam}base"], tiny_models[f"{fam}derived"], options=CompareOptions(canonicalise=False))
    assert r.verdict.derived is True
    assert r.verdict.log10_p is not None and r.verdict.log10_p < -10
    ev = [row for row in r.layers if row.evidence]
    assert ev and all(row.pearson > 0.9 for row in ev)
    assert all(0.2 < row.rel_l2 < 0.4 for row in ev)


@pytest.mark.parametrize("fam", ["", "gpt2_"])
def test_unrelated_pair_is_not_derived(tiny_models: dict[str, Path], fam: str) -> None:
    r = compare(tiny_models[f"{fam}base"], tiny_models[f"{fam}unrelated"], options=CompareOptions(canonicalise=False))
    assert r.verdict.derived is not True
    assert r.verdict.p_value is not None and r.verdict.p_value > 1e-3


def test_norms_are_not_evidence(tiny_models: dict[str, Path]) -> None:
    r = compare(tiny_models["base"], tiny_models["unrelated"], options=CompareOptions(canonicalise=False))
    norms = [row for row in r.layers if "norm" in row.kind]
    assert norms and not any(row.evidence for row in norms)
    # Norm gains of unrelated models look alike by raw cosine: exactly why they are excluded.
    assert all(row.cosine is None or row.cosine > 0.9 for row in norms)


def test_identical_and_bf16_copy(tiny_models: dict[str, Path]) -> None:
    r = compare(tiny_models["base"], tiny_models["base"], options=CompareOptions(canonicalise=False))
    assert r.verdict.relation == "identical"
    r = compare(tiny_models["base"], tiny_models["bf16"], options=CompareOptions(canonicalise=False))
    assert r.verdict.relation == "re-encoded copy" and r.verdict.derived is True
    assert r.b.dtypes == {"BF16": r.b.n_tensors}


def test_json_schema(tiny_models: dict[str, Path]) -> None:
    r = compare(tiny_models["base"], tiny_models["derived"], options=CompareOptions(canonicalise=False))
    doc = json.loads(r.to_json())
    jsonschema.validate(doc, JSON_SCHEMA)
    assert doc["schema"] == SCHEMA
    assert {"derived", "relation", "p_value", "summary"} <= set(doc["verdict"])
    row = doc["layers"][0]
    assert {"layer", "role", "cosine", "pearson", "rel_l2"} <= set(row)


def test_nan_weights_are_a_finding(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    d = tmp_path / "nan"
    shutil.copytree(tiny_models["derived"], d)
    w = load_file(d / "model.safetensors")
    name = "model.layers.1.mlp.up_proj.weight"
    w[name][2, 3] = float("nan")
    save_file(w, d / "model.safetensors")
    r = compare(tiny_models["base"], d, options=CompareOptions(canonicalise=False))
    assert any(f.severity == "error" and f.tensor == name and f.model == "b" for f in r.findings)
    assert r.verdict.derived is True  # the rest still speaks
    row = next(x for x in r.layers if x.tensor_a == name)
    assert row.pearson is None and not row.evidence


def test_cross_family_pair_reports_mismatches(tiny_models: dict[str, Path]) -> None:
    r = compare(tiny_models["base"], tiny_models["gpt2_base"], options=CompareOptions(canonicalise=False))
    assert r.verdict.derived is False and r.verdict.relation == "unrelated"
    # llama has gates and a third layer, gpt2 position embeddings and biases: each listed on its side
    assert {"L0.mlp.gate.weight", "L2.attn.q.weight", "L2.mlp.down.weight"} <= set(r.only_a)
    assert {"pos_embed.weight", "L0.attn.q.bias", "final_norm.bias"} <= set(r.only_b)
    assert not set(r.only_a) & {row.role for row in r.layers} and not set(r.only_b) & {row.role for row in r.layers}
    notes = {row.role: row.note for row in r.layers}
    assert "shape mismatch" in (notes["L0.mlp.down.weight"] or "")  # (64, 128) vs (64, 256): not compared
    assert "first 32 rows" in (notes["L0.attn.k.weight"] or "")  # 2 vs 4 KV heads: the shared rows compared


def test_streaming_blocks_do_not_change_results(tiny_models: dict[str, Path]) -> None:
    a = compare(tiny_models["base"], tiny_models["derived"], options=CompareOptions(canonicalise=False, block_elems=1024, prefetch=False))
    b = compare(tiny_models["base"], tiny_models["derived"], options=CompareOptions(canonicalise=False))
    assert [x.role for x in a.layers] == [y.role for y in b.layers] and len(a.layers) > 20
    assert sum(x.pearson is not None for x in a.layers) > 20
    for x, y in zip(a.layers, b.layers):
        assert (x.pearson is None) == (y.pearson is None), x.role
        if x.pearson is not None:
            assert abs(x.pearson - y.pearson) < 1e-6, x.role
    assert a.verdict.relation == b.verdict.relation and a.verdict.derived is True
    assert a.verdict.log10_p == pytest.approx(b.verdict.log10_p, rel=1e-5)  # summation order only


def test_options_validated() -> None:
    with pytest.raises(ConfigError):
        CompareOptions(device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA"):
            CompareOptions(device="cuda").torch_device()
