"""The scan's store (the registry) is verified on load: damaged entries are recomputed and reported once.

Issue 15, "Scan cache": a truncated, empty, random or swapped fingerprint, a swapped record, a
record whose fingerprint is missing, and a moved cache (and moved models) — each re-scan equals
the clean scan, says what it recomputed, and the next scan recomputes nothing.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from lineage.scan import ScanOptions, ScanResult, render_text, scan

NAMES = ("base", "derived", "bf16", "unrelated", "gpt2_base", "gpt2_derived")


@pytest.fixture(scope="module")
def models(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cache-models")
    for n in NAMES:
        shutil.copytree(tiny_models[n], root / n)
    return root


def _shape(res: ScanResult) -> tuple:
    return ({(p.a, p.b, round(p.log10_p, 6)) for p in res.pairs}, {frozenset(f) for f in res.tree.families},
            {(c.model, c.status) for c in res.claims})


@pytest.fixture(scope="module")
def clean(models: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, tuple]:
    cache = tmp_path_factory.mktemp("clean-cache")
    res = scan([str(models)], ScanOptions(cache_dir=str(cache), workers=2))
    assert {(p.a, p.b) for p in res.pairs} == {("base", "bf16"), ("base", "derived"), ("bf16", "derived"),
                                              ("gpt2_base", "gpt2_derived")}
    return cache, _shape(res)


def _fp(db: Path, label: str) -> str:
    with sqlite3.connect(db) as c:
        return c.execute("SELECT fp_hash FROM models WHERE label = ?", (label,)).fetchone()[0]


def _users(db: Path, *hashes: str) -> set[str]:
    """Labels of the models whose fingerprint is one of ``hashes`` (identical models share one)."""
    with sqlite3.connect(db) as c:
        return {r[0] for h in hashes for r in c.execute("SELECT label FROM models WHERE fp_hash = ?", (h,))}


def _sql(db: Path, q: str, args: tuple = ()) -> None:
    with sqlite3.connect(db) as c:
        c.execute(q, args)


def _truncate(db: Path) -> set[str]:
    _sql(db, "UPDATE blobs SET data = substr(data, 1, 1000) WHERE hash = ?", (_fp(db, "base"),))
    return _users(db, _fp(db, "base"))


def _empty(db: Path) -> set[str]:
    _sql(db, "UPDATE blobs SET data = X'' WHERE hash = ?", (_fp(db, "derived"),))
    return _users(db, _fp(db, "derived"))


def _random(db: Path) -> set[str]:
    _sql(db, "UPDATE blobs SET data = randomblob(5000) WHERE hash = ?", (_fp(db, "gpt2_base"),))
    return _users(db, _fp(db, "gpt2_base"))


def _swap_blobs(db: Path) -> set[str]:
    a, b = _fp(db, "derived"), _fp(db, "unrelated")
    with sqlite3.connect(db) as c:
        da = c.execute("SELECT data FROM blobs WHERE hash = ?", (a,)).fetchone()[0]
        db_ = c.execute("SELECT data FROM blobs WHERE hash = ?", (b,)).fetchone()[0]
        c.execute("UPDATE blobs SET data = ? WHERE hash = ?", (db_, a))
        c.execute("UPDATE blobs SET data = ? WHERE hash = ?", (da, b))
    return _users(db, a, b)


def _swap_records(db: Path) -> set[str]:
    a, b = _fp(db, "derived"), _fp(db, "gpt2_derived")
    _sql(db, "UPDATE models SET fp_hash = CASE label WHEN 'derived' THEN ? ELSE ? END "
             "WHERE label IN ('derived', 'gpt2_derived')", (b, a))
    return {"derived", "gpt2_derived"}


def _missing(db: Path) -> set[str]:
    users = _users(db, _fp(db, "unrelated"))
    _sql(db, "DELETE FROM blobs WHERE hash = ?", (_fp(db, "unrelated"),))
    return users


@pytest.mark.parametrize("damage", [_truncate, _empty, _random, _swap_blobs, _swap_records, _missing],
                         ids=lambda f: f.__name__.strip("_"))
def test_damaged_entries_are_recomputed_and_reported_once(damage: Callable[[Path], set[str]], models: Path,
                                                          clean: tuple[Path, tuple], tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(clean[0], cache)
    expected = damage(cache / "registry.sqlite")
    opts = ScanOptions(cache_dir=str(cache), workers=2)
    again = scan([str(models)], opts)
    assert {m.label for m in again.recomputed} == expected
    assert _shape(again) == clean[1]
    assert all(f"recomputed: {x}" in render_text(again) for x in expected)
    third = scan([str(models)], opts)
    assert not third.recomputed and all(m.cached for m in third.models) and third.n_tested == 0
    assert _shape(third) == clean[1]


def test_a_moved_cache_and_moved_models_are_reused(models: Path, clean: tuple[Path, tuple], tmp_path: Path) -> None:
    cache = tmp_path / "elsewhere" / "cache"
    shutil.copytree(clean[0], cache)                 # the cache moved (or shared with another machine) ...
    moved = tmp_path / "moved-models"
    shutil.copytree(models, moved)                   # ... and the models too: new paths, new mtimes
    os.utime(moved / "base" / "model.safetensors", (1, 1))
    res = scan([str(moved)], ScanOptions(cache_dir=str(cache), workers=2))
    assert all(m.cached for m in res.models) and not res.recomputed and res.n_tested == 0
    assert _shape(res) == clean[1]
    # a changed model is a new entry, not a stale one
    p = moved / "unrelated" / "model.safetensors"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x40
    p.write_bytes(bytes(data))
    res2 = scan([str(moved)], ScanOptions(cache_dir=str(cache), workers=2))
    assert [m.label for m in res2.models if not m.cached] == ["unrelated"]
