"""Every family of issue 14 on tiny random-init fixtures: roles, and element-wise verdicts.

For each family (lineage.testing.archs): the roles of a few representative stored names;
a copy with small dense noise is derived; an independent init of the same shapes is
unrelated.  Whisper with CTranslate2 names (no table knows them) still compares, by
stored name and shape, with a finding that says so.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lineage.compare import CompareOptions, compare
from lineage.roles import assign_roles, is_evidence_role
from lineage.testing.archs import BUILDERS, noisy, permute_experts, save, weights

FAMILIES = sorted(BUILDERS)
ELEMENTWISE = CompareOptions(canonicalise=False, workers=1)

#: Representative stored names → expected role, per family.
EXPECTED: dict[str, dict[str, str]] = {
    "llama": {"model.layers.1.self_attn.k_proj.weight": "L1.attn.k.weight",
              "model.layers.0.post_attention_layernorm.weight": "L0.norm.mlp.weight", "model.norm.weight": "final_norm.weight"},
    "mistral": {"model.layers.1.mlp.gate_proj.weight": "L1.mlp.gate.weight"},
    "qwen2": {"model.layers.0.self_attn.q_proj.bias": "L0.attn.q.bias"},
    "qwen3": {"model.layers.1.self_attn.q_norm.weight": "L1.attn.q_norm.weight",
              "model.layers.1.self_attn.k_norm.weight": "L1.attn.k_norm.weight"},
    "gemma2": {"model.layers.0.post_attention_layernorm.weight": "L0.norm.post_attn.weight",
               "model.layers.0.pre_feedforward_layernorm.weight": "L0.norm.mlp.weight",
               "model.layers.0.post_feedforward_layernorm.weight": "L0.norm.post_mlp.weight"},
    "gemma3": {"model.layers.1.post_attention_layernorm.weight": "L1.norm.post_attn.weight",
               "model.layers.1.self_attn.q_norm.weight": "L1.attn.q_norm.weight"},
    "phi3": {"model.layers.0.mlp.down_proj.weight": "L0.mlp.down.weight"},
    "gpt2": {"h.1.mlp.c_fc.weight": "L1.mlp.up.weight", "wpe.weight": "pos_embed.weight", "ln_f.bias": "final_norm.bias"},
    "gpt_neox": {"gpt_neox.layers.1.attention.dense.weight": "L1.attn.o.weight", "embed_out.weight": "lm_head.weight"},
    "bert": {"bert.encoder.layer.1.output.LayerNorm.weight": "L1.norm.post_mlp.weight",
             "cls.predictions.bias": "lm_head.bias"},
    "roberta": {"roberta.encoder.layer.0.attention.self.value.weight": "L0.attn.v.weight"},
    "t5": {"encoder.block.1.layer.1.DenseReluDense.wi_0.weight": "L1.mlp.gate.weight",
           "decoder.block.0.layer.1.EncDecAttention.k.weight": "L2.xattn.k.weight",
           "decoder.block.1.layer.2.DenseReluDense.wo.weight": "L3.mlp.down.weight",
           "decoder.block.0.layer.1.layer_norm.weight": "L2.norm.xattn.weight",
           "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": "L0.attn.rel_bias.weight",
           "shared.weight": "embed.weight", "encoder.final_layer_norm.weight": "enc.final_norm.weight"},
    "whisper": {"model.encoder.conv1.weight": "enc.conv1.weight", "model.encoder.layers.1.fc1.weight": "L1.mlp.up.weight",
                "model.decoder.layers.0.encoder_attn.out_proj.weight": "L2.xattn.o.weight",
                "model.decoder.layers.1.self_attn.q_proj.weight": "L3.attn.q.weight",
                "model.encoder.embed_positions.weight": "enc.pos_embed.weight",
                "model.decoder.embed_tokens.weight": "embed.weight"},
    "whisper-ct2": {},
    "vit": {"vit.embeddings.cls_token": "cls_token.weight",
            "vit.embeddings.patch_embeddings.projection.weight": "patch_embed.weight",
            "vit.encoder.layer.1.attention.attention.query.weight": "L1.attn.q.weight",
            "vit.encoder.layer.0.layernorm_after.bias": "L0.norm.mlp.bias"},
    "clip": {"text_model.encoder.layers.1.mlp.fc2.weight": "L1.mlp.down.weight",
             "vision_model.encoder.layers.0.self_attn.q_proj.weight": "L2.attn.q.weight",
             "vision_model.embeddings.class_embedding": "vis.cls_token.weight",
             "visual_projection.weight": "vis_proj.weight", "text_model.embeddings.token_embedding.weight": "embed.weight"},
    "mixtral": {"model.layers.1.block_sparse_moe.gate.weight": "L1.moe.router.weight",
                "model.layers.1.block_sparse_moe.experts.3.w1.weight": "L1.moe.E3.mlp.gate.weight",
                "model.layers.0.block_sparse_moe.experts.0.w2.weight": "L0.moe.E0.mlp.down.weight",
                "model.layers.0.block_sparse_moe.experts.2.w3.weight": "L0.moe.E2.mlp.up.weight"},
    "qwen2_moe": {"model.layers.0.mlp.gate.weight": "L0.moe.router.weight",
                  "model.layers.0.mlp.experts.1.up_proj.weight": "L0.moe.E1.mlp.up.weight",
                  "model.layers.1.mlp.shared_expert.down_proj.weight": "L1.moe.shared.mlp.down.weight",
                  "model.layers.1.mlp.shared_expert_gate.weight": "L1.moe.shared_gate.weight"},
    "qwen3_moe": {"model.layers.1.mlp.experts.2.down_proj.weight": "L1.moe.E2.mlp.down.weight"},
}
#: Stored tensors no table gives a meaning (compared by name and shape only).
UNASSIGNED = {
    "gpt2": {"h.0.attn.bias", "h.1.attn.bias"},
    "bert": {"bert.pooler.dense.weight", "bert.pooler.dense.bias", "cls.predictions.transform.dense.weight",
             "cls.predictions.transform.dense.bias", "cls.predictions.transform.LayerNorm.weight",
             "cls.predictions.transform.LayerNorm.bias"},
    "roberta": {"lm_head.dense.weight", "lm_head.dense.bias", "lm_head.layer_norm.weight", "lm_head.layer_norm.bias"},
    "clip": {"text_model.embeddings.position_ids"},
}
STACKS = {"t5": ("enc", "dec"), "whisper": ("enc", "dec"), "clip": ("txt", "vis"), "whisper-ct2": ()}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path, Path]]:
    """Per family: a base, the base plus 5 % dense noise, and an independent init."""
    root = tmp_path_factory.mktemp("archs")
    out = {}
    for name in FAMILIES:
        arch = BUILDERS[name]()
        base = weights(arch, 1)
        out[name] = (save(root / name / "a", base, arch.config),
                     save(root / name / "noisy", noisy(base, 0.05, 2), arch.config),
                     save(root / name / "indep", weights(arch, 3), arch.config))
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_roles_of_representative_names(family: str) -> None:
    arch = BUILDERS[family]()
    rm = assign_roles(arch.shapes, arch.config)
    by_tensor = {v.tensor: k for k, v in rm.roles.items() if v.rows is None}
    for name, role in EXPECTED[family].items():
        assert by_tensor.get(name) == role, (name, by_tensor.get(name))
    expected_unassigned = set(arch.shapes) if family == "whisper-ct2" else UNASSIGNED.get(family, set())
    assert set(rm.unassigned) == expected_unassigned
    assert tuple(s.tag for s in rm.stacks) == STACKS.get(family, ("",))
    # Every layer of every stack holds roles, and the layer numbers do not collide across stacks.
    assert rm.arch.n_layers == sum(s.count for s in rm.stacks)
    assert len({v.tensor for v in rm.roles.values()} | set(rm.unassigned)) == len(arch.shapes)


@pytest.mark.parametrize("family", FAMILIES)
def test_noisy_copy_is_derived_and_independent_init_unrelated(family: str, zoo: dict) -> None:
    a, child, indep = zoo[family]
    derived = compare(str(a), str(child), options=ELEMENTWISE)
    assert derived.verdict.derived is True and derived.verdict.relation == "derived", derived.verdict.summary
    unrelated = compare(str(a), str(indep), options=ELEMENTWISE)
    assert unrelated.verdict.relation == "unrelated", unrelated.verdict.summary
    assert unrelated.verdict.details["matrices"] == derived.verdict.details["matrices"] >= 12


def test_fused_tensors_split_on_their_rows() -> None:
    """Phi-3's qkv_proj and gate_up_proj, GPT-NeoX's per-head QKV, GPT-2's transposed c_attn."""
    phi = assign_roles(BUILDERS["phi3"]().shapes, BUILDERS["phi3"]().config).roles
    assert phi["L0.attn.k.weight"].rows == ((16, 24),) and phi["L0.mlp.up.weight"].rows == ((32, 64),)
    neox = assign_roles(BUILDERS["gpt_neox"]().shapes, BUILDERS["gpt_neox"]().config).roles
    assert neox["L0.attn.v.weight"].rows == ((16, 24), (40, 48))
    gpt2 = assign_roles(BUILDERS["gpt2"]().shapes, BUILDERS["gpt2"]().config).roles
    assert gpt2["L1.attn.q.weight"].transpose and gpt2["L1.attn.q.weight"].shape == (16, 16)


