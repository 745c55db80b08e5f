"""Scan many models (folders, a Hugging Face cache, Hub organisations) and report their family tree.

Pipeline (fingerprinting and testing run on an :mod:`lineage.engine` — threads here, or a Dask /
Ray cluster; the registry database stays in this process):

1. **discover** the models (:mod:`lineage.io.discover`);
2. **register** each one (:mod:`lineage.registry`): its reference (Hub commit, or a content
   signature of its files) is looked up in the registry, a stored entry is verified (content
   hash of the fingerprint and of its record) and reused, anything new, changed or damaged is
   fingerprinted (reading only the fingerprint's sample, so Hub models are not downloaded) —
   damaged entries are listed in ``ScanResult.recomputed``;
3. **shortlist** candidate pairs by the retrieval keys' nearest neighbours
   (:class:`lineage.registry.search.CandidatePolicy`: ``k`` per model, plus close keys up to
   ``k_max``) — ``n·k`` pairs, not ``n²``;
4. **test** each candidate pair with the calibrated fingerprint test
   (:func:`lineage.fingerprint.compare_fingerprints`); results are cached by fingerprint content,
   so a re-scan of a grown set only tests pairs with a new model;
5. optionally **confirm** each linked pair with the full weight comparison
   (:func:`lineage.compare.compare`), which adds the relation type and direction;
6. **tree** (:func:`lineage.tree.build_tree`) over the links, and **claims**: each model's
   claimed base (card, config, GGUF, safetensors metadata) checked against the weights.

A model that cannot be read (bad file, missing shard, unsupported format) is reported with
its error and left out; the scan goes on.  ``ScanResult.to_dict()`` follows the versioned
schema ``lineage.scan/2``.

Calibration: a link is drawn at fingerprint ``p ≤ alpha``, by default ``1e-3 / (n(n−1)/2)``,
Bonferroni over every pair the scan could have tested (the shortlist only skips tests) — the
family-wise chance of one false link among independent models is at most 1e-3 under the
fingerprint null (calibrated in ``benchmarks/fingerprint_accuracy.py``).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lineage.engine import get_engine
from lineage.errors import ConfigError
from lineage.io.discover import ModelEntry, discover
from lineage.progress import ProgressFn
from lineage.registry.claims import STATUSES, ClaimCheck
from lineage.registry.ingest import Ingested, ingest
from lineage.registry.search import (
    DEFAULT_K,
    DEFAULT_K_MAX,
    DEFAULT_TAU,
    CandidatePolicy,
    Confirmed,
    candidate_pairs,
    claim_for,
    confirm,
    name_table,
    pair_p,
    resolve_claim,
)
from lineage.registry.store import ModelRecord, Registry, default_db_path
from lineage.tree import Link, Tree, build_tree

log = logging.getLogger(__name__)

SCHEMA = "lineage.scan/2"
#: Family-wise error rate for drawing fingerprint links (divided by the number of pairs).
FAMILY_ALPHA = 1e-3
#: Merge type shown for a merge known only from its model card (some of its parents were not scanned).
CLAIMED_MERGE = "model card claim"
#: File name of the registry database inside ``--cache-dir``.
DB_NAME = "registry.sqlite"


@dataclass(frozen=True)
class ScanOptions:
    """How to run a scan (validated on construction)."""

    engine: str = "local"
    workers: int = 0
    address: str | None = None
    cache_dir: str | None = None     # folder of the registry database (default: the project's cache dir)
    db: str | None = None            # the registry database file itself (overrides cache_dir)
    alpha: float | None = None       # per-pair link threshold (default FAMILY_ALPHA / pairs)
    confirm: bool = False            # full weight comparison of every linked pair
    refresh: bool = False            # ignore stored fingerprints
    k: int = DEFAULT_K               # candidates per model (nearest retrieval keys)
    k_max: int = DEFAULT_K_MAX       # … plus keys with cosine >= tau, up to k_max
    tau: float = DEFAULT_TAU

    def __post_init__(self) -> None:
        if self.alpha is not None and not 0 < self.alpha < 1:
            raise ConfigError(f"alpha must be in (0, 1), not {self.alpha}")
        if self.workers < 0:
            raise ConfigError(f"workers must be >= 0, not {self.workers}")
        if self.k < 1 or self.k_max < self.k:
            raise ConfigError(f"need 1 <= k <= k_max, not k={self.k}, k_max={self.k_max}")

    def db_path(self) -> Path:
        """Where the registry database is."""
        if self.db:
            return Path(self.db)
        return Path(self.cache_dir) / DB_NAME if self.cache_dir else default_db_path()


@dataclass(frozen=True)
class ScannedModel:
    """One discovered model and what happened to it."""

    label: str
    ref: str
    origin: str
    ok: bool
    error: str | None = None
    format: str | None = None
    family: str | None = None
    n_layers: int | None = None
    hidden: int | None = None
    total_bytes: int | None = None
    bytes_read: int | None = None
    fingerprint: str | None = None     # content hash of its fingerprint in the registry
    cached: bool = False
    seconds: float | None = None
    recomputed: str | None = None      # a stored entry failed verification and was recomputed: why
    claims: tuple[str, ...] = ()


@dataclass(frozen=True)
class ScanPair:
    """A compared pair that crossed the link threshold (or was confirmed)."""

    a: str
    b: str
    log10_p: float
    method: str                     # "fingerprint" | "weights"
    relation: str = "related"
    parent: str | None = None
    confidence: float = 0.0
    distance: float | None = None   # size of the change (confirmed pairs), shorter = closer


@dataclass(frozen=True)
class ScanResult:
    """Models, links, the family tree and the claim checks of a scan."""

    models: tuple[ScannedModel, ...]
    pairs: tuple[ScanPair, ...]
    tree: Tree
    n_compared: int                 # candidate pairs whose test result was used
    alpha: float
    engine: str
    timing: dict[str, float] = field(default_factory=dict)
    claims: tuple[ClaimCheck, ...] = ()
    n_tested: int = 0               # … of which tested in this run (the rest came from the pair cache)
    registry: str = ""

    @property
    def recomputed(self) -> tuple[ScannedModel, ...]:
        return tuple(m for m in self.models if m.recomputed)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (schema ``lineage.scan/2``)."""
        return {"schema": SCHEMA, "engine": self.engine, "alpha": self.alpha, "n_compared": self.n_compared,
                "n_tested": self.n_tested, "registry": self.registry,
                "claims": [c.to_dict() for c in self.claims],
                "claim_counts": {s: sum(c.status == s for c in self.claims) for s in STATUSES},
                "models": [asdict(m) for m in self.models], "pairs": [asdict(p) for p in self.pairs],
                "tree": self.tree.to_dict(), "timing": dict(self.timing)}


