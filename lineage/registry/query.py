"""``lineage registry query``: the registered models a new one is most likely derived from or related to."""

from __future__ import annotations

import html
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lineage.errors import ConfigError
from lineage.registry.ann import open_index
from lineage.registry.claims import ClaimCheck
from lineage.registry.search import Confirmed, claim_for, confirm, pair_p, resolve_claim
from lineage.registry.shortlist import QueryPolicy, expansion, group_neighbours
from lineage.registry.store import ModelRecord, Registry

log = logging.getLogger(__name__)

SCHEMA = "lineage.registry.query/1"
#: Family-wise error rate of a query's links (divided by the number of registered models).
FAMILY_ALPHA = 1e-3


@dataclass(frozen=True)
class QueryHit:
    """One candidate, confirmed by the calibrated fingerprint test."""

    label: str
    ref: str
    repo_id: str | None
    revision_sha: str | None
    similarity: float        # cosine of the retrieval keys (what shortlisted it)
    log10_p: float | None    # fingerprint test (None: the test failed)
    related: bool
    claimed: bool = False    # named by the query model's claim


@dataclass(frozen=True)
class QueryResult:
    """The query model, its confirmed relatives (most significant first) and its claim check."""

    model: str
    registry: str
    n_registered: int
    alpha: float
    hits: tuple[QueryHit, ...]
    claim: ClaimCheck
    timing: dict[str, float] = field(default_factory=dict)

    @property
    def related(self) -> tuple[QueryHit, ...]:
        return tuple(h for h in self.hits if h.related)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON (schema ``lineage.registry.query/1``)."""
        return {"schema": SCHEMA, "model": self.model, "registry": self.registry, "n_registered": self.n_registered,
                "alpha": self.alpha, "claim": self.claim.to_dict(), "hits": [asdict(h) for h in self.hits],
                "timing": dict(self.timing)}


def _query_record(reg: Registry, model: str, engine: object) -> tuple[ModelRecord, bool]:
    """The query's record: its verified registry entry, else fingerprinted now (and registered)."""
    from lineage.io.discover import ModelEntry
    from lineage.registry.ingest import ingest

    label = model if not Path(model).exists() else Path(model).name
    got = ingest(engine, reg, [ModelEntry(model, label, "query")])[0]
    if got.record is None:
        raise ConfigError(f"cannot fingerprint the query model ({got.error})", path=model)
    return got.record, got.cached


def query(reg: Registry, model: str, engine: object, *, policy: QueryPolicy | None = None) -> QueryResult:
    """Shortlist ``model``'s relatives by the index (:mod:`lineage.registry.shortlist`: ``k`` groups of
    near-duplicate keys, linked groups expanded) and confirm each candidate with the fingerprint test."""
    pol = policy or QueryPolicy()
    t0 = time.perf_counter()
    rec, _ = _query_record(reg, model, engine)
    t1 = time.perf_counter()
    index = open_index(reg)
    n = max(1, reg.count() - 1)
    thr = math.log10(FAMILY_ALPHA / n)
    neigh = index.search(rec.key, pol.fetch, exclude=[rec.id])
    groups = group_neighbours(neigh, index.vectors([x.id for x in neigh]), pol.group_cos)[:pol.k]
    sim = {x.id: x.similarity for x in neigh}
    leaders = reg.by_ids([g.leader.id for g in groups])
    claimed = resolve_claim([c for c, _ in rec.claims], _claim_names(reg, rec))
    if claimed is not None and claimed.id != rec.id:
        leaders.setdefault(claimed.id, claimed)
    t2 = time.perf_counter()
    conf = confirm(engine, reg, [(rec.fp_hash, c.fp_hash) for c in leaders.values()])
    linked = {i for i, c in leaders.items() if _linked(pair_p(conf, rec.fp_hash, c.fp_hash), thr)}
    more = reg.by_ids([x.id for x in expansion(groups, linked, pol.max_tests - len(leaders))])
    cands = {**leaders, **more}
    if more:
        more_conf = confirm(engine, reg, [(rec.fp_hash, c.fp_hash) for c in more.values()])
        conf = Confirmed({**conf.log10_p, **more_conf.log10_p}, conf.cached + more_conf.cached,
                         conf.tested + more_conf.tested, conf.failed + more_conf.failed)
    hits = []
    for c in cands.values():
        lp = pair_p(conf, rec.fp_hash, c.fp_hash)
        hits.append(QueryHit(c.label, c.ref, c.repo_id, c.revision_sha, sim.get(c.id, float("nan")), lp,
                             _linked(lp, thr), claimed is not None and c.id == claimed.id))
    hits.sort(key=lambda h: (h.log10_p if h.log10_p is not None else 1.0, -h.similarity))
    top = next(((h.label, float(h.log10_p)) for h in hits if h.related and h.log10_p is not None), None)
    claim = claim_for(rec.label, rec, claimed, claimed.label if claimed else None, conf, thr, top)
    t3 = time.perf_counter()
    timing = {"fingerprint_s": t1 - t0, "index_s": t2 - t1, "confirm_s": t3 - t2, "query_s": t3 - t1,
              "tested": conf.tested, "cached": conf.cached, "groups": len(groups), "expanded": len(more)}
    return QueryResult(model, str(reg.path), n, FAMILY_ALPHA / n, tuple(hits), claim, timing)


def _linked(lp: float | None, thr: float) -> bool:
    return lp is not None and lp <= thr


def _claim_names(reg: Registry, rec: ModelRecord) -> dict[str, ModelRecord]:
    out: dict[str, ModelRecord] = {}
    for c, _ in rec.claims:
        for r in reg.by_repo(c):
            if r.id != rec.id:
                out.setdefault(c.lower(), r)
    return out


def render_text(res: QueryResult) -> str:
    """Terminal summary: the claim headline, then each candidate with its p-value."""
    lines = [res.claim.line(), "",
             f"{res.model}: {len(res.related)} related of {len(res.hits)} candidates among {res.n_registered} "
             f"registered models (link at p ≤ {res.alpha:.2g}; query {res.timing.get('query_s', 0):.2f} s)"]
    for h in res.hits:
        p = "test failed" if h.log10_p is None else f"log10 p {h.log10_p:7.1f}"
        mark = "RELATED  " if h.related else "unrelated"
        extra = "  (claimed base)" if h.claimed else ""
        lines.append(f"  {mark} {p}  key cos {h.similarity:5.2f}  {h.label}{extra}")
    return "\n".join(lines) + "\n"


def render_html(res: QueryResult) -> str:
    """A plain self-contained HTML page of the query result."""
    rows = "".join(
        f"<tr><td>{'related' if h.related else 'unrelated'}</td><td>{'' if h.log10_p is None else f'{h.log10_p:.1f}'}"
        f"</td><td>{h.similarity:.2f}</td><td>{html.escape(h.label)}{' (claimed base)' if h.claimed else ''}</td></tr>"
        for h in res.hits)
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>lineage registry query</title></head><body>"
            f"<h1>{html.escape(res.model)}</h1><p><strong>{html.escape(res.claim.line())}</strong></p>"
            f"<p>{len(res.related)} related of {len(res.hits)} candidates among {res.n_registered} registered models."
            "</p><table border=\"1\"><tr><th>relation</th><th>log10 p</th><th>key cos</th><th>model</th></tr>"
            f"{rows}</table><script type=\"application/json\" id=\"data\">"
            f"{html.escape(json.dumps(res.to_dict(), default=str))}</script></body></html>\n")
