"""Scan many models (folders, a Hugging Face cache, Hub organisations) and report their family tree.

Pipeline (each stage runs on an :mod:`lineage.engine` — threads here, or a Dask / Ray cluster):

1. **discover** the models (:mod:`lineage.io.discover`);
2. **fingerprint** each one (:mod:`lineage.fpcompare`; reads only what the fingerprint needs,
   so Hub models are not downloaded), cached on disk by reference and file signature so a
   re-scan only fingerprints what changed;
3. **compare fingerprints** pairwise (tasks are rows of the pair matrix, so each task loads
   its row model once) — the independence test of :func:`lineage.fingerprint.compare_fingerprints`;
4. optionally **confirm** each linked pair with the full weight comparison
   (:func:`lineage.compare.compare`), which adds the relation type and direction;
5. **tree** (:func:`lineage.tree.build_tree`) over the links.

A model that cannot be read (bad file, missing shard, unsupported format) is reported with
its error and left out; the scan goes on.  ``ScanResult.to_dict()`` follows the versioned
schema ``lineage.scan/1``.

Calibration: a link is drawn at fingerprint ``p ≤ alpha``; with ``n`` models there are
``n(n−1)/2`` tests, so the default ``alpha`` is Bonferroni-corrected
(``1e-3 / number of pairs``) — the family-wise chance of one false link among
independent models is then at most 1e-3 under the fingerprint null (calibrated in
``benchmarks/fingerprint_accuracy.py``).
"""

from __future__ import annotations

import hashlib
import json
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
from lineage.tree import Link, Tree, build_tree

log = logging.getLogger(__name__)

SCHEMA = "lineage.scan/1"
#: Family-wise error rate for drawing fingerprint links (divided by the number of pairs).
FAMILY_ALPHA = 1e-3


