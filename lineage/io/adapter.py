"""PEFT LoRA adapters: a folder with ``adapter_config.json`` and ``adapter_model.safetensors``.

As a model reference, an adapter folder opens as its *base model with the adapter merged
on read*: for every adapted module, rows ``[s, t)`` are ``W[s:t] + scale · B[s:t] @ A``
(``scale = lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with ``use_rslora``; per-module
``rank_pattern`` / ``alpha_pattern`` honoured), computed in float32.  Embedding LoRA
(``lora_embedding_A/B``), ``fan_in_fan_out`` (GPT-2 Conv1D) and ``modules_to_save``
(whole replaced tensors) are handled; DoRA and non-LoRA PEFT types are refused.

The base comes from the caller (:func:`open_adapter_folder` ``base=``) or from
``base_model_name_or_path`` (a local path, or a Hub id opened through the Hub opener,
which uses the local HF cache first).  :func:`read_adapter` returns the raw factors per
module for the adapter check.
"""

from __future__ import annotations

import logging
import math
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lineage.errors import CheckpointError, HeaderError, LineageError, ShapeMismatchError, UnsupportedFormatError
from lineage.io.adapterconfig import CONFIG, parse_adapter_config
from lineage.io.checkpoint import Checkpoint, TensorMeta, open_checkpoint, open_safetensors_sources
from lineage.io.sources import ByteSource, LocalFileSource

log = logging.getLogger(__name__)

WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_LORA = re.compile(
    r"(?:base_model\.model\.)?(.+?)\.lora_(A|B|embedding_A|embedding_B)"
    r"(?:\.(?!(?:weight|bias)$)[\w-]+)?(?:\.(weight|bias))?"
)
_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: factors in float32 and how they combine."""

    module: str  # module path in the base model, e.g. "model.layers.0.self_attn.q_proj"
    a: torch.Tensor  # (r, in); for embeddings (r, vocab)
    b: torch.Tensor  # (out, r); for embeddings (hidden, r)
    alpha: float
    scale: float
    kind: str = "linear"  # "linear" | "embedding"
    fan_in_fan_out: bool = False
    bias: torch.Tensor | None = None  # lora_B bias (lora_bias=True)

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    def delta_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` of the delta in the *base tensor's* storage orientation."""
        if self.kind == "embedding" or self.fan_in_fan_out:
            # stored (in, out) / (vocab, hidden): delta^T = A^T B^T
            return self.scale * (self.a.T[start:stop] @ self.b.T)
        return self.scale * (self.b[start:stop] @ self.a)

    def delta(self) -> torch.Tensor:
        """The full delta ``scale · B A`` in ``(out, in)`` (embeddings: ``(vocab, hidden)``)."""
        d = self.scale * (self.b @ self.a)
        return d.T if self.kind == "embedding" else d


@dataclass(frozen=True)
class AdapterFactors:
    """A PEFT LoRA adapter as read from its folder."""

    path: str
    config: dict[str, Any]
    base_model: str | None
    modules: dict[str, LoraModule]
    #: whole tensors saved with the adapter (``modules_to_save``), by base tensor name
    saved: dict[str, torch.Tensor] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "base_model": self.base_model,
            "peft_type": self.config.get("peft_type"),
            "r": self.config.get("r"),
            "lora_alpha": self.config.get("lora_alpha"),
            "use_rslora": bool(self.config.get("use_rslora")),
            "modules": {m: {"rank": f.rank, "scale": f.scale, "kind": f.kind}
                        for m, f in self.modules.items()},
            "saved": sorted(self.saved),
        }


def is_adapter_folder(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / CONFIG).is_file() and any((p / w).is_file() for w in WEIGHTS)


def _load_weights(folder: Path) -> tuple[dict[str, torch.Tensor], ByteSource | None]:
    st = folder / WEIGHTS[0]
    if st.is_file():
        src = LocalFileSource(st)
        ck = open_safetensors_sources(str(st), [src])
        return {n: ck.read(n) for n in ck.tensors}, src
    from lineage.io.torchbin import load_state_dict

    sd = load_state_dict(folder / WEIGHTS[1])
    return {k: v.float() for k, v in sd.items()}, None


#: Largest bound on one element of a LoRA delta (``|scale| · r · max|A| · max|B|``) accepted;
#: real adapters stay far below 1, and a larger one is corrupt or hostile.
MAX_DELTA = 1e4


def _check_factors(module: str, a: torch.Tensor | None, b: torch.Tensor | None, folder: Path) -> None:
    if a is None or b is None or a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
        raise HeaderError(
            f"module {module!r}: LoRA factors missing or of inconsistent shapes "
            f"(A {None if a is None else tuple(a.shape)}, B {None if b is None else tuple(b.shape)})",
            path=str(folder),
        )
    if a.shape[0] == 0 or a.numel() == 0 or b.numel() == 0:
        raise HeaderError(f"module {module!r}: LoRA factors of rank 0 or empty "
                          f"(A {tuple(a.shape)}, B {tuple(b.shape)})", path=str(folder))


