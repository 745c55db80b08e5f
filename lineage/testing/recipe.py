"""The zoo's recipe: model shapes, training budgets and the list of jobs.

A job is a plain JSON-able dict ``{"id", "kind", "family", "parents", "relation",
"params"}``; :mod:`lineage.testing.jobs` executes one.  The recipe (with the code
and text fingerprints) is hashed to name the cache folder, so any change here
rebuilds the zoo.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Any

from lineage.testing.models import TinyConfig


@dataclass(frozen=True)
class Recipe:
    """Everything that determines the zoo's bytes (besides the code and the text)."""

    subset: str
    vocab_size: int
    ref_chars: int  # characters of the reference text used (0 = all)
    doc_chars: int
    configs: dict[str, dict[str, Any]]
    n_bases: int
    n_null: int
    base_steps: int
    null_steps: int
    ft_steps: int
    cpt_steps: tuple[int, ...]
    lora_ranks: tuple[int, ...]
    lora_steps: int
    heal_steps: int
    noise_levels: tuple[float, ...]
    gguf: bool
    batch: int = 8
    seq: int = 64
    base_lr: float = 3e-3
    ft_lr: float = 1e-3
    lora_lr: float = 3e-3
    families: tuple[str, ...] = ("llama", "gpt2")
    extras: dict[str, Any] = field(default_factory=dict)
    #: Shape overrides of an extra llama base whose rows are multiples of 256, so that
    #: its GGUF Q4_K_M copy really holds K-quants (the regular bases' rows are too short
    #: and llama.cpp falls back to Q5_0/Q8_0 for them).  None: no such base.
    kquant_base: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def config(self, family: str, vocab: int) -> TinyConfig:
        return TinyConfig(family=family, vocab=vocab, **self.configs[family])


FULL = Recipe(
    subset="full",
    vocab_size=2048,
    ref_chars=0,
    doc_chars=600_000,
    configs={
        "llama": dict(hidden=128, n_layers=3, n_heads=4, n_kv_heads=2, intermediate=352, max_pos=128,
                      norm_eps=1e-5, tie_embeddings=False, rope_theta=10000.0),
        "gpt2": dict(hidden=96, n_layers=3, n_heads=4, n_kv_heads=4, intermediate=384, max_pos=128,
                     norm_eps=1e-5, tie_embeddings=True),
    },
    n_bases=6,
    n_null=28,
    base_steps=240,
    null_steps=60,
    ft_steps=60,
    cpt_steps=(100, 250, 500),
    lora_ranks=(1, 4, 16, 64),
    lora_steps=80,
    heal_steps=60,
    noise_levels=(0.001, 0.01, 0.05, 0.2, 0.5),
    gguf=True,
    kquant_base=dict(hidden=256, intermediate=512),
)

SMALL = Recipe(
    subset="small",
    vocab_size=400,
    ref_chars=120_000,
    doc_chars=40_000,
    configs={
        "llama": dict(hidden=32, n_layers=2, n_heads=4, n_kv_heads=2, intermediate=64, max_pos=64,
                      norm_eps=1e-5, tie_embeddings=False, rope_theta=10000.0),
        "gpt2": dict(hidden=32, n_layers=2, n_heads=4, n_kv_heads=4, intermediate=128, max_pos=64,
                     norm_eps=1e-5, tie_embeddings=True),
    },
    n_bases=2,
    n_null=3,
    base_steps=30,
    null_steps=8,
    ft_steps=10,
    cpt_steps=(20,),
    lora_ranks=(2,),
    lora_steps=10,
    heal_steps=5,
    noise_levels=(0.01, 0.2),
    gguf=True,
    seq=32,
    kquant_base=dict(hidden=256, intermediate=256),
)

RECIPES = {"full": FULL, "small": SMALL}

