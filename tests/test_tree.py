"""Family trees: Chu–Liu/Edmonds against brute force, planted families, rendering."""

from __future__ import annotations

import itertools
import random

import pytest

from lineage.render.tree import render_html, render_text
from lineage.tree import Link, build_tree, min_arborescence


def _brute(nodes, edges, root):
    others = [n for n in nodes if n != root]
    best, best_par = float("inf"), None
    choices = [[u for u in nodes if (u, v) in edges and u != v] for v in others]
    for combo in itertools.product(*choices):
        par = dict(zip(others, combo))
        ok = True
        for v in others:  # every node must reach the root
            seen, x = set(), v
            while x != root:
                if x in seen:
                    ok = False
                    break
                seen.add(x)
                x = par[x]
            if not ok:
                break
        if ok:
            c = sum(edges[(p, v)] for v, p in par.items())
            if c < best:
                best, best_par = c, par
    return best, best_par


@pytest.mark.parametrize("seed", range(25))
def test_edmonds_matches_brute_force(seed):
    rnd = random.Random(seed)
    nodes = ["r"] + [f"n{i}" for i in range(rnd.randint(2, 5))]
    edges = {}
    for u in nodes:
        for v in nodes[1:]:
            if u != v and (u == "r" or rnd.random() < 0.8):
                edges[(u, v)] = rnd.choice([1.0, 2.0, 3.0, 5.0]) + rnd.random()
    par = min_arborescence(nodes, edges, "r")
    cost = sum(edges[(p, v)] for v, p in par.items())
    best, _ = _brute(nodes, edges, "r")
    assert cost == pytest.approx(best)


def test_unreachable_node_raises():
    with pytest.raises(ValueError):
        min_arborescence(["r", "a", "b"], {("r", "a"): 1.0}, "r")


def _links(truth, dist, wrong_dir=()):
    """truth: child -> parent.  Related links among all members of a family."""
    fam = {}
    for c, p in truth.items():
        fam.setdefault(p, set()).add(c)
    links = []
    for c, p in truth.items():
        par = c if (c, p) in wrong_dir else p
        links.append(Link(p, c, True, dist[(p, c)], parent=par, confidence=0.8, relation="fine-tune"))
    return links


def test_planted_families_recovered():
    # family 1: base -> ft1 -> ft1q ; base -> lora ; family 2: other -> other-ft
    truth = {"ft1": "base", "ft1q": "ft1", "lora": "base", "other-ft": "other"}
    dist = {("base", "ft1"): 0.05, ("ft1", "ft1q"): 0.01, ("base", "lora"): 0.03,
            ("other", "other-ft"): 0.04}
    links = _links(truth, dist)
    # distractor related links (siblings and grand-parent) with larger distances, no direction
    links += [Link("ft1", "lora", True, 0.08), Link("base", "ft1q", True, 0.06),
              Link("base", "other", False, 0.9)]
    names = ["base", "ft1", "ft1q", "lora", "other", "other-ft"]
    tree = build_tree(names, links)
    assert set(tree.roots) == {"base", "other"}
    for c, p in truth.items():
        assert tree.parent_of(c) == p
    assert len(tree.families) == 2
    d = tree.to_dict()
    assert {e["child"] for e in d["edges"]} == set(truth)
    txt = render_text(tree)
    assert txt.splitlines()[0] == "base" and "ft1q" in txt and "[fine-tune" in txt
    page = render_html(tree)
    assert page.lower().startswith("<!doctype html>") and page.count("<rect") == len(names)
    assert "<svg" in page and "marker-end" in page


def test_direction_breaks_symmetry_of_a_pair():
    t1 = build_tree(["x", "y"], [Link("x", "y", True, 0.1, parent="y", confidence=0.9)])
    assert t1.roots == ("y",) and t1.parent_of("x") == "y"
    t2 = build_tree(["x", "y"], [Link("x", "y", True, 0.1, parent="x", confidence=0.9)])
    assert t2.roots == ("x",) and t2.parent_of("y") == "x"


def test_chain_with_one_wrong_direction_vote_still_a_chain():
    truth = {"b": "a", "c": "b", "d": "c"}
    dist = {("a", "b"): 0.1, ("b", "c"): 0.1, ("c", "d"): 0.1}
    links = _links(truth, dist, wrong_dir={("c", "b")})
    links += [Link("a", "c", True, 0.2, parent="a", confidence=0.8),
              Link("b", "d", True, 0.2, parent="b", confidence=0.8),
              Link("a", "d", True, 0.3, parent="a", confidence=0.8)]
    tree = build_tree(list("abcd"), links)
    assert tree.roots == ("a",)
    correct = sum(tree.parent_of(c) == p for c, p in truth.items())
    assert correct >= 2
