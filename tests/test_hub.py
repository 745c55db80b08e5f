"""Hub references against a local Hub stand-in (tests/hubserver.py): range reads, cache, faults."""

from __future__ import annotations

import json
import logging
import math
import time

import gguf
import pytest
import torch
from safetensors.torch import save_file

from lineage.errors import CheckpointError, RemoteError, ShardError
from lineage.io import open_checkpoint
from lineage.io.http import HttpOptions, HttpRangeSource
from lineage.io.hub import HubOptions, open_hub, parse_hub_ref
from lineage.io.sources import LocalFileSource

from hubserver import HubServer

FAST = HttpOptions(stall_timeout=1.0, deadline=10.0, retries=3, backoff=0.01, max_backoff=0.05)
H, FF, V, L = 32, 48, 50, 2


def _weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {"model.embed_tokens.weight": torch.randn(V, H, generator=g),
          "model.norm.weight": torch.ones(H), "lm_head.weight": torch.randn(V, H, generator=g)}
    for i in range(L):
        for p, shape in (("self_attn.q_proj", (H, H)), ("self_attn.k_proj", (H // 2, H)),
                         ("self_attn.v_proj", (H // 2, H)), ("self_attn.o_proj", (H, H)),
                         ("mlp.gate_proj", (FF, H)), ("mlp.up_proj", (FF, H)),
                         ("mlp.down_proj", (H, FF))):
            sd[f"model.layers.{i}.{p}.weight"] = torch.randn(*shape, generator=g).to(torch.bfloat16)
        sd[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(H)
    return sd


def _small_files(d, readme_base=None):
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": H,
                                               "num_hidden_layers": L}))
    (d / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {f"t{i}": i for i in range(V)}}}))
    if readme_base:
        (d / "README.md").write_text(f"---\nbase_model: {readme_base}\nlicense: mit\n---\n# card\n")


@pytest.fixture(scope="session")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    sd = _weights()
    # single-file repo
    d = root / "org" / "tiny"
    d.mkdir(parents=True)
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    _small_files(d, readme_base="org/tiny-base")
    # sharded repo
    d = root / "org" / "sharded"
    d.mkdir()
    keys = sorted(sd)
    half = len(keys) // 2
    save_file({k: sd[k] for k in keys[:half]}, str(d / "model-00001-of-00002.safetensors"))
    save_file({k: sd[k] for k in keys[half:]}, str(d / "model-00002-of-00002.safetensors"))
    wm = {k: f"model-0000{1 if i < half else 2}-of-00002.safetensors" for i, k in enumerate(keys)}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    _small_files(d)
    # broken index: names a shard that is not in the repo
    d = root / "org" / "broken"
    d.mkdir()
    save_file({k: sd[k] for k in keys[:half]}, str(d / "model-00001-of-00002.safetensors"))
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    # gated repo
    d = root / "org" / "gated"
    d.mkdir()
    save_file(sd, str(d / "model.safetensors"))
    # .bin-only repo
    d = root / "org" / "binonly"
    d.mkdir()
    torch.save(sd, d / "pytorch_model.bin")
    _small_files(d)
    # GGUF repo with two quantisations
    d = root / "org" / "tiny-gguf"
    d.mkdir()
    for qt in ("Q8_0", "F16"):
        w = gguf.GGUFWriter(str(d / f"tiny-{qt}.gguf"), "qwen2")
        w.add_uint32("general.base_model.count", 1)
        w.add_string("general.base_model.0.repo_url", "https://huggingface.co/org/tiny")
        w.add_token_list([f"t{i}" for i in range(V)])
        q = gguf.GGMLQuantizationType[qt]
        w.add_tensor("token_embd.weight", gguf.quants.quantize(sd["model.embed_tokens.weight"].numpy(), q),
                     raw_dtype=q)
        w.add_tensor("blk.0.ffn_up.weight",
                     gguf.quants.quantize(sd["model.layers.0.mlp.up_proj.weight"].float().numpy(), q),
                     raw_dtype=q)
        w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    # adapter repo whose base is a hub id
    d = root / "org" / "tiny-lora"
    d.mkdir()
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(2, H, generator=g), torch.randn(H, 2, generator=g)
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": a,
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": b},
              str(d / "adapter_model.safetensors"))
    (d / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "base_model_name_or_path": "org/tiny"}))
    with HubServer(root, gated={"org/gated": "hf_secret"}) as srv:
        yield srv, sd, (a, b)


