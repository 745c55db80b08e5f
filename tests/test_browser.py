"""Every HTML page lineage writes, rendered in headless Chromium (from the distribution's packages).

Each page must load with no console error and no request leaving the page (self-contained), and
its plots must be present and drawn (an SVG of real size whose pixels are not blank).  Screenshots
go to $LINEAGE_SCREENSHOTS when set (to look at them), else to the test's temporary folder.
`make test` installs Chromium when it is missing; without it these tests are skipped, saying why.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from lineage.testing.browser import find_chromium, render
from lineage.testing.derive import add_noise, merge_linear
from lineage.testing.models import TinyConfig, init_weights, save_model

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(
    find_chromium() is None,
    reason="chromium is not installed (`make test` installs it with apt-get when run as root); "
           "HTML pages not checked in a browser")


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A base, two fine-tunes (siblings) and an even merge of them."""
    root = tmp_path_factory.mktemp("family")
    cfg = TinyConfig(family="llama", vocab=256, hidden=64, n_layers=2, intermediate=128)
    base = init_weights(cfg, 1)
    ft1, _ = add_noise(base, 0.3, 2)
    ft2, _ = add_noise(base, 0.3, 3)
    merge, _ = merge_linear([ft1, ft2], [0.5, 0.5])
    for name, w in {"base": base, "ft1": ft1, "ft2": ft2, "merge": merge}.items():
        save_model(root / name, cfg, w)
    return root


@pytest.fixture(scope="module")
def pages(tmp_path_factory: pytest.TempPathFactory, family: Path) -> dict[str, Path]:
    """Every kind of page: four compare reports (demo), a tree, a scan, the accuracy page."""
    out = tmp_path_factory.mktemp("pages")
    from click.testing import CliRunner

    from lineage.cli import cli

    runner = CliRunner()
    r = runner.invoke(cli, ["demo", "--html", str(out / "demo"), "--no-progress"])
    assert r.exit_code == 0, r.output
    pages = {p.stem: p for p in (out / "demo").glob("*.html")}
    r = runner.invoke(cli, ["tree", *(str(family / n) for n in ("base", "ft1", "ft2", "merge")),
                            "--html", str(out / "tree.html"), "--no-progress"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(cli, ["scan", str(family), "--html", str(out / "scan.html"), "--no-progress",
                            "--cache-dir", str(out / "fp")])
    assert r.exit_code == 0, r.output
    pages |= {"tree": out / "tree.html", "scan": out / "scan.html", "accuracy": _accuracy_page(out)}
    return pages


def _accuracy_page(out: Path) -> Path:
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import accuracy
    finally:
        sys.path.pop(0)
    g = torch.Generator().manual_seed(0)
    recs = [accuracy.Record(a=f"m{i}", b=f"n{i}", family="llama", label="independent", relation="independent",
                            group="independent_null" if i % 2 else "independent", hops=0, variant="", transforms=[],
                            p_value=float(torch.rand(1, generator=g))) for i in range(40)]
    md = ("# Accuracy\n\nSome text.\n\n## Headline\n\n| measure | value |\n|---|---|\n| ROC AUC | 1.000 |\n"
          "| FPR | 0% |\n")
    path = out / "accuracy.html"
    accuracy.write_html(path, {}, recs, md)
    return path


EXPECTED_PLOTS = {"base-vs-finetuned": 2, "base-vs-unrelated": 1, "base-vs-disguised": 1, "base-vs-lora": 2,
                  "tree": 1, "scan": 1, "accuracy": 1}


@pytest.mark.parametrize("name", sorted(EXPECTED_PLOTS))
def test_page_renders_in_chromium(pages: dict[str, Path], name: str, tmp_path: Path) -> None:
    shots = Path(os.environ.get("LINEAGE_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    res = render(pages[name], shots / f"{name}.png")
    assert res.console_errors == [], res.console_errors
    assert res.external_requests == [], res.external_requests
    assert res.title
    plots = [s for s in res.svgs if s["w"] >= 200 and s["h"] >= 150]
    assert len(plots) >= EXPECTED_PLOTS[name], res.svgs
    for s in plots:
        # drawn: many elements, and the pixels of its area vary (a blank or flat plot has std ≈ 0)
        assert s["drawn"] >= 8 and s["pixel_std"] > 0.03 and s["ink"] > 0.005, s
    assert (shots / f"{name}.png").stat().st_size > 5000


def test_pages_say_what_they_show(pages: dict[str, Path]) -> None:
    """Contents a reader relies on: the summary first, aligned evidence when it decided, provenance."""
    dis = pages["base-vs-disguised"].read_text()
    assert dis.index("Summary") < dis.index("Evidence") < dis.index("Provenance")
    assert "canonical test decided" in dis and "aligned r" in dis and "raw r (secondary)" in dis
    assert "blake3:" in dis and "bytes read" in dis and "counting every pass" in dis
    assert "10^" not in dis and "1e-188.4" not in dis
    ft = pages["base-vs-finetuned"].read_text()
    assert "structured dense update" in ft and "structured (part of a dense update)" in ft
    assert "element-wise test decided" in ft
    tree = pages["tree"].read_text()
    assert "merge of ft1 + ft2" in tree or ("ft1 + ft2" in tree and ">merge<" in tree)
    assert "p &lt; 1e-300" in tree and "legend" in tree
    scan = pages["scan"].read_text()
    assert "undirected" in scan
    acc = pages["accuracy"].read_text()
    assert "<table>" in acc and "<pre>" not in acc and "expected −log10 p" in acc and "<svg" in acc
