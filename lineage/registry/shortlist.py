"""A query's shortlist: the nearest keys, grouped into near-duplicates, then tested group by group.

A registered model often has many near-identical copies — re-encodings, quantised and GGUF
re-uploads, function-preserving disguises, tiny LoRA merges — whose keys are as close to any
query as the original's (the key inherits the fingerprint's invariances, so a disguised copy's
key *is* the original's).  Ranked one by one, such copies fill the first ``k`` places and push a
parent out of them though its key is just as close (the zoo's ``-ftd-combined-gguf`` descendants
ranked their parent 10th–12th behind eight identical copies of it).  No statistic can order them
— they are the same function — so the shortlist ranks *groups* instead:

1. the ``fetch`` nearest keys are grouped greedily in similarity order: a key joins the first
   group whose leader (its nearest member to the query) it matches at cosine ≥ ``group_cos``,
   else it starts a new group;
2. the leaders of the first ``k`` groups are tested (the calibrated fingerprint test);
3. every group whose leader the test links is expanded: its other members are tested too (up to
   ``max_tests`` tests in all), each keeping its own p-value.

Cost follows evidence: members are only tested where their leader is a confirmed relative; an
unrelated group costs one test whatever its size, so the null is unchanged (independent models
never become candidates by grouping, and every reported relation carries its own test).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lineage.registry.ann import Neighbour

#: Keys at least this close are one group.  Copies, re-encodings, quantised and disguised copies of one
#: model have key cosines 0.96–1.000 on the zoo; a fine-tune and its base 0.74–0.94; independent models ≤ 0.23.
GROUP_COS = 0.95


@dataclass(frozen=True)
class KeyGroup:
    """Near-duplicate neighbours; ``members[0]`` is the leader (the nearest to the query)."""

    members: tuple[Neighbour, ...]

    @property
    def leader(self) -> Neighbour:
        return self.members[0]


@dataclass(frozen=True)
class QueryPolicy:
    """How a query shortlists: ``k`` groups of near-duplicate keys among the ``fetch`` nearest, at most
    ``max_tests`` fingerprint tests in all."""

    k: int = 10
    fetch: int = 64
    group_cos: float = GROUP_COS
    max_tests: int = 32


def group_neighbours(neigh: Sequence[Neighbour], keys: np.ndarray, group_cos: float = GROUP_COS) -> list[KeyGroup]:
    """Greedy leader grouping of ``neigh`` (most similar first; ``keys[i]`` is ``neigh[i]``'s unit key)."""
    leaders: list[int] = []
    members: list[list[Neighbour]] = []
    for i, n in enumerate(neigh):
        if leaders:
            sims = keys[leaders] @ keys[i]
            g = int(np.argmax(sims >= group_cos)) if bool((sims >= group_cos).any()) else -1
        else:
            g = -1
        if g < 0:
            leaders.append(i)
            members.append([n])
        else:
            members[g].append(n)
    return [KeyGroup(tuple(m)) for m in members]


def expansion(groups: Sequence[KeyGroup], linked_leaders: set[int], budget: int) -> list[Neighbour]:
    """The members (beyond their leader) of the groups whose leader was linked, in group order, at most ``budget``."""
    out: list[Neighbour] = []
    for g in groups:
        if g.leader.id in linked_leaders:
            out += g.members[1:]
    return out[:max(0, budget)]
