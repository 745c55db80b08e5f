"""Hostile model files for the fuzz suite: small valid seeds, and seeded mutations of them.

:func:`build_seeds` writes one tiny model in every format lineage reads (a safetensors
folder with config.json and tokenizer.json, a GGUF file, a PEFT adapter over the
folder, a sharded folder with its index, a PyTorch ``.bin`` folder and a legacy
``.pt`` file).  :func:`make_case` turns ``(seed, index)`` into one hostile case,
deterministically: a mutated copy written under a case folder, the reference to
compare it with, and what a correct answer is when lineage does not refuse the input
(``expect``: ``"derived"``, ``"finding"`` or ``"any"``).
"""

from __future__ import annotations

import json
import random
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch

from lineage.testing.fuzzbytes import deep, flip, gguf_find, hostile_json, huge_int, patch, st_join, st_split
from lineage.testing.models import TinyConfig, init_weights, save_model

FAMILIES = ("safetensors", "gguf", "peft", "shards", "torchbin", "json")
CFG = TinyConfig(vocab=64, hidden=32, n_layers=2, n_heads=4, n_kv_heads=2, intermediate=64, max_pos=32)
_Q = "model.layers.1.self_attn.q_proj.weight"


@dataclass(frozen=True)
class Seeds:
    """Paths of the valid seed files (all under one root)."""

    root: Path
    base: Path  # safetensors folder: model.safetensors, config.json, tokenizer.json
    gguf: Path
    adapter: Path
    shards: Path
    torchbin: Path
    legacy_pt: Path


@dataclass(frozen=True)
class Case:
    """One hostile input: ``ref`` is run through ``compare base ref`` and ``inspect ref``."""

    index: int
    family: str
    kind: str
    ref: str
    base: str
    expect: str  # "derived" | "finding" | "any"


def _tokenizer() -> dict:
    return {"version": "1.0", "added_tokens": [{"id": 63, "content": "<eos>", "special": True}],
            "model": {"type": "BPE", "vocab": {f"t{i}": i for i in range(CFG.vocab)}, "merges": []}}


