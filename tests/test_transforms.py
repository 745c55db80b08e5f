"""Function-preserving disguises keep the logits; derivations change weights as specified."""

from __future__ import annotations

import pytest
import torch

from lineage.testing import derive as D
from lineage.testing import transforms as T
from lineage.testing.models import (
    TinyConfig,
    forward,
    gpt2_layer_names,
    init_weights,
    llama_layer_names,
    save_model,
    load_model,
    to_dtype,
)

CONFIGS = {
    "llama": TinyConfig(family="llama", vocab=97, hidden=32, n_layers=2, n_heads=4, n_kv_heads=2, intermediate=48, max_pos=32),
    "llama-tied": TinyConfig(family="llama", vocab=97, hidden=32, n_layers=2, n_heads=4, n_kv_heads=2, intermediate=48,
                             max_pos=32, tie_embeddings=True),
    "llama-mha": TinyConfig(family="llama", vocab=97, hidden=32, n_layers=2, n_heads=4, n_kv_heads=4, intermediate=48, max_pos=32),
    "gpt2": TinyConfig(family="gpt2", vocab=97, hidden=32, n_layers=2, n_heads=4, n_kv_heads=4, intermediate=64, max_pos=32,
                       tie_embeddings=True),
    "gpt2-untied": TinyConfig(family="gpt2", vocab=97, hidden=32, n_layers=2, n_heads=4, n_kv_heads=4, intermediate=64,
                              max_pos=32, tie_embeddings=False),
}


def _trained_like(cfg: TinyConfig, seed: int = 1) -> dict[str, torch.Tensor]:
    """float64 weights with non-trivial gains/biases and large enough scale that
    every nonlinearity (softmax, SiLU/GELU, norm) is far from linear."""
    w = init_weights(cfg, seed)
    g = torch.Generator().manual_seed(seed + 100)
    out = {}
    for k, v in w.items():
        if v.dim() == 1:
            base = 1.0 if k.endswith("weight") else 0.0
            out[k] = base + 0.5 * torch.randn(v.shape, generator=g)
        else:
            out[k] = v * 10.0
    return to_dtype(out, torch.float64)


def _ids(cfg: TinyConfig) -> torch.Tensor:
    return torch.randint(0, cfg.vocab, (3, 24), generator=torch.Generator().manual_seed(7))


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


CASES = [(c, d) for c in CONFIGS for d in T.disguises_for(CONFIGS[c].family) + ["combine"]]


@pytest.mark.parametrize("cfg_name,disguise", CASES)
def test_disguise_preserves_logits_and_changes_weights(cfg_name: str, disguise: str) -> None:
    cfg = CONFIGS[cfg_name]
    w = _trained_like(cfg)
    ids = _ids(cfg)
    ref = forward(cfg, w, ids)
    if disguise == "combine":
        w2, info = T.combine(cfg, w, seed=11)
    else:
        w2, info = T.apply(disguise, cfg, w, seed=11)
    cfg2 = T.config_after(cfg, info)
    assert _rel_err(forward(cfg2, w2, ids), ref) < 1e-10
    # the disguise really changed the weights (a no-op would pass the first check)
    changed = [k for k in w if k in w2 and w2[k].shape == w[k].shape and not torch.allclose(w2[k], w[k])]
    assert len(changed) >= cfg.n_layers
    assert info["transform"] == disguise


def test_disguises_are_seeded() -> None:
    cfg = CONFIGS["llama"]
    w = _trained_like(cfg)
    a, _ = T.combine(cfg, w, seed=5)
    b, _ = T.combine(cfg, w, seed=5)
    c, _ = T.combine(cfg, w, seed=6)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.allclose(a[k], c[k]) for k in a)


