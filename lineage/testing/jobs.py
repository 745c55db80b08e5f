"""Execute one zoo job: make a model from its parents, save it, return its manifest entry.

A job runs in a worker process with one torch thread; everything it needs is
read from the zoo folder (``data/``: tokenizer and token ids; ``models/``: the
parents), so jobs are independent and their bytes do not depend on scheduling.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from lineage.testing import derive as D
from lineage.testing import transforms as T
from lineage.testing.bpe import BPETokenizer, pretokenize
from lineage.testing.corpus import encode, eval_windows
from lineage.testing.gguf_export import write_gguf
from lineage.testing.models import TinyConfig, init_weights, load_model, n_params, save_model
from lineage.testing.train import Schedule, eval_loss, train, train_lora

log = logging.getLogger(__name__)

EVAL_BATCHES = 4


@dataclass
class Context:
    """Shared read-only inputs of the jobs (loaded once per worker)."""

    root: Path
    tok: BPETokenizer
    data: dict[str, torch.Tensor]
    heldout_text: str
    eval_ids: torch.Tensor
    batch: int
    seq: int

    @classmethod
    def load(cls, root: Path) -> Context:
        d = root / "data"
        meta = json.loads((d / "data.json").read_text())
        tok = BPETokenizer.load(d)
        data = {k: torch.load(d / f"{k}.pt", weights_only=True) for k in ("reference", "docstrings")}
        held = (d / "heldout.txt").read_text(encoding="utf-8")
        return cls(root, tok, data, held, torch.load(d / "heldout.pt", weights_only=True), meta["batch"], meta["seq"])

    def windows(self, tok: BPETokenizer | None = None) -> torch.Tensor:
        ids = self.eval_ids if tok is None else encode(tok, self.heldout_text)
        return eval_windows(ids, self.batch, self.seq, EVAL_BATCHES)


_CTX: dict[str, Context] = {}


def context(root: Path) -> Context:
    key = str(root)
    if key not in _CTX:
        _CTX[key] = Context.load(root)
    return _CTX[key]


def forget_context(root: Path) -> None:
    """Drop a cached context (before rebuilding a folder in this process)."""
    _CTX.pop(str(root), None)


def _model_dir(root: Path, id_: str) -> Path:
    return root / "models" / id_


def _json_safe(info: dict[str, Any]) -> dict[str, Any]:
    """Drop tensors and configs from a transform's info (they go elsewhere)."""
    out = {}
    for k, v in info.items():
        if isinstance(v, (torch.Tensor, TinyConfig)) or (isinstance(v, dict) and v and isinstance(next(iter(v.values())), torch.Tensor)):
            continue
        out[k] = v
    return out


_BULKY = ("perm", "perms", "signs", "layers", "kept", "details", "scales", "adapter", "norms", "modules")


def _summary(info: dict[str, Any]) -> dict[str, Any]:
    """Small manifest-friendly part of an info dict (bulky lists go to truth/)."""
    return {k: v for k, v in _json_safe(info).items() if k not in _BULKY}


def _load_parent(root: Path, entry: dict[str, Any]) -> tuple[TinyConfig, dict[str, torch.Tensor]]:
    if entry.get("format") != "safetensors":
        raise ValueError(f"{entry['id']}: children can only be made from safetensors parents")
    return load_model(root / entry["path"])


