"""pipeline.report.figures: exact pixel values of overlays and colour maps, figure structure."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fake_runs import source as fake_source

from pipeline.report import figures

# ----------------------------------------------------------------------------- arrays


def test_overlay_tints_only_masked_pixels_by_alpha() -> None:
    image = np.full((3, 4, 3), 100, dtype=np.uint8)
    image[..., 2] = 10
    mask = np.zeros((3, 4), dtype=np.uint8)
    mask[1, 2] = 1
    out = figures.overlay(image, mask, color=(255, 0, 0), alpha=0.4)
    # 0.6 * 100 + 0.4 * 255 = 162; 0.6 * 100 = 60; 0.6 * 10 = 6
    assert out[1, 2].tolist() == [162, 60, 6]
    untouched = np.ones((3, 4), dtype=bool)
    untouched[1, 2] = False
    assert np.array_equal(out[untouched], image[untouched])
    assert out.dtype == np.uint8 and np.array_equal(image[1, 2], [100, 100, 10]), "input must not change"
    assert np.array_equal(figures.overlay(image, mask, alpha=0.0), image)


def test_overlay_rejects_mismatched_mask() -> None:
    with pytest.raises(ValueError, match="does not match image"):
        figures.overlay(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 5), np.uint8))


def test_error_overlay_colours_exactly_tp_fp_fn() -> None:
    image = np.full((2, 2, 3), 50, dtype=np.uint8)
    pred = np.array([[1, 1], [0, 0]])
    truth = np.array([[1, 0], [1, 0]])
    out = figures.error_overlay(image, pred, truth, alpha=1.0)
    assert out[0, 0].tolist() == list(figures.TP_COLOR)
    assert out[0, 1].tolist() == list(figures.FP_COLOR)
    assert out[1, 0].tolist() == list(figures.FN_COLOR)
    assert out[1, 1].tolist() == [50, 50, 50]  # true negative: the image
    half = figures.error_overlay(image, pred, truth, alpha=0.5)
    assert half[0, 1].tolist() == [round(0.5 * 50 + 0.5 * c) for c in figures.FP_COLOR]


def test_error_colours_are_distinct() -> None:
    assert len({figures.TP_COLOR, figures.FP_COLOR, figures.FN_COLOR}) == 3


# ----------------------------------------------------------------------------- figures


def test_threshold_curve_one_line_per_min_area_and_star() -> None:
    df = pd.DataFrame(
        [(t, a, 0.8 + 0.1 * t - 0.001 * a) for t in (0.3, 0.5, 0.7) for a in (0, 16, 64)],
        columns=["threshold", "min_area", "dice"],
    )
    fig = figures.threshold_curve(df, 0.5, 16)
    (ax,) = fig.axes
    assert len(ax.lines) == 3
    widths = {line.get_label(): line.get_linewidth() for line in ax.lines}
    assert widths["min_area 16"] > widths["min_area 0"]
    (star,) = ax.collections
    assert star.get_offsets().tolist() == [[0.5, pytest.approx(0.8 + 0.05 - 0.016)]]
    assert "threshold 0.50, min_area 16, Dice 0.8340" in ax.get_title()
    assert len(figures.threshold_curve(df).axes[0].collections) == 0  # nothing chosen, nothing starred


def test_the_threshold_title_stays_inside_its_figure() -> None:
    """On one line (`...; chosen (star): threshold 0.50, min_area 256, Dice 0.8340`) it ran 11 px past
    the right edge of the 600 px figure `make report` writes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    df = pd.DataFrame(
        [(t, a, 0.8) for t in (0.3, 0.5) for a in (0, 256)], columns=["threshold", "min_area", "dice"]
    )
    fig = figures.threshold_curve(df, 0.5, 256)
    FigureCanvasAgg(fig).draw()
    box = fig.axes[0].title.get_window_extent(fig.canvas.get_renderer())
    assert box.x0 >= 0 and box.x1 <= fig.bbox.width


def test_histograms() -> None:
    fig = figures.fraction_histogram(np.array([0.0, 0.0, 0.2, 0.5]))
    (ax,) = fig.axes
    assert len(ax.patches) == 40 and "2 empty" in ax.get_title()
    fig = figures.dice_histogram(np.array([0.2, 0.9, 1.0]))
    (ax,) = fig.axes
    assert len(ax.patches) == 20 and len(ax.lines) == 1  # the mean
    assert ax.lines[0].get_xdata()[0] == pytest.approx(0.7) and "1 below 0.5" in ax.get_title()