def test_evidence_roles_exclude_fixed_tables_and_norms() -> None:
    assert is_evidence_role("L2.xattn.q.weight") and is_evidence_role("L0.moe.E3.mlp.up.weight")
    assert is_evidence_role("L1.moe.router.weight") and is_evidence_role("L0.~decoder.layer_0.linear_0.weight")
    assert not is_evidence_role("enc.pos_embed.weight")  # Whisper's sinusoidal table: equal in every model
    assert not is_evidence_role("L0.attn.rel_bias.weight") and not is_evidence_role("L0.~x.layer_norm.gamma")
    assert not is_evidence_role("L0.~x.linear_0.bias")


def test_whisper_ctranslate2_exports_compare_by_name(tmp_path: Path) -> None:
    """Issue 14: two exports of one checkpoint under names no table knows → identical, with a finding."""
    arch = BUILDERS["whisper-ct2"]()
    w = weights(arch, 7)
    a = save(tmp_path / "a", w, {})
    b = save(tmp_path / "b", {k: v.clone() for k, v in w.items()}, {})
    r = compare(str(a), str(b), options=CompareOptions(workers=1))
    assert r.verdict.relation == "identical", r.verdict.summary
    meaning = [f for f in r.findings if "could not be given a meaning" in f.message]
    assert meaning and f"{len(arch.shapes)} tensor(s)" in meaning[0].message
    half = save(tmp_path / "half", {k: v.half() for k, v in w.items()}, {})
    assert compare(str(a), str(half), options=ELEMENTWISE).verdict.relation == "re-encoded copy"