def build_seeds(root: str | Path) -> Seeds:
    """Write the seed models under ``root`` (deterministic; about 0.7 MB in all)."""
    from safetensors.torch import save_file

    from lineage.testing.gguf_export import write_gguf

    root = Path(root)
    w = init_weights(CFG, 0)
    base = save_model(root / "base", CFG, w, _tokenizer())
    tok = SimpleNamespace(tokens=[f"t{i}" for i in range(CFG.vocab)], specials=set(), merges=[])
    write_gguf(root / "model.gguf", CFG, w, tok, "F32")
    ad = root / "adapter"
    ad.mkdir(exist_ok=True)
    g = torch.Generator().manual_seed(1)
    factors = {}
    for i in range(CFG.n_layers):
        for m in ("q_proj", "v_proj"):
            out = w[f"model.layers.{i}.self_attn.{m}.weight"].shape[0]
            pre = f"base_model.model.model.layers.{i}.self_attn.{m}"
            factors[f"{pre}.lora_A.weight"] = torch.randn(4, CFG.hidden, generator=g) * 0.1
            factors[f"{pre}.lora_B.weight"] = torch.randn(out, 4, generator=g) * 0.1
    save_file(factors, str(ad / "adapter_model.safetensors"))
    (ad / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
        "base_model_name_or_path": str(base.resolve()), "alpha_pattern": {}, "rank_pattern": {}}))
    sh = root / "shards"
    sh.mkdir(exist_ok=True)
    names = sorted(w)
    parts = (names[: len(names) // 2], names[len(names) // 2:])
    wm = {}
    for k, part in enumerate(parts):
        fn = f"model-0000{k + 1}-of-00002.safetensors"
        save_file({n: w[n].contiguous() for n in part}, str(sh / fn), metadata={"format": "pt"})
        wm.update({n: fn for n in part})
    (sh / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    for f in ("config.json", "tokenizer.json"):
        shutil.copy(base / f, sh / f)
    tb = root / "torchbin"
    tb.mkdir(exist_ok=True)
    torch.save({k: v.clone() for k, v in w.items()}, tb / "pytorch_model.bin")
    shutil.copy(base / "config.json", tb / "config.json")
    torch.save({k: v.clone() for k, v in w.items()}, root / "legacy.pt", _use_new_zipfile_serialization=False)
    return Seeds(root, base, root / "model.gguf", ad, sh, tb, root / "legacy.pt")


# ---------------------------------------------------------------------------- families


def _safetensors(rng: random.Random, s: Seeds, d: Path) -> tuple[str, str, str]:
    shutil.copytree(s.base, d, dirs_exist_ok=True)
    p = d / "model.safetensors"
    data = p.read_bytes()
    header, payload = st_split(data)
    meta = header.pop("__metadata__", {})
    names = sorted(header)
    name = rng.choice(names)
    kinds: dict[str, Callable[[], tuple[bytes, str]]] = {
        "reformat": lambda: (st_join(json.dumps({**header, "__metadata__": meta}, indent=1, sort_keys=True).encode(), payload), "derived"),
        "len_short": lambda: (st_join(json.dumps({**header, "__metadata__": meta}).encode() + b"  ", payload, -rng.choice([1, 2, 8])), "any"),
        "len_long": lambda: (st_join(json.dumps(header).encode(), payload, rng.choice([1, 8, 10**6, 2**60])), "any"),
        "truncate": lambda: (data[: rng.randrange(len(data))], "any"),
        "flip_header": lambda: (flip(data, rng, rng.randint(1, 4), 0, 8 + len(data) - len(payload)), "any"),
        "flip_payload": lambda: (flip(data, rng, rng.randint(1, 3), len(data) - len(payload)), "derived_or_finding"),
        "huge_int": lambda: (st_join(json.dumps(header).replace("[0,", "[" + huge_int(rng) + ",", 1).replace("[0, ", "[" + huge_int(rng) + ", ", 1).encode(), payload), "any"),
        "deep": lambda: (st_join(json.dumps({**header, "__metadata__": meta}).replace("{", '{"d": ' + deep(rng) + ", ", 1).encode(), payload), "any"),
        "dtype": lambda: (st_join({**header, name: {**header[name], "dtype": rng.choice(["F16", "BF16", "I32", "I64", "F64", "Q7", 7, None, "U8", "F8_E4M3"])}}, payload), "any"),
        "shape": lambda: (st_join({**header, name: {**header[name], "shape": rng.choice([[], [0], [-1, 4], [10**12, 10**12, 0], list(reversed(header[name]["shape"])), [1.5], [[2]], "x", [1] * 100, [0, 10**15]])}}, payload), "any"),
        "offsets": lambda: (st_join({**header, name: {**header[name], "data_offsets": rng.choice([[0, 0], [4, 0], [-4, 4], [1, 1 + header[name]["data_offsets"][1] - header[name]["data_offsets"][0]], [0], "x", [0, 2**70], [header[name]["data_offsets"][0] + 4, header[name]["data_offsets"][1] + 4]])}}, payload), "any"),
        "duplicate": lambda: (st_join(json.dumps(header)[:-1].encode() + b', "' + name.encode() + b'": ' + json.dumps(header[name]).encode() + b"}", payload), "any"),
        "layer_rename": lambda: (st_join({(k.replace("layers.1.", f"layers.{rng.choice([10**9, 10**6, 99999999999, 10**40])}.") if k == _Q else k): v for k, v in header.items()}, payload), "any"),
        "nonfinite": lambda: (_nonfinite(data, header, payload, rng), "finding"),
        "metadata": lambda: (st_join({**header, "__metadata__": rng.choice([{"a": 1}, [1], "x", {"a": {"b": "c"}}])}, payload), "any"),
        "random": lambda: (bytes(rng.randrange(256) for _ in range(rng.randrange(1, 4096))), "any"),
        "zero_tensors": lambda: (st_join({f"z{i}": {"dtype": "F32", "shape": [0, 10**6], "data_offsets": [0, 0]} for i in range(50)} | {"__metadata__": {}}, b""), "any"),
    }
    kind = rng.choice(sorted(kinds))
    out, expect = kinds[kind]()
    p.write_bytes(out)
    return kind, str(d), expect


def _nonfinite(data: bytes, header: dict, payload: bytes, rng: random.Random) -> bytes:
    info = header[_Q]
    a, b = info["data_offsets"]
    pos = len(data) - len(payload) + a + 4 * rng.randrange((b - a) // 4)
    val = rng.choice([float("nan"), float("inf"), float("-inf"), 1e30, -3e38])
    return data[:pos] + struct.pack("<f", val) + data[pos + 4:]


def _gguf(rng: random.Random, s: Seeds, d: Path) -> tuple[str, str, str]:
    d.mkdir(parents=True, exist_ok=True)
    data = s.gguf.read_bytes()
    n_t = struct.unpack("<Q", data[8:16])[0]
    n_kv = struct.unpack("<Q", data[16:24])[0]
    tname = rng.choice(["blk.0.attn_q.weight", "blk.1.ffn_up.weight", "token_embd.weight", "output_norm.weight"])
    after = gguf_find(data, tname)
    toks = gguf_find(data, "tokenizer.ggml.tokens")
    arch = gguf_find(data, "general.architecture")
    kinds: dict[str, Callable[[], tuple[bytes, str]]] = {
        "copy": lambda: (data, "derived"),
        "count_low": lambda: (patch(data, 8, "<Q", n_t - rng.randint(1, 2)), "any"),
        "count_high": lambda: (patch(data, 8, "<Q", n_t + rng.choice([1, 2, 10**6, 2**63])), "any"),
        "kv_count": lambda: (patch(data, 16, "<Q", max(0, n_kv + rng.choice([-1, 1, 2**40]))), "any"),
        "string_len": lambda: (patch(data, arch - len("general.architecture") - 8, "<Q", rng.choice([2**62, 10**6, 3])), "any"),
        "array_len": lambda: (patch(data, toks + 8, "<Q", rng.choice([0, 10**12, 2**28, 65])), "any"),
        "tensor_type": lambda: (patch(data, after + 4 + 8 * (1 if "norm" in tname else 2), "<I", rng.choice([1, 2, 8, 30, 99, 2**31])), "any"),
        "tensor_dim": lambda: (patch(data, after + 4, "<Q", rng.choice([0, 1, 33, 2**40, 2**63])), "any"),
        "tensor_offset": lambda: (patch(data, after + 4 + 8 * (1 if "norm" in tname else 2) + 4, "<Q", rng.choice([32, 64, 2**40, 7])), "any"),
        "n_dims": lambda: (patch(data, after, "<I", rng.choice([0, 3, 5, 2**31])), "any"),
        "version": lambda: (patch(data, 4, "<I", rng.choice([1, 4, 2**31])), "any"),
        "truncate": lambda: (data[: rng.randrange(len(data))], "any"),
        "flip_header": lambda: (flip(data, rng, rng.randint(1, 4), 0, 4096), "any"),
        "flip_data": lambda: (flip(data, rng, rng.randint(1, 3), len(data) - 40000), "derived_or_finding"),
        "layer_rename": lambda: (_gguf_rename(data, rng), "any"),
        "random": lambda: (b"GGUF" + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 4096))), "any"),
    }
    kind = rng.choice(sorted(kinds))
    out, expect = kinds[kind]()
    p = d / "model.gguf"
    p.write_bytes(out)
    return kind, str(p), expect


def _gguf_rename(data: bytes, rng: random.Random) -> bytes:
    """Rename a layer-1 tensor to a huge layer number, keeping the header length (token strings shrink)."""
    old = b"blk.1.attn_q.weight"
    new = f"blk.{rng.choice([10**9, 10**6, 10**30])}.attn_q.weight".encode()
    i = data.find(struct.pack("<Q", len(old)) + old)
    data = data[:i] + struct.pack("<Q", len(new)) + new + data[i + 8 + len(old):]
    for j in range(10, 10 + len(new) - len(old)):
        tok = struct.pack("<Q", 3) + f"t{j}".encode()
        data = data.replace(tok, struct.pack("<Q", 2) + f"u{j % 10}".encode(), 1)
    return data


def _peft(rng: random.Random, s: Seeds, d: Path) -> tuple[str, str, str]:
    from safetensors.torch import load_file, save_file

    shutil.copytree(s.adapter, d, dirs_exist_ok=True)
    cfg_p, w_p = d / "adapter_config.json", d / "adapter_model.safetensors"
    cfg = json.loads(cfg_p.read_text())
    bad_values = [
        ("lora_alpha", ["8", [8], {"a": 1}, None, float("nan"), 1e300, True, -8]),
        ("r", [0, -4, "4", 4.5, [4], 10**30]),
        ("base_model_name_or_path", [12, ["x"], {"a": 1}, "", "x" * 5000, str(d), "./", "../adapter", "no/such-model", "\u0000"]),
        ("alpha_pattern", [{"(a+)+$": 2}, {"(.*)*x": 2}, {"([a-z]+)*q": 2}, {"[": 2}, {"q_proj": "2"}, {"": 2},
                           {"x" * 1000: 2}, {"(a|a)*$": 2}, {r"(\w+\.)+q_proj": 2}, {"q_proj": 2}, [1], "x",
                           {"layers\\.0\\..*q_proj": 3}]),
        ("rank_pattern", [{"(a+)+$": 2}, {"q_proj": 0}, {"q_proj": "x"}, {"(": 1}, {"v_proj": 4}]),
        ("peft_type", ["IA3", 5, None, "lora"]),
        ("use_rslora", [True, "yes", 1]),
        ("fan_in_fan_out", [True, "no"]),
        ("use_dora", [True, "true"]),
    ]
    kinds = ["config_field", "config_json", "factors", "factor_shape", "rank0", "truncate_weights", "copy", "self_base"]
    kind = rng.choice(kinds)
    expect = "any"
    if kind == "config_field":
        key, vals = rng.choice(bad_values)
        v = rng.choice(vals)
        cfg[key] = v
        kind = f"config_{key}"
        cfg_p.write_text(json.dumps(cfg))
    elif kind == "config_json":
        cfg_p.write_text(hostile_json(rng, json.dumps(cfg)))
    elif kind == "self_base":
        cfg["base_model_name_or_path"] = rng.choice([str(d), "."])
        cfg_p.write_text(json.dumps(cfg))
    elif kind == "copy":
        expect = "derived"
    else:
        w = load_file(str(w_p))
        k = rng.choice(sorted(w))
        if kind == "factors":
            w[k].view(-1)[rng.randrange(w[k].numel())] = rng.choice([float("nan"), float("inf"), 1e30, -1e20])
        elif kind == "factor_shape":
            w[k] = torch.zeros(rng.choice([(3, 7), (0, 32), (4,), (1, 1, 1)]))
        elif kind == "rank0":
            for n in list(w):
                w[n] = torch.zeros((0, w[n].shape[1])) if "lora_A" in n else torch.zeros((w[n].shape[0], 0))
        if kind == "truncate_weights":
            data = w_p.read_bytes()
            w_p.write_bytes(data[: rng.randrange(len(data))])
        else:
            save_file(w, str(w_p))
    return kind, str(d), expect


def _shards(rng: random.Random, s: Seeds, d: Path) -> tuple[str, str, str]:
    shutil.copytree(s.shards, d, dirs_exist_ok=True)
    ip = d / "model.safetensors.index.json"
    idx = json.loads(ip.read_text())
    wm = idx["weight_map"]
    name = rng.choice(sorted(wm))
    kinds = ["long_name", "abs_name", "dotdot", "non_str", "missing_shard", "empty_map", "extra_tensor",
             "index_json", "shard_flip", "shard_truncate", "dup_across", "copy", "subdir", "nul"]
    kind = rng.choice(kinds)
    expect = "any"
    if kind == "long_name":
        wm[name] = "a" * rng.choice([256, 5000, 100000]) + ".safetensors"
    elif kind == "abs_name":
        wm[name] = str((d / wm[name]).resolve())
    elif kind == "dotdot":
        wm[name] = "../" + wm[name]
    elif kind == "subdir":
        wm[name] = "sub/" + wm[name]
    elif kind == "nul":
        wm[name] = "a\u0000b.safetensors"
    elif kind == "non_str":
        wm[name] = rng.choice([1, None, ["x"], {"a": 1}, 10**30])
    elif kind == "missing_shard":
        wm[name] = "model-00003-of-00002.safetensors"
    elif kind == "empty_map":
        idx["weight_map"] = rng.choice([{}, [], "x", None])
    elif kind == "extra_tensor":
        wm["model.layers.7.mlp.up_proj.weight"] = wm[name]
    elif kind == "dup_across":
        shutil.copy(d / "model-00001-of-00002.safetensors", d / "model-00002-of-00002.safetensors")
    elif kind in ("shard_flip", "shard_truncate"):
        p = d / rng.choice(sorted(set(wm.values())))
        data = p.read_bytes()
        p.write_bytes(flip(data, rng, 2) if kind == "shard_flip" else data[: rng.randrange(len(data))])
    elif kind == "copy":
        expect = "derived"
    if kind == "index_json":
        ip.write_text(hostile_json(rng, json.dumps(idx)))
    else:
        ip.write_text(json.dumps(idx))
    return kind, str(d), expect


def _torchbin(rng: random.Random, s: Seeds, d: Path) -> tuple[str, str, str]:
    import pickle
    import zipfile

    shutil.copytree(s.torchbin, d, dirs_exist_ok=True)
    p = d / "pytorch_model.bin"
    data = p.read_bytes()
    kinds = ["truncate", "flip", "legacy_truncate", "legacy_flip", "evil_pickle", "non_dict", "random",
             "pkl_flip", "strided", "copy", "legacy_copy", "nested_list"]
    kind = rng.choice(kinds)
    expect, ref = "any", str(d)
    if kind == "truncate":
        p.write_bytes(data[: rng.randrange(len(data))])
    elif kind == "flip":
        p.write_bytes(flip(data, rng, rng.randint(1, 6)))
    elif kind.startswith("legacy"):
        q = d / "legacy.pt"
        ld = s.legacy_pt.read_bytes()
        ld = ld[: rng.randrange(len(ld))] if kind == "legacy_truncate" else \
            flip(ld, rng, rng.randint(1, 4)) if kind == "legacy_flip" else ld
        q.write_bytes(ld)
        ref, expect = str(q), ("derived" if kind == "legacy_copy" else "any")
    elif kind == "evil_pickle":
        class Evil:
            def __reduce__(self):
                return (print, ("pwned",))
        p.write_bytes(pickle.dumps({"w": Evil()}))
    elif kind == "non_dict":
        torch.save(rng.choice([[torch.zeros(2)], torch.zeros(3), 5, {"a": {"b": 1}}, {1: torch.zeros(2)}]), p)
    elif kind == "nested_list":
        x: list = []
        for _ in range(rng.choice([50, 400])):
            x = [x]
        torch.save({"w": torch.zeros(2), "x": x}, p)
    elif kind == "random":
        p.write_bytes(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 4096))))
    elif kind == "pkl_flip":
        with zipfile.ZipFile(p) as z:
            items = {n: z.read(n) for n in z.namelist()}
        pk = next(n for n in items if n.endswith("data.pkl"))
        items[pk] = flip(items[pk], rng, rng.randint(1, 3))
        with zipfile.ZipFile(p, "w") as z:
            for n, b in items.items():
                z.writestr(n, b)
    elif kind == "strided":
        big = torch.zeros(1).expand(rng.choice([10**5, 10**7]), 1000)
        torch.save({"model.embed_tokens.weight": big}, p)
    elif kind == "copy":
        expect = "derived"
    return kind, ref, expect