def test_example_grid_layout_binary_and_multiclass() -> None:
    images = np.zeros((3, 8, 8, 3), np.uint8)
    masks = np.zeros((3, 8, 8), np.uint8)
    masks[:, :4] = 1
    fig = figures.example_grid(images, masks, ["a", "b", "c"], tiles_per_row=2)
    assert len(fig.axes) == 2 * 6  # 2 rows of 2 tiles x 3 panels; the last trio is blank
    assert [ax.get_title() for ax in fig.axes[:3]] == ["a", "overlay", "mask (50.0%)"]
    assert not fig.axes[-1].axison
    masks[0, 0, 0] = 2
    fig = figures.example_grid(
        images, masks, ["a", "b", "c"], colors=[(0, 0, 0), (9, 9, 9), (7, 7, 7)], tiles_per_row=3
    )
    assert len(fig.axes) == 9 and fig.axes[2].get_title() == "classes"
    assert fig.axes[2].images[0].get_array()[0, 0].tolist() == [7, 7, 7]


def test_prediction_gallery_titles_and_panels() -> None:
    images = np.zeros((2, 8, 8, 3), np.uint8)
    preds = np.zeros((2, 8, 8), np.uint8)
    truths = np.ones((2, 8, 8), np.uint8)
    fig = figures.prediction_gallery(images, preds, truths, ["x.jpg", "y.jpg"], [0.0, 0.25])
    assert len(fig.axes) == 6
    assert fig.axes[3].get_title() == "y.jpg  Dice 0.250"
    # the error panel shows every pixel as a false negative (blended over black)
    assert fig.axes[1].images[0].get_array()[0, 0].tolist() == [round(0.55 * c) for c in figures.FN_COLOR]
    assert len(fig.legends) == 1


def test_fold_summary_plot_and_agreement_heatmap() -> None:
    s = pd.DataFrame({"tiles": [3, 4], "empty": [1, 0], "mean_fraction": [0.1, 0.2]}, index=[0, 1])
    fig = figures.fold_summary_plot(s)
    assert len(fig.axes) == 2 and len(fig.axes[0].patches) == 4 and len(fig.axes[1].patches) == 2
    agreement = pd.DataFrame(
        [[1.0, 0.9], [0.9, 1.0]], index=["fold 0", "fold 1"], columns=["fold 0", "fold 1"]
    )
    fig = figures.agreement_heatmap(agreement)
    assert len(fig.axes) == 2  # map + colour bar
    assert sorted(t.get_text() for t in fig.axes[0].texts) == ["0.900", "0.900", "1.000", "1.000"]


def test_split_grid_draws_the_chosen_tiles(tmp_path: Path) -> None:
    source = fake_source(tmp_path)
    fig = figures.split_grid(source.train, [2, 0])
    assert [ax.get_title() for ax in fig.axes[::3]] == ["s2.png", "s0.png"]
    with pytest.raises(ValueError, match="this split has none"):
        figures.split_grid(source.test, [0])


def test_blend_summary_draws_each_runs_dice_beside_the_blends_and_the_weights() -> None:
    fig = figures.blend_summary(["a", "b"], [0.8, None], [0.7, 0.3], 0.85, 0.83)
    dice_ax, weight_ax = fig.axes
    heights = [p.get_height() for p in dice_ax.patches]
    assert heights == pytest.approx([0.8, 0.0, 0.85, 0.83])  # b's Dice unknown: an empty bar marked "-"
    assert [t.get_text() for t in dice_ax.texts] == ["0.8000", "-", "0.8500", "0.8300"]
    assert [t.get_text() for t in dice_ax.get_xticklabels()] == [
        "a",
        "b",
        "blend\nin-sample",
        "blend\nnested",
    ]
    assert [p.get_height() for p in weight_ax.patches] == pytest.approx([0.7, 0.3])
    no_nested = figures.blend_summary(["a"], [0.8], [1.0], 0.8)
    assert len(no_nested.axes[0].patches) == 2  # the run and the blend in-sample
