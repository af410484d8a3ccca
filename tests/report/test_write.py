"""pipeline.report.write: every figure of a finished run as PNG, atomically, each drawn by its figure
function from this run's data; the CLI names a missing run."""

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


def test_each_png_is_drawn_by_its_figure_from_the_runs_data(demo_run, tmp_path: Path, monkeypatch) -> None:
    """Every figure function is wrapped to record what it was given and the figure it returned; the
    figure saved as each PNG must come from the intended function, fed with this run's data."""
    import numpy as np
    import pandas as pd

    from pipeline.core.config import DataConfig
    from pipeline.data.layouts import read_source
    from pipeline.report import figures, outlines, write
    from pipeline.runs.run import load_run
    from pipeline.train import curve

    drawn_by = {
        "data_fractions.png": (figures, "fraction_histogram"),
        "data_examples.png": (figures, "split_grid"),
        "folds.png": (figures, "fold_summary_plot"),
        "learning_curves.png": (curve, "learning_curves"),
        "threshold_curve.png": (figures, "threshold_curve"),
        "oof_dice_histogram.png": (figures, "dice_histogram"),
        "worst_tiles.png": (figures, "worst_tiles_gallery"),
        "building_outlines.png": (outlines, "building_outlines"),
    }
    made: dict[int, tuple] = {}  # id(figure) -> (figure, function name, args); the figure kept alive

    def recorder(real, name):
        def spy(*args, **kwargs):
            fig = real(*args, **kwargs)
            made[id(fig)] = (fig, name, args)
            return fig

        return spy

    for module, name in drawn_by.values():
        monkeypatch.setattr(module, name, recorder(getattr(module, name), name))
    saved: dict[str, tuple[str, tuple]] = {}
    real_save = write.save_figure

    def save(fig, path):
        saved[Path(path).name] = made[id(fig)][1:]
        return real_save(fig, path)

    monkeypatch.setattr(write, "save_figure", save)
    write.write_report(demo_run.run, out_dir=tmp_path)
    assert {png: name for png, (name, _) in saved.items()} == {
        png: name for png, (_, name) in drawn_by.items()
    }

    args = {png: a for png, (_, a) in saved.items()}
    run = load_run(demo_run.run)
    train = read_source(DataConfig(root=str(demo_run.data)), with_test=False).train
    np.testing.assert_array_equal(args["data_fractions.png"][0], train.foreground_fraction())
    split, shown = args["data_examples.png"]
    assert split.names == train.names and len(shown) == write.EXAMPLE_TILES
    summary = args["folds.png"][0]
    assert summary["tiles"].to_dict() == run.folds["fold"].value_counts().sort_index().to_dict()
    assert sorted(args["learning_curves.png"][0]) == [0, 1]
    for k, frame in args["learning_curves.png"][0].items():
        pd.testing.assert_frame_equal(frame, run.metrics[k])
    search, threshold, min_area = args["threshold_curve.png"]
    pd.testing.assert_frame_equal(search, run.threshold_search)
    assert (threshold, min_area) == (run.threshold, run.min_area)
    per_tile, title = args["oof_dice_histogram.png"]
    assert len(per_tile) == len(run.oof_names) and title == "OOF per-tile Dice"
    assert float(np.mean(per_tile)) == pytest.approx(run.oof_dice)  # scored at the tuned threshold
    scores, k = args["worst_tiles.png"]
    assert list(scores.names) == list(run.oof_names) and k == write.WORST_TILES
    panels = args["building_outlines.png"][0]
    assert 0 < len(panels) <= write.OUTLINE_TILES and {p.title for p in panels} <= set(run.oof_names)


def test_report_cli_names_the_missing_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.report.write import main

    assert main([str(tmp_path / "nope")]) == 2
    assert "make train" in capsys.readouterr().err


def test_report_of_a_blend_draws_it_beside_its_runs(demo_run, tmp_path: Path) -> None:
    """make report RUN=runs/<blend>: from the blend's manifest and search table, no OOF file opened."""
    import shutil

    from fake_runs import write_synthetic_run

    from pipeline.infer.blend import blend_runs
    from pipeline.report.write import main

    runs = tmp_path / "runs"
    shutil.copytree(demo_run.run, runs / "a")
    write_synthetic_run(runs / "b", demo_run.data, seed=1)
    blend = blend_runs([runs / "a", runs / "b"], runs / "ab", overrides=["infer.min_areas=[0,16]"]).path
    assert main([str(blend)]) == 0
    assert sorted(p.name for p in (blend / "report").iterdir()) == ["blend.png", "threshold_curve.png"]
    for p in (blend / "report").iterdir():
        with Image.open(p) as im:
            assert im.format == "PNG" and min(im.size) > 100
