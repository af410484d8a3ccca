"""No code execution from data: scan pipeline/ and bench/ for calls that can run code or a shell.

Flagged (by the AST, so aliases like ``import pickle as pk`` or ``from torch import load`` are seen):

* ``eval`` / ``exec``;
* unpickling: ``pickle``/``_pickle``/``dill``/``cloudpickle``/``joblib`` ``load(s)``, ``Unpickler``,
  ``pandas.read_pickle``, ``marshal.load(s)``, ``shelve.open``, ``numpy.load`` with ``allow_pickle``
  not literally False;
* ``torch.load`` without ``weights_only=True`` (literally);
* ``yaml.load``/``load_all`` without ``Loader=SafeLoader``/``CSafeLoader``, and ``yaml.unsafe_load``,
  ``yaml.full_load`` (their loaders construct Python objects);
* a shell: ``os.system``, ``os.popen``, ``subprocess.getoutput``/``getstatusoutput``,
  ``asyncio.create_subprocess_shell``, and any ``subprocess`` call whose ``shell=`` is not
  literally False.

``ALLOWED`` exempts one (file, call) pair; every entry needs a reason, and an entry that no longer
matches anything fails the test, so the list cannot grow stale. Keep it empty unless justified.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("pipeline", "bench")

# (path relative to the repo root, qualified call name) -> why this call is safe. Keep empty unless justified.
ALLOWED: dict[tuple[str, str], str] = {}

UNPICKLE = {
    f"{mod}.{fn}"
    for mod in ("pickle", "_pickle", "cPickle", "dill", "cloudpickle")
    for fn in ("load", "loads", "Unpickler")
} | {"joblib.load", "pandas.read_pickle", "marshal.load", "marshal.loads", "shelve.open"}
SHELL = {
    "os.system",
    "os.popen",
    "subprocess.getoutput",
    "subprocess.getstatusoutput",
    "asyncio.create_subprocess_shell",
}
SUBPROCESS = {f"subprocess.{fn}" for fn in ("run", "call", "check_call", "check_output", "Popen")}
SAFE_YAML_LOADERS = {"yaml.SafeLoader", "yaml.CSafeLoader"}


def _is_const(node: ast.AST | None, value: object) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


class _Scanner:
    """Resolve call names through the module's imports, then apply the rules above."""

    def __init__(self, tree: ast.Module):
        self.aliases: dict[str, str] = {}
        # Imports anywhere in the module (pipeline modules import torch inside functions).
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    # "import a.b" binds "a"; "import a.b as c" binds "c" to "a.b".
                    top = a.name.split(".")[0]
                    self.aliases[a.asname or top] = a.name if a.asname else top
            elif isinstance(node, ast.ImportFrom) and node.module:
                for a in node.names:
                    self.aliases[a.asname or a.name] = f"{node.module}.{a.name}"
        self.tree = tree

    def qualname(self, node: ast.AST) -> str | None:
        if isinstance(node, ast.Name):
            return self.aliases.get(node.id, node.id)
        if isinstance(node, ast.Attribute):
            base = self.qualname(node.value)
            return f"{base}.{node.attr}" if base else None
        return None

    def findings(self) -> list[tuple[int, str, str]]:
        """``(line, qualified call, why)`` for every unsafe call."""
        out = []
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Call):
                name = self.qualname(node.func)
                why = self.why(name, node) if name else None
                if why:
                    out.append((node.lineno, name, why))
        return out

    def why(self, name: str, call: ast.Call) -> str | None:
        kw = {k.arg: k.value for k in call.keywords if k.arg}
        if name in ("eval", "exec", "builtins.eval", "builtins.exec"):
            return "runs arbitrary code"
        if name in UNPICKLE:
            return "unpickling runs code from the file"
        if name == "numpy.load" and "allow_pickle" in kw and not _is_const(kw["allow_pickle"], False):
            return "allow_pickle unpickles object arrays"
        if name == "torch.load" and not _is_const(kw.get("weights_only"), True):
            return "torch.load needs weights_only=True (full unpickling runs code)"
        if name in ("yaml.load", "yaml.load_all"):
            loader = kw.get("Loader", call.args[1] if len(call.args) > 1 else None)
            if loader is None or self.qualname(loader) not in SAFE_YAML_LOADERS:
                return "yaml.load without SafeLoader constructs arbitrary objects; use yaml.safe_load"
        if name in ("yaml.unsafe_load", "yaml.unsafe_load_all", "yaml.full_load", "yaml.full_load_all"):
            return "constructs Python objects; use yaml.safe_load"
        if name in SHELL:
            return "runs a shell command"
        if name in SUBPROCESS and "shell" in kw and not _is_const(kw["shell"], False):
            return "shell=True runs a shell; pass an argument list"
        return None


