"""Shared fixtures: tiny checkpoints with planted relationships, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lineage.testing.models import TinyConfig, init_weights, save_model

# Tiny tensors: one intra-op thread is faster, and OpenMP spin-waits collapse when cores are shared.
torch.set_num_threads(1)


def _noisy(w: dict[str, torch.Tensor], rel: float, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: v + rel * v.std() * torch.randn(v.shape, generator=g) if v.ndim == 2 else v.clone() for k, v in w.items()}


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Folders: llama base, its noisy derivative, a bf16 copy, an unrelated llama, a gpt2 pair."""
    root = tmp_path_factory.mktemp("tiny")
    cfg = TinyConfig(family="llama", vocab=256, hidden=64, n_layers=3, n_heads=4, n_kv_heads=2, intermediate=128)
    base = init_weights(cfg, seed=1)
    out = {
        "base": save_model(root / "base", cfg, base),
        "derived": save_model(root / "derived", cfg, _noisy(base, 0.3, 7)),
        "bf16": save_model(root / "bf16", cfg, base, dtype=torch.bfloat16),
        "unrelated": save_model(root / "unrelated", cfg, init_weights(cfg, seed=2)),
    }
    g2 = TinyConfig(family="gpt2", vocab=256, hidden=64, n_layers=2, n_heads=4, n_kv_heads=4, intermediate=256)
    gb = init_weights(g2, seed=3)
    out["gpt2_base"] = save_model(root / "gpt2_base", g2, gb)
    out["gpt2_derived"] = save_model(root / "gpt2_derived", g2, _noisy(gb, 0.3, 8))
    out["gpt2_unrelated"] = save_model(root / "gpt2_unrelated", g2, init_weights(g2, seed=4))
    return out
