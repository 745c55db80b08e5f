"""Family trees say only what is known about merges (issue 16): a merge child hangs from both of its
parents with its merge type, never in a chain between them; siblings stay siblings; a merge whose card
names a parent that was not scanned hangs from its present parent with the absent one noted. Text,
JSON and HTML; `tree` and `scan` (with and without --confirm)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lineage.cli import main
from lineage.testing.zoocache import cached_zoo
from lineage.render.tree import render_html, render_text
from lineage.tree import Link, build_tree


def run(args: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(args)
    out, err = capsys.readouterr()
    return int(info.value.code or 0), out, err


@pytest.fixture(scope="module")
def zoo():
    return cached_zoo("small")


def _merge_edges(edges: list[dict]) -> list[dict]:
    return [e for e in edges if e["relation"] == "merge"]


def _no_chain_through(edges: list[dict], merge: str, parents: set[str]) -> None:
    """No parent of the merge hangs below it, and neither parent is drawn as the other's parent (a link
    between them, needed when their common base is not in the set, is an undirected sibling link)."""
    for e in edges:
        assert not (e["parent"] == merge and e["child"] in parents), e
        if e["parent"] in parents and e["child"] in parents:
            assert e["relation"] == "sibling" and e["directed"] is False, e


@pytest.mark.parametrize("with_base", [True, False])
def test_tree_draws_a_merge_with_both_parents_and_its_type(zoo, tmp_path, capsys, with_base) -> None:
    names = (["llama-b1"] if with_base else []) + ["llama-b1-fta", "llama-b1-ftb", "llama-b1-merge-linear"]
    html = tmp_path / "t.html"
    code, out, err = run(["tree", *(zoo.path(n) for n in names), "--json", "--html", str(html)], capsys)
    assert code == 0, err
    edges = json.loads(out)["tree"]["edges"]
    (m,) = _merge_edges(edges)
    assert m["child"] == "llama-b1-merge-linear" and m["merge_method"] == "linear"
    assert {m["parent"], *m["other_parents"]} == {"llama-b1-fta", "llama-b1-ftb"} and m["absent_parents"] == []
    _no_chain_through(edges, "llama-b1-merge-linear", {"llama-b1-fta", "llama-b1-ftb"})
    if with_base:  # siblings stay siblings: both fine-tunes hang from the base
        assert {(e["parent"], e["child"]) for e in edges} >= {("llama-b1", "llama-b1-fta"), ("llama-b1", "llama-b1-ftb")}
    page = html.read_text()
    assert "merge (linear)" in page and 'stroke-dasharray="5,4"' in page and "further parent of a merge" in page
    if with_base:
        return  # the text drawing is checked once (each tree run costs seconds)
    code, out, _ = run(["tree", *(zoo.path(n) for n in names)], capsys)
    assert "merge (linear) of llama-b1-ft" in out and "llama-b1-fta + llama-b1-ftb" in out.replace(
        "llama-b1-ftb + llama-b1-fta", "llama-b1-fta + llama-b1-ftb")


def test_a_merge_with_an_absent_parent_hangs_from_the_present_one() -> None:
    links = [Link("base", "fta", True, 0.15, "base", 0.7), Link("fta", "m", True, 0.10, "fta", 0.6),
             Link("base", "m", True, 0.12, "base", 0.7), Link("m", "kid", True, 0.05, "m", 0.8)]
    tree = build_tree(["base", "fta", "m", "kid"], links, merges={"m": ("fta", "org/ftb")},
                      merge_methods={"m": "linear"})
    (e,) = [e for e in tree.edges if e.child == "m"]
    assert (e.parent, e.relation, e.other_parents, e.absent_parents) == ("fta", "merge", (), ("org/ftb",))
    assert tree.parent_of("kid") == "m" and tree.parent_of("fta") == "base"
    text = render_text(tree)
    assert "merge (linear) of fta + org/ftb; org/ftb not among the models" in text
    page = render_html(tree)
    assert "org/ftb (not among the models)" in page and "+ 1 parent not among the models" in page
    # no parent present: nothing is claimed, the model is placed by its links alone
    alone = build_tree(["base", "fta", "m"], links[:3], merges={"m": ("org/x", "org/y")})
    assert all(e.relation != "merge" for e in alone.edges)


def _scan_folder(zoo, tmp: Path, names: list[str], card: dict[str, str] | None = None) -> Path:
    d = tmp / "models"
    d.mkdir()
    for n in names:
        if card and n in card:
            shutil.copytree(zoo.path(n), d / n)
            (d / n / "README.md").write_text(card[n], encoding="utf-8")
        else:
            (d / n).symlink_to(zoo.path(n))
    return d


def test_scan_confirm_finds_the_merge_and_keeps_siblings_siblings(zoo, tmp_path, capsys) -> None:
    d = _scan_folder(zoo, tmp_path, ["llama-b1", "llama-b1-fta", "llama-b1-ftb", "llama-b1-merge-linear"])
    html = tmp_path / "s.html"
    code, out, err = run(["scan", str(d), "--confirm", "--cache-dir", str(tmp_path / "c"), "--json",
                          "--html", str(html), "--no-progress"], capsys)
    assert code == 0, err
    doc = json.loads(out)
    edges = doc["tree"]["edges"]
    (m,) = _merge_edges(edges)
    assert m["child"] == "llama-b1-merge-linear" and m["merge_method"] == "linear"
    assert {m["parent"], *m["other_parents"]} == {"llama-b1-fta", "llama-b1-ftb"}
    _no_chain_through(edges, "llama-b1-merge-linear", {"llama-b1-fta", "llama-b1-ftb"})
    assert {(e["parent"], e["child"]) for e in edges if e["relation"] != "merge"} == {
        ("llama-b1", "llama-b1-fta"), ("llama-b1", "llama-b1-ftb")}
    merged = {(p["parent"], p["relation"]) for p in doc["pairs"] if "llama-b1-merge-linear" in (p["a"], p["b"])
              and p["relation"] == "merge"}
    assert merged == {("llama-b1-fta", "merge"), ("llama-b1-ftb", "merge")}
    assert "merge (linear)" in html.read_text()


def test_scan_draws_a_card_claimed_merge_from_its_present_parent(zoo, tmp_path, capsys) -> None:
    card = {"llama-b1-merge-linear": "---\nbase_model:\n- llama-b1-fta\n- someorg/not-scanned\n"
                                     "base_model_relation: merge\n---\n"}
    d = _scan_folder(zoo, tmp_path, ["llama-b1", "llama-b1-fta", "llama-b1-merge-linear"], card)
    html = tmp_path / "s.html"
    code, out, err = run(["scan", str(d), "--cache-dir", str(tmp_path / "c"), "--json", "--html", str(html),
                          "--no-progress"], capsys)
    assert code == 0, err
    (m,) = _merge_edges(json.loads(out)["tree"]["edges"])
    assert (m["parent"], m["child"], m["absent_parents"]) == ("llama-b1-fta", "llama-b1-merge-linear",
                                                              ["someorg/not-scanned"])
    assert "someorg/not-scanned (not among the models)" in html.read_text()
    code, out, _ = run(["scan", str(d), "--cache-dir", str(tmp_path / "c"), "--no-progress"], capsys)
    assert "someorg/not-scanned not among the models" in out