def test_forward_detects_broken_symmetries() -> None:
    """Negative controls: the logits check is sharp enough to catch a transform that
    is *not* a symmetry (a rotation through LayerNorm, a scaled SwiGLU gate)."""
    cfg = CONFIGS["gpt2"]
    w = _trained_like(cfg)
    ids = _ids(cfg)
    ref = forward(cfg, w, ids)
    R = T._rand_orthogonal(cfg.hidden, torch.Generator().manual_seed(0))
    bad = dict(w)
    T._apply_residual(cfg, bad, R, torch.eye(cfg.hidden, dtype=torch.float64))
    assert _rel_err(forward(cfg, bad, ids), ref) > 1e-3
    with pytest.raises(ValueError):
        T.residual_rotation(cfg, w, 0)

    cfg = CONFIGS["llama"]
    w = _trained_like(cfg)
    ref = forward(cfg, w, ids)
    n = llama_layer_names(0)
    bad = dict(w)
    bad[n["gate"]] = w[n["gate"]] * 2.0
    bad[n["down"]] = w[n["down"]] / 2.0
    assert _rel_err(forward(cfg, bad, ids), ref) > 1e-3


def test_rotation_folds_gains_and_unties() -> None:
    cfg = CONFIGS["llama-tied"]
    w = _trained_like(cfg)
    w2, info = T.residual_rotation(cfg, w, 1)
    cfg2 = T.config_after(cfg, info)
    assert not cfg2.tie_embeddings and "lm_head.weight" in w2
    assert torch.allclose(w2["model.norm.weight"], torch.ones(cfg.hidden, dtype=torch.float64))
    # the rotation preserves the Gram matrix of the embedding rows, not the rows
    E, E2 = w["model.embed_tokens.weight"], w2["model.embed_tokens.weight"]
    assert torch.allclose(E @ E.T, E2 @ E2.T, atol=1e-9)
    assert not torch.allclose(E, E2)


def test_fold_norms_preserves_logits() -> None:
    for name in ("llama", "gpt2"):
        cfg = CONFIGS[name]
        w = _trained_like(cfg)
        ids = _ids(cfg)
        w2, cfg2 = T.fold_norms(cfg, w)
        assert _rel_err(forward(cfg2, w2, ids), forward(cfg, w, ids)) < 1e-10


# --------------------------------------------------------------------------- non-preserving

def test_noise_level() -> None:
    cfg = CONFIGS["llama"]
    w = _trained_like(cfg)
    w2, info = D.add_noise(w, 0.1, seed=0)
    k = llama_layer_names(0)["up"]
    rel = ((w2[k] - w[k]).std() / w[k].std()).item()
    assert 0.08 < rel < 0.12
    assert torch.equal(w2[llama_layer_names(0)["norm_attn"]], w[llama_layer_names(0)["norm_attn"]])
    assert info["tensors"] == sum(v.dim() == 2 for v in w.values())


def test_int8_on_grid() -> None:
    cfg = CONFIGS["gpt2"]
    w = _trained_like(cfg)
    w2, info = D.quantise_int8_per_row(w)
    for k, s in info["scales"].items():
        lin = D.as_linear(k, w2[k])
        q = lin / s.double()[:, None]
        assert torch.allclose(q, q.round(), atol=1e-3), k
        assert q.abs().max() <= 127.01
        err = (lin - D.as_linear(k, w[k])).abs()
        assert (err <= s.double()[:, None] / 2 * 1.001).all()
    assert "transformer.wpe.weight" not in info["scales"]
    assert not torch.equal(w2["transformer.wte.weight"], w["transformer.wte.weight"])


def test_int4_on_grid() -> None:
    cfg = CONFIGS["llama"]
    w = _trained_like(cfg)
    w2, info = D.quantise_int4_per_group(w, group_size=16)
    k = llama_layer_names(1)["down"]
    d = info["scales"][k].double()
    q = w2[k].reshape(d.shape[0], d.shape[1], 16) / d[..., None]
    assert torch.allclose(q, q.round(), atol=1e-3)
    assert q.min() >= -8.001 and q.max() <= 7.001
    assert len(torch.unique(q.round())) > 8


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_lora_merge_rank_and_adapter(family: str) -> None:
    cfg = CONFIGS[family]
    w = _trained_like(cfg)
    modules = ["q_proj", "down_proj"] if family == "llama" else ["c_attn", "c_fc"]
    w2, info = D.lora_merge(w, rank=3, modules=modules, seed=0, scale=0.05)
    assert len(info["modules"]) == 2 * cfg.n_layers
    for k in w:
        delta = D.as_linear(k, w2[k] - w[k])
        if k in info["modules"]:
            s = torch.linalg.svdvals(delta)
            assert (s[:3] > 1e-6 * s[0]).all() and (s[3:] < 1e-5 * s[0]).all(), k
            rel = (delta.norm() / w[k].norm()).item()
            assert abs(rel - 0.05) < 1e-3
            mod = k[: -len(".weight")]
            A = info["adapter"][f"base_model.model.{mod}.lora_A.weight"].double()
            B = info["adapter"][f"base_model.model.{mod}.lora_B.weight"].double()
            assert A.shape[0] == 3 and B.shape[1] == 3
            assert torch.allclose(B @ A, delta, atol=1e-5)
        else:
            assert torch.equal(w2[k], w[k])


