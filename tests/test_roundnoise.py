"""Rank above the child's known rounding noise: planted LoRAs of high rank/width ratio after bf16 and
int8, and no component counted in pure rounding (the calibration of the edge)."""

from __future__ import annotations

import math

import pytest
import torch

from lineage.signals.lowrank import LowRankConfig, lowrank
from lineage.signals.quantgrid import detect_grid, grid_steps
from lineage.signals.roundnoise import EDGE_T, known_noise_rank, rounding_noise


def _base(m: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (0.05 * torch.randn(m, n, generator=g) * torch.exp(0.5 * torch.randn(m, 1, generator=g))).float()


def _lora(base: torch.Tensor, r: int, seed: int, rel: float = 0.05) -> torch.Tensor:
    """A rank-r update with a decaying spectrum (random factors, as merged LoRAs are)."""
    g = torch.Generator().manual_seed(seed)
    m, n = base.shape
    A = torch.randn(r, n, generator=g, dtype=torch.float64) / math.sqrt(n)
    B = torch.randn(m, r, generator=g, dtype=torch.float64) * (1.0 / (1.0 + torch.arange(r))) ** 0.5
    d = B @ A
    return (base.double() + d * (rel * float(base.norm()) / float(d.norm()))).float()


def _encode(x: torch.Tensor, how: str) -> torch.Tensor:
    if how == "bf16":
        return x.bfloat16().float()
    s = x.double().abs().amax(1, keepdim=True) / 127
    return (torch.round(x.double() / s) * s).float()


def test_noise_map_from_the_child_format():
    w = _base(64, 128, 0)
    q = _encode(w, "int8")
    noise = rounding_noise(q)
    assert noise is not None and noise.name.startswith("int8")
    step = q.abs().amax(1, keepdim=True) / 127
    assert torch.allclose(noise.variance, (step * step / 12).expand_as(q), rtol=1e-3)
    nb = rounding_noise(w.bfloat16().float())
    assert nb is not None and nb.name == "bf16 rounding"
    assert rounding_noise(w) is None  # full precision: nothing known


def test_grid_steps_for_block_formats():
    w = _base(16, 256, 1).reshape(-1, 32)
    s = w.abs().amax(1, keepdim=True) / 8  # Q4_0-like: absmax / 8, 16 levels
    q = (torch.clamp(torch.round(w / s), -8, 7) * s).reshape(16, 256)
    grid = detect_grid(q)
    assert grid.on_grid and grid.group_size == 32
    steps = grid_steps(q, grid)
    assert steps.shape == (16, 8)
    assert torch.allclose(steps.flatten(), s.flatten(), rtol=1e-3)


@pytest.mark.parametrize("shape,r,how,floor_fails", [
    ((384, 96), 64, "bf16", True), ((384, 96), 64, "int8", True), ((96, 96), 32, "int8", True),
    ((128, 128), 48, "int8", False), ((352, 128), 64, "int8", False), ((600, 300), 24, "bf16", False)])
def test_high_rank_lora_recovered_exactly(shape, r, how, floor_fails):
    base = _base(*shape, seed=r)
    child = _encode(_lora(base, r, seed=r + 1), how)
    kn = known_noise_rank(child - base, rounding_noise(child))
    assert kn.rank == r, kn.to_dict()
    assert 0.8 <= kn.tail_ratio <= 1.2 and kn.excess_components < 2.0
    res = lowrank(base, child)
    assert res.status == "low-rank" and res.rank == r, res.to_dict()
    # without the known noise the estimated floors lose these ranks (what this signal adds)
    if shape[0] * shape[1] <= 40000 and r >= shape[1] // 2:
        old = lowrank(base, child, config=LowRankConfig(known_noise=False))
        assert not (old.status == "low-rank" and old.rank == r)


def test_no_component_counted_in_pure_rounding():
    """Calibration of the edge: pure rounding of many matrices never yields a component."""
    over = 0
    cases = 0
    for seed in range(12):
        for shape in [(96, 96), (384, 96), (64, 128), (200, 350)]:
            w = _base(*shape, seed=100 + seed)
            x = w + 1e-7 * _base(*shape, seed=999 - seed)  # a change far below the rounding
            for how in ("bf16", "int8"):
                c = _encode(x, how)
                kn = known_noise_rank(c - w, rounding_noise(c))
                over += kn.rank > 0
                cases += 1
                assert 0.85 <= kn.tail_ratio <= 1.15
    assert cases == 96 and over == 0


def test_dense_and_noise_children_are_not_explained():
    base = _base(128, 128, 7)
    g = torch.Generator().manual_seed(3)
    noisy = _encode(base + 3 * 0.05 * 0.02 * torch.randn(128, 128, generator=g), "int8")
    kn = known_noise_rank(noisy - base, rounding_noise(noisy))
    cfg = LowRankConfig()
    lo, hi = cfg.known_noise_tail
    assert not (lo <= kn.tail_ratio <= hi and kn.excess_components <= cfg.known_noise_excess
                and kn.rank <= 120), kn.to_dict()
    assert lowrank(base, noisy).status != "low-rank"


def test_slight_extra_noise_on_a_tall_matrix_is_not_low_rank():
    """Noise a fifth of the rounding's size inflates the whole bulk a little: a few components cross the
    edge of a 2048-row matrix, but the energy left over is many edge² units, so no low-rank reading."""
    base = _base(2048, 128, 21)
    g = torch.Generator().manual_seed(22)
    sigma = float((base.abs().amax(1) / 127 / math.sqrt(12)).mean())
    child = _encode(base + 0.2 * sigma * torch.randn(2048, 128, generator=g), "int8")
    kn = known_noise_rank(child - base, rounding_noise(child))
    assert kn.excess_components > LowRankConfig().known_noise_excess, kn.to_dict()
    assert lowrank(base, child).status != "low-rank"


def test_summary_lists_modules_no_wider_than_the_rank_apart():
    from lineage.signals.lowrank import lowrank_modules

    pairs = {}
    for i in range(2):
        for kind, shape in (("attn.q", (128, 128)), ("attn.v", (48, 128))):
            b = _base(*shape, seed=40 + i + shape[0])
            pairs[f"L{i}.{kind}.weight"] = (b, _encode(_lora(b, 48, seed=50 + i + shape[0]), "bf16"))
        b = _base(128, 128, seed=60 + i)
        pairs[f"L{i}.attn.o.weight"] = (b, b.bfloat16().float())
    _, summ = lowrank_modules(pairs)
    assert summ.kind == "low-rank" and summ.rank == 48, summ.to_dict()
    assert summ.modules == ("L0.attn.q.weight", "L1.attn.q.weight")
    assert summ.full_rank_modules == ("L0.attn.v.weight", "L1.attn.v.weight")
    assert "at full rank" in summ.description
    assert summ.rank_sources == {"known rounding noise": 2}


def test_noise_as_large_as_the_rounding_is_not_a_deep_low_rank():
    """Noise comparable to int8 rounding makes the count run deep into the bulk (87 of 96) leaving a thin
    complement whose excess is few edge² units; its energy per entry is still well above the rounding's,
    so the reading is rejected (the zoo's gpt2 noise0.01 child in int8 did this before the tail bound)."""
    base = _base(96, 384, 31)
    g = torch.Generator().manual_seed(32)
    sigma = (base.abs().amax(1, keepdim=True) / 127 / math.sqrt(12))
    child = _encode(base + 1.4 * sigma * torch.randn(96, 384, generator=g), "int8")
    kn = known_noise_rank(child - base, rounding_noise(child))
    cfg = LowRankConfig()
    assert kn.rank > 80 and kn.excess_components <= cfg.known_noise_excess, kn.to_dict()
    assert kn.tail_ratio > cfg.known_noise_tail[1]
    assert lowrank(base, child).status != "low-rank"
    loose = LowRankConfig(known_noise_tail=(0.7, 10.0))
    assert lowrank(base, child, config=loose).status == "low-rank"  # the tail bound is what rejects it


def test_sketched_path_for_large_matrices():
    base = _base(700, 520, 11)  # above the exact-spectrum size: randomized, growing sketch
    child = _encode(_lora(base, 40, seed=12), "bf16")
    kn = known_noise_rank(child - base, rounding_noise(child))
    assert kn.rank == 40 and kn.computed < min(base.shape)
    assert EDGE_T == 3.0


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="equal 2-D shapes"):
        known_noise_rank(torch.zeros(3, 4), rounding_noise(_base(4, 3, 0).bfloat16().float()))


