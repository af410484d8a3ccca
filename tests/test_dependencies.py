"""What the code needs is what requirements.txt declares, and CI never skips the real-data tests.

Every ``import`` in pipeline/, bench/, tests/ and notebooks/build_notebooks.py (read with ``ast``, so
imports inside functions count) is mapped to the distribution that installed it
(``importlib.metadata.packages_distributions``); each must be declared, and each declared distribution
must be imported somewhere, except the tools that are run rather than imported.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import re
import sys
from pathlib import Path

import conftest
import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["pipeline/**/*.py", "bench/**/*.py", "tests/**/*.py", "notebooks/build_notebooks.py"]
# Declared but never imported, on purpose.
NOT_IMPORTED = {
    "pytest": "the test runner",
    "ruff": "the linter, run as a command (make lint, tests/test_lint.py)",
    "ipykernel": "the kernel nbclient runs the notebooks in",
    "nbformat": "notebooks/build_notebooks.py and the notebook tests",
    "nbclient": "the notebook tests",
    "torch": "pinned for its CUDA build",
    "torchvision": "pinned to match torch",
}


def _normalise(name: str) -> str:
    """A distribution name as PEP 503 compares them (``PyYAML`` = ``pyyaml``, ``a_b`` = ``a-b``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def declared(path: Path = ROOT / "requirements.txt") -> set[str]:
    names = set()
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.add(_normalise(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", line).group()))
    return names


def first_party() -> set[str]:
    """Names our own files import each other by: the packages, and the helpers in tests/ (on sys.path)."""
    return {"pipeline", "bench", *(p.stem for p in (ROOT / "tests").glob("*.py"))}


@functools.cache
def imported_modules() -> dict[str, set[str]]:
    """Top-level third-party module -> the files importing it (relative imports are ours)."""
    found: dict[str, set[str]] = {}
    for pattern in SOURCES:
        for path in sorted(ROOT.glob(pattern)):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in first_party():
                        found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def undeclared(requirements: Path) -> list[str]:
    """One line per imported module whose distribution ``requirements`` does not declare."""
    dists = importlib.metadata.packages_distributions()
    want = declared(requirements)
    problems = []
    for module, files in sorted(imported_modules().items()):
        where = ", ".join(sorted(files)[:3])
        owners = [_normalise(d) for d in dists.get(module, [])]
        if not owners:
            problems.append(f"{module} (imported in {where}) is not installed")
        elif not set(owners) & want:
            problems.append(f"{module} (imported in {where}): add {' or '.join(owners)} to requirements.txt")
    return problems


def unused(requirements: Path) -> list[str]:
    """The distributions ``requirements`` declares that no file imports (tools aside)."""
    dists = importlib.metadata.packages_distributions()
    provided = {_normalise(d) for module in imported_modules() for d in dists.get(module, [])}
    return sorted(declared(requirements) - provided - {_normalise(n) for n in NOT_IMPORTED})


def test_every_imported_module_is_declared():
    problems = undeclared(ROOT / "requirements.txt")
    assert not problems, "\n".join(problems)


def test_every_declared_distribution_is_imported():
    names = unused(ROOT / "requirements.txt")
    assert not names, f"declared in requirements.txt but never imported: {names}; remove them"


def test_the_checks_find_an_undeclared_and_an_unused_distribution(tmp_path):
    """requirements.txt without opencv-python-headless (cv2 is imported) and with ttach (never imported):
    exactly those two more problems than the file itself has."""
    real = ROOT / "requirements.txt"
    edited = tmp_path / "requirements.txt"
    kept = [line for line in real.read_text().splitlines() if not line.startswith("opencv-python-headless")]
    edited.write_text("\n".join([*kept, "ttach==0.0.3"]) + "\n")
    more = sorted(set(undeclared(edited)) - set(undeclared(real)))
    assert len(more) == 1 and more[0].startswith("cv2 (imported in ")
    assert more[0].endswith("add opencv-python-headless to requirements.txt")
    assert sorted(set(unused(edited)) - set(unused(real))) == ["ttach"]


# ----------------------------------------------------------------------------- the real data set


@pytest.mark.parametrize("ci", ["", "false"])
def test_missing_real_data_is_a_skip_on_a_workstation(monkeypatch, tmp_path, ci):
    monkeypatch.setattr(conftest, "REAL_DATA", tmp_path / "absent")
    monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.skip.Exception, match=r"real data not found at .*absent .*BUILDSEG_REAL_DATA"):
        conftest.real_data_or_skip()


@pytest.mark.parametrize("ci", ["true", "1", "True"])
def test_missing_real_data_fails_under_ci(monkeypatch, tmp_path, ci):
    monkeypatch.setattr(conftest, "REAL_DATA", tmp_path)
    monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.fail.Exception, match=r"no train_mask\.csv\): CI must run the real-data tests"):
        conftest.real_data_or_skip()
    (tmp_path / "train_mask.csv").write_text("")
    assert conftest.real_data_or_skip() == tmp_path
    with pytest.raises(pytest.fail.Exception, match=r"no test_a_mask\.csv\)"):
        conftest.real_data_or_skip("train_mask.csv", "test_a_mask.csv")
