"""The streaming pass (lineage.stream.engine, moments, lattice) and hashing from its own reads (lineage.io.hashing)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from lineage.compare import CompareOptions, compare
from lineage.io.checkpoint import open_checkpoint
from lineage.io.hashing import HashingSource, complete_hashes, start_hashes
from lineage.io.sources import LocalFileSource
from lineage.provenance import hash_file, hash_inputs, known_digests
from lineage.signals.quantgrid import detect_grid_sampled
from lineage.stream.lattice import detect_both
from lineage.stream.moments import _count_nonzero, block_moments_reference, block_reduce
from lineage.stream.screen import ScreenBuilder, ScreenConfig


def _pair(m: int = 300, n: int = 257, mean: float = 0.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = mean + 0.1 * torch.randn(m, n, generator=g)
    y = x + 0.01 * torch.randn(m, n, generator=g)
    y[::7] = x[::7]  # unchanged rows: change counts must be exact
    x[3, :11] = 0.0  # zeros on one side only
    y[5, :4] = 0.0
    return x, y


@pytest.mark.parametrize("mean", [0.0, 1.0])  # 1.0: a shifted tensor (norm gains) takes the centring path
@pytest.mark.parametrize("chunk", [257, 1000, 1 << 20])
def test_block_reduce_matches_reference_for_any_chunk(mean: float, chunk: int) -> None:
    x, y = _pair(mean=mean)
    rows: list[tuple[int, int]] = []
    mom, changed, big = block_reduce(x, y, chunk, rows_hook=lambda r, d: rows.append((r, d.shape[0])))
    ref = block_moments_reference(x, y)
    for f in dataclasses.fields(ref):
        got, want = getattr(mom, f.name), getattr(ref, f.name)
        assert got == pytest.approx(want, rel=2e-6, abs=1e-6 * abs(ref.m2x)), f.name
    assert changed == int((x != y).sum()) and big == pytest.approx(float((y - x).abs().max()))
    assert (mom.zeros_only_x, mom.zeros_only_y) == (11, 4)
    # the hook saw whole rows, each changed chunk once, in order
    assert all(r % max(1, chunk // 257) == 0 for r, _ in rows) and sum(k for _, k in rows) <= 300
    assert [r for r, _ in rows] == sorted(r for r, _ in rows)


def test_cross_moment_keeps_one_minus_pearson_accurate() -> None:
    # bf16 weights and a 1e-3 change: 1 − r is about 1e-6, a float32 dot product of x and y would drift by that much
    g = torch.Generator().manual_seed(3)
    x = (0.02 * torch.randn(512, 2048, generator=g)).bfloat16()
    y = (x.float() * (1 + 1e-3 * torch.randn(512, 2048, generator=g))).bfloat16()
    mom, _, _ = block_reduce(x, y, 1 << 18)
    ref = block_moments_reference(x, y)
    one_minus = 1 - mom.cxy / math.sqrt(mom.m2x * mom.m2y)
    want = 1 - ref.cxy / math.sqrt(ref.m2x * ref.m2y)
    assert one_minus == pytest.approx(want, rel=1e-2)


def test_change_count_is_exact_and_counts_nan() -> None:
    d = torch.tensor([0.0, -0.0, 1e-30, -2.0, 0.0, 3.0])
    assert _count_nonzero(d, torch.empty(6)) == 3
    x = torch.zeros(2, 3)
    y = d.reshape(2, 3).clone()
    y[0, 1] = math.nan  # a NaN entry is a change (the fast count would miss it)
    _, changed, _ = block_reduce(x, y)
    assert changed == 4


def _rows_cols(x: torch.Tensor, k: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    m, n = x.shape
    ri = torch.linspace(0, m - 1, min(k, m)).round().long()
    ci = torch.linspace(0, n - 1, min(k, n)).round().long().unique()
    return x[ri].float(), x[:, ci].float()


def _lattices() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    w = torch.randn(512, 1024, generator=g) / 32
    s = w.abs().amax(1, keepdim=True) / 127
    blocks = w.reshape(-1, 32)
    q4 = (torch.round(blocks / (blocks.abs().amax(1, keepdim=True) / 8)).clamp(-8, 7)
          * (blocks.abs().amax(1, keepdim=True) / 8)).reshape(w.shape)
    st = w.abs().amax(0, keepdim=True) / 127
    nan = w.clone()
    nan[0, 0] = math.nan
    return {"bf16 noise": (w.bfloat16().float(), (w + 1e-3 * torch.randn(w.shape, generator=g)).bfloat16().float()),
            "fp32 noise": (w, w + 1e-3 * torch.randn(w.shape, generator=g)),
            "int8 per row": (w, torch.round(w / s) * s),
            "q4_0 blocks": (w, q4),
            "int8 along columns": (w, torch.round(w / st) * st),
            "int8 in bf16": (w.bfloat16().float(), (torch.round(w / s) * s).bfloat16().float()),
            "non-finite": (w, nan)}


@pytest.mark.parametrize("case", list(_lattices()))
def test_lattice_probe_for_both_sides_agrees_with_detect_grid_sampled(case: str) -> None:
    a, b = _lattices()[case]
    (ra, ca), (rb, cb) = _rows_cols(a), _rows_cols(b)
    grids = ("bf16" if "bf16" in case else "fp32", "bf16" if "bf16" in case else "fp32")
    qa, qb = detect_both((ra, rb), (ca, cb), grids, tuple(a.shape), 128)
    assert qa == detect_grid_sampled(ra, rb, ca, cb, shape=tuple(a.shape), float_grid_name=grids[0], max_rows=128,
                                     probe_rows=2)
    assert qb == detect_grid_sampled(rb, ra, cb, ca, shape=tuple(a.shape), float_grid_name=grids[1], max_rows=128,
                                     probe_rows=2)
    assert qb.on_grid == (case in ("int8 per row", "q4_0 blocks", "int8 along columns"))  # (int8 in bf16: neither)


def test_sketch_from_the_pass_matches_the_delta_rows() -> None:
    """The sketch's Gram and energies equal those of the stride-selected rows of Δ computed directly."""
    x, y = _pair(m=96, n=64)
    cfg = ScreenConfig(min_elems=1, sketch_k=8, sketch_stride=3)
    sb = ScreenBuilder("L0.attn.q.weight", (96, 64), cfg)
    for r0 in range(0, 96, 40):  # block starts not on the stride: the row selection continues across blocks
        sb.add(sb.part(r0, x[r0 : r0 + 40], y[r0 : r0 + 40]))
    sc = sb.finish()
    from lineage.stream.screen import _omega

    d = (y - x)[::3].double()
    yy = d @ _omega(64, 8, 0, torch.device("cpu")).double()
    gram = yy.T @ yy
    off = gram - torch.diag(torch.diag(gram))
    assert sc.fourth_sketch == pytest.approx(float((off * off).sum()) / (8 * 7), rel=1e-4)
    d2 = d * d
    want = float((d2.sum(0) ** 2).sum() + (d2.sum(1) ** 2).sum() - (d2**2).sum())
    assert sc.fourth_noise == pytest.approx(want, rel=1e-5)


