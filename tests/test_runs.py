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