# --------------------------------------------------------------------------- weight confirmation (engine task)


def confirm_task(job: tuple[str, str]) -> dict[str, Any]:
    """Full weight comparison of a linked pair, reduced to what a tree link needs."""
    from lineage.compare import CompareOptions, compare
    from lineage.family import link_from_report

    a, b = job
    rep = compare(a, b, options=CompareOptions(device=os.environ.get("LINEAGE_DEVICE", "cpu")))
    lk = link_from_report("a", "b", rep)
    # neither side an ancestor of the other: siblings, not a derivation (lineage.tree.SIBLING)
    relation = "sibling" if lk.between and lk.parent is None else rep.verdict.relation
    return {"log10_p": rep.verdict.log10_p, "related": lk.related, "relation": relation, "parent": lk.parent,
            "confidence": lk.confidence, "distance": lk.distance}


# --------------------------------------------------------------------------- the scan


def scan(sources: Sequence[str] | Sequence[ModelEntry], options: ScanOptions | None = None,
         progress: ProgressFn | None = None) -> ScanResult:
    """Discover, register, shortlist, test and build the family tree of the models in ``sources``."""
    opts = options or ScanOptions()
    t0 = time.perf_counter()
    entries = [s for s in sources if isinstance(s, ModelEntry)]
    paths = [s for s in sources if not isinstance(s, ModelEntry)]
    entries += discover([str(p) for p in paths]) if paths else []
    if not entries:
        raise ConfigError("no models found in " + ", ".join(map(str, sources)))
    reg = Registry(opts.db_path())
    engine = get_engine(opts.engine, opts.workers, opts.address)
    timing: dict[str, float] = {"discover_s": time.perf_counter() - t0}
    try:
        done = ingest(engine, reg, entries, refresh=opts.refresh, progress=progress)
        timing["fingerprint_s"] = time.perf_counter() - t0 - timing["discover_s"]
        models = [_scanned(d) for d in done]
        ok = [d for d in done if d.record is not None]
        recs: list[ModelRecord] = [d.record for d in ok if d.record is not None]
        labels = [d.entry.label for d in ok]
        n_pairs = len(ok) * (len(ok) - 1) // 2
        alpha = opts.alpha if opts.alpha is not None else FAMILY_ALPHA / max(1, n_pairs)
        t1 = time.perf_counter()
        cands = candidate_pairs(recs, CandidatePolicy(opts.k, opts.tau, opts.k_max))
        claimed = _claimed(reg, recs, labels)
        wanted = [(recs[i].fp_hash, recs[j].fp_hash) for i, j in cands]
        wanted += [(recs[i].fp_hash, r.fp_hash) for i, (r, _) in claimed.items()]
        conf = confirm(engine, reg, wanted, progress=progress)
        for f in conf.failed:
            log.warning("fingerprint comparisons failed: %s", f)
        timing["compare_s"] = time.perf_counter() - t1
        thr = math.log10(alpha)
        pairs = [ScanPair(labels[i], labels[j], lp, "fingerprint") for i, j in sorted(cands)
                 if (lp := pair_p(conf, recs[i].fp_hash, recs[j].fp_hash)) is not None and lp <= thr]
        pairs.sort(key=lambda p: (p.a, p.b))
        if opts.confirm and pairs:
            t2 = time.perf_counter()
            pairs = _confirm(engine, {d.entry.label: d.entry.ref for d in ok}, pairs, progress)
            timing["confirm_s"] = time.perf_counter() - t2
    finally:
        engine.close()
    tree, pairs = _tree(labels, recs, {d.entry.label: d.entry.ref for d in ok}, pairs, alpha, opts.confirm, timing)
    checks = _claims(recs, labels, claimed, conf, thr, pairs, tree)
    timing["total_s"] = time.perf_counter() - t0
    return ScanResult(tuple(models), tuple(pairs), tree, len(cands), alpha, engine.name, timing, checks,
                      conf.tested, str(reg.path))


