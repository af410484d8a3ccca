"""pipeline.runs: reading a run folder with errors that name the file; the newest submission."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fake_runs import H, W, masks

from pipeline import runs
from pipeline.data import Split


def test_load_run_reads_and_sorts(small_run: tuple[Path, Split]) -> None:
    run = runs.load_run(small_run[0])
    assert run.name == "run" and sorted(run.metrics) == [0, 1]
    assert run.oof_names.tolist() == [f"t{i}.png" for i in range(5)]
    assert run.oof_folds.tolist() == [0, 1, 0, 1, 0]
    assert run.oof_probs.shape == (5, H, W) and run.oof_probs.dtype == np.uint8
    assert np.array_equal(run.oof_probs[2] > 0, masks(5)[2] > 0), "probabilities must follow their names"
    assert (run.threshold, run.min_area, run.oof_dice) == (0.5, 0, 0.5)
    assert run.config["name"] == "run" and list(run.threshold_search.columns) == [
        "threshold",
        "min_area",
        "dice",
    ]
    assert runs.run_data_config(run.path, "elsewhere").root == "elsewhere"
    assert runs.run_data_config(small_run[0]).root.endswith("data")


@pytest.mark.parametrize(
    ("remove", "message"),
    [
        ("manifest.yaml", "manifest.yaml not found"),
        ("folds.csv", "folds.csv not found"),
        ("fold1/oof.npz", "fold 1 has not finished"),
        ("threshold_search.csv", "threshold_search.csv not found"),
    ],
)
def test_load_run_missing_file_says_train_first(
    small_run: tuple[Path, Split], remove: str, message: str
) -> None:
    (small_run[0] / remove).unlink()
    with pytest.raises(runs.RunError, match=message) as e:
        runs.load_run(small_run[0])
    assert "make train" in str(e.value)


def test_load_run_errors(tmp_path: Path, small_run: tuple[Path, Split]) -> None:
    with pytest.raises(runs.RunError, match="make train"):
        runs.load_run(tmp_path / "absent")
    run = small_run[0]
    folds = pd.read_csv(run / "folds.csv")
    folds.loc[folds["name"] == "t1.png", "fold"] = 0  # t1 predicted by fold 1 but now belongs to fold 0
    folds.to_csv(run / "folds.csv", index=False)
    with pytest.raises(runs.RunError, match=r"t1.png \(fold 0\)"):
        runs.load_run(run)
    pd.DataFrame({"epoch": [1]}).to_csv(run / "fold0" / "metrics.csv", index=False)
    with pytest.raises(runs.RunError, match="lacks columns"):
        runs.load_run(run)


def test_resolve_submission_newest_or_explicit(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="make submit"):
        runs.latest_submission("", tmp_path)
    old, new = tmp_path / "old.csv", tmp_path / "new.csv"
    old.write_text("")
    new.write_text("")
    (tmp_path / "new.csv.score.json").write_text("{}")
    os.utime(old, (1_000, 1_000))
    assert runs.latest_submission("", tmp_path) == new
    assert runs.latest_submission(old, tmp_path) == old
    with pytest.raises(FileNotFoundError):
        runs.latest_submission(tmp_path / "missing.csv")


def test_oof_writer_streams_what_np_load_reads_and_chunks_read_back(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    probs = rng.integers(0, 256, (7, 5, 6), dtype=np.uint8)
    names = [f"t{i}.jpg" for i in range(7)]
    with runs.oof_writer(tmp_path / "oof.npz", names, "probs") as write:
        write([0, 1, 2], probs[:3])
        write([3, 4, 5, 6], probs[3:])
    with np.load(tmp_path / "oof.npz") as z:
        assert list(z["names"]) == names
        np.testing.assert_array_equal(z["probs"], probs)
    chunks = list(runs.oof_chunks(tmp_path / "oof.npz", "probs", chunk=3))
    assert [n for n, _ in chunks] == [names[:3], names[3:6], names[6:]]
    np.testing.assert_array_equal(np.concatenate([a for _, a in chunks]), probs)


def test_oof_writer_leaves_nothing_when_short_or_out_of_order(tmp_path: Path) -> None:
    probs = np.zeros((4, 2, 2), np.uint8)
    short = pytest.raises(ValueError, match="2 OOF maps written for 4 tiles")
    with short, runs.oof_writer(tmp_path / "oof.npz", list("abcd"), "probs") as write:
        write([0, 1], probs[:2])
    shuffled = pytest.raises(ValueError, match="dataset order")
    with shuffled, runs.oof_writer(tmp_path / "oof.npz", list("abcd"), "probs") as write:
        write([1, 0], probs[:2])
    assert list(tmp_path.iterdir()) == []


def test_oof_chunks_of_a_savez_compressed_file(tmp_path: Path) -> None:
    """Files written by np.savez_compressed (earlier runs) stream the same way."""
    probs = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    np.savez_compressed(tmp_path / "oof.npz", names=np.array(["a", "b"]), probs=probs)
    ((names, arr),) = list(runs.oof_chunks(tmp_path / "oof.npz", "probs"))
    assert names == ["a", "b"] and np.array_equal(arr, probs)


# ----------------------------------------------------------------------------- who owns a run folder


def test_run_lock_refuses_a_live_owner_takes_over_a_gone_one_and_releases(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    from pipeline.io import HOST

    run_dir = tmp_path / "runs" / "r"
    with runs.run_lock(run_dir) as lock:
        assert lock == tmp_path / "runs" / ".r.lock"
        held = json.loads(lock.read_text())
        assert (held["pid"], held["host"]) == (os.getpid(), HOST)
        in_use = rf"{run_dir} is in use by process {os.getpid()}"
        with pytest.raises(runs.RunError, match=in_use), runs.run_lock(run_dir):
            pass
    assert not lock.exists()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    lock.write_text(json.dumps({"pid": int(gone.stdout), "host": HOST, "since": "yesterday"}))
    with runs.run_lock(run_dir):  # a kill -9 left it: taken over
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere", "since": "now", "command": "make train"}))
    other_machine = r"machine elsewhere .*delete .*\.r\.lock"
    with pytest.raises(runs.RunError, match=other_machine), runs.run_lock(run_dir):
        pass


def test_prepare_run_dir_keeps_a_run_one_run(tmp_path: Path) -> None:
    from pipeline.config import Config, load_config, save_config, to_dict

    run_dir = tmp_path / "r"
    assert runs.prepare_run_dir(run_dir, to_dict(Config()), resume=False) is None  # nothing there yet
    run_dir.mkdir()
    save_config(Config(), run_dir / "config.yaml")
    (run_dir / "fold0").mkdir()
    runs.prepare_run_dir(run_dir, to_dict(load_config(None, ["infer.threshold=0.3"])))  # infer.* is free
    with pytest.raises(runs.RunError, match=r"another config \(train.epochs: 200 -> 3\)"):
        runs.prepare_run_dir(run_dir, to_dict(load_config(None, ["train.epochs=3"])))
    with pytest.raises(runs.RunError, match=r"already holds a run.*--force"):
        runs.prepare_run_dir(run_dir, to_dict(Config()), resume=False)
    aside = runs.prepare_run_dir(run_dir, to_dict(Config()), resume=False, force=True)
    assert aside is not None and aside.name.startswith("r.old-") and (aside / "fold0").is_dir()
    assert not run_dir.exists()
