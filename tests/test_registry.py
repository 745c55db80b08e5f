"""Registry: retrieval keys, add / query, claims against the weights, concurrent writers and a killed run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from lineage.fingerprint_workflow import fingerprint_model
from lineage.io.discover import discover
from lineage.registry import KEY_DIM, Registry, ingest, query, retrieval_key
from lineage.registry.claims import read_claims
from lineage.registry.search import CandidatePolicy
from lineage.registry.shortlist import QueryPolicy
from lineage.engine import LocalEngine


def _permuted(fp, seed: int):
    """The same fingerprint with its probe tokens stored in another order."""
    g = torch.Generator().manual_seed(seed)
    p = torch.randperm(fp.m, generator=g)
    layers = tuple({k: v[p][:, p] for k, v in layer.items()} for layer in fp.layers)
    return replace(fp, tokens=tuple(fp.tokens[i] for i in p.tolist()), K=fp.K[p][:, p], layers=layers)


def test_retrieval_key_is_order_free_and_ranks_relatives_first(tiny_models: dict[str, Path]) -> None:
    fps = {n: fingerprint_model(str(tiny_models[n]))[0] for n in ("base", "derived", "bf16", "unrelated")}
    keys = {n: retrieval_key(fp) for n, fp in fps.items()}
    assert all(k.shape == (KEY_DIM,) and abs(float(np.linalg.norm(k)) - 1) < 1e-5 for k in keys.values())
    # storage order of the probe tokens does not matter (entries are indexed by token strings)
    assert np.allclose(retrieval_key(_permuted(fps["base"], 3)), keys["base"], atol=1e-5)
    cos = {n: float(keys["base"] @ keys[n]) for n in keys}
    assert cos["bf16"] > 0.99 and cos["derived"] > 0.5 and abs(cos["unrelated"]) < 0.25, cos


def _card(folder: Path, base: str) -> None:
    (folder / "README.md").write_text(f"---\nbase_model: {base}\nlicense: mit\n---\n# model\n")


@pytest.fixture()
def claimed_dir(tiny_models: dict[str, Path], tmp_path: Path) -> Path:
    root = tmp_path / "models"
    for n in ("base", "derived", "unrelated", "gpt2_base", "gpt2_derived"):
        shutil.copytree(tiny_models[n], root / n)
    _card(root / "derived", "base")                 # true
    _card(root / "gpt2_derived", "unrelated")       # false: the weights point to gpt2_base
    _card(root / "unrelated", "acme/not-registered")
    return root


def test_claims_are_read_from_card_config_gguf_and_metadata(tmp_path: Path) -> None:
    _card(tmp_path, "https://huggingface.co/acme/Base-7B")
    got = read_claims({"base_model": ["acme/base-7b", "x/y"]},
                      {"general.base_model.0.name": "Llama", "general.base_model.0.organization": "meta",
                       "base_model_sha": "ignored", "lineage.base_model": "org/st"}, str(tmp_path / "README.md"))
    assert [c for c, _ in got] == ["acme/Base-7B", "acme/base-7b", "x/y", "meta/Llama", "ignored", "org/st"]
    assert read_claims(None, {"general.base_model.0.repo_url": "https://huggingface.co/a/b"}, None) == (("a/b", "gguf"),)


def test_registry_add_query_and_claims_via_cli(claimed_dir: Path, tmp_path: Path, capsys) -> None:
    from lineage.cli import main

    db = tmp_path / "reg.sqlite"
    with pytest.raises(SystemExit) as e:
        main(["registry", "add", str(claimed_dir), "--db", str(db), "--json", "--no-progress", "--workers", "2"])
    assert e.value.code == 0
    added = json.loads(capsys.readouterr().out)
    assert added["stats"]["models"] == 5 and all(m["ok"] and not m["cached"] for m in added["models"])
    with pytest.raises(SystemExit) as e:
        main(["registry", "query", str(claimed_dir / "derived"), "--db", str(db), "--json"])
    assert e.value.code == 0
    q = json.loads(capsys.readouterr().out)
    assert q["schema"] == "lineage.registry.query/1"
    related = {h["label"] for h in q["hits"] if h["related"]}
    assert related == {"base"}
    assert all(h["log10_p"] is not None for h in q["hits"])  # every candidate confirmed by the test
    assert q["claim"]["status"] == "confirmed" and q["claim"]["claimed_model"] == "base"
    with pytest.raises(SystemExit) as e:
        main(["registry", "query", str(claimed_dir / "gpt2_derived"), "--db", str(db), "--html", str(tmp_path / "q.html")])
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith("CLAIM CONTRADICTED: gpt2_derived claims unrelated")
    assert "the weights point to gpt2_base" in out and "CLAIM CONTRADICTED" in (tmp_path / "q.html").read_text()


def test_scan_headline_checks_every_claim(claimed_dir: Path, tmp_path: Path) -> None:
    from lineage.scan import ScanOptions, render_html, render_text, scan

    res = scan([str(claimed_dir)], ScanOptions(db=str(tmp_path / "r.sqlite"), workers=2))
    by = {c.model: c for c in res.claims}
    assert by["derived"].status == "confirmed" and by["derived"].claimed_model == "base"
    assert by["gpt2_derived"].status == "contradicted" and by["gpt2_derived"].points_to == "gpt2_base"
    assert by["unrelated"].status == "unverifiable"
    assert by["gpt2_base"].status == "parent found" and by["gpt2_base"].points_to == "gpt2_derived"
    assert res.to_dict()["claim_counts"] == {"confirmed": 1, "contradicted": 1, "unverifiable": 1,
                                              "parent found": 2, "no parent": 0}
    assert render_text(res).startswith("Claims checked against the weights: 1 confirmed, 1 contradicted")
    assert "CLAIM CONTRADICTED" in render_html(res)


def test_concurrent_writers_and_resume_lose_and_duplicate_nothing(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    root = tmp_path / "m"
    root.mkdir()
    for n in ("base", "derived", "unrelated", "gpt2_base"):
        os.symlink(tiny_models[n], root / n)
    entries = discover([str(root)])
    db = tmp_path / "r.sqlite"
    ingest(LocalEngine(1), Registry(db), entries[:2])          # a run that stopped after two models
    outs: list[list] = []
    threads = [threading.Thread(target=lambda: outs.append(ingest(LocalEngine(1), Registry(db), entries)))
               for _ in range(2)]                              # two writers at once, each its own connection
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    reg = Registry(db)
    assert reg.count() == 4 and reg.stats()["fingerprints"] == 4
    for out in outs:
        assert all(d.ok for d in out) and [d.cached for d in out[:2]] == [True, True]
    ids = {d.entry.label: d.record.id for out in outs for d in out}
    assert len(set(ids.values())) == 4


def test_a_killed_add_resumes_without_loss_or_duplicates(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    root = tmp_path / "m"
    root.mkdir()
    names = ("base", "derived", "bf16", "unrelated", "gpt2_base", "gpt2_derived", "gpt2_unrelated")
    for n in names:
        os.symlink(tiny_models[n], root / n)
    db = tmp_path / "r.sqlite"
    cmd = [sys.executable, "-m", "lineage.cli", "registry", "add", str(root), "--db", str(db), "--workers", "1",
           "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.monotonic()
    while proc.poll() is None and time.monotonic() - t0 < 120:
        if db.exists() and Registry(db).count() >= 2:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    before = Registry(db).count()
    out = ingest(LocalEngine(2), Registry(db), discover([str(root)]))
    reg = Registry(db)
    assert reg.count() == len(names) and all(d.ok for d in out)
    assert sum(d.cached for d in out) >= min(before, len(names)) and not any(d.recomputed for d in out)


def test_query_confirms_a_claimed_base_outside_the_shortlist(claimed_dir: Path, tmp_path: Path) -> None:
    reg = Registry(tmp_path / "r.sqlite")
    ingest(LocalEngine(2), reg, discover([str(claimed_dir)]))
    res = query(reg, str(claimed_dir / "unrelated"), LocalEngine(1), policy=QueryPolicy(k=1))
    assert len(res.hits) == 1 and res.claim.status == "unverifiable" and not res.related


def test_registry_add_an_organisation_over_http(tiny_models: dict[str, Path], tmp_path: Path, monkeypatch) -> None:
    from lineage.registry import add
    from lineage.testing.hubserver import HubServer

    root = tmp_path / "hub"
    for name in ("base", "derived"):
        shutil.copytree(tiny_models[name], root / "acme" / name)
    _card(root / "acme" / "derived", "acme/base")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    for v in ("HF_TOKEN", "LINEAGE_HUB_DOWNLOAD", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(v, raising=False)
    with HubServer(root) as srv:
        monkeypatch.setenv("HF_ENDPOINT", srv.endpoint)
        reg = Registry(tmp_path / "r.sqlite")
        done, _ = add(["org:acme"], reg, LocalEngine(2))
        again, _ = add(["acme/derived"], reg, LocalEngine(1))      # the same repo at the same commit: reused
        res = query(reg, "acme/derived", LocalEngine(2))
    recs = {d.entry.label: d.record for d in done}
    assert all(d.ok for d in done) and again[0].cached and reg.count() == 2
    r = recs["acme/derived"]
    assert r.repo_id == "acme/derived" and r.revision_sha and len(r.revision_sha) == 40
    assert any(n == "model.safetensors" and len(h) == 64 for n, _, h in r.files)   # the LFS sha256 the Hub publishes
    assert r.claims == (("acme/base", "card"),)
    assert res.claim.status == "confirmed" and res.claim.claimed_model == "acme/base"


def test_group_neighbours_merges_near_identical_keys_only() -> None:
    from lineage.registry.ann import Neighbour
    from lineage.registry.shortlist import expansion, group_neighbours

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, KEY_DIM))
    copies = [a + 0.01 * rng.standard_normal(KEY_DIM) for _ in range(3)]
    keys = np.stack([copies[0], b, copies[1], a, copies[2]])
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    neigh = [Neighbour(i, 1.0 - 0.1 * i) for i in range(5)]
    groups = group_neighbours(neigh, keys, 0.95)
    assert [[n.id for n in g.members] for g in groups] == [[0, 2, 3, 4], [1]]
    assert [n.id for n in expansion(groups, {0}, 2)] == [2, 3] and expansion(groups, {1}, 9) == []


def test_query_reaches_a_parent_crowded_out_by_its_own_copies(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """Twelve near-identical copies of the base (as many re-uploads) would fill a k-nearest shortlist; grouped,
    the base's group is one candidate, its leader is linked, and every member — the base too — is tested."""
    from lineage.testing.models import TinyConfig, init_weights, save_model

    cfg = TinyConfig(family="llama", vocab=256, hidden=64, n_layers=3, n_heads=4, n_kv_heads=2, intermediate=128)
    base = init_weights(cfg, seed=1)                  # the same weights as tiny_models["base"]
    root = tmp_path / "m"
    for s in range(12):
        g = torch.Generator().manual_seed(100 + s)
        w = {k: v + 1e-3 * v.std() * torch.randn(v.shape, generator=g) if v.ndim == 2 else v for k, v in base.items()}
        save_model(root / f"copy{s:02d}", cfg, w)
    for n in ("base", "unrelated"):
        shutil.copytree(tiny_models[n], root / n)
    reg = Registry(tmp_path / "r.sqlite")
    ingest(LocalEngine(2), reg, discover([str(root)]))
    res = query(reg, str(tiny_models["derived"]), LocalEngine(2), policy=QueryPolicy(k=2))
    related = {h.label for h in res.related}
    assert related == {"base", *(f"copy{s:02d}" for s in range(12))}, related
    assert {h.label for h in res.hits} - related == {"unrelated"}   # tested (a group leader), not linked
    assert res.timing["groups"] == 2 and res.timing["expanded"] == 12 and res.timing["tested"] == 14


def test_outdated_keys_are_recomputed_from_the_stored_fingerprints(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    from lineage.registry.ann import open_index

    reg = Registry(tmp_path / "r.sqlite")
    done = ingest(LocalEngine(1), reg, discover([str(tiny_models["base"]), str(tiny_models["unrelated"])]))
    want = {d.record.id: d.record.key for d in done}
    reg._conn().execute("UPDATE models SET key = ?, key_version = 0", (np.zeros(8, np.float32).tobytes(),))
    assert len(reg.outdated_keys()) == 2
    index = open_index(reg)
    assert reg.outdated_keys() == [] and len(index) == 2
    got = reg.by_ids(list(want))
    assert all(np.allclose(got[i].key, k) for i, k in want.items())
    assert index.search(want[done[0].record.id], 1)[0].id == done[0].record.id