def _tree(labels: Sequence[str], recs: Sequence[ModelRecord], refs: dict[str, str], pairs: list[ScanPair],
          alpha: float, confirmed: bool, timing: dict[str, float]) -> tuple[Tree, list[ScanPair]]:
    """The family tree over the links, with merges: fitted on the weights after ``--confirm``
    (:func:`lineage.family.find_merges`), or claimed by a model card naming several bases of which some
    were not scanned (drawn from the present parents, the absent ones noted).  A merge child's pairs
    with its parents are relabelled "merge"."""
    links = [_link(p, alpha) for p in pairs]
    tree = build_tree(labels, links)
    merges: dict[str, tuple[str, ...]] = dict(_claimed_merges(recs, labels, pairs))
    methods: dict[str, str] = {c: CLAIMED_MERGE for c in merges}
    if confirmed and pairs:
        from lineage.family import find_merges

        t0 = time.perf_counter()
        found, fitted = find_merges(refs, links, tree)
        merges.update(found)
        methods.update({c: fitted.get(c, "") for c in found})
        methods = {c: m for c, m in methods.items() if m}
        timing["merges_s"] = time.perf_counter() - t0
    if not merges:
        return tree, pairs
    tree = build_tree(labels, links, merges=merges, merge_methods=methods)
    merge_edges = {(x, e.child) for e in tree.edges if e.relation == "merge" for x in (e.parent, *e.other_parents)}
    out = []
    for p in pairs:
        parent = p.a if (p.a, p.b) in merge_edges else p.b if (p.b, p.a) in merge_edges else None
        out.append(p if parent is None else ScanPair(p.a, p.b, p.log10_p, p.method, "merge", parent,
                                                      max(p.confidence, 0.9), p.distance))
    return tree, out


