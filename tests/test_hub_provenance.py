"""Reports on Hub models name what they read as anyone can look it up again: repo id, resolved commit,
file names and the SHA-256 the Hub publishes (the LFS pointer's), served here by the loopback Hub; and
`lineage verify` asks the Hub again at that commit, re-runs there, and names a file whose bytes changed."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from lineage.cli import main
from lineage.io.hubapi import forget_unreachable
from lineage.testing.models import TinyConfig, init_weights, save_model

from hubserver import HubServer


def run(args: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(args)
    out, err = capsys.readouterr()
    return int(info.value.code or 0), out, err


@pytest.fixture()
def hub(tmp_path, monkeypatch):
    cfg = TinyConfig(family="llama", vocab=128, hidden=32, n_layers=2, n_heads=4, n_kv_heads=2, intermediate=64)
    base = init_weights(cfg, seed=1)
    g = torch.Generator().manual_seed(3)
    child = {k: v + 0.05 * v.std() * torch.randn(v.shape, generator=g) if v.dim() == 2 else v for k, v in base.items()}
    root = tmp_path / "hub"
    save_model(root / "org" / "base", cfg, base)
    save_model(root / "org" / "child", cfg, child)
    with HubServer(root) as srv:
        monkeypatch.setenv("HF_ENDPOINT", srv.endpoint)
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hfhome"))
        for v in ("HF_TOKEN", "LINEAGE_HUB_DOWNLOAD", "HF_HUB_OFFLINE"):
            monkeypatch.delenv(v, raising=False)
        forget_unreachable()
        yield srv, root
    forget_unreachable()


def test_hub_report_records_repo_commit_files_and_published_sha256_and_verify_checks_them(hub, tmp_path, capsys):
    srv, root = hub
    rep = tmp_path / "r.json"
    code, _, err = run(["compare", "org/base", "org/child", "--no-canon", "--json", "-o", str(rep)], capsys)
    assert code == 0, err
    files = json.loads(rep.read_text())["provenance"]["files"]
    for side, repo in (("a", "org/base"), ("b", "org/child")):
        commit = srv.commit(root / repo)
        mine = {f["file"]: f for f in files if f["side"] == side}
        assert set(mine) >= {"model.safetensors", "config.json"}, mine
        for name, f in mine.items():
            on_disk = (root / repo / name).read_bytes()
            assert f["repo_id"] == repo and f["commit"] == commit and f["path"] == f"hf://{repo}@{commit}/{name}"
            assert f["algorithm"] == "sha256" and f["digest"] == hashlib.sha256(on_disk).hexdigest()
            assert f["size"] == len(on_disk)
        # the weights: the Hub's published hash, and every byte read matched it
        assert mine["model.safetensors"]["digest_source"] == "hub" and mine["model.safetensors"]["status"] == "verified"
        assert mine["config.json"]["digest_source"] == "fetched copy"
    assert not any(f["algorithm"] == "remote" for f in files)

    code, out, _ = run(["verify", str(rep)], capsys)
    assert code == 0 and "verified" in out, out

    # the child's weights change at the same commit (same names and sizes): the Hub now publishes another
    # SHA-256 for it, and verify names the file with both hashes
    weights = root / "org" / "child" / "model.safetensors"
    commit_before = srv.commit(root / "org" / "child")
    raw = bytearray(weights.read_bytes())
    raw[-64:] = bytes(64)
    weights.write_bytes(bytes(raw))
    assert srv.commit(root / "org" / "child") == commit_before
    code, out, _ = run(["verify", str(rep), "--json"], capsys)
    res = json.loads(out)
    assert code == 1 and not res["same"]
    hit = [x for x in res["changed_files"] if "org/child@" in x and "model.safetensors" in x]
    assert hit and hashlib.sha256(bytes(raw)).hexdigest()[:16] in " ".join(hit), res["changed_files"]
    assert not any("org/base@" in x for x in res["changed_files"])
