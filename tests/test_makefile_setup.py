"""The Makefile's set-up takes torch from PyTorch's CPU index where there is no CUDA (no nvidia-smi),
falls back to the configured index when that index cannot be reached, and uses the plain index with CUDA.
pip and python are stubs that record their arguments: nothing is installed."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def _exe(path: Path, body: str) -> None:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def _setup(tmp_path: Path, *, cuda: bool, cpu_index_up: bool) -> list[str]:
    venv, bin_dir, log = tmp_path / "venv", tmp_path / "bin", tmp_path / "pip.log"
    bin_dir.mkdir()
    fail = "" if cpu_index_up else 'case "$*" in *--index-url*) exit 1;; esac\n'
    pip = f'echo "$*" >> {log}\n{fail}exit 0\n'
    # "python -m venv DIR" makes DIR/bin/pip (the stub)
    _exe(bin_dir / "fakepython", f'mkdir -p "$3/bin"\ncat > "$3/bin/pip" <<"EOS"\n#!/bin/sh\n{pip}EOS\n'
                                 f'chmod +x "$3/bin/pip"\n')
    if cuda:
        _exe(bin_dir / "nvidia-smi", "exit 0\n")
    env = dict(os.environ, PATH=f"{bin_dir}:/usr/bin:/bin")
    subprocess.run(["make", "-s", "-C", str(REPO), f"VENV={venv}", f"PYTHON={bin_dir / 'fakepython'}",
                    f"{venv}/.installed-stamp"], check=True, env=env, capture_output=True, timeout=60)
    return log.read_text().splitlines()


def test_cpu_index_without_cuda(tmp_path):
    calls = _setup(tmp_path, cuda=False, cpu_index_up=True)
    assert "--index-url https://download.pytorch.org/whl/cpu torch==2.13.0" in calls[0]
    assert len(calls) == 2 and "-e .[test]" in calls[1]


def test_configured_index_when_the_cpu_index_is_unreachable(tmp_path):
    calls = _setup(tmp_path, cuda=False, cpu_index_up=False)
    assert "--index-url" in calls[0] and calls[1].split() == ["install", "-q", "torch==2.13.0"]
    assert "-e .[test]" in calls[2]


def test_plain_index_with_cuda(tmp_path):
    calls = _setup(tmp_path, cuda=True, cpu_index_up=True)
    assert calls[0].split() == ["install", "-q", "torch==2.13.0"] and "-e .[test]" in calls[1]
