"""pipeline.runs.run: a finished run read file by file by their owners, its OOF maps streamed; errors name the
file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fake_runs import H, W, masks

from pipeline.data.dataset import Split
from pipeline.runs import RunError
from pipeline.runs.manifest import run_data_config
from pipeline.runs.run import load_run


def test_load_run_reads_and_sorts(small_run: tuple[Path, Split]) -> None:
    run = load_run(small_run[0])
    assert run.name == "run" and sorted(run.metrics) == [0, 1]
    assert run.oof_names.tolist() == [f"t{i}.png" for i in range(5)]
    assert run.oof_folds.tolist() == [0, 1, 0, 1, 0]
    chunks = list(run.oof_chunks(chunk=2))
    assert [(fold, len(names)) for fold, names, _ in chunks] == [(0, 2), (0, 1), (1, 2)]  # never all at once
    probs = {n: p for _, names, arr in chunks for n, p in zip(names, arr)}
    assert all(p.shape == (H, W) and p.dtype == np.uint8 for p in probs.values())
    assert np.array_equal(probs["t2.png"] > 0, masks(5)[2] > 0), "probabilities must follow their names"
    assert (run.threshold, run.min_area, run.oof_dice) == (0.5, 0, 0.5)
    assert run.config.name == "run" and list(run.threshold_search.columns) == [
        "threshold",
        "min_area",
        "dice",
    ]
    assert run_data_config(run.path, "elsewhere").root == "elsewhere"
    assert run_data_config(small_run[0]).root.endswith("data")


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
    with pytest.raises(RunError, match=message) as e:
        load_run(small_run[0])
    assert "make train" in str(e.value)


def test_load_run_errors(tmp_path: Path, small_run: tuple[Path, Split]) -> None:
    with pytest.raises(RunError, match="make train"):
        load_run(tmp_path / "absent")
    run = small_run[0]
    folds = pd.read_csv(run / "folds.csv")
    folds.loc[folds["name"] == "t1.png", "fold"] = 0  # t1 predicted by fold 1 but now belongs to fold 0
    folds.to_csv(run / "folds.csv", index=False)
    with pytest.raises(RunError, match=r"t1.png \(fold 0\)"):
        load_run(run)
    pd.DataFrame({"epoch": [1]}).to_csv(run / "fold0" / "metrics.csv", index=False)
    with pytest.raises(RunError, match="lacks columns"):
        load_run(run)
