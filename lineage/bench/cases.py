"""The benchmark's problems: each kernel, in each storage format, at the sizes of real models.

Sizes come from one transformer layer of Llama-3.2-1B, Llama-3.1-8B and Llama-3.1-70B:
element-wise kernels (pair moments, lattice checks) get a block of the layer's whole
parameter count (hidden × elements/hidden), matrix kernels (projection of A − B, Gram
rows, the Sinkhorn balance) the layer's largest matrix (the MLP projection), batched
decompositions one small matrix per attention head per layer.  ``model`` is the pair
moments over every tensor of TinyLlama-1.1B (bf16), the moment work of one whole compare.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from lineage_kernels.balance import balance
from lineage_kernels.batched import batched_eigh, batched_svdvals
from lineage_kernels.lattice import lattice_residual
from lineage_kernels.sketch import gaussian_sketch, gram_rows, project_diff
from lineage_kernels.stored import GGUF_BLOCKS, Stored
from lineage_kernels.stored_moments import pair_moments_stored

#: Layer sizes: (hidden, elements per layer / hidden, MLP width, heads, layers).
MODELS: dict[str, tuple[int, int, int, int, int]] = {
    "1B": (2048, 29696, 8192, 32, 16),
    "8B": (4096, 53248, 14336, 32, 32),
    "70B": (8192, 104448, 28672, 64, 80),
}
MOMENT_FORMATS = ("bfloat16", "float16", "float32", "float8_e4m3fn", "float8_e5m2", "int8_row", "int8_col",
                  "Q8_0", "Q4_K")
KERNELS = ("moments", "project", "gram", "lattice", "svdvals", "eigh", "balance", "model")
SKETCH_K = 64
GRAM_ROWS = 1024
BALANCE_ITERS = 20


@dataclass(frozen=True)
class Prepared:
    """A ready-to-time problem: the call, the bytes it must read, its FLOPs (nominal for decompositions)."""

    run: Callable[[], object]
    bytes_read: int
    flops: float


@dataclass(frozen=True)
class Case:
    """One benchmark problem, before its tensors exist."""

    kernel: str
    variant: str
    size: str
    shape: tuple[int, ...]
    mem_bytes: int  # peak memory estimate on the device
    build: Callable[[torch.device], Prepared]


def _dense(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, seed: int) -> torch.Tensor:
    """Standard normal values of ``dtype``, drawn on ``device`` itself (a 70B layer on the host takes seconds)."""
    g = torch.Generator(device=device).manual_seed(seed)
    out = torch.empty(shape, dtype=dtype, device=device)
    flat = out.view(-1)
    step = 1 << 24
    for s in range(0, flat.numel(), step):  # bounded float32 temporaries
        m = min(step, flat.numel() - s)
        flat[s : s + m] = torch.randn(m, generator=g, device=device).to(dtype)
    return out


def stored_operand(fmt: str, shape: tuple[int, int], device: torch.device, seed: int) -> Stored:
    """A random operand of ``fmt`` (valid scales; codes are random bytes)."""
    g = torch.Generator(device=device).manual_seed(seed)
    rows, cols = shape
    if fmt in GGUF_BLOCKS:
        per, nbytes = GGUF_BLOCKS[fmt]
        nblk = rows * cols // per
        raw = torch.randint(0, 256, (nblk, nbytes), generator=g, dtype=torch.uint8, device=device)
        raw[:, :4 if fmt == "Q4_K" else 2] = torch.full((nblk, 2 if fmt == "Q4_K" else 1), 0.01,
                                                       dtype=torch.float16, device=device).view(torch.uint8)
        return Stored.gguf(raw.reshape(-1), fmt, shape)
    if fmt in ("int8_row", "int8_col"):
        axis = 0 if fmt == "int8_row" else 1
        q = torch.randint(-127, 128, shape, generator=g, dtype=torch.int8, device=device)
        return Stored.int8(q, torch.rand(shape[axis], generator=g, device=device) * 0.01, axis)
    return Stored.dense(_dense(shape, getattr(torch, fmt), device, seed))


def _bytes_per_value(fmt: str) -> float:
    if fmt in GGUF_BLOCKS:
        per, nbytes = GGUF_BLOCKS[fmt]
        return nbytes / per
    return {"bfloat16": 2, "float16": 2, "float32": 4}.get(fmt, 1)


def _moments(fmt: str, shape: tuple[int, int]) -> Callable[[torch.device], Prepared]:
    def build(device: torch.device) -> Prepared:
        a = stored_operand(fmt, shape, device, 1)
        b = stored_operand(fmt, shape, device, 2)
        return Prepared(lambda: pair_moments_stored(a, b), a.nbytes + b.nbytes, 11.0 * a.numel)
    return build


def _project(dtype: str, shape: tuple[int, int]) -> Callable[[torch.device], Prepared]:
    def build(device: torch.device) -> Prepared:
        A = _dense(shape, getattr(torch, dtype), device, 1)
        B = _dense(shape, getattr(torch, dtype), device, 2)
        W = gaussian_sketch(shape[1], SKETCH_K, 0, device)
        nb = 2 * A.numel() * A.element_size() + W.numel() * 4
        return Prepared(lambda: project_diff(A, B, W), nb, 2.0 * A.numel() * SKETCH_K)
    return build


def _gram(dtype: str, shape: tuple[int, int]) -> Callable[[torch.device], Prepared]:
    def build(device: torch.device) -> Prepared:
        A = _dense(shape, getattr(torch, dtype), device, 1)
        rows = torch.randperm(shape[0], generator=torch.Generator().manual_seed(0))[:GRAM_ROWS].to(device)
        r = rows.numel()
        return Prepared(lambda: gram_rows(A, rows), r * shape[1] * A.element_size(), 2.0 * r * r * shape[1])
    return build


def _lattice(dtype: str, shape: tuple[int, int]) -> Callable[[torch.device], Prepared]:
    def build(device: torch.device) -> Prepared:
        w = _dense(shape, getattr(torch, dtype), device, 1)
        step = torch.full((shape[0],), 0.01, device=device)
        return Prepared(lambda: lattice_residual(w, step), w.numel() * w.element_size(), 5.0 * w.numel())
    return build


def _batched(kind: str, shape: tuple[int, int, int]) -> Callable[[torch.device], Prepared]:
    def build(device: torch.device) -> Prepared:
        X = _dense(shape, torch.float32, device, 1)
        n = shape[-1]
        if kind == "eigh":
            X = X @ X.transpose(-1, -2)
            return Prepared(lambda: batched_eigh(X), X.numel() * 4, 9.0 * n**3 * shape[0])
        return Prepared(lambda: batched_svdvals(X), X.numel() * 4, 8.0 / 3.0 * n**3 * shape[0])
    return build


def _balance(shape: tuple[int, int]) -> Callable[[torch.device], Prepared]:
    def build(device: torch.device) -> Prepared:
        V = _dense(shape, torch.float32, device, 1).square_().add_(0.1)
        passes = 2 * BALANCE_ITERS + 2 * (BALANCE_ITERS // 4)  # V·b and Vᵀ·a per iteration, and per check
        return Prepared(lambda: balance(V, max_iter=BALANCE_ITERS, tol=-1.0), passes * V.numel() * 4,
                        2.0 * passes * V.numel())
    return build


def tinyllama_shapes() -> list[tuple[int, int]]:
    """Every tensor shape of TinyLlama-1.1B (22 layers, hidden 2048, MLP 5632, 4 KV heads, vocab 32000)."""
    h, f, kv, vocab = 2048, 5632, 256, 32000
    layer = [(h, h), (kv, h), (kv, h), (h, h), (f, h), (f, h), (h, f), (1, h), (1, h)]
    return [(vocab, h)] + layer * 22 + [(1, h), (vocab, h)]


def _model() -> Callable[[torch.device], Prepared]:
    def build(device: torch.device) -> Prepared:
        shapes = tinyllama_shapes()
        big = max(r * c for r, c in shapes)
        a = _dense((big,), torch.bfloat16, device, 1)
        b = _dense((big,), torch.bfloat16, device, 2)
        pairs = [(Stored.dense(a[: r * c].view(r, c)), Stored.dense(b[: r * c].view(r, c))) for r, c in shapes]
        total = sum(r * c for r, c in shapes)

        def run() -> None:
            for x, y in pairs:
                pair_moments_stored(x, y)
        return Prepared(run, 4 * total, 11.0 * total)
    return build


def cases(kernels: tuple[str, ...] = KERNELS, sizes: tuple[str, ...] = tuple(MODELS)) -> list[Case]:
    """Every (kernel, variant, size) problem selected."""
    out: list[Case] = []
    for k, size in enumerate(sizes):
        if k == 1 and "model" in kernels:  # the whole-model case early: it is a target of its own
            out.append(Case("model", "bfloat16", "1.1B", (1100048384,), 5 * 65_536_000 * 2, _model()))
        hidden, per_row, mlp, heads, layers = MODELS[size]
        flat, mat = (hidden, per_row), (mlp, hidden)
        for fmt in MOMENT_FORMATS if "moments" in kernels else ():
            nb = int(2 * hidden * per_row * _bytes_per_value(fmt))
            out.append(Case("moments", fmt, size, flat, 2 * nb, _moments(fmt, flat)))
        for dt in ("bfloat16", "float8_e4m3fn") if "project" in kernels else ():
            out.append(Case("project", dt, size, mat, 3 * mlp * hidden * 4, _project(dt, mat)))
        if "gram" in kernels:
            out.append(Case("gram", "bfloat16", size, mat, 2 * mlp * hidden * 2, _gram("bfloat16", mat)))
        for dt in ("bfloat16", "float8_e4m3fn") if "lattice" in kernels else ():
            out.append(Case("lattice", dt, size, flat, 2 * hidden * per_row * 4, _lattice(dt, flat)))
        bshape = (heads * layers, hidden // heads * 2, hidden // heads * 2)
        for kind in ("svdvals", "eigh"):
            if kind in kernels:
                out.append(Case(kind, "float32", size, bshape, 3 * 4 * bshape[0] * bshape[1] ** 2,
                                _batched(kind, bshape)))
        if "balance" in kernels:
            out.append(Case("balance", "float32", size, mat, 2 * mlp * hidden * 4, _balance(mat)))
    if "model" in kernels and len(sizes) < 2:
        out.append(Case("model", "bfloat16", "1.1B", (1100048384,), 5 * 65_536_000 * 2, _model()))
    return out
