"""The package's shape: each module imports only from modules below it, and stays readable in one sitting."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"

# Lowest first. A module may import only from modules before it in this list: the leaves (files,
# RLE, metrics, devices, TTA, config), the data, the stages in the order a run goes through them,
# and last the tools that read finished runs (analysis, report).
LAYERS = [
    "errors",
    "io",
    "progress",
    "rle",
    "metrics",
    "buildings",
    "device",
    "tta",
    "schedule",
    "config",
    "runs",
    "maskcsv",
    "demo_data",
    "data",
    "layouts",
    "losses",
    "models",
    "weights",
    "check_images",
    "check_data",
    "folds",
    "postprocess",
    "tiling",
    "scene",
    "vectorize",
    "viz",
    "viz_buildings",
    "engine",
    "tune",
    "train",
    "infer",
    "pseudo",
    "footprints",
    "validate",
    "predict",
    "score",
    "submit",
    "analysis",
    "report",
]
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80
LONG_OK = "long on purpose:"  # a function may exceed the limit when its docstring says why, with this phrase


def _modules() -> dict[str, list[Path]]:
    mods: dict[str, list[Path]] = {}
    for p in sorted(PACKAGE.rglob("*.py")):
        rel = p.relative_to(PACKAGE)
        if rel.name == "__init__.py" and rel.parent == Path("."):
            continue
        mods.setdefault(rel.parts[0].removesuffix(".py"), []).append(p)
    return mods


def _imports(path: Path) -> set[str]:
    """Every ``pipeline.<module>`` a file imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "pipeline":
            parts = node.module.split(".")
            found |= {a.name for a in node.names} if len(parts) == 1 else {parts[1]}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("pipeline.")}
    return found


def test_every_module_has_a_layer():
    assert sorted(set(_modules()) - set(LAYERS)) == [], "add new modules to LAYERS"


@pytest.mark.parametrize("module", sorted(_modules()))
def test_imports_only_from_lower_layers(module):
    rank = {m: i for i, m in enumerate(LAYERS)}
    upward = sorted(
        f"{p.relative_to(PACKAGE)} imports {dep}"
        for p in _modules()[module]
        for dep in _imports(p)
        if dep != module and rank.get(dep, -1) > rank[module]
    )
    assert upward == []


@pytest.mark.parametrize("module", sorted(_modules()))
def test_modules_and_functions_stay_short(module):
    problems = []
    for p in _modules()[module]:
        text = p.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            problems.append(f"{p.name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES and LONG_OK not in (ast.get_docstring(node) or ""):
                    problems.append(f"{p.name}:{node.lineno} {node.name}() is {n} lines")
    assert problems == []
