"""The canonical test's gate (--canon auto): skipped only when there is nothing to undo, run on partial disguises."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import torch

from lineage.canon.gate import MIN_PEARSON, CanonDecision, Structure, decide_canon
from lineage.compare import CompareOptions, compare
from lineage.errors import ConfigError
from lineage.report import JSON_SCHEMA
from lineage.testing.models import TinyConfig, init_weights, llama_layer_names, save_model
from lineage.verdict import MatrixEvidence, decide

LLAMA = TinyConfig(family="llama", vocab=256, hidden=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate=128)
SAME = Structure(2, 2, 64, 64, 0)


def _noisy(w: dict[str, torch.Tensor], rel: float, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: v + rel * v.std() * torch.randn(v.shape, generator=g) if v.ndim == 2 else v.clone()
            for k, v in w.items()}


def _ev(pearsons: dict[str, float], n: int = 512) -> list[MatrixEvidence]:
    return [MatrixEvidence(role, n, n, r, (2 * (1 - r)) ** 0.5, False) for role, r in pearsons.items()]


def _layers(r: float, n_layers: int = 4) -> dict[str, float]:
    return {f"L{i}.{k}.weight": r for i in range(n_layers) for k in ("attn.q", "attn.o", "mlp.up", "mlp.down")}


# --------------------------------------------------------------------------- the decision (pure)

def test_even_overwhelming_evidence_skips_and_says_why() -> None:
    ev = _ev(_layers(0.9999))
    d = decide_canon("auto", decide(ev), ev, SAME)
    assert d == CanonDecision(False, "auto", d.reason) and "nothing to undo" in d.reason
    assert decide_canon("always", decide(ev), ev, SAME).ran
    assert not decide_canon("never", decide(ev), ev, SAME).ran


@pytest.mark.parametrize("role, r, words", [
    ("L2.mlp.up.weight", 0.01, "look unrelated"),          # one layer's neurons permuted
    ("L1.attn.q.weight", 0.94, "below"),                    # a few heads of 32 permuted
    ("L3.mlp.down.weight", 0.996, "depart from the others"),  # two neurons of 512 moved: only an outlier
])
def test_one_odd_module_runs_the_test(role: str, r: float, words: str) -> None:
    p = _layers(0.99995)
    p[role] = r
    ev = _ev(p)
    d = decide_canon("auto", decide(ev), ev, SAME)
    assert d.ran and words in d.reason and role in d.reason


def test_structure_and_verdict_run_the_test() -> None:
    ev = _ev(_layers(0.9999))
    v = decide(ev)
    assert decide_canon("auto", v, ev, Structure(4, 3, 64, 64, 0)).ran
    assert decide_canon("auto", v, ev, Structure(4, 4, 64, 48, 0)).ran
    assert decide_canon("auto", v, ev, Structure(4, 4, 64, 64, 2)).ran
    unrelated = _ev(_layers(0.001))
    assert decide_canon("auto", decide(unrelated), unrelated, SAME).ran
    # a uniformly moderate correlation (a long fine-tune, or a disguise of every layer) runs it too
    mid = _ev(_layers(MIN_PEARSON - 0.02))
    assert decide_canon("auto", decide(mid), mid, SAME).ran
    with pytest.raises(ValueError):
        decide_canon("sometimes", v, ev, SAME)
    with pytest.raises(ConfigError):
        CompareOptions(canon="sometimes")


# --------------------------------------------------------------------------- planted pairs, end to end

@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, torch.Tensor], Path]:
    w = init_weights(LLAMA, seed=21)
    return w, save_model(tmp_path_factory.mktemp("gate") / "base", LLAMA, w)


def _swap_heads(w: dict[str, torch.Tensor], layer: int, h1: int, h2: int) -> dict[str, torch.Tensor]:
    """Swap two q heads of one kv group in one layer (q rows and o columns): function-preserving."""
    out = dict(w)
    n, hd = llama_layer_names(layer), LLAMA.head_dim
    order = list(range(LLAMA.n_heads))
    order[h1], order[h2] = order[h2], order[h1]
    rows = torch.tensor([h * hd + j for h in order for j in range(hd)])
    out[n["q"]], out[n["o"]] = w[n["q"]][rows], w[n["o"]][:, rows]
    return out


def _permute_mlp(w: dict[str, torch.Tensor], layer: int, seed: int) -> dict[str, torch.Tensor]:
    """Permute one layer's MLP neurons (gate and up rows, down columns): function-preserving."""
    out = dict(w)
    n = llama_layer_names(layer)
    perm = torch.randperm(LLAMA.intermediate, generator=torch.Generator().manual_seed(seed))
    out[n["gate"]], out[n["up"]], out[n["down"]] = w[n["gate"]][perm], w[n["up"]][perm], w[n["down"]][:, perm]
    return out


def test_noise_child_skips_the_test_and_reports_what_always_reports(base, tmp_path: Path) -> None:
    w, pa = base
    pb = save_model(tmp_path / "noisy", LLAMA, _noisy(w, 0.01, 3))
    auto, always = compare(pa, pb), compare(pa, pb, options=CompareOptions(canon="always"))
    assert auto.canon_gate is not None and not auto.canon_gate.ran and auto.canon is None
    assert any(f.message.startswith("canonical test skipped: nothing to undo") for f in auto.findings)
    assert always.canon_gate is not None and always.canon_gate.ran and always.canon is not None
    # everything the report says is kept: relation, anatomy (type, direction), verdict
    assert auto.verdict.derived is True and auto.verdict.relation == always.verdict.relation
    assert auto.anatomy is not None and always.anatomy is not None
    assert auto.anatomy["relation"] == always.anatomy["relation"] and auto.anatomy["parent"] == always.anatomy["parent"]
    assert "canon_s" not in auto.timing and "canon_s" in always.timing
    doc = json.loads(auto.to_json())
    jsonschema.validate(doc, JSON_SCHEMA)
    assert doc["canon_gate"]["ran"] is False and doc["canon_gate"]["mode"] == "auto"
    never = compare(pa, pb, options=CompareOptions(canonicalise=False))
    assert never.canon_gate is not None and never.canon_gate.mode == "never" and never.anatomy is None


@pytest.mark.parametrize("planted", ["one layer's MLP neurons", "two heads of one layer"])
def test_partial_disguise_runs_the_test_and_is_named_disguised(base, tmp_path: Path, planted: str) -> None:
    w, pa = base
    noisy = _noisy(w, 0.01, 4)
    child = _permute_mlp(noisy, 1, seed=5) if planted.startswith("one") else _swap_heads(noisy, 1, 0, 1)
    pb = save_model(tmp_path / "partial", LLAMA, child)
    r = compare(pa, pb)
    assert r.canon_gate is not None and r.canon_gate.ran, r.canon_gate
    assert "L1." in r.canon_gate.reason
    assert r.verdict.derived is True and r.verdict.relation.endswith("(disguised)"), r.verdict.relation