def _json_side(rng: random.Random, s: Seeds, d: Path) -> tuple[str, str, str]:
    shutil.copytree(s.base, d, dirs_exist_ok=True)
    which = rng.choice(["config.json", "tokenizer.json", "vocab.json"])
    p = d / which
    if which == "vocab.json":
        (d / "tokenizer.json").unlink()
        text = json.dumps({f"t{i}": i for i in range(CFG.vocab)})
    else:
        text = p.read_text()
    k = rng.randrange(4)
    if k == 0:
        out = hostile_json(rng, text)
    elif k == 1 and which == "config.json":
        cfg = json.loads(text)
        key = rng.choice(["num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
                          "vocab_size", "model_type", "tie_word_embeddings", "text_config", "head_dim"])
        cfg[key] = rng.choice([0, -1, 10**18, "x", [1, 2], {"a": 1}, None, 1.5, float("nan"), True])
        out = json.dumps(cfg)
    elif k == 1:
        data = json.loads(text)
        vocab = data["model"]["vocab"] if which == "tokenizer.json" else data
        vocab[rng.choice(sorted(vocab))] = rng.choice([10**12, -5, "x", 2**40, 1.5, None, 10**6])
        if which == "tokenizer.json" and rng.random() < 0.5:
            data["added_tokens"] = rng.choice([[{"id": 10**12, "content": "x"}], "x", [1], [{"id": "a"}]])
        out = json.dumps(data)
    elif k == 2:
        out = rng.choice(["[]", "null", "1", '"x"', "", "\x00"])
    else:
        out = json.dumps(json.loads(text), indent=3)
    p.write_text(out, encoding="utf-8")
    return f"{which}:{k}", str(d), "derived"


_FAMILY_FN = {"safetensors": _safetensors, "gguf": _gguf, "peft": _peft, "shards": _shards,
              "torchbin": _torchbin, "json": _json_side}


def make_case(seeds: Seeds, seed: int, index: int, workdir: str | Path) -> Case:
    """Case number ``index`` of the campaign ``seed``, written under ``workdir`` (deterministic)."""
    rng = random.Random(f"{seed}:{index}")
    family = FAMILIES[index % len(FAMILIES)]
    d = Path(workdir) / f"case{index:06d}"
    if d.exists():
        shutil.rmtree(d)
    kind, ref, expect = _FAMILY_FN[family](rng, seeds, d)
    return Case(index, family, kind, ref, str(seeds.base), expect)

