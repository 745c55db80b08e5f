"""Network faults against the loopback Hub (issue #15, "Network"): metadata retries, wrong ranges,
altered bytes caught by the published SHA-256, a slow server stopped by the per-model deadline."""

from __future__ import annotations

import json
import socket
import time

import pytest
import torch
from safetensors.torch import save_file

from lineage.errors import RemoteError
from lineage.io.http import HttpOptions
from lineage.io.hub import HubOptions, open_hub
from lineage.io.hubapi import forget_unreachable
from lineage.io.transfer import DeadlineOptions, TransferProgress

from hubserver import HubServer

FAST = HttpOptions(stall_timeout=1.0, deadline=10.0, retries=3, backoff=0.01, max_backoff=0.05)


def _weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {"model.embed_tokens.weight": torch.randn(64, 32, generator=g)}
    for i in range(2):
        for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.up_proj", "mlp.down_proj", "mlp.gate_proj"):
            sd[f"model.layers.{i}.{p}.weight"] = torch.randn(32, 32, generator=g)
    sd["lm_head.weight"] = torch.randn(64, 32, generator=g)
    return sd


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("hubfaults")
    sd = _weights()
    for name in ("tiny", "copy"):
        d = root / "org" / name
        d.mkdir(parents=True)
        save_file(sd, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2,
                                                   "num_attention_heads": 4, "intermediate_size": 32,
                                                   "vocab_size": 64}))
    with HubServer(root) as srv:
        yield srv, sd


@pytest.fixture()
def hub(server, tmp_path, monkeypatch):
    srv, sd = server
    monkeypatch.setenv("HF_ENDPOINT", srv.endpoint)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    for v in ("HF_TOKEN", "LINEAGE_HUB_DOWNLOAD", "HF_HUB_OFFLINE", "LINEAGE_HUB_DEADLINE", "LINEAGE_SPILL"):
        monkeypatch.delenv(v, raising=False)
    forget_unreachable()
    srv.clear()
    yield srv, sd
    srv.clear()
    forget_unreachable()


def _info_requests(srv) -> int:
    return len([r for r in srv.requests if r[1].startswith("/api/models/org/tiny")])


def _read_all(ck) -> None:
    for name in ck.in_file_order():
        ck.read_raw(name)


# -- metadata (model info) -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["500", "drop"])
def test_metadata_transient_failures_are_retried(hub, kind):
    srv, sd = hub
    srv.add_fault("/api/models/org/tiny", kind, times=2)
    ck = open_hub("org/tiny", HubOptions.from_env(http=FAST))
    assert torch.equal(ck.read_raw("lm_head.weight"), sd["lm_head.weight"])
    assert _info_requests(srv) == 3


def test_metadata_429_honours_retry_after(hub):
    srv, _ = hub
    srv.add_fault("/api/models/org/tiny", "429", times=1, seconds=0.6)
    t = time.monotonic()
    ck = open_hub("org/tiny", HubOptions.from_env(http=FAST))  # FAST backs off 0.01 s: the wait is the server's
    assert time.monotonic() - t >= 0.6
    assert ck.provenance is not None and _info_requests(srv) == 2


def test_metadata_persistent_500_fails_after_bounded_retries(hub):
    srv, _ = hub
    srv.add_fault("/api/models/org/tiny", "500", times=None)
    with pytest.raises(RemoteError, match=r"HTTP 500.*after 4 attempts"):
        open_hub("org/tiny", HubOptions.from_env(http=FAST))
    assert _info_requests(srv) == 4


