"""The whole pipeline on the small zoo: planted lineage must come out with the stated evidence."""

from __future__ import annotations

import pytest

from lineage.compare import compare
from lineage.testing.zoo import Zoo, build_zoo
from lineage.testing.zoocache import cached_zoo


@pytest.fixture(scope="module")
def zoo() -> Zoo:
    return cached_zoo("small")


@pytest.mark.parametrize(
    "parent, child, relation",
    [
        ("llama-b1", "llama-b1-fta", "fine-tune"),
        ("llama-b1", "llama-b1-lorasyn2", "lora merge"),
        ("llama-b0", "llama-b0-int8_per_row", "quantised copy"),
        ("llama-b0", "llama-b0-gguf-Q8_0", "quantised copy"),
        ("llama-b0", "llama-b0-drop", "pruned"),
        ("gpt2-b0", "gpt2-b0-prune", "pruned"),
        ("llama-b0", "llama-b0-bf16", "re-encoded copy"),
    ],
)
def test_derivatives_are_named(zoo: Zoo, parent: str, child: str, relation: str) -> None:
    r = compare(zoo.path(parent), zoo.path(child))
    assert r.verdict.derived is True
    assert r.verdict.log10_p is not None and r.verdict.log10_p <= -10
    assert r.verdict.relation == relation, r.verdict.summary


@pytest.mark.parametrize("parent, child", [("llama-b1", "llama-b1-combined"), ("llama-b1", "llama-b1-ftd-combined"),
                                           ("gpt2-b1", "gpt2-b1-combined")])
def test_disguised_derivatives_are_found_and_transforms_named(zoo: Zoo, parent: str, child: str) -> None:
    r = compare(zoo.path(parent), zoo.path(child))
    assert r.verdict.derived is True and r.verdict.log10_p <= -10
    assert r.verdict.relation.endswith("(disguised)")
    assert r.canon is not None and any("permutation" in t for t in r.canon["transforms"])


@pytest.mark.parametrize("fam", ["llama", "gpt2"])
def test_independent_bases_are_not_derived(zoo: Zoo, fam: str) -> None:
    r = compare(zoo.path(f"{fam}-b0"), zoo.path(f"{fam}-b1"))
    assert r.verdict.derived is not True
    assert r.verdict.p_value is not None and r.verdict.p_value > 1e-3


def test_family_tree(zoo: Zoo) -> None:
    from lineage.family import family_tree

    ids = ["llama-b1", "llama-b1-fta", "llama-b0", "llama-b0-int8_per_row"]
    res = family_tree([zoo.path(i) for i in ids])
    edges = {(e.parent, e.child, e.relation) for e in res.tree.edges}
    assert edges == {("llama-b1", "llama-b1-fta", "fine-tune"), ("llama-b0", "llama-b0-int8_per_row", "quantised copy")}
    assert set(res.tree.roots) == {"llama-b0", "llama-b1"}
    assert res.to_dict()["schema"] == "lineage.tree/1"


def test_adapter_check(zoo: Zoo) -> None:
    from lineage.adaptercheck import check_adapter

    ok = check_adapter(zoo.path("llama-b0"), zoo.path("llama-b0-lora2"), zoo.model("llama-b0-lora2")["adapter_path"])
    assert ok.verified and ok.modules and all(m.rank == 2 and m.rel_residual < 1e-3 for m in ok.modules)
    bad = check_adapter(zoo.path("llama-b0"), zoo.path("llama-b0-ft"), zoo.model("llama-b0-lora2")["adapter_path"])
    assert not bad.verified and bad.changed_outside


def test_adapter_folder_is_a_derivative(zoo: Zoo) -> None:
    r = compare(zoo.path("llama-b0"), zoo.model("llama-b0-lora2")["adapter_path"])
    assert r.verdict.relation == "lora merge" and r.b.format.startswith("peft")
    assert r.anatomy["details"]["rank"] == 2


@pytest.mark.parametrize("fam", ["llama", "gpt2"])
def test_merge_weights_recovered(zoo: Zoo, fam: str) -> None:
    from lineage.mergefit import fit_merge_models

    parents = [zoo.path(f"{fam}-b1-fta"), zoo.path(f"{fam}-b1-ftb")]
    lin = fit_merge_models(zoo.path(f"{fam}-b1-merge-linear"), parents, zoo.path(f"{fam}-b1"))
    assert lin.explains and abs(lin.weights[0] - 0.3) < 0.02 and abs(lin.weights[1] - 0.7) < 0.02
    sl = fit_merge_models(zoo.path(f"{fam}-b1-merge-slerp"), parents, zoo.path(f"{fam}-b1"))
    assert sl.method == "slerp" and abs(sl.t - 0.4) < 0.02