def test_engine_results_do_not_depend_on_workers_or_block_size(tiny_models) -> None:
    runs = [compare(tiny_models["base"], tiny_models["derived"],
                    options=CompareOptions(workers=w, block_elems=b, screen=ScreenConfig(min_elems=1)))
            for w, b in ((1, 1 << 22), (2, 1 << 22), (2, 4096))]
    for r in runs[1:]:
        assert r.verdict.log10_p == pytest.approx(runs[0].verdict.log10_p, rel=1e-6)
        assert (r.anatomy or {}).get("relation") == (runs[0].anatomy or {}).get("relation")
        for x, y in zip(runs[0].layers, r.layers):
            assert y.pearson == pytest.approx(x.pearson, rel=1e-6, abs=1e-9) if x.pearson is not None else True


# ----------------------------------------------------------------------------- hashing in the read pass


def _file(tmp_path, n: int = 3_000_000) -> str:
    p = tmp_path / "blob.bin"
    p.write_bytes(torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
                  .numpy().tobytes())
    return str(p)


@pytest.mark.parametrize("order", ["in order", "gaps", "backwards", "inactive"])
def test_hashing_source_digest_equals_hash_file(tmp_path, order: str) -> None:
    path = _file(tmp_path)
    src = HashingSource(LocalFileSource(path))
    if order != "inactive":
        src.start()
    spans = {"in order": [(0, 1_000_000), (1_000_000, 2_000_000), (2_000_000, 3_000_000)],
             "gaps": [(10, 100), (500_000, 600_000), (2_900_000, 2_950_000)],
             "backwards": [(2_000_000, 2_500_000), (0, 1_000)],
             "inactive": [(0, 1_000), (2_000_000, 2_500_000)]}[order]
    for lo, hi in spans:
        buf = bytearray(hi - lo)
        src.readinto(lo, memoryview(buf))
    before = src.inner.bytes_read
    if order == "inactive":
        assert src.hashed == 0 and src.integrity().blake3 is None
        assert complete_hashes([src]) == 0.0 and src.integrity().blake3 is None  # never started: nothing read
        return
    assert src.integrity().blake3 is None or order == "in order"
    complete_hashes([src])
    assert src.integrity().blake3 == hash_file(path) and src.hashed == 3_000_000
    if order == "in order":
        assert src.inner.bytes_read == before == 3_000_000  # one read: the hash took the same bytes
    src.close()