def _check_finite(name: str, t: torch.Tensor, folder: Path) -> float:
    """Largest |value| of ``t``; a NaN or infinite value is an error."""
    if t.numel() == 0:
        return 0.0
    if not bool(torch.isfinite(t).all()):
        raise HeaderError(f"tensor {name!r} holds NaN or infinite values", path=str(folder))
    return float(t.abs().max())


def read_adapter(folder: str | Path) -> AdapterFactors:
    """Raw LoRA factors per module, with their scales (``lora_alpha / r`` or rsLoRA).

    The config is type-checked (:mod:`lineage.io.adapterconfig`); factors must be of
    rank ≥ 1, finite, and give a delta of sane size, or a typed error names the folder.
    """
    folder = Path(folder)
    cfg = parse_adapter_config(folder)
    if cfg.use_dora:
        raise UnsupportedFormatError("DoRA adapters are not supported (magnitude vectors)",
                                     path=str(folder))
    weights, src = _load_weights(folder)
    if src is not None:
        src.close()
    parts: dict[str, dict[str, torch.Tensor]] = {}
    saved: dict[str, torch.Tensor] = {}
    for key, t in weights.items():
        m = _LORA.fullmatch(key)
        if m:
            module, which, kind = m.group(1), m.group(2), m.group(3) or "weight"
            parts.setdefault(module, {})[which + ("" if kind == "weight" else ".bias")] = t
        elif "lora_magnitude_vector" in key:
            raise UnsupportedFormatError("DoRA adapters are not supported", path=str(folder))
        else:
            _check_finite(key, t, folder)
            name = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
            saved[name.replace(".modules_to_save.default", "")] = t
    modules: dict[str, LoraModule] = {}
    for module, p in parts.items():
        emb = "embedding_A" in p
        a = p.get("embedding_A" if emb else "A")
        b = p.get("embedding_B" if emb else "B")
        _check_factors(module, a, b, folder)
        assert a is not None and b is not None
        r = a.shape[0]
        alpha = cfg.alpha_for(module)
        scale = alpha / math.sqrt(r) if cfg.use_rslora else alpha / r
        bound = abs(scale) * r * _check_finite(module + ".lora_A", a, folder) \
            * _check_finite(module + ".lora_B", b, folder)
        bias = p.get("B.bias")
        if bias is not None:
            bound = max(bound, abs(scale) * _check_finite(module + ".lora_B.bias", bias, folder))
        if not bound <= MAX_DELTA:
            raise HeaderError(f"module {module!r}: LoRA delta of up to {bound:.3g} per weight "
                              f"(cap {MAX_DELTA:g}): corrupt or hostile factors", path=str(folder))
        modules[module] = LoraModule(module, a, b, alpha, scale,
                                     "embedding" if emb else "linear", cfg.fan_in_fan_out and not emb,
                                     bias)
    if not modules and not saved:
        raise CheckpointError("adapter holds no LoRA factors", path=str(folder))
    return AdapterFactors(str(folder), cfg.raw, cfg.base_model, modules, saved)


def _base_name(module_or_tensor: str, base: Checkpoint, suffix: str) -> str | None:
    """The base tensor for a PEFT module path (tolerating a missing/extra ``model.`` prefix)."""
    cands = [module_or_tensor + suffix]
    if module_or_tensor.startswith("model."):
        cands.append(module_or_tensor[len("model."):] + suffix)
    else:
        cands.append("model." + module_or_tensor + suffix)
    for c in cands:
        if c in base.tensors:
            return c
    tail = "." + module_or_tensor.split(".", 1)[-1] + suffix
    hits = [n for n in base.tensors if n.endswith(tail)]
    return hits[0] if len(hits) == 1 else None


class MergedReader:
    """Base rows plus the LoRA delta rows (float32)."""

    def __init__(self, base: Checkpoint, lora: LoraModule | None, bias: bool = False,
                 saved: torch.Tensor | None = None) -> None:
        self.base = base
        self.lora = lora
        self.bias = bias
        self.saved = saved

    def read_rows(self, meta: TensorMeta, start: int, stop: int) -> torch.Tensor:
        if self.saved is not None:
            return self.saved[start:stop] if self.saved.dim() >= 2 else self.saved
        w = self.base.read(meta.name, start, stop)
        assert self.lora is not None
        if self.bias:
            assert self.lora.bias is not None
            return w + self.lora.scale * self.lora.bias
        return w + self.lora.delta_rows(start, stop)