@pytest.fixture()
def hub(zoo, tmp_path, monkeypatch):
    srv, sd, lora = zoo
    monkeypatch.setenv("HF_ENDPOINT", srv.endpoint)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    for v in ("HF_TOKEN", "LINEAGE_HUB_DOWNLOAD", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(v, raising=False)
    srv.clear()
    yield srv, sd, lora
    srv.clear()


def _cdn(srv):
    return [r for r in srv.requests if r[1].startswith("/_cdn/")]


def test_parse_refs(tmp_path):
    assert parse_hub_ref("org/name").repo_id == "org/name"
    assert parse_hub_ref("org/name@v1.0").revision == "v1.0"
    r = parse_hub_ref("hf://org/name@abc/sub/file.gguf")
    assert (r.repo_id, r.revision, r.path) == ("org/name", "abc", "sub/file.gguf")
    assert parse_hub_ref(str(tmp_path)) is None
    assert parse_hub_ref("./org/name") is None
    assert parse_hub_ref("not a ref") is None


def test_header_then_exact_ranges(hub, monkeypatch):
    monkeypatch.setenv("LINEAGE_SPILL", "0")  # exact network ranges (the spill cache is tested in test_spill.py)
    srv, sd, _ = hub
    ck = open_checkpoint("org/tiny")
    assert ck.format == "safetensors"
    assert ck.metadata["hub.repo_id"] == "org/tiny" and len(ck.metadata["hub.commit"]) == 40
    assert ck.config["model_type"] == "llama"
    size = (srv.root / "org" / "tiny" / "model.safetensors").stat().st_size
    header_bytes = ck.bytes_read
    assert header_bytes < 4096 and ck.total_bytes > 0.9 * size
    assert all(isinstance(s.inner, HttpRangeSource) for s in ck.sources)  # hashed as read (VerifiedSource)
    name = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(ck.read_raw(name), sd[name])
    assert ck.bytes_read - header_bytes == ck.tensors[name].nbytes
    before = ck.bytes_read
    assert torch.equal(ck.read_raw(name, 3, 9), sd[name][3:9])
    assert ck.bytes_read - before == 6 * ck.tensors[name].row_numel * 2
    assert "tokenizer.json" not in " ".join(r[1] for r in srv.requests)
    assert ck.vocab()[:3] == ["t0", "t1", "t2"]  # fetched on first use
    assert ck.sources[0].connections_opened == 2  # resolve + CDN, each kept alive


def test_sharded_and_revision(hub):
    srv, sd, _ = hub
    ck = open_checkpoint("org/sharded")
    assert set(ck.tensors) == set(sd) and len(ck.sources) == 2
    commit = ck.metadata["hub.commit"]
    for name in ("model.embed_tokens.weight", "model.layers.1.self_attn.k_proj.weight"):
        assert torch.equal(ck.read_raw(name), sd[name])
    pinned = open_checkpoint(f"org/sharded@{commit}")
    assert pinned.metadata["hub.commit"] == commit
    with pytest.raises(RemoteError, match="revision not found"):
        open_checkpoint("org/sharded@nope")
    with pytest.raises(RemoteError, match="not found"):
        open_checkpoint("org/does-not-exist")


def test_missing_shard_and_404(hub):
    srv, _, _ = hub
    with pytest.raises(ShardError, match="missing from the repository"):
        open_checkpoint("org/broken")
    srv.add_fault("model-00002-of-00002.safetensors", "404", times=None)
    with pytest.raises(RemoteError, match="404"):
        open_hub("org/sharded", HubOptions.from_env(http=FAST))


def test_gated(hub, monkeypatch):
    srv, sd, _ = hub
    with pytest.raises(RemoteError, match="gated|HF_TOKEN"):
        open_checkpoint("org/gated")
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    ck = open_checkpoint("org/gated")
    assert torch.equal(ck.read_raw("model.norm.weight"), sd["model.norm.weight"])


@pytest.mark.parametrize("kind", ["drop", "truncate", "500"])
def test_faults_during_reads_are_retried(hub, kind):
    srv, sd, _ = hub
    ck = open_hub("org/tiny", HubOptions.from_env(http=FAST))
    srv.add_fault("/_cdn/", kind, times=2)
    name = "model.embed_tokens.weight"
    assert torch.equal(ck.read_raw(name), sd[name])
    assert ck.sources[0].retries == 2


def test_slow_server_bounded_by_timeout(hub):
    srv, _, _ = hub
    ck = open_hub("org/tiny", HubOptions.from_env(http=HttpOptions(
        stall_timeout=0.3, deadline=1.0, retries=5, backoff=0.01)))
    srv.add_fault("/_cdn/", "slow", times=None, seconds=3.0)
    t = time.monotonic()
    with pytest.raises(RemoteError):
        ck.read("model.embed_tokens.weight")
    assert time.monotonic() - t < 1.6


def test_cache_reuse_and_download_mode(hub, monkeypatch):
    srv, sd, _ = hub
    monkeypatch.setenv("LINEAGE_HUB_DOWNLOAD", "1")
    ck = open_checkpoint("org/tiny")
    assert all(isinstance(s.inner, LocalFileSource) for s in ck.sources)
    assert torch.equal(ck.read_raw("lm_head.weight"), sd["lm_head.weight"])
    monkeypatch.delenv("LINEAGE_HUB_DOWNLOAD")
    srv.clear()
    ck = open_checkpoint("org/tiny")  # cached: no weight bytes from the server
    assert all(isinstance(s.inner, LocalFileSource) for s in ck.sources)
    assert _cdn(srv) == []
    # offline: explicit, and endpoint unreachable
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert open_checkpoint("org/tiny").tensors.keys() == sd.keys()
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    assert open_checkpoint("org/tiny").tensors.keys() == sd.keys()
    with pytest.raises(RemoteError, match="cannot reach|unreachable"):
        open_checkpoint("org/sharded")


def test_bin_repo_needs_download(hub, monkeypatch):
    srv, sd, _ = hub
    with pytest.raises(RemoteError, match="--download"):
        open_checkpoint("org/binonly")
    monkeypatch.setenv("LINEAGE_HUB_DOWNLOAD", "1")
    ck = open_checkpoint("org/binonly")
    assert ck.format == "torch" and ck.config["model_type"] == "llama"
    assert torch.equal(ck.read_raw("model.layers.0.mlp.up_proj.weight"),
                       sd["model.layers.0.mlp.up_proj.weight"])


def test_gguf_repo(hub, monkeypatch):
    monkeypatch.setenv("LINEAGE_SPILL", "0")  # exact network ranges (the spill cache is tested in test_spill.py)
    srv, sd, _ = hub
    with pytest.raises(CheckpointError, match="2 GGUF files"):
        open_checkpoint("org/tiny-gguf")
    ck = open_checkpoint("hf://org/tiny-gguf/tiny-Q8_0.gguf")
    assert ck.format == "gguf"
    assert ck.metadata["general.base_model.0.repo_url"].endswith("org/tiny")
    assert ck.vocab()[:2] == ["t0", "t1"]
    size = (srv.root / "org" / "tiny-gguf" / "tiny-Q8_0.gguf").stat().st_size
    head = ck.bytes_read
    assert head <= size  # a tiny file fits in the header read-ahead
    up = ck.read("blk.0.ffn_up.weight", 0, 4)
    assert ck.bytes_read - head == 4 * (H // 32) * 34
    ref = sd["model.layers.0.mlp.up_proj.weight"].float()[:4]
    assert (up - ref).abs().max() < 0.05 * ref.abs().max()


def test_adapter_repo_with_hub_base(hub):
    srv, sd, (a, b) = hub
    ck = open_checkpoint("org/tiny-lora")
    assert ck.format == "peft+safetensors"
    name = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(ck.read(name), sd[name].float() + 2.0 * b @ a)
    assert ck.vocab()[:2] == ["t0", "t1"]  # the base's tokenizer, fetched lazily
    assert ck.metadata["adapter.base_model"] == "org/tiny"


def _llama_repo(d, hidden, ff, vocab, layers, heads, kv_heads, *, sparse=False, seed=0):
    """A Llama-layout BF16 safetensors repo in ``d``: sparse (zeros, nothing on disk) or random weights."""
    d.mkdir(parents=True)
    kvd = kv_heads * (hidden // heads)
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (hidden,), p + "self_attn.q_proj.weight": (hidden, hidden),
                       p + "self_attn.k_proj.weight": (kvd, hidden), p + "self_attn.v_proj.weight": (kvd, hidden),
                       p + "self_attn.o_proj.weight": (hidden, hidden), p + "post_attention_layernorm.weight": (hidden,),
                       p + "mlp.gate_proj.weight": (ff, hidden), p + "mlp.up_proj.weight": (ff, hidden),
                       p + "mlp.down_proj.weight": (hidden, ff)})
    shapes.update({"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)})
    header, off = {}, 0
    for n, s in shapes.items():
        nb = 2 * math.prod(s)
        header[n] = {"dtype": "BF16", "shape": list(s), "data_offsets": [off, off + nb]}
        off += nb
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    g = torch.Generator().manual_seed(seed)
    with open(d / "model.safetensors", "wb") as f:
        f.write(len(hb).to_bytes(8, "little") + hb)
        if sparse:
            f.truncate(8 + len(hb) + off)  # apparent size only
        else:
            for n, s in shapes.items():
                t = 1.0 + 0.1 * torch.randn(s, generator=g) if len(s) == 1 else torch.randn(s, generator=g) / s[-1] ** 0.5
                f.write(t.bfloat16().view(torch.int16).numpy().tobytes())
    (d / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": hidden,
        "num_hidden_layers": layers, "intermediate_size": ff, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "vocab_size": vocab, "tie_word_embeddings": False}))
    return 8 + len(hb) + off


def test_tinyllama_shaped_fingerprint_reads(tmp_path, monkeypatch):
    """The fingerprint of a Hub repo read by HTTP ranges reads < 5 % of it (TinyLlama proportions, narrow)."""
    from lineage.fingerprint_workflow import write_fingerprint

    root = tmp_path / "root"
    # TinyLlama-1.1B proportions (ff = 2.75 h, GQA 32/4, vocab ≈ 15.6 h, 22 layers) at hidden 384
    size = _llama_repo(root / "TinyLlama" / "narrow", 384, 1056, 6000, 22, 32, 4)
    with HubServer(root) as srv:
        monkeypatch.setenv("HF_ENDPOINT", srv.endpoint)
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
        info = write_fingerprint("TinyLlama/narrow", tmp_path / "n.lfp")
        ranged = [r for r in srv.requests if r[2]]
        fp_local = write_fingerprint(str(root / "TinyLlama" / "narrow"), tmp_path / "local.lfp")
    logging.getLogger(__name__).info("narrow TinyLlama: read %d of %d (%.2f%%) in %d requests", info["bytes_read"],
                                     size, 100 * info["read_fraction"], info["requests"])
    assert info["bytes_read"] < 0.05 * size and info["read_fraction"] < 0.05
    assert srv.bytes_sent < 0.05 * size
    assert 0 < info["requests"] <= 200 and len(ranged) == info["requests"]
    assert fp_local["bytes_read"] == info["bytes_read"]  # same plan locally and remotely
    from lineage.fingerprint import compare_fingerprints, load_fingerprint

    fa, fb = load_fingerprint(tmp_path / "n.lfp"), load_fingerprint(tmp_path / "local.lfp")
    assert compare_fingerprints(fa, fb).log10_p < -10


def test_tinyllama_geometry_fingerprint_read_fraction(tmp_path, monkeypatch):
    """The exact TinyLlama-1.1B geometry (a sparse 2.2 GB file: zeros, nothing on disk): < 5 % read."""
    from lineage.fingerprint_workflow import write_fingerprint

    root = tmp_path / "root"
    size = _llama_repo(root / "TinyLlama" / "TinyLlama-1.1B", 2048, 5632, 32000, 22, 32, 4, sparse=True)
    with HubServer(root) as srv:
        monkeypatch.setenv("HF_ENDPOINT", srv.endpoint)
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
        info = write_fingerprint("TinyLlama/TinyLlama-1.1B", tmp_path / "t.lfp")
    logging.getLogger(__name__).info("TinyLlama geometry: read %d of %d (%.2f%%) in %d requests", info["bytes_read"],
                                     size, 100 * info["read_fraction"], info["requests"])
    assert size > 2_000_000_000 and info["read_fraction"] < 0.05 and srv.bytes_sent < 0.05 * size


def test_inspect_hub_ref(hub):
    from lineage.inspect import inspect

    srv, sd, _ = hub
    r = inspect("org/tiny")
    assert r.format == "safetensors" and len(r.tensors) == len(sd)
    assert ("model_card", "org/tiny-base") in [(c.source, c.model) for c in r.claims]
    assert r.vocab_size == V
    assert r.bytes_read < 4096  # headers only
    r = inspect("hf://org/tiny-gguf/tiny-F16.gguf")
    assert r.claims[0].model == "https://huggingface.co/org/tiny"


def test_slow_api_is_bounded(hub):
    srv, _, _ = hub
    srv.add_fault("/api/models/", "slow", times=None, seconds=3.0)
    t = time.monotonic()
    with pytest.raises(RemoteError, match="cannot reach.*after 3 attempts"):  # timeouts are retried, bounded
        open_hub("org/tiny", HubOptions.from_env(http=HttpOptions(stall_timeout=0.4, retries=2, backoff=0.01)))
    assert time.monotonic() - t < 2.5


def test_server_speaks_huggingface_hub(hub, tmp_path):
    from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_url

    srv, _, _ = hub
    api = HfApi(endpoint=srv.endpoint)
    files = api.list_repo_files("org/sharded")
    assert "model.safetensors.index.json" in files and "model-00002-of-00002.safetensors" in files
    info = api.model_info("org/tiny", files_metadata=True)
    sizes = {s.rfilename: s.size for s in info.siblings}
    assert sizes["model.safetensors"] == (srv.root / "org/tiny/model.safetensors").stat().st_size
    meta = get_hf_file_metadata(hf_hub_url("org/tiny", "model.safetensors", endpoint=srv.endpoint))
    assert meta.commit_hash == info.sha and meta.size == sizes["model.safetensors"]
    assert meta.location.startswith(srv.cdn_endpoint)


def test_remote_compare_reports_bytes_read(hub):
    from lineage.compare import CompareOptions, compare

    srv, sd, _ = hub
    r = compare("org/tiny", "org/sharded", options=CompareOptions(canonicalise=False))
    assert r.verdict.relation == "identical"
    assert r.a.format == "safetensors" and r.a.total_bytes > 0
    # every paired tensor was streamed once over HTTP, plus headers and small files
    assert 0.9 * r.a.total_bytes <= r.a.bytes_read <= 1.05 * r.a.total_bytes + 65536
    assert _cdn(srv)