def test_fingerprint_cli_roundtrip(zoo: Zoo, tmp_path, capsys) -> None:
    from lineage.cli import main

    out = tmp_path / "base.lfp"
    with pytest.raises(SystemExit) as e:
        main(["fingerprint", zoo.path("llama-b1"), "-o", str(out)])
    assert e.value.code == 0 and out.stat().st_size < 2 << 20
    capsys.readouterr()
    derived = compare(str(out), zoo.path("llama-b1-ftd-combined"))
    assert derived.verdict.derived is True and derived.verdict.log10_p <= -10
    assert derived.verdict.method == "fingerprint"
    unrelated = compare(str(out), zoo.path("llama-b0"))
    assert unrelated.verdict.derived is not True and unrelated.verdict.p_value > 1e-3
    bad = tmp_path / "bad.lfp"
    bad.write_bytes(b"not a fingerprint")
    with pytest.raises(SystemExit) as e:
        main(["compare", str(bad), zoo.path("llama-b0")])
    assert e.value.code == 2 and str(bad) in capsys.readouterr().err


# --------------------------------------------------------------------------- GGUF K-quants and disguised GGUF

@pytest.mark.parametrize(
    "parent, child, fmt, types",
    [
        # rows of 256: real K-quants (Q6_K for output, layer-1 attn_v and ffn_down)
        ("llama-wide0", "llama-wide0-gguf-Q4_K_M", "Q4_K", {"Q4_K", "Q6_K", "F32"}),
        # rows of 32/64: llama.cpp's fallback for K-quants (Q5_0, and Q8_0 for the Q6_K tensors)
        ("llama-b0", "llama-b0-gguf-Q4_K_M", "Q5_0", {"Q5_0", "Q8_0", "F32"}),
    ],
)
def test_gguf_q4_k_m_is_a_quantised_copy(zoo: Zoo, parent: str, child: str, fmt: str, types: set[str],
                                         capsys) -> None:
    import json

    from gguf import GGUFReader

    from lineage.cli import main

    m = zoo.model(child)
    planted = zoo.truth(child)["tensor_types"]
    stored = {t.name: t.tensor_type.name for t in GGUFReader(m["path"]).tensors}
    assert stored == planted and set(stored.values()) == types
    assert stored["output.weight"] == ("Q6_K" if fmt == "Q4_K" else "Q8_0")
    with pytest.raises(SystemExit) as e:
        main(["compare", zoo.path(parent), m["path"], "--json"])
    assert e.value.code == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["verdict"]["derived"] is True and rep["verdict"]["log10_p"] <= -10
    assert rep["verdict"]["relation"] == "quantised copy"
    assert rep["anatomy"]["details"]["quant_format"] == fmt


@pytest.mark.parametrize("fam", ["llama", "gpt2"])
def test_gguf_disguised_finetune_is_derived_like_safetensors(zoo: Zoo, fam: str) -> None:
    planted = [p for p in zoo.pairs("derived") if p.a == f"{fam}-b1" and p.b == f"{fam}-b1-ftd-combined-gguf-Q8_0"]
    assert planted and planted[0].relation == "finetune+disguised+quantised" and planted[0].hops == 3
    st = compare(zoo.path(f"{fam}-b1"), zoo.path(f"{fam}-b1-ftd-combined"))
    gg = compare(zoo.path(f"{fam}-b1"), zoo.path(f"{fam}-b1-ftd-combined-gguf-Q8_0"))
    assert gg.b.format == "gguf"
    for r in (st, gg):
        assert r.verdict.derived is True and r.verdict.log10_p <= -10
        assert r.verdict.relation == "fine-tune (disguised)", r.verdict.summary
    assert abs(gg.verdict.log10_p - st.verdict.log10_p) <= 5
    unrelated = compare(zoo.path(f"{fam}-b0"), zoo.path(f"{fam}-b1-ftd-combined-gguf-Q8_0"))
    assert unrelated.verdict.derived is not True and unrelated.verdict.p_value > 1e-3