def test_canonical_stage_on_stacked_models_degrades_to_findings(zoo: dict) -> None:
    """With the canonical test on, encoder-decoder and two-tower models still get a verdict."""
    for family in ("t5", "clip"):
        a, child, _ = zoo[family]
        r = compare(str(a), str(child), options=CompareOptions(workers=1))
        assert r.verdict.derived is True, (family, r.verdict.summary)


def test_layer_numbers_from_names_allocate_nothing() -> None:
    """A hostile layer number costs nothing: offsets and notes follow the number of tensors."""
    rm = assign_roles({"model.layers.999999999.input_layernorm.weight": (4,), "model.norm.weight": (4,)})
    # a layer number beyond what the file's tensors can hold is no layer: left unassigned, with a note,
    # so nothing downstream (per-layer loops of the canonical test, fingerprints) runs to it
    assert rm.arch.n_layers == 0 and "model.layers.999999999.input_layernorm.weight" in rm.unassigned
    assert any("beyond" in n for n in rm.notes)
    t5 = assign_roles({"encoder.block.999999999.layer.0.layer_norm.weight": (4,),
                       "decoder.block.0.layer.0.layer_norm.weight": (4,)}, {"model_type": "t5"})
    assert "encoder.block.999999999.layer.0.layer_norm.weight" in t5.unassigned and t5.arch.n_layers == 1
    odd = assign_roles({"decoder.layer_123456789.linear.weight": (2, 2), "x.layers.99999999999999.w": (2, 2)})
    assert set(odd.generic) == {"L123456789.~decoder.layer_123456789.linear.weight", "~x.layers.99999999999999.w"}


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_permuted_experts_are_matched_back(family: str, zoo: dict, tmp_path: Path) -> None:
    """Issue 14: the experts' order is a function-preserving permutation; undone before the statistics."""
    arch = BUILDERS[family]()
    base = weights(arch, 1)
    order = [2, 0, 3, 1]
    child = save(tmp_path / "perm", noisy(permute_experts(base, order), 0.05, 5), arch.config)
    r = compare(str(zoo[family][0]), str(child), options=ELEMENTWISE)
    rows = {row.role: row for row in r.layers}
    assert rows["L1.moe.E0.mlp.up.weight"].tensor_b.endswith(f"experts.{order.index(0)}.up_proj.weight"
                                                               if family == "qwen2_moe" else f"experts.{order.index(0)}.w3.weight")
    experts = [row.pearson for role, row in rows.items() if ".moe." in role and role.endswith(".weight")]
    assert len(experts) >= 8 * 3 and min(experts) > 0.99
    assert sum("experts" in f.message and "matched to A's" in f.message for f in r.findings) == 2
    # Independent experts are left in their stored order (no permutation found, no finding).
    indep = compare(str(zoo[family][0]), str(zoo[family][2]), options=ELEMENTWISE)
    assert indep.verdict.relation == "unrelated" and not any("matched to A's" in f.message for f in indep.findings)
