"""The zoo: trained tiny models with known lineage, built once and cached.

``build_zoo("small")`` (a few seconds, used by the tests) or ``build_zoo("full")``
(minutes) returns a :class:`Zoo`; the folder is
``$LINEAGE_CACHE/zoo/<subset>-<recipe hash>/`` (default cache ``~/.cache/lineage``)
and is reused while the recipe, the code of :mod:`lineage.testing` and the
training text are unchanged.

Layout of a zoo folder::

    manifest.json          models (id, path, family, parents, relation, params, losses, …) and pairs
    build_info.json        timings (not part of the deterministic bytes)
    data/                  tokenizer.json, token ids of the corpora, held-out text
    models/<id>/           model.safetensors + config.json + tokenizer.json (or model.gguf)
    models/<id>-adapter/   PEFT adapter (adapter_config.json + adapter_model.safetensors)
    truth/<id>.json        bulky ground truth (permutations, kept neurons, new tokens, …)
"""

from __future__ import annotations

import ast
import fcntl
import hashlib
import json
import logging
import multiprocessing as mp
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lineage.testing import corpus
from lineage.testing.bpe import train_bpe
from lineage.testing.recipe import RECIPES, Recipe, make_jobs, recipe_digest

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1

#: Modules whose code determines the zoo's bytes (other modules of the package may
#: change without invalidating the cache).
ZOO_MODULES = ("bpe", "corpus", "derive", "gguf_export", "jobs", "kquants", "models", "recipe", "train", "transforms",
               "zoo")


