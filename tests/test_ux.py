"""The command line and reports as a user meets them: p-values, short text, provenance and verify,
schemas, consistent options, progress, start-up, family trees that say only what is known."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

import lineage
from lineage.cli import cli, main
from lineage.render.pvalue import format_p, p_float
from lineage.tree import SIBLING, Link, build_tree

REPO = Path(__file__).resolve().parent.parent


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main(args)
    out, err = capsys.readouterr()
    return int(e.value.code or 0), out, err


# ----------------------------------------------------------------------------- p-values

def test_one_p_value_format() -> None:
    assert format_p(-620.0) == "p < 1e-300 (log10 p = −620.0)"
    assert format_p(-188.36) == "p = 4.4e-189"
    assert format_p(-11.49) == "p = 3.2e-12"
    assert format_p(-0.0429) == "p = 0.906"
    assert format_p(None) == "p not computed"
    assert p_float(-620.0) is None and p_float(-2.0) == pytest.approx(0.01)


def test_json_p_value_null_below_floor_and_log10_exact(tiny_models: dict[str, Path], capsys) -> None:
    code, out, _ = run(["compare", str(tiny_models["base"]), str(tiny_models["derived"]), "--json", "--no-canon"],
                       capsys)
    v = json.loads(out)["verdict"]
    assert code == 0 and v["log10_p"] < -300
    assert v["p_value"] is None and v["p_text"] == format_p(v["log10_p"])


# ----------------------------------------------------------------------------- short text, --explain

def test_text_is_short_and_explain_adds_the_method_once(tiny_models: dict[str, Path], capsys) -> None:
    args = ["compare", str(tiny_models["base"]), str(tiny_models["derived"]), "--no-canon"]
    _, short, _ = run(args, capsys)
    assert "H0:" not in short and "1e-" not in short.split("Verdict:")[1].split("\n")[0].replace("1e-300", "")
    _, long, _ = run(args + ["--explain"], capsys)
    assert long.count("H0:") == 1 and "p < 1e-300 (log10 p = " in long


# ----------------------------------------------------------------------------- provenance and verify

def test_report_records_hashes_and_verify_reruns_it(tiny_models: dict[str, Path], tmp_path: Path, capsys) -> None:
    import blake3

    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(tiny_models["base"], a)
    shutil.copytree(tiny_models["derived"], b)
    rep = tmp_path / "r.json"
    code, _, _ = run(["compare", str(a), str(b), "--json", "-o", str(rep), "--no-canon"], capsys)
    d = json.loads(rep.read_text())
    pv = d["provenance"]
    assert code == 0 and pv["version"] == lineage.__version__ and pv["options"]["canonicalise"] is False
    weights = [f for f in pv["files"] if f["path"].endswith(".safetensors")]
    assert len(weights) == 2 and all(f["algorithm"] == "blake3" for f in weights)
    for f in weights:
        assert f["digest"] == blake3.blake3(Path(f["path"]).read_bytes()).hexdigest()
        assert f["size"] == Path(f["path"]).stat().st_size
    assert pv["seeds"] and "H0" in pv["method"] and pv["hash_seconds"] >= 0
    code, out, _ = run(["verify", str(rep)], capsys)
    assert code == 0 and "verified" in out
    # change B's weights: verify names the file by hash and reports the changed figures
    st = b / "model.safetensors"
    raw = bytearray(st.read_bytes())
    raw[-64:] = bytes(64)
    st.write_bytes(bytes(raw))
    code, out, _ = run(["verify", str(rep), "--json"], capsys)
    res = json.loads(out)
    assert code == 1 and res["schema"] == "lineage.verify/1" and res["version"] and not res["same"]
    assert any("model.safetensors: changed" in x for x in res["changed_files"]) and res["differences"]
    code, _, err = run(["verify", str(tmp_path / "nope.json")], capsys)
    assert code == 2 and "nope.json" in err and "Traceback" not in err


# ----------------------------------------------------------------------------- schemas, versions

def test_every_json_carries_schema_and_version(tiny_models: dict[str, Path], tmp_path: Path, capsys) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    from lineage.schemas import SCHEMAS

    code, out, _ = run(["inspect", str(tiny_models["base"]), "--json"], capsys)
    doc = json.loads(out)
    assert code == 0 and doc["schema"] == "lineage.inspect/1" and doc["version"] == lineage.__version__
    jsonschema.validate(doc, SCHEMAS["inspect"])
    code, out, _ = run(["fingerprint", str(tiny_models["base"]), "-o", str(tmp_path / "x.lfp"), "--json"], capsys)
    doc = json.loads(out)
    assert code == 0 and doc["schema"] == "lineage.fingerprint/1" and doc["version"]
    jsonschema.validate(doc, SCHEMAS["fingerprint"])
    code, out, _ = run(["compare", str(tiny_models["base"]), str(tiny_models["unrelated"]), "--json", "--no-canon"],
                       capsys)
    jsonschema.validate(json.loads(out), SCHEMAS["compare"])
    code, out, _ = run(["schema", "compare"], capsys)
    assert code == 0 and json.loads(out)["$id"] == "lineage.compare/1"
    code, out, _ = run(["schema", "--list"], capsys)
    assert all(n in out for n in ("compare", "tree", "scan", "inspect", "fingerprint", "merge", "verify"))


def test_version_flags_and_module_entry_point(capsys) -> None:
    code, out, _ = run(["-V"], capsys)
    assert code == 0 and lineage.__version__ in out
    r = subprocess.run([sys.executable, "-m", "lineage", "--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and lineage.__version__ in r.stdout


# ----------------------------------------------------------------------------- one consistent command line

HEAVY = ("compare", "tree", "scan")
WORKING = ("compare", "verify", "inspect", "fingerprint", "merge", "tree", "scan", "demo")


def _opts(name: str) -> dict[str, click.Option]:
    cmd = cli.commands[name]
    return {o: p for p in cmd.params if isinstance(p, click.Option) for o in p.opts + p.secondary_opts}


def test_options_are_consistent_and_documented() -> None:
    for name, cmd in cli.commands.items():
        for p in cmd.params:
            if isinstance(p, click.Option):
                assert p.help, f"{name} {p.opts} has no help text"
    for name in HEAVY:
        assert "--device" in _opts(name), name
    for name in WORKING:
        assert "--no-progress" in _opts(name), name
    for name in ("compare", "tree", "scan", "inspect", "merge", "verify"):
        assert {"--json", "-o", "--output"} <= set(_opts(name)), name
    for name in ("compare", "tree", "scan"):
        assert "--html" in _opts(name)
    for name in ("compare", "inspect"):
        assert {"--tensors", "--no-tensors"} <= set(_opts(name))
    for name in ("compare", "tree", "scan", "inspect", "demo"):
        assert {"--color", "--no-color"} <= set(_opts(name))
    assert {"-q", "--quiet", "-V", "--version"} <= {o for p in cli.params for o in p.opts}


def test_color_is_forced_into_a_pipe(tiny_models: dict[str, Path]) -> None:
    args = ["compare", str(tiny_models["base"]), str(tiny_models["derived"]), "--no-canon", "--no-hash"]
    runner = CliRunner()
    assert "\x1b[" in runner.invoke(cli, args + ["--color"], color=False).output
    assert "\x1b[" not in runner.invoke(cli, args + ["--no-color"], color=False).output


def test_quiet_keeps_only_the_result(tiny_models: dict[str, Path], tmp_path: Path, capsys) -> None:
    args = ["compare", str(tiny_models["base"]), str(tiny_models["derived"]), "--no-canon", "--no-hash",
            "--html", str(tmp_path / "r.html")]
    _, out, err = run(args, capsys)
    assert "HTML written" in err
    _, out_q, err_q = run(["-q", *args], capsys)
    def timeless(text: str) -> str:  # the read time differs run to run
        return re.sub(r"in \d+\.\d s", "in _ s", text)

    assert err_q == "" and timeless(out_q) == timeless(out) and (tmp_path / "r.html").exists()


def test_arguments_are_checked_before_heavy_imports() -> None:
    code = ("import sys\nfrom lineage.cli import main\n"
            "try:\n    main(['tree', 'only-one'])\nexcept SystemExit as e:\n"
            "    print(e.code, 'torch' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.split() == ["2", "False"] and "give at least two models" in r.stderr


def test_dask_and_ray_logs_are_quiet_unless_verbose(monkeypatch: pytest.MonkeyPatch) -> None:
    import logging
    import os

    monkeypatch.delenv("DASK_LOGGING__DISTRIBUTED", raising=False)
    CliRunner().invoke(cli, ["-v", "schema", "--list"])
    assert "DASK_LOGGING__DISTRIBUTED" not in os.environ
    CliRunner().invoke(cli, ["schema", "--list"])
    # dask reads its logging config from the environment when imported (by the engine, later)
    assert os.environ["DASK_LOGGING__DISTRIBUTED"] == "error"
    assert logging.getLogger("distributed").level == logging.ERROR


def test_progress_shows_stages_and_leaves_no_bar() -> None:
    from lineage.progress import TqdmProgress

    buf = io.StringIO()
    bar = TqdmProgress(buf)
    for i in range(1, 5):
        bar(i * 1000, 4000, f"L{i}.attn.q.weight")
    # closed at 100 %: nothing left standing; a ticking "working…" line until the next stage
    assert bar._key is None and bar._idle is not None
    for i in range(1, 3):
        bar(i, 3, "layer", stage="aligning layers", unit="layer")
    assert bar._idle is None and bar._key == ("aligning layers", 3)
    bar.close()
    assert bar._bar is None and bar._idle is None
    text = buf.getvalue()
    assert "streaming tensors" in text and "working…" in text and "aligning layers" in text and "/s" in text


# ----------------------------------------------------------------------------- family trees

def test_undirected_links_stay_undirected_and_siblings_stay_siblings() -> None:
    links = [Link("base", "ft", True, 0.2), Link("ft", "other", True, 0.3, between=True)]
    t = build_tree(["base", "ft", "other"], links)
    assert all(not e.directed for e in t.edges)
    assert {e.relation for e in t.edges} == {"related", SIBLING}
    from lineage.render.tree import render_html, render_text

    txt = render_text(t)
    assert "undirected" in txt and "sibling" in txt
    page = render_html(t)
    assert 'marker-end="url(#arr)"/>' not in page.split("<h1>")[1].split('class="legend"')[0]
    directed = build_tree(["base", "ft"], [Link("base", "ft", True, 0.2, parent="base", confidence=0.9)])
    assert directed.edges[0].directed and directed.parent_of("ft") == "base"


def test_even_merge_of_siblings_gets_both_parents(tmp_path: Path) -> None:
    import torch

    from lineage.family import family_tree
    from lineage.testing.derive import add_noise, merge_linear
    from lineage.testing.models import TinyConfig, init_weights, save_model

    cfg = TinyConfig(family="llama", vocab=256, hidden=64, n_layers=2, intermediate=128)
    base = init_weights(cfg, 1)
    ft1, _ = add_noise(base, 0.3, 2)
    ft2, _ = add_noise(base, 0.3, 3)
    merge, _ = merge_linear([ft1, ft2], [0.5, 0.5])
    torch.manual_seed(0)
    refs = {n: str(save_model(tmp_path / n, cfg, w)) for n, w in
            {"base": base, "ft1": ft1, "ft2": ft2, "merge": merge}.items()}
    t = family_tree(list(refs.values())).tree
    (e,) = [e for e in t.edges if e.child == "merge"]
    assert e.relation == "merge" and {e.parent, *e.other_parents} == {"ft1", "ft2"}
    assert t.parent_of("ft1") == "base" and t.parent_of("ft2") == "base"
    # without their base: the two fine-tunes are siblings, the merge has both as parents
    t3 = family_tree([refs["ft1"], refs["ft2"], refs["merge"]]).tree
    rel = {frozenset((x.parent, x.child)): x for x in t3.edges}
    assert rel[frozenset(("ft1", "ft2"))].relation == SIBLING and not rel[frozenset(("ft1", "ft2"))].directed
    (m,) = [x for x in t3.edges if x.child == "merge"]
    assert m.relation == "merge" and {m.parent, *m.other_parents} == {"ft1", "ft2"}


def test_anatomy_line_names_the_rank_once() -> None:
    from lineage.signals.lowrank_summary import compress_modules

    assert compress_modules(["L0.attn.q.weight", "L1.attn.q.weight", "L0.attn.o.weight", "L1.attn.o.weight"]) \
        == "attn.o, attn.q in layers 0-1"
    from lineage.render.anatomy import anatomy_summary

    s = anatomy_summary({"relation": "lora merge", "parent": "a", "details": {
        "rank": 2, "modules_description": "low-rank update, rank 2 on attn.o, attn.q in layers 0-1"}})
    assert s == "lora merge: rank 2 on attn.o, attn.q in layers 0-1 (A is the parent)"


def test_readme_documents_install_demo_and_environment() -> None:
    text = (REPO / "README.md").read_text()
    first = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")][:3]
    assert any("make demo" in ln for ln in first)
    for needle in ("pip install weight-lineage", "lineage demo --output", ".venv/bin/lineage", "LINEAGE_CACHE",
                   "NO_COLOR", "lineage verify", "make test"):
        assert needle in text, needle