#: PEFT target-module sets, by family, used in turn for the LoRA ranks.
LORA_MODULES = {
    "llama": (("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj"),
              ("q_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
    "gpt2": (("c_attn",), ("c_attn", "c_proj"), ("c_fc",), ("c_attn", "c_fc")),
}


def stable_seed(*parts: Any) -> int:
    """A 31-bit seed from a name (stable across runs and machines)."""
    return int(hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


def _sched(steps: int, lr: float, r: Recipe, warmup: int | None = None) -> dict[str, Any]:
    return {"steps": steps, "lr": lr, "batch": r.batch, "seq": r.seq,
            "warmup": warmup if warmup is not None else max(1, min(20, steps // 5))}


def make_jobs(r: Recipe) -> list[dict[str, Any]]:
    """All jobs of the recipe, parents before children."""
    jobs: list[dict[str, Any]] = []

    def add(id_: str, kind: str, fam: str, parents: list[str], relation: str, **params: Any) -> str:
        jobs.append({"id": id_, "kind": kind, "family": fam, "parents": parents, "relation": relation,
                     "params": params})
        return id_

    full = r.subset == "full"
    for fam in r.families:
        p = fam
        bases = []
        for i in range(r.n_bases):
            bases.append(add(f"{p}-b{i}", "base", fam, [], "base", init_seed=stable_seed(fam, "init", i),
                             data="reference", data_seed=stable_seed(fam, "data", i),
                             sched=_sched(r.base_steps, r.base_lr, r)))
        for i in range(r.n_null):
            add(f"{p}-null{i:02d}", "base", fam, [], "null", init_seed=stable_seed(fam, "null-init", i),
                data="reference", data_seed=stable_seed(fam, "null-data", i), sched=_sched(r.null_steps, r.base_lr, r))
        # same initialisation as b0, other data and data order
        add(f"{p}-sameinit", "base", fam, [], "same_init", init_seed=stable_seed(fam, "init", 0),
            data="docstrings", data_seed=stable_seed(fam, "sameinit-data"), sched=_sched(r.base_steps, r.base_lr, r),
            same_init_as=bases[0])

        b0, b1 = bases[0], bases[1 % len(bases)]
        b2 = bases[2 % len(bases)]
        b3 = bases[3 % len(bases)]
        # fine-tunes and continued pre-training
        ft = add(f"{b0}-ft", "train", fam, [b0], "finetune", data="reference",
                 data_seed=stable_seed(fam, "ft"), sched=_sched(r.ft_steps, r.ft_lr, r))
        if full:
            add(f"{b1}-ft", "train", fam, [b1], "finetune", data="docstrings",
                data_seed=stable_seed(fam, "ft1"), sched=_sched(r.ft_steps, r.ft_lr, r))
        for n in r.cpt_steps:
            add(f"{b0}-cpt{n}", "train", fam, [b0], "continued_pretraining", data="docstrings",
                data_seed=stable_seed(fam, "cpt", n), sched=_sched(n, r.base_lr / 2, r))
        # LoRA: trained (merged + adapter) and synthetic merges
        for k, rank in enumerate(r.lora_ranks):
            mods = list(LORA_MODULES[fam][k % len(LORA_MODULES[fam])])
            add(f"{b0}-lora{rank}", "lora_train", fam, [b0], "lora", rank=rank, modules=mods, data="docstrings",
                data_seed=stable_seed(fam, "lora", rank), sched=_sched(r.lora_steps, r.lora_lr, r))
            # another module set (never one with a side <= rank: the delta would be full rank)
            mods2 = list(LORA_MODULES[fam][(k + 3) % len(LORA_MODULES[fam])])
            add(f"{b1}-lorasyn{rank}", "lora_synth", fam, [b1], "lora", rank=rank, modules=mods2,
                scale=0.05, seed=stable_seed(fam, "lorasyn", rank))
        # re-encoded and quantised copies
        add(f"{b0}-bf16", "copy", fam, [b0], "copy", dtype="bfloat16")
        for q in ("int8_per_row", "int4_per_group"):
            add(f"{b0}-{q}", "quant", fam, [b0], "quantised", quant=q)
        add(f"{b0}-ft-int4_per_group", "quant", fam, [ft], "quantised", quant="int4_per_group")
        if r.gguf:
            for q in ("Q8_0", "Q4_0"):
                add(f"{b0}-gguf-{q}", "gguf", fam, [b0], "quantised", quant=f"gguf_{q}")
            if fam == "llama":
                # llama.cpp's Q4_K_M mix; b0's rows are shorter than a K-quant super-block,
                # so this file is llama.cpp's fallback mix (Q5_0 + Q8_0), the wide base's is K-quants
                add(f"{b0}-gguf-Q4_K_M", "gguf", fam, [b0], "quantised", quant="gguf_Q4_K_M")
                if r.kquant_base:
                    wide = add(f"{p}-wide0", "base", fam, [], "base", init_seed=stable_seed(fam, "init-wide", 0),
                               data="reference", data_seed=stable_seed(fam, "data-wide", 0),
                               sched=_sched(r.base_steps, r.base_lr, r), config=dict(r.kquant_base))
                    add(f"{wide}-gguf-Q4_K_M", "gguf", fam, [wide], "quantised", quant="gguf_Q4_K_M")
        # noise
        for lvl in r.noise_levels:
            add(f"{b0}-noise{lvl:g}", "noise", fam, [b0], "noise", rel_level=lvl,
                seed=stable_seed(fam, "noise", lvl))
        # function-preserving disguises
        from lineage.testing.transforms import disguises_for

        names = disguises_for(fam) if full else ["residual_permutation", "norm_refold"]
        for name in names:
            add(f"{b1}-{name}", "disguise", fam, [b1], "disguised", names=[name], seed=stable_seed(fam, name))
        add(f"{b1}-combined", "disguise", fam, [b1], "disguised", names=["combine"], seed=stable_seed(fam, "comb"))
        ft1 = add(f"{b1}-ftd", "train", fam, [b1], "finetune", data="reference",
                  data_seed=stable_seed(fam, "ftd"), sched=_sched(r.ft_steps, r.ft_lr, r))
        ftdc = add(f"{b1}-ftd-combined", "disguise", fam, [ft1], "disguised", names=["combine"],
                   seed=stable_seed(fam, "comb-ft"))
        if r.gguf:
            # the disguised fine-tune as llama.cpp would ship it
            add(f"{ftdc}-gguf-Q8_0", "gguf", fam, [ftdc], "quantised", quant="gguf_Q8_0")
        # depth and width
        L = int(r.configs[fam]["n_layers"])
        drop = add(f"{b2}-drop", "remap", fam, [b2], "depth_change", layer_map=[i for i in range(L) if i != L // 2],
                   op="drop_layers")
        add(f"{b2}-drop-healed", "train", fam, [drop], "finetune", data="reference",
            data_seed=stable_seed(fam, "heal-drop"), sched=_sched(r.heal_steps, r.ft_lr, r))
        dup_map = sorted(list(range(L)) + [L // 2])
        add(f"{b2}-dup", "remap", fam, [b2], "depth_change", layer_map=dup_map, op="duplicate_layers")
        width = int(r.configs[fam]["intermediate"])
        pr = add(f"{b2}-prune", "prune_width", fam, [b2], "width_pruned", keep=width * 5 // 8)
        add(f"{b2}-prune-healed", "train", fam, [pr], "finetune", data="reference",
            data_seed=stable_seed(fam, "heal-prune"), sched=_sched(r.heal_steps, r.ft_lr, r))
        # vocabulary
        add(f"{b2}-vocab-ext", "vocab", fam, [b2], "vocab_change", op="extend", n_new=max(16, r.vocab_size // 16),
            seed=stable_seed(fam, "vext"))
        add(f"{b2}-vocab-prune", "vocab", fam, [b2], "vocab_change", op="prune", frac=0.2)
        add(f"{b2}-vocab-perm", "vocab", fam, [b2], "vocab_change", op="reorder", seed=stable_seed(fam, "vperm"))
        # merges of two fine-tunes of one base
        fa = add(f"{b3}-fta", "train", fam, [b3], "finetune", data="reference",
                 data_seed=stable_seed(fam, "fta"), sched=_sched(r.ft_steps * 2, r.ft_lr, r))
        fb = add(f"{b3}-ftb", "train", fam, [b3], "finetune", data="docstrings",
                 data_seed=stable_seed(fam, "ftb"), sched=_sched(r.ft_steps * 2, r.ft_lr, r))
        add(f"{b3}-merge-linear", "merge", fam, [fa, fb], "merge", method="linear", weights=[0.3, 0.7], base=b3)
        add(f"{b3}-merge-slerp", "merge", fam, [fa, fb], "merge", method="slerp", t=0.4, base=b3)
        add(f"{b3}-merge-ties", "merge", fam, [fa, fb], "merge", method="ties", weights=[0.5, 0.5],
            density=0.5, base=b3)
        # chain base -> ft -> ft
        b4 = bases[4 % len(bases)]
        c1 = add(f"{b4}-chain1", "train", fam, [b4], "finetune", data="reference",
                 data_seed=stable_seed(fam, "chain1"), sched=_sched(r.ft_steps, r.ft_lr, r))
        add(f"{b4}-chain2", "train", fam, [c1], "finetune", data="docstrings",
            data_seed=stable_seed(fam, "chain2"), sched=_sched(r.ft_steps, r.ft_lr, r))
    ids = [j["id"] for j in jobs]
    assert len(ids) == len(set(ids)), "duplicate job ids"
    return jobs


def recipe_digest(r: Recipe, extra: dict[str, Any]) -> str:
    """Hash of the recipe, the job list and ``extra`` (code and text fingerprints)."""
    import json

    blob = json.dumps({"recipe": r.to_dict(), "jobs": make_jobs(r), "extra": extra}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
