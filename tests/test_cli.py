"""The CLI: exit codes, JSON on stdout only, HTML file, errors without tracebacks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lineage.cli import main


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(args)
    out, err = capsys.readouterr()
    return int(info.value.code or 0), out, err


def test_compare_json(tiny_models: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["compare", str(tiny_models["base"]), str(tiny_models["derived"]), "--json", "--no-canon"], capsys)
    assert code == 0
    doc = json.loads(out)
    assert doc["verdict"]["derived"] is True


def test_compare_text_and_html(tiny_models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    html = tmp_path / "r.html"
    code, out, _ = run(["compare", str(tiny_models["base"]), str(tiny_models["unrelated"]), "--html", str(html), "--no-canon", "--tensors"], capsys)
    assert code == 0
    assert "Verdict:" in out and "UNRELATED" in out and "\x1b[" not in out
    page = html.read_text()
    assert "<svg" in page and "http://" not in page.replace("http://www.w3.org/2000/svg", "")


def test_expect_exit_codes(tiny_models: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    args = ["compare", str(tiny_models["base"]), str(tiny_models["unrelated"]), "--no-canon"]
    assert run(args + ["--expect", "unrelated"], capsys)[0] == 0
    code, _, err = run(args + ["--expect", "derived"], capsys)
    assert code == 1 and "expected derived" in err


def test_bad_input_exit_2_without_traceback(tmp_path: Path, tiny_models: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\xff" * 16)
    code, out, err = run(["compare", str(bad), str(tiny_models["base"])], capsys)
    assert code == 2 and out == ""
    assert str(bad) in err and "Traceback" not in err
    code, _, err = run(["compare", str(tmp_path / "nope"), str(tiny_models["base"])], capsys)
    assert code == 2 and "no such file" in err


def test_debug_shows_traceback(tmp_path: Path, tiny_models: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["--debug", "compare", str(tmp_path / "nope"), str(tiny_models["base"])], capsys)
    assert code == 2 and "Traceback" in err


def test_usage_error_is_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["compare", "only-one"], capsys)[0] == 2


def test_inspect(tiny_models: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["inspect", str(tiny_models["base"]), "--tensors"], capsys)
    assert code == 0 and "safetensors" in out and "L0.attn.q.weight" in out and "family=llama" in out
    code, out, _ = run(["inspect", str(tiny_models["gpt2_base"]), "--json"], capsys)
    assert code == 0 and json.loads(out)["format"] == "safetensors"


def test_only_transforms_that_moved_something_are_shown() -> None:
    from lineage.render.text import meaningful_transforms

    shown = meaningful_transforms([
        "residual stream: identity", "residual stream: identity onto 64 of 128 channels",
        "residual rotation, 97% of energy off the identity", "MLP neuron permutation, 0 of 128 neurons moved",
        "attention head permutation, 8 of 8 q heads moved",
    ])
    assert shown == ["residual rotation, 97% of energy off the identity", "attention head permutation, 8 of 8 q heads moved"]


def test_demo_gives_the_planted_verdicts(capsys: pytest.CaptureFixture[str]) -> None:
    """`lineage demo` (the README's first command) on the small zoo: each pair comes out as planted."""
    code, out, _ = run(["demo", "--json"], capsys)
    assert code == 0
    doc = json.loads(out)
    assert doc["schema"] == "lineage.demo/1" and doc["version"]
    docs = doc["reports"]
    rel = [d["verdict"]["relation"] for d in docs]
    assert rel == ["fine-tune", "unrelated", "fine-tune (disguised)", "lora merge"]
    assert [d["verdict"]["derived"] for d in docs] == [True, False, True, True]
    lora = docs[3]["anatomy"]
    assert lora["details"]["rank"] == 2 and lora["parent"] == "a"
    kinds = {m.split(".", 1)[1].removesuffix(".weight") for m in lora["details"]["modules"]}
    assert kinds == {"attn.q", "attn.o", "mlp.gate", "mlp.up", "mlp.down"}  # the zoo recipe's modules for it
    assert len(lora["details"]["modules"]) == 10  # both layers