def merge_adapter(base: Checkpoint, factors: AdapterFactors, ref: str) -> Checkpoint:
    """A checkpoint reading ``base`` with ``factors`` merged into every adapted tensor."""
    tensors = dict(base.tensors)
    readers = dict(base.readers)
    unmatched = []
    for module, lora in factors.modules.items():
        name = _base_name(module, base, ".weight")
        if name is None:
            unmatched.append(module)
            continue
        meta = base.tensors[name]
        if lora.kind == "embedding" or lora.fan_in_fan_out:
            want = (lora.a.shape[1], lora.b.shape[0])
        else:
            want = (lora.b.shape[0], lora.a.shape[1])
        if meta.shape != want:
            raise ShapeMismatchError(
                f"adapter module {module!r} expects a base weight of shape {want}, "
                f"but {name!r} in the base is {meta.shape}",
                path=ref,
            )
        readers[name] = MergedReader(base, lora)
        if lora.bias is not None:
            bname = _base_name(module, base, ".bias")
            if bname is not None:
                readers[bname] = MergedReader(base, lora, bias=True)
            else:
                log.warning("%s: adapter module %s has a LoRA bias but the base has no bias "
                            "tensor; the bias is left out of the merged view", ref, module)
    if unmatched:
        raise ShapeMismatchError(
            f"{len(unmatched)} adapter module(s) have no weight in the base model, e.g. "
            f"{unmatched[0]!r}: is this the right base?",
            path=ref,
        )
    for name, t in factors.saved.items():
        bname = name if name in base.tensors else _base_name(name.removesuffix(".weight").removesuffix(".bias"),
                                                               base, "." + name.rsplit(".", 1)[-1])
        bname = bname or name
        old = base.tensors.get(bname)
        tensors[bname] = TensorMeta(bname, "F32", tuple(t.shape), t.numel() * 4,
                                    factors.path, old.offset if old else 0)
        readers[bname] = MergedReader(base, None, saved=t.float())
    meta = dict(base.metadata)
    meta.update({
        "adapter.path": factors.path,
        "adapter.base_model": factors.base_model,
        "adapter.r": factors.config.get("r"),
        "adapter.lora_alpha": factors.config.get("lora_alpha"),
        "adapter.modules": len(factors.modules),
    })
    own_tok = Path(factors.path, "tokenizer.json").is_file()
    return MergedCheckpoint(ref, f"peft+{base.format}", tensors, readers, list(base.sources),
                            config=base.config, metadata=meta,
                            tokenizer_dir=factors.path if own_tok else None,
                            base=None if own_tok else base)


@dataclass
class MergedCheckpoint(Checkpoint):
    """Base + adapter; the vocabulary is the adapter's own tokenizer if it ships one, else the base's."""

    base: Checkpoint | None = field(default=None, repr=False)

    def vocab(self) -> list[str] | None:
        if self.base is not None:
            return self.base.vocab()
        return super().vocab()


def resolve_base(factors: AdapterFactors, base: str | Checkpoint | None) -> Checkpoint:
    """Open the adapter's base: the caller's, else ``base_model_name_or_path``."""
    if isinstance(base, Checkpoint):
        return base
    name = base or factors.base_model
    if not name:
        raise CheckpointError(
            "adapter_config.json names no base_model_name_or_path; pass the base model explicitly",
            path=factors.path,
        )
    cands = [name]
    if not Path(name).is_absolute():
        cands.insert(0, str(Path(factors.path) / name))
    for cand in cands:
        try:
            found = Path(cand).exists()
        except OSError:
            found = False
        if found:
            return open_checkpoint(cand)
    try:
        return open_checkpoint(name)
    except LineageError as e:
        raise CheckpointError(
            f"cannot open the adapter's base model {name!r} ({e}); pass the base explicitly",
            path=factors.path,
        ) from e


#: Adapters being opened on this thread (resolved folders), to catch a base chain that loops.
_OPENING = threading.local()
#: Longest chain of adapters over adapters followed.
MAX_ADAPTER_CHAIN = 8


def open_adapter_folder(folder: str, base: str | Checkpoint | None = None,
                        ref: str | None = None) -> Checkpoint:
    """The base model with the adapter in ``folder`` merged on read.

    A base that is itself an adapter is followed up to :data:`MAX_ADAPTER_CHAIN`
    levels; a chain that comes back to an adapter already being opened is an error.
    """
    key = str(Path(folder).resolve())
    stack: list[str] = _OPENING.__dict__.setdefault("stack", [])
    if key in stack:
        raise CheckpointError(f"the adapter's base chain loops back to {key} "
                              f"(base_model_name_or_path names an adapter being opened)", path=folder)
    if len(stack) >= MAX_ADAPTER_CHAIN:
        raise CheckpointError(f"adapter base chain longer than {MAX_ADAPTER_CHAIN}", path=folder)
    stack.append(key)
    try:
        factors = read_adapter(folder)
        base_ck = resolve_base(factors, base)
    finally:
        stack.pop()
    log.info("%s: LoRA adapter (%d modules) over base %s", folder, len(factors.modules), base_ck.ref)
    return merge_adapter(base_ck, factors, ref or folder)


def open_adapter(ref: str) -> Checkpoint | None:
    """Opener: a PEFT adapter folder (or its ``adapter_config.json``)."""
    p = Path(ref)
    if p.is_file() and p.name == CONFIG:
        p = p.parent
    if not is_adapter_folder(p):
        return None
    return open_adapter_folder(str(p), ref=ref)
