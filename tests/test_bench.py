"""`lineage bench`: limits and every kernel measured on a tiny size; text, JSON and HTML outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import os
import signal

from lineage.bench import KERNELS, MODELS, SCHEMA, BenchConfig, BenchError, run_bench
from lineage.bench.run import sigterm_interrupts
from lineage.cli import cli, main

TINY = (64, 512, 256, 4, 2)  # hidden, elements/hidden, MLP width, heads, layers


@pytest.fixture
def tiny_size(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setitem(MODELS, "tiny", TINY)
    return "tiny"


def test_every_kernel_measured_against_limits(tiny_size: str) -> None:
    kernels = tuple(k for k in KERNELS if k != "model")
    report = run_bench(BenchConfig(kernels=kernels, sizes=(tiny_size,), reps=1, quick=True))
    lim = report.limits
    assert lim.copy_bytes_per_s > 1e8 and lim.matmul_flops_per_s > 1e8
    assert {r.kernel for r in report.results} == set(kernels)
    variants = {r.variant for r in report.results if r.kernel == "moments"}
    assert {"bfloat16", "float8_e4m3fn", "float8_e5m2", "int8_row", "int8_col", "Q8_0", "Q4_K"} <= variants
    for r in report.results:
        assert r.skipped is None and r.wall_s > 0 and r.bytes_read > 0
        assert r.fraction == pytest.approx(
            max(r.bytes_read / lim.copy_bytes_per_s, r.flops / lim.matmul_flops_per_s) / r.wall_s)


def test_cli_json_and_html(tiny_size: str, tmp_path: Path) -> None:
    page = tmp_path / "bench.html"
    res = CliRunner().invoke(cli, ["bench", "--kernel", "moments", "--size", tiny_size, "--quick", "--json",
                                   "--html", str(page)])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["schema"] == SCHEMA and doc["tool"]["version"]
    assert doc["config"]["quick"] and doc["config"]["sizes"] == [tiny_size]
    assert len(doc["results"]) == 9 and all(r["memcpy_ratio"] > 0 for r in doc["results"])
    text = page.read_text()
    assert text.count("<svg") == 1 and "roofline" in text and "http" not in text.split("<svg")[0]


def test_cli_text_table(tiny_size: str) -> None:
    res = CliRunner().invoke(cli, ["bench", "--kernel", "lattice", "--size", tiny_size, "--quick"])
    assert res.exit_code == 0, res.output
    assert "limits: copy" in res.stdout and res.stdout.count("lattice") == 2
    assert "bench: lattice bfloat16 tiny:" in res.stderr  # progress, one line per case


def test_bad_requests_are_one_line_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(BenchError, match="unknown size"):
        run_bench(BenchConfig(sizes=("3T",)))
    bad = [["bench", "--kernel", "nope"]]
    if not torch.cuda.is_available():
        bad.append(["bench", "--device", "cuda", "--kernel", "moments"])
    for args in bad:
        with pytest.raises(SystemExit) as e:
            main(args)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("lineage: error:") and err.count("\n") == 1


def test_budget_skips_what_would_not_fit(tiny_size: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(MODELS, "tiny2", tuple(2 * v for v in TINY[:2]) + TINY[2:])
    report = run_bench(BenchConfig(kernels=("moments",), sizes=(tiny_size, "tiny2"), reps=1, budget_s=1e-9))
    assert all(r.skipped == "time budget spent" for r in report.results)  # the limits alone spend it
    assert report.config.budget_s == 1e-9 and not report.interrupted
    with pytest.raises(BenchError, match="budget"):
        run_bench(BenchConfig(budget_s=-1))


def test_sigterm_ends_the_run_with_the_cases_done(tiny_size: str) -> None:
    seen: list[str] = []

    def stop_after_first(r: object) -> None:
        seen.append(r.variant)  # type: ignore[attr-defined]
        if len(seen) == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    with sigterm_interrupts():
        report = run_bench(BenchConfig(kernels=("moments",), sizes=(tiny_size,), reps=1), on_case=stop_after_first)
    assert report.interrupted
    assert report.results[0].skipped is None and report.results[0].wall_s > 0
    assert len(report.results) == 9 and all(r.skipped == "interrupted" for r in report.results[1:])


def test_json_file_rewritten_after_every_case(tiny_size: str, tmp_path: Path) -> None:
    out = tmp_path / "b.json"
    res = CliRunner().invoke(cli, ["bench", "--kernel", "moments", "--size", tiny_size, "--quick", "--json",
                                   "-o", str(out), "--budget", "60"])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert len(doc["results"]) == 9 and doc["interrupted"] is False and doc["config"]["budget_s"] == 60
    assert res.stderr.count("bench: moments") == 9
