"""pipeline.runs.folder: one owner per run folder, one config per run, the newest submission."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.runs import RunError, folder


def test_resolve_submission_newest_or_explicit(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="make submit"):
        folder.latest_submission("", tmp_path)
    old, new = tmp_path / "old.csv", tmp_path / "new.csv"
    old.write_text("")
    new.write_text("")
    (tmp_path / "new.csv.score.json").write_text("{}")
    os.utime(old, (1_000, 1_000))
    assert folder.latest_submission("", tmp_path) == new
    assert folder.latest_submission(old, tmp_path) == old
    with pytest.raises(FileNotFoundError):
        folder.latest_submission(tmp_path / "missing.csv")


def test_run_lock_refuses_a_live_owner_takes_over_a_gone_one_and_releases(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    from pipeline.core.io import HOST

    run_dir = tmp_path / "runs" / "r"
    with folder.run_lock(run_dir) as lock:
        assert lock == tmp_path / "runs" / ".r.lock"
        held = json.loads(lock.read_text())
        assert (held["pid"], held["host"]) == (os.getpid(), HOST)
        in_use = rf"{run_dir} is in use by process {os.getpid()}"
        with pytest.raises(RunError, match=in_use), folder.run_lock(run_dir):
            pass
    assert not lock.exists()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    lock.write_text(json.dumps({"pid": int(gone.stdout), "host": HOST, "since": "yesterday"}))
    with folder.run_lock(run_dir):  # a kill -9 left it: taken over
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere", "since": "now", "command": "make train"}))
    other_machine = r"machine elsewhere .*delete .*\.r\.lock"
    with pytest.raises(RunError, match=other_machine), folder.run_lock(run_dir):
        pass


def test_prepare_run_dir_keeps_a_run_one_run(tmp_path: Path) -> None:
    from pipeline.core.config import Config, load_config, save_config, to_dict

    run_dir = tmp_path / "r"
    assert folder.prepare_run_dir(run_dir, to_dict(Config()), resume=False) is None  # nothing there yet
    run_dir.mkdir()
    save_config(Config(), run_dir / "config.yaml")
    (run_dir / "fold0").mkdir()
    folder.prepare_run_dir(run_dir, to_dict(load_config(None, ["infer.threshold=0.3"])))  # infer.* is free
    with pytest.raises(RunError, match=r"another config \(train.epochs: 200 -> 3\)"):
        folder.prepare_run_dir(run_dir, to_dict(load_config(None, ["train.epochs=3"])))
    with pytest.raises(RunError, match=r"already holds a run.*--force"):
        folder.prepare_run_dir(run_dir, to_dict(Config()), resume=False)
    aside = folder.prepare_run_dir(run_dir, to_dict(Config()), resume=False, force=True)
    assert aside is not None and aside.name.startswith("r.old-") and (aside / "fold0").is_dir()
    assert not run_dir.exists()
