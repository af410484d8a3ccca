"""pipeline.tune: OOF search written to the manifest and into every checkpoint; re-tuning without training."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from pipeline import train, tune
from pipeline.io import load_checkpoint, load_yaml


@pytest.fixture
def trained(tiny_cfg):
    cfg = tiny_cfg("train.epochs=1")
    return cfg, train.run(cfg)


def _checkpoint_values(run_dir: Path) -> set[tuple[float, int]]:
    manifest = load_yaml(run_dir / "manifest.yaml")
    return {
        (load_checkpoint(run_dir / c)["threshold"], load_checkpoint(run_dir / c)["min_area"])
        for c in manifest["checkpoints"]
    }


def test_training_ends_tuned(trained):
    cfg, run_dir = trained
    manifest = load_yaml(run_dir / "manifest.yaml")
    search = pd.read_csv(run_dir / "threshold_search.csv")
    best = search.loc[search["dice"].idxmax()]
    assert (manifest["threshold"], manifest["min_area"]) == (best["threshold"], best["min_area"])
    assert _checkpoint_values(run_dir) == {(manifest["threshold"], manifest["min_area"])}


def test_make_tune_retunes_without_training(trained, capsys):
    cfg, run_dir = trained
    last = {p: p.stat().st_mtime_ns for p in run_dir.glob("fold*/last.pt")}
    grid = ["infer.thresholds=[0.2,0.25]", "infer.min_areas=[0,4]"]
    assert tune.main(["--run", str(run_dir), *grid]) == 0
    assert "oof_dice@tuned" in capsys.readouterr().out
    manifest = load_yaml(run_dir / "manifest.yaml")
    assert manifest["threshold"] in (0.2, 0.25) and manifest["min_area"] in (0, 4)
    # Every checkpoint carries the new values: a single best.pt is self-sufficient.
    assert _checkpoint_values(run_dir) == {(manifest["threshold"], manifest["min_area"])}
    assert len(pd.read_csv(run_dir / "threshold_search.csv")) == 4
    assert {p: p.stat().st_mtime_ns for p in run_dir.glob("fold*/last.pt")} == last, "tuning retrained"


def test_make_tune_refuses_training_settings(trained, capsys):
    _, run_dir = trained
    assert tune.main(["--run", str(run_dir), "train.epochs=3"]) == 2
    assert "changes only infer.* settings" in capsys.readouterr().err


def test_tune_without_oof_says_what_to_run(tiny_cfg, tmp_path, capsys):
    from pipeline.config import save_config

    run_dir = tmp_path / "empty-run"
    run_dir.mkdir()
    save_config(tiny_cfg(), run_dir / "config.yaml")
    assert tune.main(["--run", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert "no out-of-fold files" in err and "Traceback" not in err


def test_format_table_known_rows():
    tuned = {
        "threshold": 0.45,
        "min_area": 16,
        "oof_dice": 0.8,
        "oof_dice@0.5": 0.75,
        "n_oof": 10,
        "per_fold": {
            0: {"n": 6, "dice@0.5": 0.7, "dice@tuned": 0.78},
            1: {"n": 4, "dice@0.5": 0.8, "dice@tuned": 0.83},
        },
        "best": {0: 0.71},
    }
    lines = tune.format_table(tuned).splitlines()
    assert lines[1].split() == ["0", "6", "0.7100", "0.7000", "0.7800"]
    assert lines[2].split() == ["1", "4", "-", "0.8000", "0.8300"]
    assert lines[3].split() == ["all", "10", "0.7500", "0.8000"]
    assert lines[4] == "threshold 0.45, min_area 16"
