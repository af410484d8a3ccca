"""The code stays ruff-clean and ruff-formatted (the settings are in pyproject.toml)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PATHS = ["pipeline", "bench", "tests", "notebooks/build_notebooks.py"]


def _ruff() -> str:
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    if not Path(ruff).exists():
        pytest.skip("ruff is not installed")
    return ruff


def test_ruff_check_is_clean():
    out = subprocess.run([_ruff(), "check", *PATHS], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-4000:]


def test_ruff_format_leaves_every_file_as_it_is():
    out = subprocess.run([_ruff(), "format", "--check", *PATHS], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, f"run `ruff format {' '.join(PATHS)}`:\n{out.stdout[-4000:]}"