def test_layer_changes() -> None:
    cfg = CONFIGS["llama"].with_(n_layers=4)
    w = init_weights(cfg, 0)
    c2, w2, info = D.drop_layers(cfg, w, [1])
    assert c2.n_layers == 3 and info["layer_map"] == [0, 2, 3]
    assert torch.equal(w2[llama_layer_names(1)["q"]], w[llama_layer_names(2)["q"]])
    c3, w3, info = D.duplicate_layers(cfg, w, [0, 1, 1, 2, 3])
    assert c3.n_layers == 5
    assert torch.equal(w3[llama_layer_names(2)["up"]], w[llama_layer_names(1)["up"]])
    assert forward(c3, w3, _ids(cfg)).shape[-1] == cfg.vocab


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_prune_width_keeps_selected_neurons(family: str) -> None:
    cfg = CONFIGS[family]
    w = _trained_like(cfg)
    c2, w2, info = D.prune_mlp_width(cfg, w, keep=20)
    assert c2.intermediate == 20
    kept = info["kept"][0]
    if family == "llama":
        n = llama_layer_names(0)
        assert torch.equal(w2[n["up"]], w[n["up"]][kept])
    else:
        n = gpt2_layer_names(0)
        assert torch.equal(w2[n["fc_w"]], w[n["fc_w"]][:, kept])
    forward(c2, w2, _ids(cfg))


def test_vocab_changes(tmp_path) -> None:
    cfg = CONFIGS["llama"]
    w = _trained_like(cfg)
    E = w["model.embed_tokens.weight"]
    c2, w2, _ = D.extend_vocab(cfg, w, 10, seed=0)
    assert c2.vocab == cfg.vocab + 10 and torch.equal(w2["model.embed_tokens.weight"][: cfg.vocab], E)
    c3, w3, info = D.reorder_vocab(cfg, w, seed=0)
    perm = info["perm"]
    assert torch.equal(w3["lm_head.weight"], w["lm_head.weight"][perm])
    c4, w4, _ = D.prune_vocab(cfg, w, list(range(0, cfg.vocab, 2)))
    assert w4["model.embed_tokens.weight"].shape[0] == (cfg.vocab + 1) // 2
    save_model(tmp_path / "m", c2, w2)
    cfg_back, w_back = load_model(tmp_path / "m")
    assert cfg_back == c2 and torch.equal(w_back["model.embed_tokens.weight"], w2["model.embed_tokens.weight"].float())


def test_merges() -> None:
    cfg = CONFIGS["gpt2"]
    base = init_weights(cfg, 0)
    a, _ = D.add_noise(base, 0.2, seed=1)
    b, _ = D.add_noise(base, 0.2, seed=2)
    m, info = D.merge_linear([a, b], [0.3, 0.7])
    k = gpt2_layer_names(0)["fc_w"]
    assert torch.allclose(m[k], 0.3 * a[k] + 0.7 * b[k], atol=1e-6)
    s, _ = D.merge_slerp(a, b, 0.0)
    assert torch.allclose(s[k], a[k], atol=1e-6)
    s, _ = D.merge_slerp(a, b, 0.5)
    assert not torch.allclose(s[k], a[k]) and not torch.allclose(s[k], 0.5 * (a[k] + b[k]), atol=1e-7)
    t, info = D.merge_ties(base, [a, b], [1.0, 1.0], density=0.3)
    tau = t[k] - base[k]
    frac_zero = (tau == 0).float().mean().item()
    assert 0.3 < frac_zero < 0.75  # trimmed entries and sign conflicts are dropped