def test_grid_along_columns_transposed_layout():
    """A matrix quantised in its transposed layout (a GPT-2 Conv1D weight rounded per stored row): the
    lattice is found along columns, its steps and rounding map follow, and a planted LoRA rank survives."""
    base = _base(96, 384, 71)
    child_t = _encode(_lora(base, 40, seed=72).T.contiguous(), "int8")  # per row of the transposed layout
    child = child_t.T.contiguous()
    grid = detect_grid(child, base)
    assert grid.on_grid and grid.axis == 1 and grid.format.endswith("along columns"), grid.to_dict()
    steps = grid_steps(child, grid)
    assert steps.shape == (384, 1)
    assert torch.allclose(steps[:, 0], child_t.abs().amax(1) / 127, rtol=1e-3)
    noise = rounding_noise(child)
    assert noise is not None and torch.allclose(noise.variance, ((child_t.abs().amax(1, keepdim=True) / 127) ** 2
                                                                / 12).expand_as(child_t).T, rtol=1e-3)
    res = lowrank(base, child)
    assert res.status == "low-rank" and res.rank == 40 and res.rank_source == "known rounding noise"
    # an ordinary row-wise grid still reads axis 0
    assert detect_grid(_encode(base, "int8")).axis == 0


def test_a_component_barely_across_the_edge_is_not_a_lora():
    """The strongest component must stand clear of the bulk (``known_noise_lead``): a lone component just
    across the noise edge is what noise slightly above the rounding produces (the zoo's llama noise0.001
    child quantised per column read "lora merge, rank 1 on lm_head" without this guard)."""
    base = _base(2048, 128, 81)
    g = torch.Generator().manual_seed(82)
    step = base.double().abs().amax(1, keepdim=True) / 127
    u = torch.randn(2048, 1, generator=g, dtype=torch.float64)
    v = torch.randn(1, 128, generator=g, dtype=torch.float64)
    u, v = u / u.norm(), v / v.norm()
    # whitened singular value θ = 31: the BBP outlier lands ~3 % above the edge √2048 + √128
    spike = (step / math.sqrt(12)) * (31.0 * u @ v)
    child = _encode((base.double() + spike).float(), "int8")
    kn = known_noise_rank(child - base, rounding_noise(child))
    assert kn.rank == 1 and 1.0 < kn.lead < LowRankConfig().known_noise_lead, kn.to_dict()
    assert lowrank(base, child).status != "low-rank"
    assert lowrank(base, child, config=LowRankConfig(known_noise_lead=0.0)).status == "low-rank"
