"""Across modules: what the per-module low-rank readings say together (a merged LoRA of one rank, a dense
update, rounding only), and the compact module lists the reports print."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Protocol


class ModuleReading(Protocol):
    """What the summary reads of one module's :class:`lineage.signals.lowrank.LowRank`."""

    @property
    def shape(self) -> tuple[int, int]: ...
    @property
    def status(self) -> str: ...
    @property
    def rank(self) -> int: ...
    @property
    def gap(self) -> float | None: ...
    @property
    def rank_source(self) -> str: ...


@dataclass(frozen=True)
class LowRankSummary:
    """Across modules: ``kind`` in unchanged / rounding / low-rank / dense / noise-like."""

    kind: str
    rank: int | None
    modules: tuple[str, ...]
    ranks: dict[str, int] = field(default_factory=dict)
    statuses: dict[str, str] = field(default_factory=dict)
    description: str = ""
    #: changed modules no wider than the rank (a rank-r update of them is full rank)
    full_rank_modules: tuple[str, ...] = ()
    #: how the low-rank modules' ranks were read: module count per ``LowRank.rank_source``
    rank_sources: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


_LAYER = re.compile(r"^L(\d+)\.(.+)$")


def compress_modules(names: list[str] | tuple[str, ...]) -> str:
    """``L0.attn.q.weight, L1.attn.q.weight`` → ``attn.q in layers 0-1``."""
    by_suffix: dict[str, list[int]] = {}
    others: list[str] = []
    for nm in names:
        mt = _LAYER.match(nm)
        if mt:
            suffix = mt.group(2).removesuffix(".weight")
            by_suffix.setdefault(suffix, []).append(int(mt.group(1)))
        else:
            others.append(nm)
    parts = []
    for suffix, layers in sorted(by_suffix.items()):
        layers = sorted(set(layers))
        runs, start, prev = [], layers[0], layers[0]
        for x in layers[1:] + [None]:
            if x is not None and x == prev + 1:
                prev = x
                continue
            runs.append(f"{start}" if start == prev else f"{start}-{prev}")
            if x is not None:
                start = prev = x
        parts.append((suffix, ",".join(runs)))
    # modules sharing one layer set are written once: "attn.o, attn.q in layers 0-1"
    grouped: dict[str, list[str]] = {}
    for suffix, runs_text in parts:
        grouped.setdefault(runs_text, []).append(suffix)
    text = [f"{', '.join(sfx)} in layer{'s' if ('-' in r or ',' in r) else ''} {r}" for r, sfx in grouped.items()]
    return "; ".join(text + sorted(others))


def summarise(results: Mapping[str, ModuleReading], *, noise_is_untouched: bool = False) -> LowRankSummary:
    """Combine per-module results into one statement.

    ``noise_is_untouched``: count noise-like modules as untouched (set it when the
    child is known to be quantised, so untouched modules carry only rounding noise).
    """
    statuses = {k: v.status for k, v in results.items()}
    ranks = {k: v.rank for k, v in results.items() if v.status == "low-rank"}
    dense = tuple(sorted(k for k, s in statuses.items() if s == "dense"))
    lowr = tuple(sorted(ranks))
    noise = tuple(sorted(k for k, s in statuses.items() if s == "noise-like"))
    if not results or all(s == "unchanged" for s in statuses.values()):
        return LowRankSummary("unchanged", None, (), {}, statuses, "no module changed")
    if all(s in ("unchanged", "rounding") for s in statuses.values()):
        return LowRankSummary("rounding", None, (), {}, statuses,
                              "every change is float re-encoding rounding")
    # a dense module no wider than the largest low-rank rank may be a LoRA of that rank at full rank
    r_top = max(ranks.values()) if ranks else 0
    dense_wide = tuple(k for k in dense if min(results[k].shape) > r_top)
    if dense and len(dense_wide) >= len(lowr):
        return LowRankSummary("dense", None, dense, ranks, statuses,
                              f"dense update on {len(dense)} modules")
    if lowr:
        # A merged LoRA has one rank r in every touched module (or the full rank of a
        # module narrower than r) and leaves other modules alone; a trained dense
        # update of a small model can look low-rank module by module, but with
        # ranks that differ and every module changed.
        counts = Counter(ranks.values())
        r_mode = max(counts, key=lambda x: (counts[x], x))
        consistent = sum(1 for k in lowr if ranks[k] == r_mode or ranks[k] == min(results[k].shape)
                         ) >= 0.75 * len(lowr)
        untouched = any(s in ("unchanged", "rounding") for s in statuses.values()) or (
            noise_is_untouched and bool(noise))
        gaps = sorted(results[k].gap for k in lowr if results[k].gap is not None)
        clear = bool(gaps) and gaps[len(gaps) // 2] >= 3.0
        if not untouched and not (consistent and clear):
            return LowRankSummary("dense", None, lowr, ranks, statuses,
                                  f"structured update of every module ({len(lowr)} modules, ranks "
                                  f"{min(ranks.values())}-{max(ranks.values())})")
        r = r_mode if consistent else max(ranks.values())
        # A module no wider than the rank takes the update at full rank: it is changed, but nothing
        # tells that change from a dense one, so it is listed apart (when wider modules carry the rank).
        narrow = tuple(sorted(k for k in lowr + dense if min(results[k].shape) <= r))
        if narrow and len(set(lowr) - set(narrow)):
            lowr = tuple(k for k in lowr if k not in narrow)
        else:
            narrow = ()
        desc = f"low-rank update, rank {r} on {compress_modules(lowr)}"
        if narrow:
            desc += f"; at full rank (no wider than the rank) on {compress_modules(narrow)}"
        sources = dict(Counter(results[k].rank_source for k in lowr))
        return LowRankSummary("low-rank", r, lowr, ranks, statuses, desc, full_rank_modules=narrow,
                              rank_sources=sources)
    return LowRankSummary("noise-like", None, noise, {}, statuses,
                          f"noise-like change on {len(noise)} modules (no low-rank structure)")
