"""The small zoo builds, is cached, is byte-for-byte deterministic, and its manifest is consistent."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lineage.testing.bpe import BPETokenizer, train_bpe
from lineage.testing.models import TinyConfig, forward, load_model, to_dtype
from lineage.testing.zoo import Zoo, build_zoo
from lineage.testing.zoocache import cached_zoo


@pytest.fixture(scope="module")
def zoo() -> Zoo:
    return cached_zoo("small")


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "build_info.json"}


def test_cached_on_second_call(zoo: Zoo) -> None:
    stamp = (zoo.root / "manifest.json").stat().st_mtime_ns
    t0 = time.perf_counter()
    again = cached_zoo("small")
    assert again.root == zoo.root
    assert (zoo.root / "manifest.json").stat().st_mtime_ns == stamp
    assert time.perf_counter() - t0 < 10


def test_deterministic_bytes(zoo: Zoo, tmp_path: Path) -> None:
    fresh = build_zoo("small", out=tmp_path / "zoo", force=True, workers=2)
    a, b = _files(zoo.root), _files(fresh.root)
    assert sorted(a) == sorted(b)
    different = [k for k in a if a[k] != b[k]]
    assert different == []


def test_manifest_consistent(zoo: Zoo) -> None:
    ids = set(zoo.ids)
    relations = {m["relation"] for m in zoo.models()}
    assert {"base", "null", "same_init", "finetune", "continued_pretraining", "lora", "quantised", "copy", "noise",
            "disguised", "depth_change", "width_pruned", "vocab_change", "merge"} <= relations
    for m in zoo.models():
        assert Path(m["path"]).exists(), m["id"]
        assert set(m["parents"]) <= ids
        assert m["family"] in ("llama", "gpt2")
        assert isinstance(m["loss"], float) and 0 < m["loss"] < 10
        if m["format"] == "safetensors":
            cfg, w = load_model(m["path"])
            assert cfg == TinyConfig(**m["config"]), m["id"]
            tok = BPETokenizer.load(m["path"])
            assert len(tok) == cfg.vocab, m["id"]
        if m["relation"] == "disguised":
            assert m["logit_rel_err"] < 1e-5 and m["transforms"]
    for m in zoo.models(relation="base"):
        assert m["loss"] < m["loss_before"] - 0.5, "bases are trained"
    for m in zoo.models(relation="null"):
        assert m["loss"] < m["loss_before"] - 0.1, "null models are trained (briefly)"
    for p in zoo.pairs():
        assert p.a in ids and p.b in ids and p.a != p.b
    derived = zoo.pairs("derived")
    assert derived and all(p.hops >= 1 for p in derived)
    assert any(p.relation == "finetune+finetune" and p.hops == 2 for p in derived)
    assert zoo.pairs("same_init") and zoo.pairs("independent", group="independent_null")
    b0 = zoo.model("llama-b0")
    assert b0["relation"] == "base" and not b0["parents"]


def test_disguised_model_has_parent_logits(zoo: Zoo) -> None:
    child = zoo.model("llama-b1-combined")
    pcfg, pw = load_model(zoo.path(child["parents"][0]))
    ccfg, cw = load_model(child["path"])
    ids = torch.arange(20)[None] * 7 % pcfg.vocab
    ref = forward(pcfg, to_dtype(pw, torch.float64), ids)
    got = forward(ccfg, to_dtype(cw, torch.float64), ids)
    assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-5
    assert not torch.allclose(pw["model.embed_tokens.weight"], cw["model.embed_tokens.weight"])


def test_lora_adapters_are_peft_and_match_merge(zoo: Zoo) -> None:
    for m in zoo.models(relation="lora"):
        d = Path(m["adapter_path"])
        conf = json.loads((d / "adapter_config.json").read_text())
        assert conf["peft_type"] == "LORA" and conf["r"] == m["lora"]["rank"]
        ad = load_file(str(d / "adapter_model.safetensors"))
        assert ad and all(k.startswith("base_model.model.") and (".lora_A." in k or ".lora_B." in k) for k in ad)
        _, pw = load_model(zoo.path(m["parents"][0]))
        _, cw = load_model(m["path"])
        for k in ad:
            if ".lora_A." not in k:
                continue
            name = k[len("base_model.model."):].replace(".lora_A.weight", ".weight")
            delta = ad[k.replace("lora_A", "lora_B")] @ ad[k]
            if conf["fan_in_fan_out"]:
                delta = delta.T
            assert torch.allclose(cw[name] - pw[name], delta, atol=1e-5), (m["id"], name)
        untouched = [n for n in pw if f"base_model.model.{n[:-7]}.lora_A.weight" not in ad]
        assert all(torch.equal(pw[n], cw[n]) for n in untouched)


def test_noise_and_quant_losses_recorded(zoo: Zoo) -> None:
    noisy = sorted(zoo.models(relation="noise", family="llama"), key=lambda m: m["params"]["rel_level"])
    deltas = [m["loss_after"] - m["loss_before"] for m in noisy]
    assert deltas == sorted(deltas) and deltas[-1] > deltas[0]
    q = zoo.model("gpt2-b0-gguf-Q4_0")
    assert q["format"] == "gguf" and q["path"].endswith(".gguf")
    from gguf import GGUFReader

    r = GGUFReader(q["path"])
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types["blk.0.ffn_up.weight"] == "Q4_0"


def test_depth_vocab_merge_truth(zoo: Zoo) -> None:
    drop = zoo.model("llama-b0-drop")
    assert drop["layer_map"] == [0] and drop["config"]["n_layers"] == 1
    dup = zoo.model("gpt2-b0-dup")
    assert dup["layer_map"] == [0, 1, 1]
    perm = zoo.truth("llama-b0-vocab-perm")["perm"]
    ptok = BPETokenizer.load(zoo.path("llama-b0"))
    ctok = BPETokenizer.load(zoo.path("llama-b0-vocab-perm"))
    assert [ctok.tokens[j] for j in range(5)] == [ptok.tokens[perm[j]] for j in range(5)]
    ext = zoo.model("llama-b0-vocab-ext")
    assert ext["vocab"]["to"] > ext["vocab"]["from"]
    lin = zoo.model("llama-b1-merge-linear")
    assert lin["merge"]["weights"] == [0.3, 0.7]
    _, a = load_model(zoo.path(lin["parents"][0]))
    _, b = load_model(zoo.path(lin["parents"][1]))
    _, m = load_model(lin["path"])
    k = "model.layers.0.mlp.up_proj.weight"
    assert torch.allclose(m[k], 0.3 * a[k] + 0.7 * b[k], atol=1e-6)


def test_bpe_roundtrip_and_determinism() -> None:
    text = "The quick brown fox jumps over the lazy dog. " * 20 + "Über naïve café — 3.14159!"
    tok = train_bpe(text, 300)
    assert train_bpe(text, 300).tokens == tok.tokens
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(ids) < len(text.encode()) / 2
