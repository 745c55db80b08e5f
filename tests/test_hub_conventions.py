"""Hugging Face conventions (issue #16): names kept, --revision/--token, one-word ids, offline
without a warning per model, fail fast when unreachable, folders loaded as transformers loads
them, lineage's own cache under XDG_CACHE_HOME."""

from __future__ import annotations

import json
import logging
import socket
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lineage.errors import RemoteError
from lineage.io import open_checkpoint
from lineage.io.hub import HubRef, parse_hub_ref, with_revision
from lineage.io.hubapi import forget_unreachable

from hubserver import HubServer


def _sd(seed: int = 0, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {"model.embed_tokens.weight": torch.randn(40, 16, generator=g)}
    for i in range(2):
        for p in ("self_attn.q_proj", "mlp.up_proj", "mlp.down_proj"):
            sd[f"model.layers.{i}.{p}.weight"] = torch.randn(16, 16, generator=g)
    return {k: v.to(dtype) for k, v in sd.items()}


def _folder_with_copy(d: Path) -> dict[str, torch.Tensor]:
    """``model.safetensors`` (bf16) beside a float32 copy of the same tensors, no index."""
    d.mkdir(parents=True)
    sd = _sd()
    save_file(sd, str(d / "model.safetensors"))
    save_file({k: v.float() for k, v in sd.items()}, str(d / "model.fp32.safetensors"))
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 16, "num_hidden_layers": 2}))
    return sd


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("hubconv")
    _folder_with_copy(root / "org" / "twocopies")
    d = root / "org" / "gated"
    d.mkdir(parents=True)
    save_file(_sd(1), str(d / "model.safetensors"))
    with HubServer(root, gated={"org/gated": "hf_secret"}) as srv:
        yield srv


