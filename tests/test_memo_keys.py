"""The memo-key contract: what the anatomy's first pass remembers, the signals' later passes find.

A key built differently by the writer (lineage.anatomy) and a reader (signals.lowrank.lowrank_modules,
signals.quantgrid.detect_modules) would recompute every module silently; here each exact signal must
run once per module over a whole explain() of a lazily read LoRA pair.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

import lineage.anatomy as anatomy
import lineage.signals.lowrank as lowrank_mod
import lineage.signals.quantgrid as quantgrid_mod
from lineage.anatomy import AlignedPair, explain
from lineage.lazyroles import LazyRoles
from lineage.signals.lowrank import LowRankConfig
from lineage.signals.memo import DETECT_ROWS, MemoKey, Signal, detect_key, lowrank_key, pair_stats_key


def _pair() -> tuple[LazyRoles, LazyRoles, list[str]]:
    g = torch.Generator().manual_seed(3)
    base = {f"L{i}.{k}.weight": torch.randn(48, 48, generator=g) / 7 for i in range(2) for k in ("q", "v", "o")}
    child = dict(base)
    for name in [n for n in base if ".q." in n or ".v." in n]:
        child[name] = base[name] + 0.02 * torch.randn(48, 2, generator=g) @ torch.randn(2, 48, generator=g)
    lazy = [LazyRoles(lambda r, d=d: d[r].clone(), {k: tuple(v.shape) for k, v in d.items()}) for d in (base, child)]
    return lazy[0], lazy[1], list(base)


def _counting(monkeypatch: pytest.MonkeyPatch, counts: Counter, name: str, *modules: object) -> None:
    real = getattr(modules[0], name)

    def wrapped(*args, **kwargs):
        counts[name] += 1
        return real(*args, **kwargs)

    for m in modules:
        monkeypatch.setattr(m, name, wrapped)


def test_each_exact_signal_runs_once_per_module(monkeypatch: pytest.MonkeyPatch) -> None:
    counts: Counter = Counter()
    _counting(monkeypatch, counts, "lowrank", lowrank_mod, anatomy)
    _counting(monkeypatch, counts, "detect_grid", quantgrid_mod, anatomy)
    a, b, roles = _pair()
    rel = explain(AlignedPair(a, b, p_value=1e-30))
    assert rel.relation == "lora merge" and rel.details["rank"] == 2
    # the first pass computes both signals for every module; the later passes find them remembered
    assert counts == {"lowrank": len(roles), "detect_grid": len(roles)}
    for r in roles:
        assert lowrank_key(b, r, LowRankConfig()) in a.memo and detect_key(b, r) in a.memo


def test_keys_are_typed_and_distinct() -> None:
    x, y = object(), object()
    k = lowrank_key(x, "L0.q.weight", LowRankConfig())
    assert k == MemoKey(Signal.LOWRANK, id(x), "L0.q.weight", LowRankConfig())
    assert k != lowrank_key(y, "L0.q.weight", LowRankConfig())
    assert k != lowrank_key(x, "L0.q.weight", LowRankConfig(k_max=64))
    assert detect_key(x, "r") == MemoKey(Signal.QUANTGRID, id(x), "r", DETECT_ROWS) != detect_key(x, "r", 64)
    assert len({k, detect_key(x, "L0.q.weight"), pair_stats_key(x, "L0.q.weight")}) == 3
