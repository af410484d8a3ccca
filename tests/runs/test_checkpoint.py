"""pipeline.runs.checkpoint: best.pt and last.pt, each one typed definition written by one writer and read
back equal by one reader; a file of the other kind or of another program is refused, naming the fix."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pipeline.core.config import Config, load_config, save_config, to_dict
from pipeline.core.io import CheckpointError, save_checkpoint
from pipeline.runs.checkpoint import (
    BestCheckpoint,
    LastCheckpoint,
    check_run_config,
    read_best,
    read_last,
    set_postprocessing,
    write_checkpoint,
)

WEIGHTS = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([1.0, -1.0])}


def _best() -> BestCheckpoint:
    return BestCheckpoint(
        WEIGHTS, to_dict(Config()), fold=2, epoch=7, monitor="val_dice", score=0.81, threshold=0.5, min_area=0
    )


def _assert_same(a, b) -> None:
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, dict) and x and isinstance(next(iter(x.values())), torch.Tensor):
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), f.name
        else:
            assert x == y, f.name


def test_best_round_trip(tmp_path):
    write_checkpoint(tmp_path / "best.pt", _best())
    _assert_same(read_best(tmp_path / "best.pt"), _best())


def test_last_round_trip_keeps_the_progress_fields_at_the_top_level(tmp_path):
    progress = {"epoch": 3, "step_in_epoch": 0, "global_step": 60, "history": [{"epoch": 1, "val_dice": 0.5}]}
    last = LastCheckpoint(
        WEIGHTS, to_dict(Config()), 0, "abc123", {"state": {}, "param_groups": []}, progress=progress
    )
    write_checkpoint(tmp_path / "last.pt", last)
    _assert_same(read_last(tmp_path / "last.pt"), last)
    raw = torch.load(tmp_path / "last.pt", weights_only=True)
    assert raw["epoch"] == 3 and raw["folds_hash"] == "abc123"  # the layout every run so far has


def test_tuning_rewrites_only_the_post_processing(tmp_path):
    write_checkpoint(tmp_path / "best.pt", _best())
    set_postprocessing(tmp_path / "best.pt", 0.35, 64)
    _assert_same(read_best(tmp_path / "best.pt"), dataclasses.replace(_best(), threshold=0.35, min_area=64))


def test_a_file_of_the_other_kind_or_without_the_keys_is_refused(tmp_path):
    write_checkpoint(tmp_path / "best.pt", _best())
    with pytest.raises(CheckpointError, match=r"lacks folds_hash, optimizer .*retrain this fold"):
        read_last(tmp_path / "best.pt")
    state = {k: v for k, v in dataclasses.asdict(_best()).items() if k not in ("threshold", "min_area")}
    save_checkpoint(tmp_path / "old.pt", state)
    with pytest.raises(CheckpointError, match="lacks threshold, min_area .*re-run make tune"):
        read_best(tmp_path / "old.pt")


def test_a_checkpoint_of_another_config_in_a_run_folder_is_refused(tmp_path):
    save_config(Config(), tmp_path / "config.yaml")
    (tmp_path / "fold0").mkdir()
    ok = dataclasses.replace(_best(), config=to_dict(Config()))
    check_run_config(tmp_path / "fold0/best.pt", ok)  # the run's own: accepted
    other = dataclasses.replace(_best(), config=to_dict(load_config(None, ["model.arch=FPN"])))
    with pytest.raises(
        CheckpointError, match=r"another config than .*config.yaml \(model.arch: 'Unet' -> 'FPN'\)"
    ):
        check_run_config(tmp_path / "fold0/best.pt", other)
    check_run_config(tmp_path / "elsewhere.pt", other)  # not in a run folder: nothing to compare with
