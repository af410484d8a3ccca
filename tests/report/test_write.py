"""pipeline.report.write: every figure of a finished run as PNG, atomically; the CLI names a missing run."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image


def test_report_writes_every_figure(demo_run, tmp_path: Path) -> None:
    from pipeline.report.write import main, write_report

    paths = write_report(demo_run.run, out_dir=tmp_path / "report")
    assert [p.name for p in paths] == [
        "data_fractions.png",
        "data_examples.png",
        "folds.png",
        "learning_curves.png",
        "threshold_curve.png",
        "oof_dice_histogram.png",
        "worst_tiles.png",
        "building_outlines.png",
    ]
    for p in paths:
        with Image.open(p) as im:
            assert im.format == "PNG" and min(im.size) > 100
    assert not list((tmp_path / "report").glob(".*.tmp")), "temporary files left behind"
    assert main([str(demo_run.run), "--data", str(demo_run.data), "--out", str(tmp_path / "cli")]) == 0
    assert len(list((tmp_path / "cli").glob("*.png"))) == 8


def test_report_cli_names_the_missing_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.report.write import main

    assert main([str(tmp_path / "nope")]) == 2
    assert "make train" in capsys.readouterr().err