def run_job(root: str, job: dict[str, Any], parents: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Build one model; returns its manifest entry."""
    torch.set_num_threads(1)
    root_p = Path(root)
    ctx = context(root_p)
    t0 = time.perf_counter()
    kind, fam, p = job["kind"], job["family"], job["params"]
    out_dir = _model_dir(root_p, job["id"])
    tok = ctx.tok
    entry: dict[str, Any] = {
        "id": job["id"], "family": fam, "parents": list(job["parents"]), "relation": job["relation"],
        "kind": kind, "params": {k: v for k, v in p.items() if k != "sched"}, "transforms": [],
        "format": "safetensors", "path": f"models/{job['id']}",
    }
    truth: dict[str, Any] = {}
    parent = parents[job["parents"][0]] if job["parents"] else None
    cfg: TinyConfig
    w: dict[str, torch.Tensor]
    if parent is not None and kind != "merge":
        pcfg, pw = _load_parent(root_p, parent)
        entry["loss_before"] = parent["loss"]
    tok_out = tok
    windows = None

    if kind == "base":
        cfg = TinyConfig(**job["config"])
        w0 = init_weights(cfg, p["init_seed"])
        entry["loss_before"] = eval_loss(cfg, w0, ctx.windows())
        w, curve = train(cfg, w0, ctx.data[p["data"]], Schedule(**p["sched"]), p["data_seed"])
        entry["train"] = {"steps": len(curve), "data": p["data"], "first_loss": curve[0], "last_loss": curve[-1]}
        if "same_init_as" in p:
            entry["same_init_as"] = p["same_init_as"]
    elif kind == "train":
        cfg = pcfg
        w, curve = train(cfg, pw, ctx.data[p["data"]], Schedule(**p["sched"]), p["data_seed"])
        entry["train"] = {"steps": len(curve), "data": p["data"], "first_loss": curve[0], "last_loss": curve[-1]}
        entry["transforms"] = ["finetune"]
    elif kind == "lora_train":
        cfg = pcfg
        w, adapter, curve = train_lora(cfg, pw, ctx.data[p["data"]], Schedule(**p["sched"]), p["data_seed"],
                                       p["rank"], p["modules"])
        entry["train"] = {"steps": len(curve), "data": p["data"], "first_loss": curve[0], "last_loss": curve[-1]}
        entry["lora"] = {"rank": p["rank"], "target_modules": p["modules"], "trained": True}
        entry["adapter_path"] = _save_adapter(root_p, job["id"], adapter, p["rank"], p["modules"], fam, parent)
        entry["transforms"] = ["lora"]
    elif kind == "lora_synth":
        cfg = pcfg
        w, info = D.lora_merge(pw, p["rank"], p["modules"], p["seed"], p["scale"])
        entry["lora"] = {"rank": p["rank"], "target_modules": p["modules"], "trained": False, "scale": p["scale"]}
        entry["adapter_path"] = _save_adapter(root_p, job["id"], info["adapter"], p["rank"], p["modules"], fam, parent)
        entry["transforms"] = ["lora"]
        truth["modules"] = info["modules"]
    elif kind == "copy":
        cfg = pcfg
        dt = getattr(torch, p["dtype"])
        w = {k: v.to(dt) for k, v in pw.items()}
        entry["transforms"] = [f"cast_{p['dtype']}"]
    elif kind == "quant":
        cfg = pcfg
        if p["quant"] == "int8_per_row":
            w, info = D.quantise_int8_per_row(pw)
        else:
            w, info = D.quantise_int4_per_group(pw)
        entry["quant"] = p["quant"]
        entry["transforms"] = [p["quant"]]
        entry["quant_info"] = _summary(info)
    elif kind == "gguf":
        cfg = pcfg
        qtype = p["quant"].split("_", 1)[1]
        out_dir.mkdir(parents=True, exist_ok=True)
        types: dict[str, str] = {}
        w = write_gguf(out_dir / "model.gguf", cfg, pw, tok, qtype, name=job["id"], base_model=parent["id"],
                       types_out=types)
        entry.update(format="gguf", path=f"models/{job['id']}/model.gguf", quant=p["quant"], transforms=[p["quant"]],
                     gguf_types=dict(sorted(Counter(types.values()).items())))
        truth["tensor_types"] = types
    elif kind == "noise":
        cfg = pcfg
        w, info = D.add_noise(pw, p["rel_level"], p["seed"])
        entry["transforms"] = ["noise"]
    elif kind == "disguise":
        cfg = pcfg
        if p["names"] == ["combine"]:
            w, info = T.combine(cfg, pw, p["seed"])
            entry["transforms"] = list(info["steps"])
        else:
            w, info = T.apply(p["names"][0], cfg, pw, p["seed"])
            entry["transforms"] = list(p["names"])
        cfg = T.config_after(cfg, info)
        truth = _json_safe(info)
        # verify: same logits as the parent (float64)
        ids = ctx.eval_ids[: 2 * 32].reshape(2, 32)
        from lineage.testing.models import forward, to_dtype

        ref = forward(pcfg, to_dtype(pw, torch.float64), ids)
        got = forward(cfg, to_dtype(w, torch.float64), ids)
        err = ((got - ref).abs().max() / ref.abs().max()).item()
        entry["logit_rel_err"] = err
        if err > 1e-5:
            raise RuntimeError(f"{job['id']}: disguise changed the logits (relative error {err:.2e})")
    elif kind == "remap":
        fn = D.drop_layers if p["op"] == "drop_layers" else D.remap_layers
        if p["op"] == "drop_layers":
            dropped = [i for i in range(pcfg.n_layers) if i not in p["layer_map"]]
            cfg, w, info = D.drop_layers(pcfg, pw, dropped)
        else:
            cfg, w, info = fn(pcfg, pw, p["layer_map"])
            info["transform"] = p["op"]
        entry["layer_map"] = info["layer_map"]
        entry["transforms"] = [p["op"]]
    elif kind == "prune_width":
        cfg, w, info = D.prune_mlp_width(pcfg, pw, p["keep"])
        entry["transforms"] = ["prune_mlp_width"]
        entry["width"] = {"from": pcfg.intermediate, "to": p["keep"]}
        truth["kept"] = info["kept"]
    elif kind == "vocab":
        cfg, w, tok_out, info = _vocab_job(pcfg, pw, tok, ctx, p)
        entry["transforms"] = [f"vocab_{p['op']}"]
        entry["vocab"] = {"from": pcfg.vocab, "to": cfg.vocab, "op": p["op"]}
        truth = _json_safe(info)
        windows = ctx.windows(tok_out) if p["op"] != "extend" else None
        if p["op"] != "extend":
            entry["loss_before_note"] = "parent loss on the parent tokenizer; child loss on its own tokenizer"
    elif kind == "merge":
        a, b = (load_model(root_p / parents[x]["path"]) for x in job["parents"])
        cfg = a[0]
        if p["method"] == "linear":
            w, info = D.merge_linear([a[1], b[1]], p["weights"])
        elif p["method"] == "slerp":
            w, info = D.merge_slerp(a[1], b[1], p["t"])
        else:
            _, bw = load_model(root_p / parents[p["base"]]["path"])
            w, info = D.merge_ties(bw, [a[1], b[1]], p["weights"], p["density"])
        entry["merge"] = {"method": p["method"], "parents": list(job["parents"]), "base": p["base"],
                          **{k: v for k, v in p.items() if k in ("weights", "t", "density")}}
        entry["loss_before"] = [parents[x]["loss"] for x in job["parents"]]
        entry["transforms"] = [f"merge_{p['method']}"]
    else:
        raise ValueError(f"unknown job kind {kind!r}")

    if entry["format"] == "safetensors":
        save_model(out_dir, cfg, w, tok_out, dtype=next(iter(w.values())).dtype if kind == "copy" else torch.float32)
    entry["loss"] = eval_loss(cfg, {k: v.float() for k, v in w.items()}, windows if windows is not None else ctx.windows())
    entry["loss_after"] = entry["loss"]
    entry["config"] = cfg.to_dict()
    entry["n_params"] = n_params(w)
    if truth:
        tdir = root_p / "truth"
        tdir.mkdir(exist_ok=True)
        (tdir / f"{job['id']}.json").write_text(json.dumps(truth, sort_keys=True) + "\n")
        entry["truth_path"] = f"truth/{job['id']}.json"
    entry["seconds"] = round(time.perf_counter() - t0, 3)
    return entry


def _save_adapter(root: Path, id_: str, adapter: dict[str, torch.Tensor], rank: int, modules: list[str], fam: str,
                  parent: dict[str, Any]) -> str:
    d = root / "models" / f"{id_}-adapter"
    d.mkdir(parents=True, exist_ok=True)
    save_file({k: v.float().contiguous() for k, v in sorted(adapter.items())}, str(d / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    cfg = D.peft_adapter_config(rank, modules, fam, base=f"../{parent['id']}")
    (d / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return f"models/{id_}-adapter"


def _vocab_job(cfg: TinyConfig, w: dict[str, torch.Tensor], tok: BPETokenizer, ctx: Context, p: dict[str, Any]):
    if p["op"] == "extend":
        counts = Counter(pretokenize(ctx.heldout_text + "\n" + _doc_sample(ctx)))
        new = sorted((t for t in counts if tok.token_id(t) is None and len(t) > 2), key=lambda t: (-counts[t], t))
        new = new[: p["n_new"]]
        tok2 = tok.extended(new)
        n_new = len(tok2) - len(tok)
        cfg2, w2, info = D.extend_vocab(cfg, w, n_new, p["seed"])
        info["new_tokens"] = new
        return cfg2, w2, tok2, info
    if p["op"] == "prune":
        n_fixed = len(tok.specials) + 256
        merged = list(range(n_fixed, cfg.vocab))
        g = torch.Generator().manual_seed(len(merged))
        drop = set(torch.randperm(len(merged), generator=g)[: int(p["frac"] * len(merged))].tolist())
        keep = list(range(n_fixed)) + [i for j, i in enumerate(merged) if j not in drop]
        cfg2, w2, info = D.prune_vocab(cfg, w, keep)
        return cfg2, w2, tok.subset(keep), info
    cfg2, w2, info = D.reorder_vocab(cfg, w, p["seed"])
    return cfg2, w2, tok.permuted(info["perm"]), info


def _doc_sample(ctx: Context) -> str:
    ids = ctx.data["docstrings"][:20000].tolist()
    return ctx.tok.decode(ids)