def cache_root() -> Path:
    env = os.environ.get("LINEAGE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "lineage"


def _code_fingerprint() -> str:
    """Hash of the code of lineage.testing: a change of code rebuilds the zoo, a change
    of comments, docstrings or formatting does not (the syntax tree is hashed)."""
    h = hashlib.sha256()
    here = Path(__file__).parent
    for p in (here / f"{m}.py" for m in ZOO_MODULES):
        tree = ast.parse(p.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                    and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
        h.update(p.name.encode())
        h.update(ast.dump(tree, include_attributes=False).encode())
    return h.hexdigest()[:16]


def _texts(r: Recipe) -> tuple[str, str, str]:
    ref = corpus.reference_text()
    if r.ref_chars:
        ref = ref[: r.ref_chars]
    train_txt, held = corpus.split_holdout(ref)
    doc = corpus.docstring_text(r.doc_chars)
    return train_txt, held, doc


def zoo_key(subset: str) -> tuple[str, Recipe, tuple[str, str, str]]:
    r = RECIPES[subset]
    texts = _texts(r)
    extra = {"code": _code_fingerprint(), "text": corpus.text_fingerprint(*texts), "python": sys.version.split()[0],
             "torch": torch.__version__.split("+")[0], "manifest": MANIFEST_VERSION}
    return f"{subset}-{recipe_digest(r, extra)}", r, texts


# --------------------------------------------------------------------------- the Zoo object

@dataclass(frozen=True)
class Pair:
    """A labelled pair: ``a`` is the ancestor for derived pairs."""

    a: str
    b: str
    label: str  # "derived" | "independent" | "same_init"
    relation: str  # e.g. "finetune", "lora", "finetune+disguised", "independent"
    hops: int
    group: str  # finer class for the benchmark ("independent_bases", "independent_null", …)

    def to_dict(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b, "label": self.label, "relation": self.relation, "hops": self.hops,
                "group": self.group}


class Zoo:
    """Read access to a built zoo."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.manifest = json.loads((self.root / "manifest.json").read_text())
        self._models = {m["id"]: m for m in self.manifest["models"]}

    def __repr__(self) -> str:
        return f"Zoo({self.root}, {len(self._models)} models)"

    @property
    def ids(self) -> list[str]:
        return list(self._models)

    def model(self, id_: str) -> dict[str, Any]:
        """Manifest entry with ``path`` made absolute (``adapter_path`` too, if any)."""
        m = dict(self._models[id_])
        m["path"] = str(self.root / m["path"])
        if "adapter_path" in m:
            m["adapter_path"] = str(self.root / m["adapter_path"])
        return m

    def path(self, id_: str) -> str:
        return self.model(id_)["path"]

    def truth(self, id_: str) -> dict[str, Any]:
        """Bulky ground truth of a model (permutations, kept neurons, …), or {}."""
        m = self._models[id_]
        if "truth_path" not in m:
            return {}
        return json.loads((self.root / m["truth_path"]).read_text())

    def models(self, *, relation: str | None = None, family: str | None = None) -> list[dict[str, Any]]:
        return [self.model(i) for i, m in self._models.items()
                if (relation is None or m["relation"] == relation) and (family is None or m["family"] == family)]

    def pairs(self, kind: str | None = None, *, relation: str | None = None, group: str | None = None,
              family: str | None = None) -> list[Pair]:
        """Labelled pairs; ``kind`` filters by label ("derived", "independent", "same_init")."""
        out = []
        for d in self.manifest["pairs"]:
            p = Pair(**d)
            if kind is not None and p.label != kind:
                continue
            if relation is not None and p.relation != relation:
                continue
            if group is not None and p.group != group:
                continue
            if family is not None and self._models[p.a]["family"] != family:
                continue
            out.append(p)
        return out


# --------------------------------------------------------------------------- pairs

def _ancestors(models: dict[str, dict[str, Any]], id_: str) -> dict[str, list[str]]:
    """Ancestor id -> relations along the path (nearest first reversed to oldest first)."""
    out: dict[str, list[str]] = {}
    frontier = [(id_, [])]
    while frontier:
        cur, rels = frontier.pop()
        for par in models[cur]["parents"]:
            path = [models[cur]["relation"]] + rels
            if par not in out or len(path) < len(out[par]):
                out[par] = path
            frontier.append((par, path))
    return out


def _shape_key(m: dict[str, Any]) -> tuple:
    """Architecture of a model as built (bases of other shapes are not paired as independent)."""
    c = m.get("config") or {}
    return tuple(c.get(k) for k in ("hidden", "n_layers", "n_heads", "n_kv_heads", "intermediate"))


def make_pairs(models: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Labelled pairs: every ancestor of a model (derived, relations along the path joined by
    ``+``), independent bases and null models of one architecture, same-init pairs, and every
    single-rooted derivative against the next base of its root's architecture."""
    by_id = {m["id"]: m for m in models}
    pairs: list[Pair] = []
    for m in models:
        for anc, rels in sorted(_ancestors(by_id, m["id"]).items()):
            pairs.append(Pair(anc, m["id"], "derived", "+".join(rels), len(rels), "derived"))
    fams = sorted({m["family"] for m in models})
    for fam in fams:
        all_bases = [m["id"] for m in models if m["family"] == fam and m["relation"] == "base"]
        shapes = list(dict.fromkeys(_shape_key(by_id[b]) for b in all_bases))
        groups = {s: [b for b in all_bases if _shape_key(by_id[b]) == s] for s in shapes}
        nulls = [m["id"] for m in models if m["family"] == fam and m["relation"] == "null"]
        for bases in groups.values():
            for i, a in enumerate(bases):
                for b in bases[i + 1:]:
                    pairs.append(Pair(a, b, "independent", "independent", 0, "independent_bases"))
        for i, a in enumerate(nulls):
            for b in nulls[i + 1:]:
                pairs.append(Pair(a, b, "independent", "independent", 0, "independent_null"))
        for m in models:
            if m["family"] == fam and m["relation"] == "same_init":
                pairs.append(Pair(m["same_init_as"], m["id"], "same_init", "same_init", 0, "same_init"))
        # a derivative of base i against base i+1 (of the same architecture): independent, but transformed
        root_of = {}
        for m in models:
            if m["family"] != fam or not m["parents"]:
                continue
            anc = _ancestors(by_id, m["id"])
            roots = sorted(a for a in anc if by_id[a]["relation"] == "base")
            if len(roots) == 1:
                root_of[m["id"]] = roots[0]
        for cid, root in sorted(root_of.items()):
            bases = groups[_shape_key(by_id[root])]
            j = bases.index(root)
            other = bases[(j + 1) % len(bases)]
            if other != root:
                pairs.append(Pair(other, cid, "independent", "independent", 0, "independent_derived"))
    return [p.to_dict() for p in pairs]


# --------------------------------------------------------------------------- build

def _prepare_data(root: Path, r: Recipe, texts: tuple[str, str, str]) -> int:
    train_txt, held, doc = texts
    d = root / "data"
    d.mkdir(parents=True, exist_ok=True)
    tok = train_bpe(train_txt, r.vocab_size)
    tok.save(d)
    torch.save(corpus.encode(tok, train_txt), d / "reference.pt")
    torch.save(corpus.encode(tok, doc), d / "docstrings.pt")
    torch.save(corpus.encode(tok, held), d / "heldout.pt")
    (d / "heldout.txt").write_text(held, encoding="utf-8")
    (d / "data.json").write_text(json.dumps({"batch": r.batch, "seq": r.seq, "vocab": len(tok)}) + "\n")
    return len(tok)


def _waves(jobs: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    depth: dict[str, int] = {}
    for j in jobs:  # parents come first in make_jobs
        deps = list(j["parents"]) + ([j["params"]["base"]] if "base" in j["params"] else [])
        depth[j["id"]] = 1 + max((depth[p] for p in deps), default=-1)
    n = max(depth.values()) + 1
    return [[j for j in jobs if depth[j["id"]] == k] for k in range(n)]


def _worker_init() -> None:
    torch.set_num_threads(1)


def _run(args: tuple[str, dict[str, Any], dict[str, dict[str, Any]]]) -> dict[str, Any]:
    from lineage.testing.jobs import run_job

    return run_job(*args)


def _build(root: Path, r: Recipe, texts: tuple[str, str, str], workers: int) -> dict[str, Any]:
    from lineage.testing.jobs import forget_context

    t0 = time.perf_counter()
    forget_context(root)
    vocab = _prepare_data(root, r, texts)
    jobs = make_jobs(r)
    for j in jobs:
        if j["kind"] == "base":
            # a base may override the family's shape (the wide K-quant base)
            j["config"] = {**r.config(j["family"], vocab).to_dict(), **j["params"].get("config", {})}
    done: dict[str, dict[str, Any]] = {}
    timings = {"data": round(time.perf_counter() - t0, 2)}
    pool = mp.get_context("spawn").Pool(workers, initializer=_worker_init) if workers > 1 else None
    try:
        for k, wave in enumerate(_waves(jobs)):
            tw = time.perf_counter()
            # longest jobs first so the pool stays busy
            wave = sorted(wave, key=lambda j: -j["params"].get("sched", {}).get("steps", 0))
            args = []
            for j in wave:
                need = list(j["parents"]) + ([j["params"]["base"]] if "base" in j["params"] else [])
                args.append((str(root), j, {p: done[p] for p in need}))
            results = pool.imap(_run, args, chunksize=1) if pool else map(_run, args)
            for e in results:
                done[e["id"]] = e
                log.debug("built %s (%d/%d)", e["id"], len(done), len(jobs))
            timings[f"wave{k}"] = round(time.perf_counter() - tw, 2)
            log.info("zoo wave %d: %d models in %.1f s", k, len(wave), time.perf_counter() - tw)
    finally:
        if pool:
            pool.close()
            pool.join()
    models = [done[j["id"]] for j in jobs]
    seconds = {m["id"]: m.pop("seconds") for m in models}
    manifest = {"version": MANIFEST_VERSION, "subset": r.subset, "recipe": r.to_dict(), "tokenizer": "data",
                "models": models, "pairs": make_pairs(models)}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    timings["total"] = round(time.perf_counter() - t0, 2)
    return {"timings": timings, "model_seconds": seconds, "workers": workers}


def build_zoo(subset: str = "small", out: str | Path | None = None, *, workers: int | None = None,
              force: bool = False) -> Zoo:
    """Build (or reuse) a zoo and return it.

    ``out`` defaults to the cache folder named by the recipe hash; an existing
    complete zoo with the same key is reused unless ``force``.
    """
    if subset not in RECIPES:
        raise ValueError(f"subset must be one of {sorted(RECIPES)}")
    key, r, texts = zoo_key(subset)
    root = Path(out) if out is not None else cache_root() / "zoo" / key
    if not force and _is_built(root, key):
        log.info("zoo %s: cached at %s", key, root)
        return Zoo(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    # one builder at a time per folder; a waiting process then finds the zoo built
    with open(root.with_name(root.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not force and _is_built(root, key):
                return Zoo(root)
            return _build_into(root, key, r, texts, workers, subset)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _is_built(root: Path, key: str) -> bool:
    stamp = root / "build_info.json"
    if not (stamp.is_file() and (root / "manifest.json").is_file()):
        return False
    try:
        return json.loads(stamp.read_text()).get("key") == key
    except ValueError:
        return False


def _build_into(root: Path, key: str, r: Recipe, texts: tuple[str, str, str], workers: int | None,
                subset: str) -> Zoo:
    if workers is None:
        workers = 1 if subset == "small" else max(1, min(2, os.cpu_count() or 1))
    tmp = root.with_name(root.name + f".tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    log.info("building zoo %s in %s with %d workers", key, root, workers)
    info = _build(tmp, r, texts, workers)
    info["key"] = key
    (tmp / "build_info.json").write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
    if root.exists():
        shutil.rmtree(root)
    tmp.rename(root)
    return Zoo(root)
