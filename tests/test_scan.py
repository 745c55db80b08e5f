"""Scanning: discovery in folders and HF caches, engines, links and tree on planted families."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lineage.engine import LocalEngine, get_engine
from lineage.errors import ConfigError
from lineage.io.discover import discover, discover_folder, discover_hf_cache
from lineage.scan import ScanOptions, scan


def _touch(p: Path, text: str = "x") -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


def test_discover_folder_finds_model_folders_and_files(tmp_path: Path) -> None:
    _touch(tmp_path / "org" / "m1" / "model.safetensors")
    _touch(tmp_path / "org" / "m1" / "sub" / "model.safetensors")  # inside a model folder: not separate
    _touch(tmp_path / "org" / "m2" / "model.safetensors.index.json")
    _touch(tmp_path / "adapters" / "a1" / "adapter_config.json")
    _touch(tmp_path / "loose" / "x.safetensors")
    _touch(tmp_path / "ggufs" / "big-00001-of-00002.gguf")
    _touch(tmp_path / "ggufs" / "big-00002-of-00002.gguf")
    _touch(tmp_path / "ggufs" / "small.gguf")
    _touch(tmp_path / ".hidden" / "model.safetensors")
    _touch(tmp_path / "notes.txt")
    os.symlink(tmp_path, tmp_path / "loop")  # a symlink back into the tree is not followed
    os.symlink(tmp_path / "org" / "m1", tmp_path / "linked-m1")  # a symlinked model folder is a model
    labels = sorted(e.label for e in discover_folder(tmp_path))
    assert labels == ["adapters/a1", "ggufs/big-00001-of-00002.gguf", "ggufs/small.gguf", "linked-m1",
                      "loose/x.safetensors", "org/m1", "org/m2"]


def test_discover_hf_cache_picks_the_main_snapshot(tmp_path: Path) -> None:
    repo = tmp_path / "models--acme--tiny"
    _touch(repo / "snapshots" / "aaaa1111" / "model.safetensors")
    _touch(repo / "snapshots" / "bbbb2222" / "model.safetensors")
    _touch(repo / "refs" / "main", "bbbb2222")
    _touch(tmp_path / "datasets--acme--data" / "snapshots" / "cccc" / "x.safetensors")  # not a model repo
    found = discover_hf_cache(tmp_path)
    assert [(e.label, Path(e.ref).name, e.origin) for e in found] == [("acme/tiny@bbbb2222", "bbbb2222", "hf-cache")]


def test_discover_rejects_unknown_sources_and_dedups(tmp_path: Path) -> None:
    m = _touch(tmp_path / "a" / "model.safetensors").parent
    assert len(discover([str(m), str(m)])) == 1
    assert [e.origin for e in discover(["acme/tiny@v1"])] == ["hub"]
    with pytest.raises(ConfigError):
        discover(["/no/such/place"])


def _boom(x: int) -> int:
    if x == 2:
        raise ValueError("two is bad")
    return x * 10


@pytest.mark.parametrize("workers", [1, 2])
def test_local_engine_reports_failures_as_outcomes(workers: int) -> None:
    outs = sorted(LocalEngine(workers).map(_boom, [0, 1, 2, 3]), key=lambda o: o.index)
    assert [o.value for o in outs] == [0, 10, None, 30]
    assert outs[2].error == "two is bad" and outs[2].error_type == "ValueError" and not outs[2].ok
    with pytest.raises(ConfigError):
        get_engine("spark")


@pytest.fixture(scope="module")
def scan_dir(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("scan")
    for name in ("base", "derived", "bf16", "unrelated", "gpt2_base", "gpt2_derived", "gpt2_unrelated"):
        os.symlink(tiny_models[name], root / name)
    (root / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    return root


EXPECTED_LINKS = {("base", "bf16"), ("base", "derived"), ("bf16", "derived"), ("gpt2_base", "gpt2_derived")}


def _check(res) -> None:
    assert {(p.a, p.b) for p in res.pairs} == EXPECTED_LINKS
    bad = [m for m in res.models if not m.ok]
    assert [m.label for m in bad] == ["broken.safetensors"] and "HeaderError" in (bad[0].error or "")
    fams = {frozenset(f) for f in res.tree.families}
    assert frozenset({"base", "bf16", "derived"}) in fams and frozenset({"gpt2_base", "gpt2_derived"}) in fams
    assert frozenset({"unrelated"}) in fams and frozenset({"gpt2_unrelated"}) in fams


def test_scan_links_planted_families_and_caches_fingerprints(scan_dir: Path, tmp_path: Path) -> None:
    opts = ScanOptions(cache_dir=str(tmp_path / "fp"), workers=2)
    first = scan([str(scan_dir)], opts)
    _check(first)
    assert first.n_compared == 21 and first.alpha == pytest.approx(1e-3 / 21)
    assert not any(m.cached for m in first.models)
    again = scan([str(scan_dir)], opts)
    assert all(m.cached for m in again.models if m.ok)
    _check(again)
    d = json.loads(json.dumps(first.to_dict()))
    assert d["schema"] == "lineage.scan/2" and len(d["models"]) == 8


def test_scan_confirm_types_and_orients_the_links(scan_dir: Path, tmp_path: Path) -> None:
    res = scan([str(scan_dir)], ScanOptions(cache_dir=str(tmp_path / "fp"), workers=2, confirm=True))
    by = {(p.a, p.b): p for p in res.pairs}
    assert all(p.method == "weights" for p in res.pairs)
    assert by[("base", "bf16")].relation == "re-encoded copy"
    # every planted derivative hangs under its own parent, by a directed edge of the planted type
    edges = {(e.parent, e.child): e for e in res.tree.edges}
    assert set(edges) == {("base", "bf16"), ("base", "derived"), ("gpt2_base", "gpt2_derived")}
    assert all(e.directed for e in edges.values())
    assert edges[("base", "derived")].relation == edges[("gpt2_base", "gpt2_derived")].relation == "fine-tune"
    assert by[("base", "derived")].parent == "base" and by[("gpt2_base", "gpt2_derived")].parent == "gpt2_base"
    assert res.tree.parent_of("unrelated") is None and res.tree.parent_of("gpt2_unrelated") is None


def test_scan_on_a_dask_cluster_gives_the_same_links(scan_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("dask.distributed", reason="dask.distributed not installed (pip install 'weight-lineage[scale]')")
    res = scan([str(scan_dir)], ScanOptions(engine="dask", workers=2, cache_dir=str(tmp_path / "fp")))
    assert res.engine == "dask"
    _check(res)
    # fingerprints made and candidates tested on two worker processes equal the local engine's, bit for bit
    local = scan([str(scan_dir)], ScanOptions(workers=2, cache_dir=str(tmp_path / "fp-local")))
    assert res.n_tested == local.n_tested > 0 and not any(m.cached for m in res.models)
    assert [(m.label, m.fingerprint) for m in res.models] == [(m.label, m.fingerprint) for m in local.models]
    assert [(p.a, p.b, p.log10_p) for p in res.pairs] == [(p.a, p.b, p.log10_p) for p in local.pairs]
    assert [c.to_dict() for c in res.claims] == [c.to_dict() for c in local.claims]


def test_scan_cli_json_and_bad_source(scan_dir: Path, tmp_path: Path, capsys) -> None:
    from lineage.cli import main

    with pytest.raises(SystemExit) as e:
        main(["scan", str(scan_dir), "--json", "--no-progress", "--cache-dir", str(tmp_path / "fp")])
    failed = json.loads(capsys.readouterr().out)
    # a model that failed makes the scan exit 3, unless --keep-going
    assert e.value.code == (3 if any(not m["ok"] for m in failed["models"]) else 0)
    with pytest.raises(SystemExit) as e:
        main(["scan", str(scan_dir), "--json", "--no-progress", "--keep-going", "--cache-dir", str(tmp_path / "fp")])
    assert e.value.code == 0
    d = json.loads(capsys.readouterr().out)
    assert d["schema"] == "lineage.scan/2" and d["version"]
    assert {(p["a"], p["b"]) for p in d["pairs"]} == EXPECTED_LINKS
    with pytest.raises(SystemExit) as e:
        main(["scan", str(tmp_path / "nothing-here"), "--no-progress"])
    assert e.value.code == 2
    assert "not a file, folder" in capsys.readouterr().err


def test_scan_hub_organisation_over_http(tiny_models: dict[str, Path], tmp_path: Path, monkeypatch) -> None:
    import shutil

    from lineage.io.discover import discover_hub_org
    from lineage.testing.hubserver import HubServer

    root = tmp_path / "hub"
    for name in ("base", "derived", "unrelated"):
        shutil.copytree(tiny_models[name], root / "acme" / name)
    shutil.copytree(tiny_models["gpt2_base"], root / "other" / "gpt2")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    for v in ("HF_TOKEN", "LINEAGE_HUB_DOWNLOAD", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(v, raising=False)
    with HubServer(root) as srv:
        monkeypatch.setenv("HF_ENDPOINT", srv.endpoint)
        assert [e.ref for e in discover_hub_org("acme")] == ["acme/base", "acme/derived", "acme/unrelated"]
        res = scan(["org:acme"], ScanOptions(cache_dir=str(tmp_path / "fp"), workers=2))
    assert {(p.a, p.b) for p in res.pairs} == {("acme/base", "acme/derived")}
    assert all(m.ok and m.origin == "hub" for m in res.models)
    # read by HTTP ranges: each model's fingerprint read only part of its weights
    assert all(m.bytes_read is not None and 0 < m.bytes_read < m.total_bytes for m in res.models)


def test_scan_cost_grows_as_n_k_and_a_rescan_tests_only_new_pairs(scan_dir: Path, tmp_path: Path) -> None:
    import sqlite3

    from lineage.io.discover import discover_folder

    entries = [e for e in discover_folder(scan_dir) if e.label != "broken.safetensors"]
    opts = ScanOptions(cache_dir=str(tmp_path / "fp"), workers=2, k=2, k_max=2)
    first = scan(entries[:4], opts)
    assert first.n_compared <= 4 * 2 and first.n_tested == first.n_compared
    db = tmp_path / "fp" / "registry.sqlite"
    with sqlite3.connect(db) as c:
        before = set(c.execute("SELECT a, b FROM pairs").fetchall())
    grown = scan(entries, opts)  # three more models
    assert grown.n_compared <= 7 * 2 and grown.n_tested <= 3 * 2 + 4 * 2
    with sqlite3.connect(db) as c:
        new = set(c.execute("SELECT a, b FROM pairs").fetchall()) - before
    old = {m.fingerprint for m in first.models}
    assert len(new) == grown.n_tested and all(not (a in old and b in old) for a, b in new)
    assert all(m.cached == (m.fingerprint in old) for m in grown.models)
    assert {(p.a, p.b) for p in grown.pairs} == EXPECTED_LINKS
