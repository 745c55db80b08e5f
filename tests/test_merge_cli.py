"""`lineage compare A B --parents …`: a merge child is called a merge; a fine-tune with decoy parents is not."""

from __future__ import annotations

import json

import pytest

from lineage.cli import main
from lineage.testing.zoo import Zoo, build_zoo
from lineage.testing.zoocache import cached_zoo


@pytest.fixture(scope="module")
def zoo() -> Zoo:
    return cached_zoo("small")


def _run(capsys, args: list[str]) -> dict:
    with pytest.raises(SystemExit) as e:
        main(["compare", *args, "--json", "--no-progress"])
    assert e.value.code == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("fam", ["llama", "gpt2"])
def test_linear_merge_named_with_its_weights(zoo: Zoo, capsys, fam: str) -> None:
    p1, p2 = zoo.path(f"{fam}-b1-fta"), zoo.path(f"{fam}-b1-ftb")
    d = _run(capsys, [zoo.path(f"{fam}-b1"), zoo.path(f"{fam}-b1-merge-linear"), "-p", p1, "-p", p2])
    assert d["verdict"]["relation"] == "merge"
    m = d["merge"]
    assert m["base"] == zoo.path(f"{fam}-b1") and m["explains"] is True
    assert abs(m["weights"][0] - 0.3) < 0.02 and abs(m["weights"][1] - 0.7) < 0.02


def test_slerp_merge_against_one_parent(zoo: Zoo, capsys) -> None:
    p1, p2 = zoo.path("llama-b1-fta"), zoo.path("llama-b1-ftb")
    d = _run(capsys, [p1, zoo.path("llama-b1-merge-slerp"), "-p", p1, "-p", p2, "--base", zoo.path("llama-b1")])
    assert d["verdict"]["relation"] == "merge" and d["merge"]["method"] == "slerp"
    assert abs(d["merge"]["t"] - 0.4) < 0.02


def test_decoy_parents_do_not_make_a_merge(zoo: Zoo, capsys) -> None:
    d = _run(capsys, [zoo.path("llama-b1"), zoo.path("llama-b1-fta"), "-p", zoo.path("llama-b1-ftb"),
                      "-p", zoo.path("llama-b1-lorasyn2")])
    assert d["merge"]["explains"] is False
    assert d["verdict"]["relation"] == "fine-tune"