def _claimed_merges(recs: Sequence[ModelRecord], labels: Sequence[str], pairs: Sequence[ScanPair]
                    ) -> dict[str, tuple[str, ...]]:
    """Models whose card names two or more bases (the Hub's convention for a merge) of which at least one
    is linked to it here and at least one was not scanned: label → (present parents, absent names)."""
    names = name_table(recs, labels)
    label_of = {id(r): lab for r, lab in zip(recs, labels)}
    linked = {(p.a, p.b) for p in pairs} | {(p.b, p.a) for p in pairs}
    out: dict[str, tuple[str, ...]] = {}
    for r, lab in zip(recs, labels):
        card = list(dict.fromkeys(c for c, where in r.claims if where == "card"))
        if len(card) < 2:
            continue
        present = [label_of[id(names[c.lower()])] for c in card if c.lower() in names]
        absent = [c for c in card if c.lower() not in names]
        if absent and any((lab, x) in linked for x in present):
            out[lab] = tuple(x for x in present if (lab, x) in linked) + tuple(absent)
    return out


def _scanned(d: Ingested) -> ScannedModel:
    e = d.entry
    if d.record is None:
        return ScannedModel(e.label, e.ref, e.origin, False, d.error, recomputed=d.recomputed)
    v = d.record.info_dict()
    return ScannedModel(e.label, e.ref, e.origin, True, None, v.get("format"), v.get("family"),  # type: ignore[arg-type]
                        v.get("layers"), v.get("hidden"), v.get("model_bytes"),  # type: ignore[arg-type]
                        d.bytes_read if not d.cached else v.get("bytes_read"),  # type: ignore[arg-type]
                        d.record.fp_hash, d.cached, d.seconds, d.recomputed, tuple(c for c, _ in d.record.claims))


def _claimed(reg: Registry, recs: Sequence[ModelRecord], labels: Sequence[str]) -> dict[int, tuple[ModelRecord, str]]:
    """Scan position → (registered model its claim names, its label), for models whose claim resolves."""
    names = name_table(recs, labels)
    pos = {id(r): i for i, r in enumerate(recs)}
    out: dict[int, tuple[ModelRecord, str]] = {}
    for i, r in enumerate(recs):
        claims = [c for c, _ in r.claims]
        if not claims:
            continue
        hit = resolve_claim(claims, names)
        if hit is None:  # outside this scan: anywhere in the registry
            found = {c.lower(): x for c in claims for x in reg.by_repo(c)[:1]}
            hit = resolve_claim(claims, found)
            if hit is not None:
                out[i] = (hit, hit.repo_id or hit.label)
        elif hit is not r:
            out[i] = (hit, labels[pos[id(hit)]])
    return out


def _claims(recs: Sequence[ModelRecord], labels: Sequence[str], claimed: dict[int, tuple[ModelRecord, str]],
            conf: Confirmed, thr: float, pairs: Sequence[ScanPair], tree: Tree) -> tuple[ClaimCheck, ...]:
    best: dict[str, tuple[str, float]] = {}
    for p in pairs:
        for x, y in ((p.a, p.b), (p.b, p.a)):
            if x not in best or p.log10_p < best[x][1]:
                best[x] = (y, p.log10_p)
    plp = {(p.a, p.b): p.log10_p for p in pairs} | {(p.b, p.a): p.log10_p for p in pairs}
    out = []
    for i, r in enumerate(recs):
        lab = labels[i]
        parent = tree.parent_of(lab)
        points = (parent, plp[(lab, parent)]) if parent is not None and (lab, parent) in plp else best.get(lab)
        res, res_label = claimed.get(i, (None, None))
        out.append(claim_for(lab, r, res, res_label, conf, thr, points))
    return tuple(out)


def _confirm(engine: Any, ref: dict[str, str], pairs: list[ScanPair], progress: ProgressFn | None) -> list[ScanPair]:
    out = list(pairs)
    for k, res in enumerate(engine.map(confirm_task, [(ref[p.a], ref[p.b]) for p in pairs])):
        p = pairs[res.index]
        if res.ok and res.value is not None:
            v = res.value
            parent = {"a": p.a, "b": p.b}.get(str(v["parent"]))
            out[res.index] = ScanPair(p.a, p.b, float(v["log10_p"]) if v["log10_p"] is not None else p.log10_p,
                                      "weights", str(v["relation"]), parent, float(v["confidence"]),
                                      float(v["distance"]))
        else:
            log.warning("weight comparison of %s and %s failed: %s", p.a, p.b, res.error)
        if progress is not None:
            progress(k + 1, len(pairs), f"confirm {p.a} vs {p.b}")
    return out