@pytest.mark.parametrize("fam", ["llama", "gpt2"])
def test_disguised_model_quantised_afterwards_is_a_quantised_copy(zoo: Zoo, fam: str) -> None:
    """ftd → ftd-combined-gguf-Q8_0 is a disguise then a Q8_0 re-upload: once the disguise is undone the
    difference is the Q8_0 rounding carried through the realignment, so it reads as a quantised copy (and
    the fine-tune under the same disguise, above, does not)."""
    planted = [p for p in zoo.pairs("derived") if p.a == f"{fam}-b1-ftd" and p.b == f"{fam}-b1-ftd-combined-gguf-Q8_0"]
    assert planted and planted[0].relation == "disguised+quantised"
    r = compare(zoo.path(f"{fam}-b1-ftd"), zoo.path(f"{fam}-b1-ftd-combined-gguf-Q8_0"))
    assert r.verdict.derived is True and r.verdict.log10_p <= -10
    assert r.verdict.relation == "quantised copy (disguised)", r.verdict.summary
    check = r.anatomy["details"]["rounding_check"]
    assert check["explains"] and 0.6 <= check["median_ratio"] <= 1.6 and tuple(check["formats"]) == ("Q8_0 rounding",)
    assert r.anatomy["parent"] == "a" and r.anatomy["details"]["quant_format"] == "Q8_0"


def test_disguised_copy_quantised_int8_per_row_is_a_quantised_copy(zoo: Zoo, tmp_path) -> None:
    """The same through a float32 file (no storage-format hint): a pure disguise of the base, then every
    matrix rounded to int8 per row.  A fine-tune under the same disguise and rounding stays a fine-tune."""
    from lineage.testing.reencode import reencoded_folder

    def int8_copy(model_id: str, name: str):
        return reencoded_folder(zoo.path(model_id), tmp_path / name, "int8-per-row")

    r = compare(zoo.path("llama-b1"), str(int8_copy("llama-b1-combined", "combined-int8")))
    assert r.verdict.derived is True
    assert r.verdict.relation == "quantised copy (disguised)", r.verdict.summary
    # rows of 32 (hidden 32) cannot be told from one Q8_0 block per row; either name is the 8-bit lattice
    assert r.anatomy["details"]["quant_format"] in ("int8-per-row", "Q8_0")
    ft = compare(zoo.path("llama-b1"), str(int8_copy("llama-b1-ftd-combined", "ftd-int8")))
    assert ft.verdict.relation == "fine-tune (disguised)", ft.verdict.summary
    assert ft.anatomy["details"]["rounding_check"]["explains"] is False


@pytest.mark.parametrize("encoding", ["bf16", "int8"])
def test_adapter_check_through_the_childs_rounding(zoo: Zoo, tmp_path, encoding: str) -> None:
    """A merge saved in bf16 or quantised int8 per row afterwards still verifies against its adapter: the
    residual is the child's storage rounding (ratio ≈ 1), and tensors outside the adapter, re-encoded the
    same way, do not count as changed.  A re-encoded fine-tune still fails."""
    from lineage.adaptercheck import check_adapter
    from lineage.testing.reencode import reencoded_folder

    def encoded(model_id: str) -> str:
        how = "bf16" if encoding == "bf16" else "int8-per-row"
        return str(reencoded_folder(zoo.path(model_id), tmp_path / f"{model_id}-{encoding}", how))

    adapter = zoo.model("llama-b0-lora2")["adapter_path"]
    ok = check_adapter(zoo.path("llama-b0"), encoded("llama-b0-lora2"), adapter)
    assert ok.verified, ok.summary
    assert not ok.changed_outside
    assert all(m.rounding_ratio is not None and 0.5 < m.rounding_ratio < 1.5 for m in ok.modules)
    bad = check_adapter(zoo.path("llama-b0"), encoded("llama-b0-ft"), adapter)
    assert not bad.verified and bad.changed_outside


def test_disguised_copy_cast_to_bf16_is_identical(zoo: Zoo, tmp_path) -> None:
    """A pure disguise of the base saved in bf16 is a copy: within the format's roundoff after undoing the
    disguise, or — when undoing it magnifies the rounding past that (the full zoo's llama-b1-combined) —
    by the rounding check (the child's bf16 rounding realigned: ratio 1.06 there)."""
    from lineage.testing.reencode import reencoded_folder

    dst = reencoded_folder(zoo.path("llama-b1-combined"), tmp_path / "combined-bf16", "bf16")
    r = compare(zoo.path("llama-b1"), str(dst))
    assert r.verdict.relation == "identical (disguised)", r.verdict.summary
    check = r.anatomy["details"].get("rounding_check")
    assert check is None or (check["explains"] and tuple(check["formats"]) == ("bf16 rounding",))
    # the same copy with its roundoff tolerance out of the way must pass the rounding check
    import lineage.compare as cmp

    saved = cmp.unit_roundoff
    cmp.unit_roundoff = lambda name: 0.0
    try:
        tight = compare(zoo.path("llama-b1"), str(dst))
    finally:
        cmp.unit_roundoff = saved
    assert tight.verdict.relation == "identical (disguised)", tight.verdict.summary
    check = tight.anatomy["details"]["rounding_check"]
    assert check["explains"] and tuple(check["formats"]) == ("bf16 rounding",)