def test_compare_hashes_the_weights_from_its_own_read(tiny_models) -> None:
    a, b = tiny_models["base"], tiny_models["derived"]
    r = compare(a, b, options=CompareOptions(hash_files=True, canonicalise=False))  # the streaming pass alone
    for side, ref in (("a", a), ("b", b)):
        summary = getattr(r, side)
        files = [f for f in summary.files if f.blake3]
        assert files and all(f.blake3 == hash_file(f.file) for f in files)
        ck = open_checkpoint(ref)
        size = sum(s.size for s in ck.sources)
        # every byte read once for both the hash and the statistics; only the header (read when the file
        # was opened, before hashing started) is read again
        assert size <= summary.bytes_read <= size + 8 + 64 * 1024
        ck.close()
    plain = compare(a, b)
    assert not any(f.blake3 for f in plain.a.files)  # not asked: nothing hashed


def test_provenance_reuses_digests_from_the_read_pass(tmp_path, tiny_models) -> None:
    r = compare(tiny_models["base"], tiny_models["derived"], options=CompareOptions(hash_files=True))
    known = known_digests([r.a.files])
    assert known
    path, (size, digest) = next(iter(known.items()))
    fake = {path: (size, "0" * 64)}
    files, _ = hash_inputs({"a": tiny_models["base"]}, known=fake)
    assert any(f.digest == "0" * 64 for f in files)  # taken from the pass, not re-read
    files, _ = hash_inputs({"a": tiny_models["base"]}, known={path: (size + 1, "0" * 64)})
    assert all(f.digest != "0" * 64 for f in files)  # size differs: hashed again
    assert any(f.digest == digest for f in files)


def test_start_hashes_touches_only_hashing_sources(tmp_path) -> None:
    path = _file(tmp_path, 1000)
    plain = LocalFileSource(path)
    start_hashes([plain])  # a source that does not hash is left alone
    assert complete_hashes([plain]) == 0.0
    plain.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_screens_on_cuda_agree_with_cpu() -> None:
    """The screen computed from device blocks (one chunk per block, device sketch) equals the CPU one."""
    g = torch.Generator().manual_seed(9)
    w = torch.randn(1024, 768, generator=g) / 28
    low = (torch.randn(1024, 16, generator=g) @ torch.randn(16, 768, generator=g)) * 1e-4
    s = w.abs().amax(1, keepdim=True) / 127
    cases = {"noise": (w.bfloat16(), (w + 1e-3 * torch.randn(w.shape, generator=g)).bfloat16()),
             "low-rank": (w, w + low), "int8": (w, torch.round(w / s) * s)}
    for name, (a, b) in cases.items():
        out = []
        for dev in ("cpu", "cuda"):
            sb = ScreenBuilder("L0.attn.q.weight", tuple(a.shape), ScreenConfig(min_elems=1))
            for r0 in range(0, 1024, 300):
                sb.add(sb.part(r0, a[r0 : r0 + 300].to(dev), b[r0 : r0 + 300].to(dev)))
            out.append(sb.finish())
        c, k = out
        assert k.changed == c.changed and k.quant_b == c.quant_b and k.noise_like == c.noise_like, name
        assert k.structure_ratio == pytest.approx(c.structure_ratio, rel=1e-4), name
        assert k.stats.pearson == pytest.approx(c.stats.pearson, rel=1e-6), name
        assert k.stats.sdd == pytest.approx(c.stats.sdd, rel=1e-5), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_forced_screens_on_cuda_keep_the_report(tiny_models) -> None:
    forced = ScreenConfig(min_elems=1)
    c = compare(tiny_models["base"], tiny_models["derived"], options=CompareOptions(device="cpu", screen=forced))
    k = compare(tiny_models["base"], tiny_models["derived"], options=CompareOptions(device="cuda", screen=forced))
    assert (k.verdict.relation, (k.anatomy or {}).get("relation")) == (c.verdict.relation, (c.anatomy or {}).get("relation"))
    assert k.verdict.log10_p == pytest.approx(c.verdict.log10_p, rel=1e-5)
