"""`--device cpu|cuda|auto` means the same on every command that does tensor work (compare, merge,
fingerprint, tree, scan --confirm): auto runs where CUDA is, else on the CPU with the same result; cuda
without a CUDA device stops at once with one line and exit 2, before any model is read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lineage.cli import main
from lineage.testing.zoocache import cached_zoo

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA refusal")


def run(args: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(args)
    out, err = capsys.readouterr()
    return int(info.value.code or 0), out, err


@pytest.fixture(scope="module")
def zoo():
    return cached_zoo("small")


def _commands(zoo, tmp: Path) -> dict[str, list[str]]:
    base, a, b, m = (zoo.path(x) for x in ("llama-b1", "llama-b1-fta", "llama-b1-ftb", "llama-b1-merge-linear"))
    return {"compare": ["compare", base, a, "--no-canon"],
            "merge": ["merge", m, "-p", a, "-p", b, "--base", base],
            "fingerprint": ["fingerprint", base, "-o", str(tmp / "x.lfp")],
            "tree": ["tree", base, a],
            "scan": ["scan", base, a, "--confirm", "--cache-dir", str(tmp / "cache")]}


@no_cuda
@pytest.mark.parametrize("cmd", ["compare", "merge", "fingerprint", "tree", "scan"])
def test_device_cuda_without_cuda_is_one_line_exit_2_before_any_work(cmd, zoo, tmp_path, capsys) -> None:
    code, out, err = run([*_commands(zoo, tmp_path)[cmd], "--device", "cuda"], capsys)
    assert code == 2 and out == "", (code, out, err)
    assert err.strip().splitlines() == ["lineage: error: --device cuda requested but no CUDA device is available"]
    assert not (tmp_path / "x.lfp").exists() and not (tmp_path / "cache").exists()


def test_merge_and_fingerprint_auto_equals_cpu(zoo, tmp_path, capsys) -> None:
    from lineage.fingerprint import load_fingerprint

    cmds = _commands(zoo, tmp_path)
    results = {}
    for dev in ("cpu", "auto"):
        code, out, err = run([*cmds["merge"], "--device", dev, "--json"], capsys)
        assert code == 0, err
        results[dev] = json.loads(out)
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert results["cpu"]["device"] == "cpu" and results["auto"]["device"] == "auto"
    assert results["cpu"]["method"] == results["auto"]["method"] and results["cpu"]["explains"] is True
    for k in ("weights", "residual"):
        assert results["cpu"][k] == pytest.approx(results["auto"][k], rel=1e-5, abs=1e-6), k
    assert abs(results["cpu"]["weights"][0] - 0.3) < 0.02  # the planted linear merge (0.3, 0.7)
    fps = {}
    for dev in ("cpu", "auto"):
        out_file = tmp_path / f"{dev}.lfp"
        code, out, _ = run(["fingerprint", zoo.path("llama-b1"), "-o", str(out_file), "--device", dev, "--json"], capsys)
        assert code == 0 and json.loads(out)["device"] == (want if dev == "auto" else "cpu")
        fps[dev] = load_fingerprint(out_file)
    assert fps["cpu"].tokens == fps["auto"].tokens
    torch.testing.assert_close(fps["cpu"].K, fps["auto"].K, rtol=2e-3, atol=2e-3)
    for la, lb in zip(fps["cpu"].layers, fps["auto"].layers):
        for k in la:
            torch.testing.assert_close(la[k], lb[k], rtol=2e-3, atol=2e-3)


def test_fingerprint_sketches_run_where_the_rows_are(zoo) -> None:
    """The device path: rows handed over on a device give the same fingerprint, returned on the CPU."""
    from lineage.canon import CheckpointModel
    from lineage.fingerprint import DeviceRows, compute_fingerprint, row_source
    from lineage.io.checkpoint import open_checkpoint
    from lineage.roles import roles_for

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with open_checkpoint(zoo.path("llama-b1")) as ck:
        rm = roles_for(ck)
        model = CheckpointModel(ck, rm)
        plain = compute_fingerprint(model, rm.arch, ck.vocab())
        moved = compute_fingerprint(DeviceRows(row_source(model), dev), rm.arch, ck.vocab(), device=dev)
    assert moved.K.device.type == "cpu" and all(v.device.type == "cpu" for la in moved.layers for v in la.values())
    torch.testing.assert_close(plain.K, moved.K, rtol=1e-4, atol=1e-4)