def _link(p: ScanPair, alpha: float) -> Link:
    """Tree link: stronger evidence = shorter edge (distance ``1 / −log10 p``)."""
    related = p.log10_p <= math.log10(alpha) if p.method == "fingerprint" else p.relation not in (
        "unrelated", "inconclusive")
    distance = p.distance if p.distance is not None else 1.0 / max(1.0, -p.log10_p)
    return Link(p.a, p.b, related, distance, p.parent, p.confidence, p.relation)


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n}"


def claims_headline(result: ScanResult) -> list[str]:
    """The claim checks: counts per status, then one line per model (contradicted claims first)."""
    if not result.claims:
        return []
    counts = ", ".join(f"{sum(c.status == st for c in result.claims)} {st}" for st in STATUSES)
    order = {st: i for i, st in enumerate(("contradicted", "unverifiable", "confirmed", "parent found", "no parent"))}
    lines = [f"Claims checked against the weights: {counts}."]
    lines += ["  " + c.line() for c in sorted(result.claims, key=lambda c: (order[c.status], c.model))]
    return lines


def render_text(result: ScanResult, *, colour: bool = False) -> str:
    """Terminal summary: the claim checks (headline), models (read fraction, errors), the links, and the tree."""
    from lineage.render.pvalue import format_p
    from lineage.render.text import Style
    from lineage.render.tree import render_text as tree_text

    s = Style(colour)
    ok = [m for m in result.models if m.ok]
    bad = [m for m in result.models if not m.ok]
    total = sum(m.total_bytes or 0 for m in ok)
    read = sum(m.bytes_read or 0 for m in ok if not m.cached)
    cached = sum(bool(m.cached) for m in ok)
    head = claims_headline(result)
    lines = ([s(head[0], "bold")] + head[1:] + [""]) if head else []
    lines += [s(f"Scanned {len(result.models)} models", "bold")
              + f" ({len(ok) - cached} fingerprinted now + {cached} from the registry + {len(bad)} failed) "
              f"on the {result.engine} engine in {result.timing.get('total_s', 0):.1f} s; "
              f"read {_size(read)} of {_size(total)}.",
              f"{result.n_compared} candidate pairs compared ({result.n_tested} tested now, the rest cached); "
              f"link threshold p ≤ {result.alpha:.2g} per pair (family-wise {FAMILY_ALPHA:g}).", ""]
    for m in result.recomputed:
        lines.append(s("recomputed:", "yellow") + f" {m.label}: {m.recomputed}")
    if result.recomputed:
        lines.append("")
    if result.pairs:
        lines.append(s("Links", "bold"))
        for p in result.pairs:
            arrow = f"{p.parent} → {p.b if p.parent == p.a else p.a}" if p.parent else f"{p.a} — {p.b}"
            lines.append(f"  {arrow}  {p.relation}  {format_p(p.log10_p)} ({p.method})")
        lines.append("")
    lines.append(s("Family tree", "bold"))
    lines.append(tree_text(result.tree).rstrip("\n"))
    for m in bad:
        lines.append(s("error:", "red") + f" {m.label}: {m.error}")
    return "\n".join(lines) + "\n"


def render_html(result: ScanResult, title: str = "lineage scan") -> str:
    """The drawn tree (:func:`lineage.render.tree.render_html`) headed by the claim checks and recomputed entries."""
    import html

    from lineage.render.tree import render_html as tree_html

    pairs = [{"a": p.a, "b": p.b, "relation": p.relation, "log10_p": p.log10_p, "method": p.method}
             for p in result.pairs]
    page = tree_html(result.tree, title=title, pairs=pairs)
    items = "".join(f"<li>{html.escape(x.strip())}</li>" for x in claims_headline(result)[1:])
    items += "".join(f"<li>recomputed {html.escape(m.label)}: {html.escape(m.recomputed or '')}</li>"
                     for m in result.recomputed)
    head = claims_headline(result)
    block = (f"<section id=\"claims\"><h2>{html.escape(head[0]) if head else 'Claims'}</h2><ul>{items}</ul></section>\n")
    return page.replace("</h1>\n", "</h1>\n" + block, 1)