def test_connection_refused_fails_fast_once(hub, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    slow = HttpOptions(stall_timeout=5.0, retries=5, backoff=1.0)  # retrying would take > 30 s
    t = time.monotonic()
    for ref in ("org/tiny", "org/copy"):
        with pytest.raises(RemoteError, match="cannot reach the Hub.*[Rr]efused"):
            open_hub(ref, HubOptions.from_env(http=slow))
    assert time.monotonic() - t < 2.0


# -- weight reads ----------------------------------------------------------------------------


def test_wrong_content_range_is_retried(hub):
    srv, sd = hub
    ck = open_hub("org/tiny", HubOptions.from_env(http=FAST))
    srv.add_fault("/_cdn/", "badrange", times=1)
    assert torch.equal(ck.read_raw("lm_head.weight"), sd["lm_head.weight"])
    assert ck.sources[0].retries == 1
    srv.add_fault("/_cdn/", "badrange", times=None)
    with pytest.raises(RemoteError, match="server sent range"):
        ck.read_raw("model.embed_tokens.weight")


def test_full_read_is_verified_partial_read_is_not(hub):
    srv, sd = hub
    ck = open_hub("org/tiny", HubOptions.from_env(http=FAST))
    ck.read_raw("lm_head.weight")
    (fi,) = ck.file_integrity()
    assert fi.status == "partial" and fi.file == "hf://org/tiny/model.safetensors"
    assert fi.expected_sha256 == srv.lfs_sha256(srv.root / "org" / "tiny" / "model.safetensors")
    _read_all(ck)
    (fi,) = ck.file_integrity()
    assert fi.verified and fi.bytes_hashed == fi.size  # out-of-order reads caught up from the spill file


@pytest.mark.parametrize("spill", ["1", "0"])
def test_altered_bytes_are_refused(hub, monkeypatch, spill):
    monkeypatch.setenv("LINEAGE_SPILL", spill)
    srv, _ = hub
    ck = open_hub("org/tiny", HubOptions.from_env(http=FAST))
    srv.add_fault("/_cdn/", "alter", times=1)  # a 206 with correct headers and one byte changed
    with pytest.raises(RemoteError, match="do not match the SHA-256"):
        _read_all(ck)
    with pytest.raises(RemoteError, match="do not match"):  # and it stays refused
        ck.read_raw("lm_head.weight")


def test_altered_bytes_stop_compare_with_one_line(hub, capsys):
    from lineage.cli import main

    srv, _ = hub
    srv.add_fault("/_cdn/org/copy/", "alter", times=1, after=2)  # the header (2 reads) intact, a tensor altered
    with pytest.raises(SystemExit) as e:
        main(["compare", "org/tiny", "org/copy", "--json", "--no-progress", "--no-canon"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "do not match the SHA-256" in err[0]


def test_clean_compare_reports_provenance_and_verification(hub):
    from lineage.compare import CompareOptions, compare

    srv, _ = hub
    r = compare("org/tiny", "org/copy", options=CompareOptions(canonicalise=False)).to_dict()
    assert r["verdict"]["relation"] == "identical"
    for side, repo in (("a", "org/tiny"), ("b", "org/copy")):
        hub_rec = r[side]["hub"]
        assert hub_rec["repo_id"] == repo and hub_rec["revision"] == "main"
        assert hub_rec["commit"] == srv.commit(srv.root / repo) and "model.safetensors" in hub_rec["files"]
        assert [f["status"] for f in r[side]["files"]] == ["verified"]


# -- a slow server, each answer under the stall timeout ---------------------------------------


def test_slow_server_hits_the_model_deadline(hub, monkeypatch):
    srv, _ = hub
    monkeypatch.setenv("LINEAGE_SPILL", "0")
    opts = HubOptions.from_env(http=FAST, deadline=DeadlineOptions(seconds=0.6))
    ck = open_hub("org/tiny", opts)
    srv.add_fault("/_cdn/", "slow", times=None, seconds=0.15)  # each request well under the 1 s stall timeout
    t = time.monotonic()
    with pytest.raises(RemoteError, match="overall deadline of 0.6 s"):
        for _ in range(100):
            _read_all(ck)
    assert time.monotonic() - t < 2.0


def test_deadline_from_env_and_progress_carries_rate(hub, monkeypatch):
    srv, _ = hub
    monkeypatch.setenv("LINEAGE_HUB_DEADLINE", "0.5")
    seen: list[TransferProgress] = []
    ck = open_hub("org/tiny", HubOptions.from_env(http=FAST, progress=seen.append))
    assert ck.sources[0].transfer.deadline == 0.5
    _read_all(ck)
    assert seen and seen[-1].bytes_read > 0 and seen[-1].bytes_per_second > 0
    assert seen[-1].total_bytes == (srv.root / "org/tiny/model.safetensors").stat().st_size
    monkeypatch.setenv("LINEAGE_HUB_DEADLINE", "none")
    assert HubOptions.from_env().deadline is None


def test_small_file_download_dropped_is_retried(hub):
    srv, _ = hub
    srv.add_fault("/config.json", "drop", times=1)  # hf_hub_download does not retry a dropped connection
    ck = open_hub("org/tiny", HubOptions.from_env(http=FAST))
    assert ck.config["model_type"] == "llama"
    assert len([r for r in srv.requests if r[1].endswith("/config.json")]) >= 2


def test_default_progress_reaches_models_opened_by_reference(hub):
    from lineage.io import open_checkpoint
    from lineage.io.hub import set_transfer_progress

    seen: list[TransferProgress] = []
    set_transfer_progress(seen.append)
    try:
        ck = open_checkpoint("org/tiny")
        _read_all(ck)
    finally:
        set_transfer_progress(None)
    assert seen and seen[-1].model == "hf://org/tiny" and seen[-1].bytes_read >= ck.total_bytes


def test_fingerprint_compare_says_bytes_unverified(hub, tmp_path):
    """A fingerprint reads a few % of the file: the report says its bytes were not verified."""
    from lineage.compare import compare
    from lineage.fingerprint_workflow import write_fingerprint

    write_fingerprint("org/copy", tmp_path / "copy.lfp")
    r = compare("org/tiny", str(tmp_path / "copy.lfp"))
    assert r.a.hub is not None and r.a.hub.repo_id == "org/tiny"
    assert [f.status for f in r.a.files] == ["partial"] and not r.a.files[0].verified
