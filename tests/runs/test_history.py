"""pipeline.runs.history: metrics.csv names the selection metric by what it holds."""

from __future__ import annotations

import pandas as pd
import pytest

from pipeline.runs import RunError
from pipeline.runs.history import best_scores, monitor_key, read_metrics, write_metrics


def test_monitor_names_the_metric_it_holds(tiny_cfg):
    assert monitor_key(tiny_cfg()) == "val_dice"
    assert monitor_key(tiny_cfg("model.classes=3")) == "val_miou"


def test_written_metrics_read_back_equal_and_a_file_without_the_columns_is_refused(tmp_path):
    rows = [
        {"epoch": 1, "train_loss": 0.7, "val_loss": 0.8, "val_dice": 0.4},
        {"epoch": 2, "train_loss": 0.5, "val_loss": 0.6, "val_dice": 0.6},
    ]
    written = write_metrics(tmp_path, rows)
    pd.testing.assert_frame_equal(read_metrics(tmp_path), written)
    fold = tmp_path / "fold3"
    fold.mkdir()
    write_metrics(fold, rows)
    assert best_scores(tmp_path, "val_dice") == {3: 0.6}
    pd.DataFrame({"epoch": [1]}).to_csv(tmp_path / "metrics.csv", index=False)
    with pytest.raises(RunError, match=r"lacks columns \['train_loss', 'val_loss'\]"):
        read_metrics(tmp_path)