def scan_source(source: str, filename: str = "<string>") -> list[tuple[int, str, str]]:
    return _Scanner(ast.parse(source, filename)).findings()


def _files() -> list[Path]:
    return sorted(p for d in SCANNED if (ROOT / d).is_dir() for p in (ROOT / d).rglob("*.py"))


def test_no_unsafe_calls_in_pipeline_and_bench() -> None:
    files = _files()
    n_pipeline = sum(p.relative_to(ROOT).parts[0] == "pipeline" for p in files)
    assert n_pipeline >= 5, f"only {n_pipeline} files in {ROOT}/pipeline: the scan looks in the wrong place"
    found, used = [], set()
    for path in files:
        rel = path.relative_to(ROOT).as_posix()
        for line, name, why in scan_source(path.read_text(encoding="utf-8"), rel):
            if (rel, name) in ALLOWED:
                used.add((rel, name))
            else:
                found.append(f"{rel}:{line}: {name}(...): {why}")
    assert not found, "unsafe calls (fix them, or justify an entry in ALLOWED):\n" + "\n".join(found)
    stale = set(ALLOWED) - used
    assert not stale, f"ALLOWED entries that match nothing any more; delete them: {sorted(stale)}"


def test_allow_list_entries_are_justified() -> None:
    for key, reason in ALLOWED.items():
        assert len(reason.split()) >= 5, f"ALLOWED[{key}] needs a real justification, not {reason!r}"


# ----------------------------------------------------------------------------- the scanner itself

FLAGGED = [
    "eval('1 + 1')",
    "exec(code)",
    "import builtins\nbuiltins.eval(s)",
    "import pickle\npickle.load(f)",
    "import pickle\npickle.loads(b)",
    "import pickle as pk\npk.loads(b)",
    "from pickle import loads\nloads(b)",
    "import pickle\npickle.Unpickler(f).load()",
    "import dill\ndill.load(f)",
    "import joblib\njoblib.load(p)",
    "import pandas as pd\npd.read_pickle(p)",
    "import numpy as np\nnp.load(p, allow_pickle=True)",
    "import numpy as np\nnp.load(p, allow_pickle=flag)",
    "import torch\ntorch.load(p)",
    "import torch\ntorch.load(p, weights_only=False)",
    "import torch\ntorch.load(p, weights_only=flag)",
    "import torch\ntorch.load(p, **kwargs)",
    "from torch import load\nload(p)",
    "def f(p):\n    import torch\n    return torch.load(p, map_location='cpu')",
    "import yaml\nyaml.load(s)",
    "import yaml\nyaml.load(s, Loader=yaml.Loader)",
    "import yaml\nyaml.load(s, yaml.UnsafeLoader)",
    "import yaml\nyaml.unsafe_load(s)",
    "import yaml\nyaml.full_load(s)",
    "import os\nos.system('ls')",
    "import os\nos.popen('ls')",
    "from os import system\nsystem('ls')",
    "import subprocess\nsubprocess.run('ls', shell=True)",
    "import subprocess\nsubprocess.Popen(cmd, shell=use_shell)",
    "import subprocess as sp\nsp.check_output('ls', shell=True)",
    "from subprocess import call\ncall('ls', shell=True)",
    "import subprocess\nsubprocess.getoutput('ls')",
]

SAFE = [
    "model.eval()",  # nn.Module.eval: a method, not the builtin
    "import yaml\nyaml.safe_load(s)",
    "import yaml\nyaml.load(s, Loader=yaml.SafeLoader)",
    "import yaml\nyaml.load(s, yaml.CSafeLoader)",
    "import torch\ntorch.load(p, map_location='cpu', weights_only=True)",
    "import numpy as np\nnp.load(p)",
    "import numpy as np\nnp.load(p, mmap_mode='r', allow_pickle=False)",
    "import subprocess, sys\nsubprocess.run([sys.executable, '-V'], check=True)",
    "import subprocess\nsubprocess.run(['ls'], shell=False)",
    "import json\njson.loads(s)",
    "import os\nos.replace(a, b)",
]


@pytest.mark.parametrize("source", FLAGGED)
def test_scanner_flags(source: str) -> None:
    assert scan_source(source), f"not flagged:\n{source}"


@pytest.mark.parametrize("source", SAFE)
def test_scanner_passes_safe_calls(source: str) -> None:
    assert scan_source(source) == [], f"flagged but safe:\n{source}"
