"""Roles across naming schemes, fused-tensor splits, reading and pairing (lineage.roles)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from lineage.errors import ShapeMismatchError
from lineage.io.checkpoint import open_checkpoint
from lineage.roles import (
    RoleView,
    assign_roles,
    is_generic,
    iter_role_blocks,
    layer_dict,
    pair_models,
    parse_role,
    read_role,
    role_key,
    role_kind,
    roles_for,
)

H, NH, HD, NKV, INTER, VOCAB = 8, 2, 4, 1, 12, 16


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rand(*shape: int, g: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=g)


# ---------------------------------------------------------------------------- shape builders


def llama_shapes(n_layers: int = 2, prefix: str = "model.", bias: bool = False,
                 lm_head: bool = True, inter: int = INTER) -> dict[str, tuple[int, ...]]:
    d: dict[str, tuple[int, ...]] = {f"{prefix}embed_tokens.weight": (VOCAB, H), f"{prefix}norm.weight": (H,)}
    for i in range(n_layers):
        p = f"{prefix}layers.{i}."
        d[p + "self_attn.q_proj.weight"] = (NH * HD, H)
        d[p + "self_attn.k_proj.weight"] = (NKV * HD, H)
        d[p + "self_attn.v_proj.weight"] = (NKV * HD, H)
        d[p + "self_attn.o_proj.weight"] = (H, NH * HD)
        if bias:
            d[p + "self_attn.q_proj.bias"] = (NH * HD,)
            d[p + "self_attn.k_proj.bias"] = (NKV * HD,)
            d[p + "self_attn.v_proj.bias"] = (NKV * HD,)
        d[p + "mlp.gate_proj.weight"] = (inter, H)
        d[p + "mlp.up_proj.weight"] = (inter, H)
        d[p + "mlp.down_proj.weight"] = (H, inter)
        d[p + "input_layernorm.weight"] = (H,)
        d[p + "post_attention_layernorm.weight"] = (H,)
        d[p + "self_attn.rotary_emb.inv_freq"] = (HD // 2,)
    if lm_head:
        d["lm_head.weight"] = (VOCAB, H)
    return d


LLAMA_CFG = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2,
    "hidden_size": H, "num_attention_heads": NH, "num_key_value_heads": NKV,
    "intermediate_size": INTER, "vocab_size": VOCAB, "tie_word_embeddings": False,
}


def gpt2_shapes(n_layers: int = 2, vocab: int = 20, prefix: str = "transformer.") -> dict[str, tuple[int, ...]]:
    d: dict[str, tuple[int, ...]] = {
        f"{prefix}wte.weight": (vocab, H), f"{prefix}wpe.weight": (32, H),
        f"{prefix}ln_f.weight": (H,), f"{prefix}ln_f.bias": (H,),
    }
    for i in range(n_layers):
        p = f"{prefix}h.{i}."
        d[p + "ln_1.weight"] = (H,)
        d[p + "ln_1.bias"] = (H,)
        d[p + "ln_2.weight"] = (H,)
        d[p + "ln_2.bias"] = (H,)
        d[p + "attn.c_attn.weight"] = (H, 3 * H)
        d[p + "attn.c_attn.bias"] = (3 * H,)
        d[p + "attn.c_proj.weight"] = (H, H)
        d[p + "attn.c_proj.bias"] = (H,)
        d[p + "mlp.c_fc.weight"] = (H, 4 * H)
        d[p + "mlp.c_fc.bias"] = (4 * H,)
        d[p + "mlp.c_proj.weight"] = (4 * H, H)
        d[p + "mlp.c_proj.bias"] = (H,)
        d[p + "attn.bias"] = (1, 1, 32, 32)
        d[p + "attn.masked_bias"] = ()
    return d


GPT2_CFG = {"model_type": "gpt2", "n_layer": 2, "n_embd": H, "n_head": NH, "vocab_size": 20, "n_positions": 32}


# ---------------------------------------------------------------------------- role keys


def test_role_key_helpers() -> None:
    assert role_key(3, "attn.q") == "L3.attn.q.weight"
    assert role_key(None, "embed") == "embed.weight"
    assert parse_role("L12.mlp.down.bias") == (12, "mlp.down.bias")
    assert parse_role("final_norm.weight") == (None, "final_norm.weight")
    assert role_kind("L0.norm.attn.weight") == "norm"
    assert role_kind("L0.attn.q_norm.weight") == "norm"
    assert role_kind("L0.attn.q.bias") == "bias"
    assert role_kind("embed.weight") == "embedding"
    assert role_kind("L0.mlp.up.weight") == "matrix"


# ---------------------------------------------------------------------------- Llama family


def test_llama_roles_from_config() -> None:
    rm = assign_roles(llama_shapes(), LLAMA_CFG)
    r = rm.roles
    assert r["embed.weight"].tensor == "model.embed_tokens.weight"
    assert r["final_norm.weight"].tensor == "model.norm.weight"
    assert r["lm_head.weight"].tensor == "lm_head.weight"
    assert r["L1.attn.q.weight"].tensor == "model.layers.1.self_attn.q_proj.weight"
    assert r["L0.attn.k.weight"].shape == (NKV * HD, H)
    assert r["L0.mlp.gate.weight"].tensor.endswith("mlp.gate_proj.weight")
    assert r["L0.norm.attn.weight"].tensor.endswith("input_layernorm.weight")
    # In Llama post_attention_layernorm is the pre-MLP norm.
    assert r["L0.norm.mlp.weight"].tensor.endswith("post_attention_layernorm.weight")
    assert "L0.norm.post_attn.weight" not in r
    assert all(v.is_plain for v in r.values())
    assert rm.unassigned == sorted(n for n in llama_shapes() if n.endswith("inv_freq"))
    a = rm.arch
    assert (a.family, a.n_layers, a.hidden, a.n_heads, a.n_kv_heads, a.head_dim) == ("llama", 2, H, NH, NKV, HD)
    assert (a.intermediate, a.vocab, a.norm, a.mlp, a.positional) == (INTER, VOCAB, "rms", "glu", "rope")
    assert a.tied_embeddings is False and a.architectures == ("LlamaForCausalLM",)
    assert a.source == "config+shapes"
    assert list(rm.roles)[0] == "embed.weight" and list(rm.roles)[-1] == "lm_head.weight"


def test_llama_without_config_infers_from_shapes() -> None:
    rm = assign_roles(llama_shapes(n_layers=3, prefix=""), None)
    a = rm.arch
    assert (a.family, a.n_layers, a.hidden, a.intermediate, a.vocab) == ("llama", 3, H, INTER, VOCAB)
    assert a.n_heads is None and a.head_dim is None
    assert any("head count unknown" in n for n in a.notes)
    assert a.source == "shapes"
    assert "L2.mlp.down.weight" in rm.roles


def test_qwen2_qkv_biases() -> None:
    rm = assign_roles(llama_shapes(bias=True), None)
    assert rm.arch.family == "qwen2" and rm.arch.qkv_bias
    assert rm.roles["L0.attn.q.bias"].shape == (NH * HD,)
    assert rm.roles["L1.attn.v.bias"].tensor == "model.layers.1.self_attn.v_proj.bias"


def _gemma2_shapes(prefix: str = "model.", qk_norm: bool = False) -> dict[str, tuple[int, ...]]:
    d = llama_shapes(prefix=prefix, lm_head=False)
    for i in range(2):
        p = f"{prefix}layers.{i}."
        d[p + "pre_feedforward_layernorm.weight"] = (H,)
        d[p + "post_feedforward_layernorm.weight"] = (H,)
        if qk_norm:
            d[p + "self_attn.q_norm.weight"] = (HD,)
            d[p + "self_attn.k_norm.weight"] = (HD,)
    return d


def test_gemma2_norms_and_tied_embeddings() -> None:
    rm = assign_roles(_gemma2_shapes(), {"model_type": "gemma2", "num_attention_heads": NH,
                                         "num_key_value_heads": NKV, "head_dim": HD})
    r = rm.roles
    # Gemma-2: post_attention_layernorm is the post-attention norm, pre_feedforward the pre-MLP one.
    assert r["L0.norm.post_attn.weight"].tensor == "model.layers.0.post_attention_layernorm.weight"
    assert r["L0.norm.mlp.weight"].tensor == "model.layers.0.pre_feedforward_layernorm.weight"
    assert r["L0.norm.post_mlp.weight"].tensor == "model.layers.0.post_feedforward_layernorm.weight"
    assert r["L0.norm.attn.weight"].tensor == "model.layers.0.input_layernorm.weight"
    assert "lm_head.weight" not in r
    assert rm.tied_embeddings and rm.arch.family == "gemma2"


def test_gemma3_multimodal_prefix_qk_norm_and_vision_unassigned() -> None:
    d = _gemma2_shapes(prefix="language_model.model.", qk_norm=True)
    d["vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight"] = (H, H)
    d["multi_modal_projector.mm_input_projection_weight"] = (H, H)
    rm = assign_roles(d, None)
    r = rm.roles
    assert r["L1.attn.q_norm.weight"].tensor == "language_model.model.layers.1.self_attn.q_norm.weight"
    assert r["L1.attn.k_norm.weight"].shape == (HD,)
    assert r["embed.weight"].tensor == "language_model.model.embed_tokens.weight"
    assert "vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight" in rm.unassigned
    assert "multi_modal_projector.mm_input_projection_weight" in rm.unassigned
    # q_norm gives head_dim, hence the head counts, without a config.
    a = rm.arch
    assert (a.family, a.head_dim, a.n_heads, a.n_kv_heads) == ("gemma3", HD, NH, NKV)


def test_gemma3_nested_text_config() -> None:
    cfg = {"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"],
           "text_config": {"model_type": "gemma3_text", "hidden_size": H, "num_attention_heads": NH,
                           "num_key_value_heads": NKV, "head_dim": HD, "num_hidden_layers": 2}}
    rm = assign_roles(_gemma2_shapes(prefix="model.language_model.", qk_norm=True), cfg)
    assert rm.arch.family == "gemma3" and rm.arch.n_heads == NH and rm.arch.model_type == "gemma3"
    assert "L0.norm.post_attn.weight" in rm.roles


def test_duplicate_role_is_unassigned_not_overwritten() -> None:
    d = llama_shapes()
    d["language_model.model.embed_tokens.weight"] = (VOCAB, H)
    rm = assign_roles(d, LLAMA_CFG)
    assert rm.roles["embed.weight"].tensor == "model.embed_tokens.weight"
    assert "language_model.model.embed_tokens.weight" in rm.unassigned


def test_hostile_config_values_are_ignored() -> None:
    cfg = {"model_type": 5, "num_hidden_layers": "many", "hidden_size": -3,
           "num_attention_heads": 2.5, "text_config": "x", "architectures": "no"}
    rm = assign_roles(llama_shapes(), cfg)
    assert rm.arch.hidden == H and rm.arch.n_heads is None and rm.arch.family == "llama"


def test_hostile_shapes_do_not_crash() -> None:
    d = {"h.0.attn.c_attn.weight": (), "layers.0.mlp.gate_up_proj.weight": (7, H),
         "layers.0.self_attn.qkv_proj.bias": (3, 3), "embed_tokens.weight": (VOCAB, H)}
    rm = assign_roles(d, [1, 2])  # type: ignore[arg-type]
    assert set(rm.unassigned) == {"h.0.attn.c_attn.weight", "layers.0.mlp.gate_up_proj.weight",
                                  "layers.0.self_attn.qkv_proj.bias"}
    assert list(rm.roles) == ["embed.weight"] and sum("left unassigned" in n for n in rm.notes) == 3
    kv = {"general.architecture": "llama", "llama.attention.head_count": 3}
    odd = assign_roles({"blk.0.attn_q.weight": (9, H)}, None, kv)
    assert odd.roles["L0.attn.q.weight"].is_plain and any("not undone" in n for n in odd.notes)


# ---------------------------------------------------------------------------- GPT-2


def test_gpt2_roles_transposed_and_split() -> None:
    rm = assign_roles(gpt2_shapes(), GPT2_CFG)
    r = rm.roles
    assert r["embed.weight"].shape == (20, H) and r["pos_embed.weight"].tensor == "transformer.wpe.weight"
    q = r["L0.attn.q.weight"]
    assert q.tensor == "transformer.h.0.attn.c_attn.weight" and q.transpose
    assert q.rows == ((0, H),) and q.shape == (H, H)
    assert r["L0.attn.v.weight"].rows == ((2 * H, 3 * H),)
    assert r["L0.attn.k.bias"].rows == ((H, 2 * H),) and not r["L0.attn.k.bias"].transpose
    assert r["L0.mlp.up.weight"].shape == (4 * H, H) and r["L0.mlp.up.weight"].transpose
    assert r["L0.mlp.down.weight"].shape == (H, 4 * H)
    assert not r["L0.mlp.up.bias"].transpose
    assert r["L1.norm.mlp.bias"].tensor == "transformer.h.1.ln_2.bias"
    assert "transformer.h.0.attn.bias" in rm.unassigned and "transformer.h.0.attn.masked_bias" in rm.unassigned
    assert "lm_head.weight" not in r and rm.tied_embeddings
    a = rm.arch
    assert (a.family, a.norm, a.mlp, a.positional, a.intermediate) == ("gpt2", "layer", "plain", "learned", 4 * H)


def test_gpt2_already_linear_layout_is_not_transposed() -> None:
    d = {"h.0.attn.c_attn.weight": (3 * H, H), "h.0.attn.c_proj.weight": (H, H),
         "h.0.mlp.c_fc.weight": (4 * H, H), "h.0.mlp.c_proj.weight": (H, 4 * H), "wte.weight": (20, H)}
    rm = assign_roles(d, None)
    assert not rm.roles["L0.attn.q.weight"].transpose
    assert rm.roles["L0.mlp.up.weight"].shape == (4 * H, H)


@pytest.fixture(scope="module")
def gpt2_file(tmp_path_factory: pytest.TempPathFactory):
    g = _gen(1)
    tensors = {n: _rand(*s, g=g) if s else torch.tensor(0.0) for n, s in gpt2_shapes(n_layers=1).items()}
    path = tmp_path_factory.mktemp("gpt2") / "model.safetensors"
    save_file(tensors, str(path))
    return path, tensors


def test_gpt2_read_role_transposes_conv1d(gpt2_file) -> None:
    path, t = gpt2_file
    with open_checkpoint(path) as ckpt:
        rm = roles_for(ckpt)
        assert rm.arch.n_heads is None  # no config.json next to the file
        w = t["transformer.h.0.attn.c_attn.weight"]
        assert torch.equal(read_role(ckpt, rm.roles["L0.attn.q.weight"]), w[:, :H].T)
        assert torch.equal(read_role(ckpt, rm.roles["L0.attn.k.weight"]), w[:, H:2 * H].T)
        assert torch.equal(read_role(ckpt, rm.roles["L0.attn.v.weight"]), w[:, 2 * H:].T)
        assert torch.equal(read_role(ckpt, rm.roles["L0.attn.v.bias"]), t["transformer.h.0.attn.c_attn.bias"][2 * H:])
        fc = read_role(ckpt, rm.roles["L0.mlp.up.weight"])
        assert fc.dtype == torch.float32 and fc.is_contiguous()
        assert torch.equal(fc, t["transformer.h.0.mlp.c_fc.weight"].T)
        assert torch.equal(read_role(ckpt, rm.roles["L0.attn.o.weight"]), t["transformer.h.0.attn.c_proj.weight"].T)


def test_gpt2_layer_dict_and_blocks(gpt2_file) -> None:
    path, t = gpt2_file
    with open_checkpoint(path) as ckpt:
        rm = roles_for(ckpt)
        ld = layer_dict(ckpt, rm, 0)
        assert set(ld) == {
            "attn.q.weight", "attn.k.weight", "attn.v.weight", "attn.q.bias", "attn.k.bias", "attn.v.bias",
            "attn.o.weight", "attn.o.bias", "mlp.up.weight", "mlp.up.bias", "mlp.down.weight", "mlp.down.bias",
            "norm.attn.weight", "norm.attn.bias", "norm.mlp.weight", "norm.mlp.bias",
        }
        for k, v in ld.items():
            assert torch.equal(v, read_role(ckpt, rm.roles[f"L0.{k}"])), k
        assert torch.equal(ld["attn.k.weight"], t["transformer.h.0.attn.c_attn.weight"][:, H:2 * H].T)
        # Transposed view: float32 blocks that concatenate to the canonical tensor.
        blocks = list(iter_role_blocks(ckpt, rm.roles["L0.mlp.up.weight"], block_elems=5 * H))
        assert [s for s, _ in blocks] == [0, 5, 10, 15, 20, 25, 30]
        assert torch.equal(torch.cat([b for _, b in blocks]), t["transformer.h.0.mlp.c_fc.weight"].T)


def test_read_role_rejects_stale_view(gpt2_file) -> None:
    path, _ = gpt2_file
    with open_checkpoint(path) as ckpt:
        bad = RoleView("transformer.wte.weight", (VOCAB + 1, H))
        with pytest.raises(ShapeMismatchError):
            read_role(ckpt, bad)


# ---------------------------------------------------------------------------- GPT-NeoX


def _neox_tensors(g: torch.Generator, n_layers: int = 1):
    planted: dict[str, torch.Tensor] = {}
    t: dict[str, torch.Tensor] = {"gpt_neox.embed_in.weight": _rand(VOCAB, H, g=g),
                                  "embed_out.weight": _rand(VOCAB, H, g=g),
                                  "gpt_neox.final_layer_norm.weight": _rand(H, g=g),
                                  "gpt_neox.final_layer_norm.bias": _rand(H, g=g)}
    for i in range(n_layers):
        p = f"gpt_neox.layers.{i}."
        q, k, v = (_rand(NH * HD, H, g=g) for _ in range(3))
        qb, kb, vb = (_rand(NH * HD, g=g) for _ in range(3))
        # (heads, 3, head_dim, hidden) interleaving, as GPT-NeoX stores it.
        t[p + "attention.query_key_value.weight"] = torch.stack(
            [x.view(NH, HD, H) for x in (q, k, v)], dim=1).reshape(3 * NH * HD, H).contiguous()
        t[p + "attention.query_key_value.bias"] = torch.stack(
            [x.view(NH, HD) for x in (qb, kb, vb)], dim=1).reshape(-1).contiguous()
        planted.update({f"L{i}.attn.q.weight": q, f"L{i}.attn.k.weight": k, f"L{i}.attn.v.weight": v,
                        f"L{i}.attn.q.bias": qb, f"L{i}.attn.k.bias": kb, f"L{i}.attn.v.bias": vb})
        t[p + "attention.dense.weight"] = _rand(H, NH * HD, g=g)
        t[p + "mlp.dense_h_to_4h.weight"] = _rand(4 * H, H, g=g)
        t[p + "mlp.dense_4h_to_h.weight"] = _rand(H, 4 * H, g=g)
        for n in ("input_layernorm", "post_attention_layernorm"):
            t[p + n + ".weight"] = _rand(H, g=g)
            t[p + n + ".bias"] = _rand(H, g=g)
        t[p + "attention.rotary_emb.inv_freq"] = _rand(HD // 2, g=g)
        t[p + "attention.bias"] = torch.ones(1, 1, 4, 4)
    return t, planted


NEOX_CFG = {"model_type": "gpt_neox", "num_attention_heads": NH, "hidden_size": H, "num_hidden_layers": 1}


def test_neox_fused_qkv_split_equals_planted(tmp_path) -> None:
    t, planted = _neox_tensors(_gen(2))
    t = {k: v.to(torch.bfloat16) for k, v in t.items()}
    save_file(t, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(__import__("json").dumps(NEOX_CFG))
    with open_checkpoint(tmp_path) as ckpt:
        rm = roles_for(ckpt)
        r = rm.roles
        assert rm.arch.family == "gpt_neox" and rm.arch.positional == "rope" and not rm.tied_embeddings
        assert r["embed.weight"].tensor == "gpt_neox.embed_in.weight"
        assert r["lm_head.weight"].tensor == "embed_out.weight"
        assert r["L0.norm.mlp.bias"].tensor == "gpt_neox.layers.0.post_attention_layernorm.bias"
        assert r["L0.attn.q.weight"].rows == ((0, HD), (3 * HD, 4 * HD))
        assert set(rm.unassigned) == {"gpt_neox.layers.0.attention.rotary_emb.inv_freq",
                                      "gpt_neox.layers.0.attention.bias"}
        for key, want in planted.items():
            got = read_role(ckpt, r[key])
            assert torch.equal(got, want.to(torch.bfloat16).float()), key
        ld = layer_dict(ckpt, rm, 0)
        assert torch.equal(ld["attn.k.weight"], planted["L0.attn.k.weight"].to(torch.bfloat16).float())
        # Untransposed row selection streams in storage dtype, in blocks of 3 rows.
        blocks = list(iter_role_blocks(ckpt, r["L0.attn.v.weight"], block_elems=3 * H))
        assert [s for s, _ in blocks] == [0, 3, 6]
        assert all(b.dtype == torch.bfloat16 for _, b in blocks)
        assert torch.equal(torch.cat([b for _, b in blocks]).float(), read_role(ckpt, r["L0.attn.v.weight"]))
        # Plain view: delegated to Checkpoint.iter_blocks, storage dtype.
        eb = list(iter_role_blocks(ckpt, r["embed.weight"], block_elems=5 * H))
        assert [s for s, _ in eb] == [0, 5, 10, 15] and eb[0][1].dtype == torch.bfloat16
        assert torch.equal(torch.cat([b for _, b in eb]), t["gpt_neox.embed_in.weight"])
        # 1-D fused bias: float32 single block.
        (s0, bias), = list(iter_role_blocks(ckpt, r["L0.attn.q.bias"]))
        assert s0 == 0 and bias.dtype == torch.float32 and bias.shape == (NH * HD,)


def test_neox_without_head_count_leaves_qkv_unassigned() -> None:
    t, _ = _neox_tensors(_gen(3))
    rm = assign_roles({k: tuple(v.shape) for k, v in t.items()}, None)
    assert rm.arch.family == "gpt_neox" and rm.arch.n_heads is None
    assert "gpt_neox.layers.0.attention.query_key_value.weight" in rm.unassigned
    assert "L0.attn.q.weight" not in rm.roles and "L0.attn.o.weight" in rm.roles
    assert any("head count" in n for n in rm.notes)


# ---------------------------------------------------------------------------- Phi-3


def test_phi3_fused_qkv_and_gate_up(tmp_path) -> None:
    g = _gen(4)
    q, k, v = _rand(NH * HD, H, g=g), _rand(NKV * HD, H, g=g), _rand(NKV * HD, H, g=g)
    gate, up = _rand(INTER, H, g=g), _rand(INTER, H, g=g)
    t = {"model.embed_tokens.weight": _rand(VOCAB, H, g=g), "model.norm.weight": _rand(H, g=g),
         "lm_head.weight": _rand(VOCAB, H, g=g),
         "model.layers.0.self_attn.qkv_proj.weight": torch.cat([q, k, v]),
         "model.layers.0.self_attn.o_proj.weight": _rand(H, H, g=g),
         "model.layers.0.mlp.gate_up_proj.weight": torch.cat([gate, up]),
         "model.layers.0.mlp.down_proj.weight": _rand(H, INTER, g=g),
         "model.layers.0.input_layernorm.weight": _rand(H, g=g),
         "model.layers.0.post_attention_layernorm.weight": _rand(H, g=g)}
    save_file(t, str(tmp_path / "phi3.safetensors"))
    cfg = {"model_type": "phi3", "num_attention_heads": NH, "num_key_value_heads": NKV, "hidden_size": H}
    with open_checkpoint(tmp_path / "phi3.safetensors") as ckpt:
        rm = assign_roles(ckpt.tensors, cfg)
        r = rm.roles
        assert r["L0.attn.k.weight"].rows == ((NH * HD, NH * HD + NKV * HD),)
        assert r["L0.attn.v.weight"].shape == (NKV * HD, H)
        assert r["L0.mlp.up.weight"].rows == ((INTER, 2 * INTER),)
        assert r["L0.norm.mlp.weight"].tensor == "model.layers.0.post_attention_layernorm.weight"
        for key, want in (("attn.q", q), ("attn.k", k), ("attn.v", v), ("mlp.gate", gate), ("mlp.up", up)):
            assert torch.equal(read_role(ckpt, r[f"L0.{key}.weight"]), want), key
        assert rm.arch.mlp == "glu" and rm.arch.intermediate == INTER and rm.arch.family == "phi3"


def test_phi3_gqa_without_config_is_not_split_blindly() -> None:
    d = {"model.layers.0.self_attn.qkv_proj.weight": ((NH + 2 * NKV) * HD, H), "model.embed_tokens.weight": (VOCAB, H)}
    rm = assign_roles(d, None)
    assert "model.layers.0.self_attn.qkv_proj.weight" in rm.unassigned
    mha = assign_roles({"model.layers.0.self_attn.qkv_proj.weight": (3 * H, H),
                        "model.embed_tokens.weight": (VOCAB, H)}, None)
    assert mha.roles["L0.attn.v.weight"].rows == ((2 * H, 3 * H),)


# ---------------------------------------------------------------------------- Falcon


def test_falcon_grouped_and_multi_query_layouts() -> None:
    nh, nkv, hd = 4, 2, 2
    d = {"transformer.word_embeddings.weight": (VOCAB, H), "transformer.ln_f.weight": (H,),
         "transformer.h.0.self_attention.query_key_value.weight": ((nh + 2 * nkv) * hd, H),
         "transformer.h.0.ln_attn.weight": (H,), "transformer.h.0.ln_mlp.weight": (H,)}
    cfg = {"model_type": "falcon", "new_decoder_architecture": True, "num_attention_heads": nh,
           "num_kv_heads": nkv, "hidden_size": H}
    r = assign_roles(d, cfg).roles
    # (kv_heads, q_per_kv + 2, head_dim): group 0 rows 0..7, group 1 rows 8..15.
    assert r["L0.attn.q.weight"].rows == ((0, 4), (8, 12))
    assert r["L0.attn.k.weight"].rows == ((4, 6), (12, 14))
    assert r["L0.attn.v.weight"].rows == ((6, 8), (14, 16))
    assert r["L0.norm.mlp.weight"].tensor == "transformer.h.0.ln_mlp.weight"
    d["transformer.h.0.self_attention.query_key_value.weight"] = (H + 2 * HD, H)
    mq = assign_roles(d, {"model_type": "falcon", "num_attention_heads": NH, "hidden_size": H}).roles
    assert mq["L0.attn.q.weight"].rows == ((0, H),)
    assert mq["L0.attn.k.weight"].rows == ((H, H + HD),)
    assert mq["L0.attn.v.weight"].rows == ((H + HD, H + 2 * HD),)


# ---------------------------------------------------------------------------- BERT


def test_bert_roles() -> None:
    d = {"bert.embeddings.word_embeddings.weight": (VOCAB, H),
         "bert.embeddings.position_embeddings.weight": (32, H),
         "bert.embeddings.token_type_embeddings.weight": (2, H),
         "bert.embeddings.LayerNorm.gamma": (H,), "bert.embeddings.LayerNorm.beta": (H,),
         "bert.embeddings.position_ids": (1, 32),
         "bert.pooler.dense.weight": (H, H),
         "cls.predictions.bias": (VOCAB,), "cls.predictions.transform.dense.weight": (H, H),
         "cls.predictions.transform.LayerNorm.weight": (H,), "cls.predictions.decoder.weight": (VOCAB, H)}
    p = "bert.encoder.layer.0."
    for n, s in (("attention.self.query", (H, H)), ("attention.self.key", (H, H)), ("attention.self.value", (H, H)),
                 ("attention.output.dense", (H, H)), ("attention.output.LayerNorm", (H,)),
                 ("intermediate.dense", (INTER, H)), ("output.dense", (H, INTER)), ("output.LayerNorm", (H,))):
        d[p + n + ".weight"] = s
        d[p + n + ".bias"] = (s[0],)
    rm = assign_roles(d, {"model_type": "bert", "num_attention_heads": NH, "hidden_size": H})
    r = rm.roles
    assert r["embed.weight"].tensor == "bert.embeddings.word_embeddings.weight"
    assert r["pos_embed.weight"].shape == (32, H) and r["type_embed.weight"].shape == (2, H)
    assert r["embed_norm.weight"].tensor == "bert.embeddings.LayerNorm.gamma"
    assert r["embed_norm.bias"].tensor == "bert.embeddings.LayerNorm.beta"
    assert r["L0.attn.k.bias"].tensor == p + "attention.self.key.bias"
    assert r["L0.attn.o.weight"].tensor == p + "attention.output.dense.weight"
    assert r["L0.norm.post_attn.weight"].tensor == p + "attention.output.LayerNorm.weight"
    assert r["L0.mlp.up.weight"].tensor == p + "intermediate.dense.weight"
    assert r["L0.mlp.down.weight"].tensor == p + "output.dense.weight"
    assert r["L0.norm.post_mlp.bias"].tensor == p + "output.LayerNorm.bias"
    assert "L0.norm.attn.weight" not in r and "L0.norm.mlp.weight" not in r
    assert r["lm_head.weight"].tensor == "cls.predictions.decoder.weight"
    assert r["lm_head.bias"].tensor == "cls.predictions.bias"
    for n in ("bert.embeddings.position_ids", "bert.pooler.dense.weight",
              "cls.predictions.transform.dense.weight", "cls.predictions.transform.LayerNorm.weight"):
        assert n in rm.unassigned
    a = rm.arch
    assert (a.family, a.norm, a.mlp, a.positional, a.n_layers) == ("bert", "layer", "plain", "learned", 1)


# ---------------------------------------------------------------------------- GGUF


def _llamacpp_permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """What llama.cpp's converter does to q/k rows (reference for the test)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_gguf_llama_roles_and_rotary_unpermute(tmp_path) -> None:
    # head_dim 6: llama.cpp's permutation is not its own inverse (with head_dim 4 it would be).
    h, nh, nkv, hd, inter = 12, 2, 1, 6, 10
    kv = {"general.architecture": "llama", "llama.block_count": 1, "llama.embedding_length": h,
          "llama.attention.head_count": nh, "llama.attention.head_count_kv": nkv,
          "llama.feed_forward_length": inter}
    g = _gen(5)
    q, k = _rand(nh * hd, h, g=g), _rand(nkv * hd, h, g=g)
    t = {"token_embd.weight": _rand(VOCAB, h, g=g), "output.weight": _rand(VOCAB, h, g=g),
         "output_norm.weight": _rand(h, g=g), "rope_freqs.weight": _rand(hd // 2, g=g),
         "blk.0.attn_q.weight": _llamacpp_permute(q, nh), "blk.0.attn_k.weight": _llamacpp_permute(k, nkv),
         "blk.0.attn_v.weight": _rand(nkv * hd, h, g=g), "blk.0.attn_output.weight": _rand(h, h, g=g),
         "blk.0.ffn_gate.weight": _rand(inter, h, g=g), "blk.0.ffn_up.weight": _rand(inter, h, g=g),
         "blk.0.ffn_down.weight": _rand(h, inter, g=g),
         "blk.0.attn_norm.weight": _rand(h, g=g), "blk.0.ffn_norm.weight": _rand(h, g=g)}
    save_file(t, str(tmp_path / "m.safetensors"))
    with open_checkpoint(tmp_path / "m.safetensors") as ckpt:
        rm = assign_roles(ckpt.tensors, None, kv)
        r = rm.roles
        assert rm.arch.family == "gguf-llama" and rm.arch.n_kv_heads == nkv and rm.arch.intermediate == inter
        assert rm.arch.head_dim == hd and rm.arch.source == "config+shapes"
        assert r["embed.weight"].tensor == "token_embd.weight" and r["lm_head.weight"].tensor == "output.weight"
        assert r["final_norm.weight"].tensor == "output_norm.weight"
        assert r["L0.norm.attn.weight"].tensor == "blk.0.attn_norm.weight"
        assert r["L0.norm.mlp.weight"].tensor == "blk.0.ffn_norm.weight"
        assert r["L0.mlp.up.weight"].tensor == "blk.0.ffn_up.weight" and r["L0.mlp.up.weight"].is_plain
        assert r["L0.attn.q.weight"].unpermute_heads == nh and r["L0.attn.k.weight"].unpermute_heads == nkv
        assert not r["L0.attn.v.weight"].unpermute_heads
        assert rm.unassigned == ["rope_freqs.weight"]
        assert not torch.equal(t["blk.0.attn_q.weight"], q)  # the permutation is not trivial
        assert torch.equal(read_role(ckpt, r["L0.attn.q.weight"]), q)
        assert torch.equal(read_role(ckpt, r["L0.attn.k.weight"]), k)
        blocks = list(iter_role_blocks(ckpt, r["L0.attn.q.weight"], block_elems=2 * h))
        assert torch.equal(torch.cat([b for _, b in blocks]), q)
        assert torch.equal(layer_dict(ckpt, rm, 0)["attn.k.weight"], k)


def test_gguf_reader_config_is_not_unpermuted_twice(tmp_path) -> None:
    """Through lineage.io.gguf the reader un-permutes; the role view must not do it again."""
    from lineage.io.gguf import config_from_gguf

    kv = {"general.architecture": "llama", "llama.block_count": 1, "llama.embedding_length": H,
          "llama.attention.head_count": NH, "llama.attention.head_count_kv": NKV}
    d = {"token_embd.weight": (VOCAB, H), "blk.0.attn_q.weight": (NH * HD, H),
         "blk.0.attn_k.weight": (NKV * HD, H), "blk.0.ffn_up.weight": (INTER, H)}
    rm = assign_roles(d, config_from_gguf(kv), {**kv, "lineage.qk_unpermuted": True})
    assert rm.arch.family == "gguf-llama" and rm.arch.n_heads == NH and rm.arch.n_kv_heads == NKV
    assert rm.roles["L0.attn.q.weight"].is_plain and rm.roles["L0.attn.k.weight"].is_plain
    assert rm.tied_embeddings
    # Same with only the metadata marker (no config).
    rm2 = assign_roles(d, None, {**kv, "lineage.qk_unpermuted": True})
    assert rm2.roles["L0.attn.q.weight"].is_plain
    # gguf phi3 through the reader's config still splits the fused ffn_up.
    ph = assign_roles({"token_embd.weight": (VOCAB, H), "blk.0.ffn_up.weight": (2 * INTER, H)},
                      {"model_type": "phi3", "_from_gguf": True})
    assert ph.roles["L0.mlp.gate.weight"].rows == ((0, INTER),)


def test_gguf_file_end_to_end_matches_hf_rows(tmp_path) -> None:
    """A real GGUF (written with the gguf package, q/k permuted as llama.cpp does) reads back HF rows."""
    gguf = pytest.importorskip("gguf")
    h, nh, nkv, hd = 12, 2, 1, 6
    g = _gen(6)
    q, k = _rand(nh * hd, h, g=g), _rand(nkv * hd, h, g=g)
    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_embedding_length(h)
    w.add_head_count(nh)
    w.add_head_count_kv(nkv)
    w.add_tensor("token_embd.weight", _rand(VOCAB, h, g=g).numpy())
    w.add_tensor("blk.0.attn_q.weight", _llamacpp_permute(q, nh).numpy())
    w.add_tensor("blk.0.attn_k.weight", _llamacpp_permute(k, nkv).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with open_checkpoint(path) as ckpt:
        rm = roles_for(ckpt)
        assert rm.arch.family == "gguf-llama" and rm.arch.n_kv_heads == nkv
        assert torch.equal(read_role(ckpt, rm.roles["L0.attn.q.weight"]), q)
        assert torch.equal(read_role(ckpt, rm.roles["L0.attn.k.weight"]), k)


def test_gguf_llama_without_head_count_notes_permutation() -> None:
    rm = assign_roles({"token_embd.weight": (VOCAB, H), "blk.0.attn_q.weight": (H, H)}, None)
    assert rm.arch.family == "gguf-llama" and rm.roles["L0.attn.q.weight"].is_plain
    assert any("permutation not undone" in n for n in rm.notes)


def test_gguf_gemma2_norms_are_not_permuted() -> None:
    d = {"token_embd.weight": (VOCAB, H), "blk.0.attn_q.weight": (H, H), "blk.0.attn_norm.weight": (H,),
         "blk.0.post_attention_norm.weight": (H,), "blk.0.ffn_norm.weight": (H,),
         "blk.0.post_ffw_norm.weight": (H,), "blk.0.attn_q_norm.weight": (HD,)}
    rm = assign_roles(d, None, {"general.architecture": "gemma2", "gemma2.attention.head_count": NH})
    r = rm.roles
    assert rm.arch.family == "gguf-gemma2" and rm.arch.norm == "rms"
    assert r["L0.norm.post_attn.weight"].tensor == "blk.0.post_attention_norm.weight"
    assert r["L0.norm.mlp.weight"].tensor == "blk.0.ffn_norm.weight"
    assert r["L0.norm.post_mlp.weight"].tensor == "blk.0.post_ffw_norm.weight"
    assert r["L0.attn.q_norm.weight"].shape == (HD,)
    assert r["L0.attn.q.weight"].is_plain and rm.tied_embeddings


def test_gguf_phi3_fused_ffn_up() -> None:
    d = {"token_embd.weight": (VOCAB, H), "blk.0.attn_qkv.weight": (3 * H, H),
         "blk.0.ffn_up.weight": (2 * INTER, H), "blk.0.ffn_down.weight": (H, INTER)}
    r = assign_roles(d, None, {"general.architecture": "phi3", "phi3.attention.head_count": NH}).roles
    assert r["L0.mlp.gate.weight"].rows == ((0, INTER),) and r["L0.mlp.up.weight"].rows == ((INTER, 2 * INTER),)
    assert r["L0.attn.k.weight"].rows == ((H, 2 * H),)


# ---------------------------------------------------------------------------- pairing


def test_pair_llama_with_gpt2() -> None:
    a = assign_roles(llama_shapes(), LLAMA_CFG)
    b = assign_roles(gpt2_shapes(), GPT2_CFG)
    p = pair_models(a, b)
    by_role = {m.role: m for m in p.matched}
    assert by_role["embed.weight"].shape_a == (VOCAB, H) and by_role["embed.weight"].shape_b == (20, H)
    assert not by_role["embed.weight"].same_shape
    assert by_role["L0.attn.q.weight"].same_shape and by_role["L1.attn.o.weight"].same_shape
    assert by_role["L0.attn.q.weight"].view_b.transpose and not by_role["L0.attn.q.weight"].view_a.transpose
    mism = {m.role for m in p.shape_mismatches}
    assert {"embed.weight", "L0.attn.k.weight", "L0.mlp.up.weight", "L1.mlp.down.weight"} <= mism
    assert "L0.attn.q.weight" not in mism
    assert "L0.mlp.gate.weight" in p.only_a and "pos_embed.weight" in p.only_b
    assert "L0.attn.q.bias" in p.only_b and "final_norm.bias" in p.only_b
    # A stores lm_head, B ties it: the head is compared with B's embedding.
    head = by_role["lm_head.weight"]
    assert head.view_b.tensor == "transformer.wte.weight" and "ties" in head.note
    assert "lm_head.weight" not in p.only_a
    assert "llama" in p.summary and "gpt2" in p.summary
    assert p.layer_pairs == ((0, 0), (1, 1))
    d = p.to_dict()
    assert d["arch_a"]["family"] == "llama" and "embed.weight" in d["shape_mismatches"]
    roles = [m.role for m in p.matched]
    assert roles[0] == "embed.weight" and roles[-1] == "lm_head.weight"


def test_pair_different_layer_counts() -> None:
    a = assign_roles(llama_shapes(n_layers=3), None)
    b = assign_roles(llama_shapes(n_layers=2), None)
    p = pair_models(a, b)
    assert p.layer_pairs == ((0, 0), (1, 1))
    assert all(parse_role(r)[0] == 2 for r in p.only_a) and len(p.only_a) == 9
    assert p.only_b == ()
    known = [m for m in p.layer(1) if not is_generic(m.role)]
    assert not p.shape_mismatches and len(known) == 9
    # The rotary buffers have no role: paired by stored name and shape, and said so.
    generic = [m.role for m in p.layer(1) if is_generic(m.role)]
    assert generic == ["L1.~model.layers.1.self_attn.rotary_emb.inv_freq"]
    assert any("could not be given a meaning" in f.message for f in p.findings)
    assert any("no same-name" in f.message and "layers.2" in f.message for f in p.findings)
    assert "3 vs 2" in p.summary
    assert any("layer counts differ" in n for n in p.notes)


def test_pair_tied_on_a_side_swaps_views() -> None:
    a = assign_roles(llama_shapes(lm_head=False), None)
    b = assign_roles(llama_shapes(), None)
    head = {m.role: m for m in pair_models(a, b).matched}["lm_head.weight"]
    assert head.view_a.tensor == "model.embed_tokens.weight" and head.view_b.tensor == "lm_head.weight"
    assert head.note.startswith("a ties")


def test_pair_with_nothing_comparable_is_valid() -> None:
    a = assign_roles({"foo.weight": (3, 3), "bar": (2,)}, None)
    b = assign_roles(llama_shapes(), LLAMA_CFG)
    p = pair_models(a, b)
    assert p.matched == () and a.unassigned == ["bar", "foo.weight"]
    assert a.arch.family == "unknown" and a.arch.n_layers == 0
    assert "Nothing could be paired" in p.summary and len(p.only_b) == len(b.roles)
