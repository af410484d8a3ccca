"""The package's shape: one sub-package per stage, data flowing one way, tests mirroring the modules, and
a README map that says the same. The one list is ``pipeline.STAGES``."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from pipeline import STAGES

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pipeline"
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80
LONG_OK = "long on purpose:"  # a function may exceed the limit when its docstring says why, with this phrase
ENTRY = ("__init__.py", "__main__.py")


def _modules() -> dict[str, Path]:
    """``pkg.module`` -> file, for every module of every stage package (``pkg`` for its ``__init__``)."""
    mods = {}
    for p in sorted(PACKAGE.rglob("*.py")):
        rel = p.relative_to(PACKAGE)
        if len(rel.parts) == 1:
            continue  # pipeline/__init__.py: the list of stages
        name = rel.parts[0] if rel.name == "__init__.py" else ".".join(rel.with_suffix("").parts)
        mods[name] = p
    return mods


def _imports(path: Path) -> set[str]:
    """The stage package of every ``pipeline.<package>...`` a file imports, at the top or in a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "pipeline":
            parts = node.module.split(".")
            found |= {a.name for a in node.names} if len(parts) == 1 else {parts[1]}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("pipeline.")}
    return found


def test_the_package_is_its_stages():
    top = sorted(p.name for p in PACKAGE.iterdir() if p.suffix == ".py" or (p / "__init__.py").is_file())
    assert top == sorted(["__init__.py", *STAGES]), "every module lives in the package of its stage"


@pytest.mark.parametrize("module", sorted(_modules()))
def test_imports_only_from_lower_stages(module):
    rank = {s: i for i, s in enumerate(STAGES)}
    me = rank[module.split(".")[0]]
    upward = sorted(
        f"imports pipeline.{dep}" for dep in _imports(_modules()[module]) if rank.get(dep, -1) > me
    )
    assert upward == []


@pytest.mark.parametrize("module", sorted(_modules()))
def test_modules_and_functions_stay_short(module):
    p = _modules()[module]
    text = p.read_text()
    problems = (
        [f"{p.name}: {len(text.splitlines())} lines"] if len(text.splitlines()) > MAX_MODULE_LINES else []
    )
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            n = node.end_lineno - node.lineno + 1
            if n > MAX_FUNCTION_LINES and LONG_OK not in (ast.get_docstring(node) or ""):
                problems.append(f"{p.name}:{node.lineno} {node.name}() is {n} lines")
    assert problems == []


def test_tests_mirror_the_package():
    """``pipeline/<stage>/<module>.py`` <-> ``tests/<stage>/test_<module>.py``, one to one."""
    modules = {f"{p.parent.name}/test_{p.name}" for p in PACKAGE.glob("*/*.py") if p.name not in ENTRY}
    tests = {f"{p.parent.name}/{p.name}" for s in STAGES for p in (ROOT / "tests" / s).glob("test_*.py")}
    assert sorted(modules - tests) == [], "a module without its test file"
    assert sorted(tests - modules) == [], "a test file without its module"


def _readme_map() -> list[str]:
    """The package paths the README's "Where things are" table names, in order."""
    text = (ROOT / "README.md").read_text().split("## Where things are", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `pipeline/([a-z_]+)/`", text, re.M)


def test_readme_map_lists_the_stages_in_order():
    assert _readme_map() == list(STAGES)


@pytest.mark.parametrize("stage", STAGES)
def test_readme_map_names_every_module(stage):
    text = (ROOT / "README.md").read_text().split("## Where things are", 1)[1].split("\n## ", 1)[0]
    row = next(line for line in text.splitlines() if line.startswith(f"| `pipeline/{stage}/`"))
    named = set(re.findall(r"`([a-z_0-9]+)`", row.split("|")[2]))
    modules = {p.stem for p in (PACKAGE / stage).glob("*.py") if p.name not in ENTRY}
    assert modules == named


def test_no_source_file_is_ignored_by_git():
    """A .gitignore pattern such as ``data/`` also matches ``pipeline/data/``: the package would then be left
    out of every commit, and only a clean clone would notice."""
    import shutil
    import subprocess

    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    files = [
        str(p.relative_to(ROOT)) for d in ("pipeline", "tests", "bench") for p in (ROOT / d).rglob("*.py")
    ]
    out = subprocess.run(["git", "check-ignore", *files], cwd=ROOT, capture_output=True, text=True)
    assert out.stdout.split() == []


def test_every_test_the_readme_names_exists():
    """The "What happens when…" table names the test behind each promise: the names must stay true."""
    text = (ROOT / "README.md").read_text()
    missing = []
    for path, name in set(re.findall(r"`(tests/[\w/]+\.py)(?:::(\w+))?`", text)):
        if not (ROOT / path).is_file():
            missing.append(path)
        elif name and not re.search(rf"^def {name}\(", (ROOT / path).read_text(), re.M):
            missing.append(f"{path}::{name}")
    assert sorted(missing) == []
