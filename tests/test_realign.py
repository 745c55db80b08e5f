"""Realignment: a disguised copy comes back as the same weights; a disguised fine-tune as a fine-tune."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lineage.compare import compare
from lineage.realign import ResidualOp
from lineage.testing.models import TinyConfig, init_weights, save_model
from lineage.testing.transforms import combine, config_after, disguises_for
from lineage.testing.transforms import apply as apply_disguise

LLAMA = TinyConfig(family="llama", vocab=256, hidden=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate=128)
GPT2 = TinyConfig(family="gpt2", vocab=256, hidden=64, n_layers=2, n_heads=4, n_kv_heads=4, intermediate=256)


def _noisy(w: dict[str, torch.Tensor], rel: float, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: v + rel * v.std() * torch.randn(v.shape, generator=g) if v.ndim == 2 else v.clone()
            for k, v in w.items()}


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[TinyConfig, dict[str, torch.Tensor], Path]]:
    root = tmp_path_factory.mktemp("realign")
    out = {}
    for cfg, seed in ((LLAMA, 11), (GPT2, 12)):
        w = init_weights(cfg, seed=seed)
        out[cfg.family] = (cfg, w, save_model(root / f"{cfg.family}-base", cfg, w))
    return out


@pytest.mark.parametrize("family, name", [(f, n) for f in ("llama", "gpt2") for n in disguises_for(f)])
def test_pure_disguise_is_an_identical_copy(bases, tmp_path: Path, family: str, name: str) -> None:
    cfg, w, base = bases[family]
    dw, info = apply_disguise(name, cfg, w, seed=5)
    child = save_model(tmp_path / name, config_after(cfg, info), dw)
    r = compare(base, child)
    assert r.verdict.derived is True and r.verdict.log10_p <= -10
    assert r.verdict.relation == "identical (disguised)", r.verdict.summary
    realigned = r.anatomy["details"]["realigned"]
    assert realigned["max_aligned_rel"] < 1e-4 < realigned["raw_rel"]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_disguised_update_keeps_its_type(bases, tmp_path: Path, family: str) -> None:
    cfg, w, base = bases[family]
    dw, info = combine(cfg, _noisy(w, 0.3, 3), seed=9)
    child = save_model(tmp_path / "ft-disguised", config_after(cfg, info), dw)
    r = compare(base, child)
    assert r.verdict.derived is True
    assert r.verdict.relation.endswith("(disguised)") and not r.verdict.relation.startswith("identical")
    # the realigned difference is the planted update (‖δ‖/‖W‖ = 0.3 per matrix), not the disguise
    assert 0.2 < r.anatomy["details"]["realigned"]["aligned_rel"] < 0.45


def test_undisguised_derivative_is_not_called_disguised(bases, tmp_path: Path) -> None:
    cfg, w, base = bases["llama"]
    child = save_model(tmp_path / "noisy", cfg, _noisy(w, 0.3, 4))
    r = compare(base, child)
    assert r.verdict.derived is True and "(disguised)" not in r.verdict.relation


def test_residual_op_matches_the_matrix() -> None:
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(8, generator=g)
    signs = torch.tensor([1.0, -1, 1, 1, -1, 1, -1, 1])
    M = torch.zeros(8, 8)
    M[perm, torch.arange(8)] = signs
    op = ResidualOp(M)
    assert op.rows is not None and not op.identity
    W, V = torch.randn(5, 8, generator=g), torch.randn(8, 3, generator=g)
    assert torch.allclose(op.inp(W), W @ M.T) and torch.allclose(op.out(V), M @ V)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g))
    rot = ResidualOp(q)
    assert rot.rows is None and torch.allclose(rot.inp(W), W @ q.T)
    assert ResidualOp(torch.eye(8)).identity


def test_realigned_anatomy_streams_through_a_spill(bases, tmp_path: Path, monkeypatch) -> None:
    """Above the in-memory size the realigned copy goes to a temporary folder and is read back
    module by module; the anatomy is the same as in memory."""
    import lineage.compare as C
    from lineage.lazyroles import RoleSpill

    cfg, w, base = bases["llama"]
    dw, info = combine(cfg, _noisy(w, 0.3, 3), seed=9)
    child = save_model(tmp_path / "ft-disguised", config_after(cfg, info), dw)
    in_memory = compare(base, child)
    written: list[int] = []
    orig_add = RoleSpill.add

    def add(self, role, t):
        orig_add(self, role, t)
        written.append(t.numel())

    monkeypatch.setattr(RoleSpill, "add", add)
    monkeypatch.setattr(C, "ANATOMY_MAX_BYTES", 0)
    spilled = compare(base, child)
    assert written, "the spill path was not taken"
    assert spilled.verdict.relation == in_memory.verdict.relation
    assert spilled.anatomy["relation"] == in_memory.anatomy["relation"]
    ra, rb = in_memory.anatomy["details"]["realigned"], spilled.anatomy["details"]["realigned"]
    assert abs(ra["aligned_rel"] - rb["aligned_rel"]) < 1e-9