@pytest.fixture()
def hub(server, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hfhome"))  # no token file of the machine
    for v in ("HF_TOKEN", "LINEAGE_HUB_DOWNLOAD", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(v, raising=False)
    forget_unreachable()
    server.clear()
    yield server
    forget_unreachable()


# -- names ---------------------------------------------------------------------------------------


def test_one_word_ids_and_revision(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse_hub_ref("gpt2") == HubRef("gpt2")
    assert parse_hub_ref("gpt2@v1") == HubRef("gpt2", "v1")
    assert parse_hub_ref("model.safetensors") is None and parse_hub_ref("x.gguf") is None
    assert parse_hub_ref("../x") is None and parse_hub_ref("a..b") is None
    (tmp_path / "gpt2").mkdir()  # a local folder of that name wins
    assert parse_hub_ref("gpt2") is None
    assert with_revision("org/m", "v2") == "hf://org/m@v2"
    assert with_revision("org/m@v1", "v2") == "org/m@v1"  # its own @REV wins
    assert with_revision(str(tmp_path), "v2") == str(tmp_path)


def test_hub_checkpoint_keeps_its_name(hub):
    ck = open_checkpoint("org/twocopies")
    p = ck.provenance
    assert (p.repo_id, p.revision, p.commit) == ("org/twocopies", "main", hub.commit(hub.root / "org/twocopies"))
    assert "model.safetensors" in p.files and "model.fp32.safetensors" not in p.files
    assert ck.skipped_files == ("model.fp32.safetensors",)  # same selection as a local folder


def test_cli_revision_and_token(hub, capsys):
    from lineage.cli import main

    commit = hub.commit(hub.root / "org/gated")
    with pytest.raises(SystemExit) as e:
        main(["inspect", "org/gated"])
    assert e.value.code == 2 and "HF_TOKEN" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["inspect", "org/gated", "--token", "hf_secret", "--revision", commit, "--json"])
    assert e.value.code == 0
    assert json.loads(capsys.readouterr().out)["format"] == "safetensors"
    assert any(f"/api/models/org/gated/revision/{commit}" in r[1] for r in hub.requests)
    with pytest.raises(SystemExit) as e:
        main(["inspect", "org/gated", "--token", "hf_secret", "--revision", "no-such-branch"])
    assert e.value.code == 2 and "revision not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["inspect", str(hub.root / "org/gated"), "--revision", "v1"])
    assert e.value.code == 2 and "--revision applies to Hub references" in capsys.readouterr().err


def test_progress_bars_follow_hf_hub_disable_progress_bars(monkeypatch):
    from lineage.cli.options import progress_bar as _progress

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    assert _progress(False) is not None
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    assert _progress(False) is None


# -- offline and unreachable -----------------------------------------------------------------------


def test_offline_uses_cache_without_a_warning_per_model(hub, monkeypatch, caplog):
    monkeypatch.setenv("LINEAGE_HUB_DOWNLOAD", "1")
    open_checkpoint("org/twocopies")  # fills the HF cache
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    open_checkpoint("org/gated")
    monkeypatch.delenv("LINEAGE_HUB_DOWNLOAD")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.clear()
    with caplog.at_level(logging.INFO):
        for ref in ("org/twocopies", "org/gated", "org/twocopies"):
            ck = open_checkpoint(ref)
            assert ck.provenance.from_cache and ck.provenance.repo_id == ref
    assert hub.requests == []
    assert [r for r in caplog.records if r.levelno >= logging.WARNING and "offline" in r.getMessage()] == []
    # unreachable endpoint: the cache is used, said once for all models
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{s.getsockname()[1]}")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        for ref in ("org/twocopies", "org/gated"):
            assert open_checkpoint(ref).provenance.from_cache
    assert len([r for r in caplog.records if "cannot reach the Hub" in r.getMessage()]) == 1


def test_scan_org_fails_fast_when_unreachable_or_offline(hub, monkeypatch, capsys):
    from lineage.cli import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{s.getsockname()[1]}")
    for offline in (False, True):
        if offline:
            monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        t = time.monotonic()
        with pytest.raises(SystemExit) as e:
            main(["scan", "org:someone", "--no-progress"])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1, err
        assert ("HF_HUB_OFFLINE" in err[0]) if offline else ("cannot reach the Hub" in err[0])
        assert time.monotonic() - t < 2.0


def test_unreachable_hub_id_fails_fast_with_one_line(hub, monkeypatch, capsys):
    from lineage.cli import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{s.getsockname()[1]}")
    t = time.monotonic()
    with pytest.raises(SystemExit) as e:
        main(["inspect", "gpt2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "cannot reach the Hub" in err[0] and "gpt2" in err[0]
    assert time.monotonic() - t < 2.0


# -- folders as transformers loads them -------------------------------------------------------------


def test_folder_with_a_float32_copy_loads_model_safetensors(tmp_path, caplog):
    sd = _folder_with_copy(tmp_path / "m")
    with caplog.at_level(logging.WARNING):
        ck = open_checkpoint(tmp_path / "m")
    assert [Path(s.name).name for s in ck.sources] == ["model.safetensors"]
    assert {m.dtype for m in ck.tensors.values()} == {"BF16"}
    assert torch.equal(ck.read_raw("model.layers.1.mlp.up_proj.weight"), sd["model.layers.1.mlp.up_proj.weight"])
    assert ck.skipped_files == ("model.fp32.safetensors",)
    assert any("left out model.fp32.safetensors" in r.getMessage() for r in caplog.records)


def test_index_shards_only_and_adapter_base_with_a_copy(tmp_path):
    # an index names its shards: a float32 file beside them is left out
    d = tmp_path / "sharded"
    d.mkdir()
    sd = _sd()
    keys = sorted(sd)
    save_file({k: sd[k] for k in keys[:3]}, str(d / "model-00001-of-00002.safetensors"))
    save_file({k: sd[k] for k in keys[3:]}, str(d / "model-00002-of-00002.safetensors"))
    save_file({k: v.float() for k, v in sd.items()}, str(d / "model.fp32.safetensors"))
    wm = {k: f"model-0000{1 if i < 3 else 2}-of-00002.safetensors" for i, k in enumerate(keys)}
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    ck = open_checkpoint(d)
    assert set(ck.tensors) == set(sd) and ck.skipped_files == ("model.fp32.safetensors",)
    # the base an adapter names, holding a copy beside model.safetensors
    base = tmp_path / "base"
    _folder_with_copy(base)
    ad = tmp_path / "adapter"
    ad.mkdir()
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(2, 16, generator=g), torch.randn(16, 2, generator=g)
    save_file({"base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": a,
               "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight": b}, str(ad / "adapter_model.safetensors"))
    (ad / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "base_model_name_or_path": str(base)}))
    merged = open_checkpoint(ad)
    name = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(merged.read(name), sd[name].float() + b @ a, atol=1e-2, rtol=1e-2)


# -- lineage's own cache -----------------------------------------------------------------------------


def test_cache_root_follows_lineage_cache_then_xdg(tmp_path, monkeypatch):
    from lineage.io.cachedir import cache_path, cache_root
    from lineage.scan import ScanOptions
    from lineage.testing import zoo, zoocache

    monkeypatch.delenv("LINEAGE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "lineage"
    # the zoo's cache follows the same rule (lineage.testing.zoocache; zoo.py's own default is kept
    # byte-identical because the zoo's cache key hashes its code)
    assert zoocache.zoo_dir("small") == tmp_path / "xdg" / "lineage" / "zoo" / zoo.zoo_key("small")[0]
    assert ScanOptions().db_path() == tmp_path / "xdg" / "lineage" / "registry.sqlite"  # the scan's registry
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/path")  # not absolute: ignored, as the spec says
    assert cache_root() == Path.home() / ".cache" / "lineage"
    monkeypatch.setenv("LINEAGE_CACHE", str(tmp_path / "own"))
    assert cache_root() == tmp_path / "own" and zoocache.zoo_dir("small").parent.parent == tmp_path / "own"
    assert cache_path("bench", create=True).is_dir()


def test_zoo_and_demo_live_under_xdg_cache_home(tmp_path, monkeypatch):
    """`lineage demo` (and every zoo user) finds the zoo under $XDG_CACHE_HOME/lineage, and builds it there."""
    from lineage.testing import zoo, zoocache
    from lineage.testing.demo import build_demo

    monkeypatch.delenv("LINEAGE_CACHE", raising=False)
    built = zoocache.cached_zoo("small")  # wherever it is cached now (built once per machine)
    key = zoo.zoo_key("small")[0]
    (tmp_path / "xdg" / "lineage" / "zoo").mkdir(parents=True)
    (tmp_path / "xdg" / "lineage" / "zoo" / key).symlink_to(built.root)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    models = build_demo()
    assert models and all(Path(p).is_relative_to(tmp_path / "xdg" / "lineage" / "zoo" / key) for p in models.values())
    calls = []
    monkeypatch.setattr(zoocache, "build_zoo", lambda subset, out, **kw: calls.append((subset, Path(out))))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty"))
    zoocache.cached_zoo("small")
    assert calls == [("small", tmp_path / "empty" / "lineage" / "zoo" / key)]


def test_no_cache_path_computed_elsewhere():
    """Every place that needs lineage's cache asks lineage.io.cachedir (no second copy of the rule)."""
    repo = Path(__file__).resolve().parent.parent
    offenders = [str(p.relative_to(repo)) for p in [*repo.glob("lineage/**/*.py"), *repo.glob("benchmarks/*.py"),
                                                   *repo.glob("fixtures/*.py")]
                 # lineage/testing/zoo.py keeps its own copy: the zoo's cache key hashes its code, and
                 # delegating there would rebuild every cached zoo for no change of bytes
                 if p.name not in ("cachedir.py", "zoo.py") and ('".cache" / "lineage"' in p.read_text() or
                                                 'environ.get("LINEAGE_CACHE"' in p.read_text())]
    assert offenders == []


def test_remote_error_is_typed(hub, monkeypatch):
    with pytest.raises(RemoteError, match="not found"):
        open_checkpoint("org/does-not-exist")


def test_hub_client_warnings_are_printed_once(hub, tmp_path):
    import os
    import subprocess

    hub.add_fault("/api/models", "500", times=1)  # huggingface_hub retries the listing itself, with a warning
    p = subprocess.run([sys.executable, "-m", "lineage.cli", "scan", "org:nobody", "--no-progress",
                        "--cache-dir", str(tmp_path / "fp")], capture_output=True, text=True, env=dict(os.environ),
                       timeout=120)
    assert p.stderr.count("Retrying in") == 1, p.stderr