@dataclass(frozen=True)
class ScanOptions:
    """How to run a scan (validated on construction)."""

    engine: str = "local"
    workers: int = 0
    address: str | None = None
    cache_dir: str | None = None     # fingerprint cache (default: $LINEAGE_CACHE/fingerprints)
    alpha: float | None = None       # per-pair link threshold (default FAMILY_ALPHA / pairs)
    confirm: bool = False            # full weight comparison of every linked pair
    refresh: bool = False            # ignore cached fingerprints

    def __post_init__(self) -> None:
        if self.alpha is not None and not 0 < self.alpha < 1:
            raise ConfigError(f"alpha must be in (0, 1), not {self.alpha}")
        if self.workers < 0:
            raise ConfigError(f"workers must be >= 0, not {self.workers}")


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
    fingerprint: str | None = None
    cached: bool = False
    seconds: float | None = None


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
    """Models, links and the family tree of a scan."""

    models: tuple[ScannedModel, ...]
    pairs: tuple[ScanPair, ...]
    tree: Tree
    n_compared: int
    alpha: float
    engine: str
    timing: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (schema ``lineage.scan/1``)."""
        return {"schema": SCHEMA, "engine": self.engine, "alpha": self.alpha, "n_compared": self.n_compared,
                "models": [asdict(m) for m in self.models], "pairs": [asdict(p) for p in self.pairs],
                "tree": self.tree.to_dict(), "timing": dict(self.timing)}


# --------------------------------------------------------------------------- tasks (top level: picklable)


def _signature(ref: str) -> str:
    """What identifies a model's bytes: file names, sizes and mtimes for local paths; the ref for Hub ids."""
    p = Path(ref)
    h = hashlib.sha256(ref.encode())
    if p.exists():
        files = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file())
        for q in files:
            st = q.stat()
            h.update(f"{q.relative_to(p) if p.is_dir() else q.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


def fingerprint_task(job: tuple[str, str, bool]) -> dict[str, Any]:
    """Fingerprint one model into the cache folder (reused when its signature is unchanged)."""
    from lineage.fpcompare import write_fingerprint

    ref, cache_dir, refresh = job
    sig = _signature(ref)
    out = Path(cache_dir) / f"{sig}.lfp"
    meta = out.with_suffix(".json")
    if not refresh and out.is_file() and meta.is_file():
        try:
            info = json.loads(meta.read_text())
            info["cached"] = True
            return info
        except ValueError:
            pass
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    t0 = time.perf_counter()
    info = write_fingerprint(ref, tmp)
    os.replace(tmp, out)
    info.update(fingerprint=str(out), seconds=time.perf_counter() - t0, cached=False)
    meta.write_text(json.dumps(info, default=str))
    return info


def compare_row_task(job: tuple[str, list[str]]) -> list[float]:
    """log10 p of the fingerprint test between one fingerprint and each of several others."""
    from lineage.fingerprint import compare_fingerprints, load_fingerprint

    first, others = job
    fa = load_fingerprint(first)
    return [float(compare_fingerprints(fa, load_fingerprint(o)).log10_p) for o in others]


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


def _cache_dir(opts: ScanOptions) -> Path:
    if opts.cache_dir:
        d = Path(opts.cache_dir)
    else:
        from lineage.io.cachedir import cache_path

        d = cache_path("fingerprints")
    d.mkdir(parents=True, exist_ok=True)
    return d


def scan(sources: Sequence[str] | Sequence[ModelEntry], options: ScanOptions | None = None,
         progress: ProgressFn | None = None) -> ScanResult:
    """Discover, fingerprint, compare and build the family tree of the models in ``sources``."""
    opts = options or ScanOptions()
    t0 = time.perf_counter()
    entries = [s for s in sources if isinstance(s, ModelEntry)]
    paths = [s for s in sources if not isinstance(s, ModelEntry)]
    entries += discover([str(p) for p in paths]) if paths else []
    if not entries:
        raise ConfigError("no models found in " + ", ".join(map(str, sources)))
    cache = _cache_dir(opts)
    engine = get_engine(opts.engine, opts.workers, opts.address)
    timing: dict[str, float] = {"discover_s": time.perf_counter() - t0}
    try:
        models = _fingerprint_all(engine, entries, cache, opts.refresh, progress)
        timing["fingerprint_s"] = time.perf_counter() - t0 - timing["discover_s"]
        ok = [m for m in models if m.ok]
        n_pairs = len(ok) * (len(ok) - 1) // 2
        alpha = opts.alpha if opts.alpha is not None else FAMILY_ALPHA / max(1, n_pairs)
        t1 = time.perf_counter()
        pairs = _compare_all(engine, ok, alpha, progress)
        timing["compare_s"] = time.perf_counter() - t1
        if opts.confirm and pairs:
            t2 = time.perf_counter()
            pairs = _confirm(engine, ok, pairs, progress)
            timing["confirm_s"] = time.perf_counter() - t2
    finally:
        engine.close()
    tree = build_tree([m.label for m in ok], [_link(p, alpha) for p in pairs])
    timing["total_s"] = time.perf_counter() - t0
    return ScanResult(tuple(models), tuple(pairs), tree, n_pairs, alpha, engine.name, timing)


def _fingerprint_all(engine: Any, entries: list[ModelEntry], cache: Path, refresh: bool,
                     progress: ProgressFn | None) -> list[ScannedModel]:
    jobs = [(e.ref, str(cache), refresh) for e in entries]
    done: dict[int, ScannedModel] = {}
    for k, out in enumerate(engine.map(fingerprint_task, jobs)):
        e = entries[out.index]
        if out.ok and out.value is not None:
            v = out.value
            done[out.index] = ScannedModel(e.label, e.ref, e.origin, True, None, v.get("format"), v.get("family"),
                                           v.get("layers"), v.get("hidden"), v.get("model_bytes"), v.get("bytes_read"),
                                           v.get("fingerprint"), bool(v.get("cached")), v.get("seconds"))
        else:
            log.info("%s: %s", e.label, out.error)
            done[out.index] = ScannedModel(e.label, e.ref, e.origin, False, f"{out.error_type}: {out.error}")
        if progress is not None:
            progress(k + 1, len(jobs), f"fingerprint {e.label}")
    return [done[i] for i in range(len(entries))]


def _compare_all(engine: Any, ok: list[ScannedModel], alpha: float, progress: ProgressFn | None) -> list[ScanPair]:
    rows = [(ok[i].fingerprint or "", [m.fingerprint or "" for m in ok[i + 1:]]) for i in range(len(ok) - 1)]
    out: list[ScanPair] = []
    thr = math.log10(alpha)
    for k, res in enumerate(engine.map(compare_row_task, rows)):
        i = res.index
        if not res.ok or res.value is None:
            log.warning("fingerprint comparisons of %s failed: %s", ok[i].label, res.error)
            continue
        for j, lp in enumerate(res.value, start=i + 1):
            if lp <= thr:
                out.append(ScanPair(ok[i].label, ok[j].label, lp, "fingerprint"))
        if progress is not None:
            progress(k + 1, len(rows), f"compare {ok[i].label}")
    return sorted(out, key=lambda p: (p.a, p.b))


def _confirm(engine: Any, ok: list[ScannedModel], pairs: list[ScanPair], progress: ProgressFn | None) -> list[ScanPair]:
    ref = {m.label: m.ref for m in ok}
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


def render_text(result: ScanResult, *, colour: bool = False) -> str:
    """Terminal summary: models (read fraction, errors), the links, and the tree."""
    from lineage.pvalue import format_p
    from lineage.render_text import Style
    from lineage.tree import render_text as tree_text

    s = Style(colour)
    ok = [m for m in result.models if m.ok]
    bad = [m for m in result.models if not m.ok]
    total = sum(m.total_bytes or 0 for m in ok)
    read = sum(m.bytes_read or 0 for m in ok if not m.cached)
    cached = sum(bool(m.cached) for m in ok)
    lines = [s(f"Scanned {len(result.models)} models", "bold")
             + f" ({len(ok) - cached} fingerprinted now + {cached} from cache + {len(bad)} failed) "
             f"on the {result.engine} engine in {result.timing.get('total_s', 0):.1f} s; "
             f"read {_size(read)} of {_size(total)}.",
             f"{result.n_compared} pairs compared; link threshold p ≤ {result.alpha:.2g} per pair "
             f"(family-wise {FAMILY_ALPHA:g}).", ""]
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
