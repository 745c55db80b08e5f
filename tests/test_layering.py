"""Architecture rules: imports point down the layers, kernels never import lineage, packaging lists every package."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: Lower number = lower layer.  A module may import only from its own layer or below.
LAYERS = {
    "lineage.errors": 0,
    "lineage.io": 1,
    "lineage.progress": 1,
    "lineage.engine": 1,
    "lineage.render.plots": 1,
    "lineage.render.pvalue": 1,
    "lineage.provenance": 1,
    "lineage.device": 1,
    "lineage.signals": 2,
    "lineage.roles": 2,
    "lineage.stream": 2,
    "lineage.lazyroles": 2,
    "lineage.canon": 3,
    "lineage.depth": 3,
    "lineage.stattest": 3,
    "lineage.fingerprint": 3,
    "lineage.verdict": 3,
    "lineage.anatomy": 3,
    "lineage.realign": 4,
    "lineage.report": 4,
    "lineage.render": 5,
    "lineage.schemas": 5,
    "lineage.inspect": 5,
    "lineage.compare": 6,
    "lineage.adaptercheck": 6,
    "lineage.mergefit": 6,
    "lineage.fingerprint_workflow": 6,
    "lineage.tree": 6,
    "lineage.render.tree": 6,
    "lineage.scan": 7,
    "lineage.registry": 7,
    "lineage.family": 7,
    "lineage.verify": 7,
    "lineage.testing": 7,
    "lineage.bench": 7,
    "lineage.cli": 8,
    "lineage.__main__": 8,
}


def _layer(module: str) -> int | None:
    best = None
    for prefix, level in LAYERS.items():
        if module == prefix or module.startswith(prefix + "."):
            if best is None or len(prefix) > len(best[0]):
                best = (prefix, level)
    return None if best is None else best[1]


def _imports(path: Path) -> list[str]:
    """Every module ``path`` imports, in every form: ``import a.b``, ``from a import b`` (``a.b`` too, as b may
    be a module), and relative imports resolved against ``path``'s package."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = list(path.relative_to(ROOT).parts[:-1])  # the package holding the file (for relative imports)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package[: len(package) - (node.level - 1)]
                base = ".".join(parent + ([base] if base else []))
            if base:
                out.append(base)
            out.extend(f"{base}.{a.name}" for a in node.names if base)
    return out


def test_imports_point_down() -> None:
    bad = []
    for path in (ROOT / "lineage").rglob("*.py"):
        mod = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        own = _layer(mod)
        if own is None or mod == "lineage.io" or mod == "lineage":
            continue
        for imp in _imports(path):
            if not imp.startswith("lineage."):
                continue
            lvl = _layer(imp)
            if lvl is not None and lvl > own:
                bad.append(f"{mod} (layer {own}) imports {imp} (layer {lvl})")
    assert not bad, "\n".join(bad)


def test_every_module_has_a_layer() -> None:
    missing = []
    for path in (ROOT / "lineage").rglob("*.py"):
        mod = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        if mod != "lineage" and _layer(mod) is None:
            missing.append(mod)
    assert not missing, f"add these modules to LAYERS: {missing}"


def test_kernels_do_not_import_lineage() -> None:
    for path in (ROOT / "kernels").rglob("*.py"):
        for imp in _imports(path):
            assert not (imp == "lineage" or imp.startswith("lineage.")), f"{path} imports {imp}"


def test_pyproject_lists_every_package() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    listed = set(re.search(r"packages = \[(.*?)\]", text).group(1).replace('"', "").replace(" ", "").split(","))
    found = {"lineage_kernels"}
    for init in (ROOT / "lineage").rglob("__init__.py"):
        found.add(".".join(init.parent.relative_to(ROOT).parts))
    assert found == listed


def test_library_does_not_print() -> None:
    offenders = []
    for path in list((ROOT / "lineage").rglob("*.py")) + list((ROOT / "kernels").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print":
                offenders.append(f"{path}:{node.lineno}")
    assert not offenders, offenders
