"""pipeline.report.outlines: building outlines over tiles, coloured by match (TP green, FP red, FN blue)."""

from __future__ import annotations

import numpy as np
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure

from pipeline.core.io import save_figure
from pipeline.geo.vectorize import tile_polygons
from pipeline.metrics import buildings
from pipeline.report import figures
from pipeline.report.outlines import OutlinePanel, building_outlines


def _panel() -> OutlinePanel:
    """One TP (a building with a hole), one FP, one FN."""
    truth, pred = np.zeros((64, 64), np.uint8), np.zeros((64, 64), np.uint8)
    truth[5:25, 5:25] = pred[6:25, 5:25] = 1
    truth[10:15, 10:15] = pred[10:15, 10:15] = 0
    truth[40:60, 40:60] = 1  # missed
    pred[40:50, 5:15] = 1  # not there
    m = buildings.match_masks(pred, truth)
    image = np.full((64, 64, 3), 90, np.uint8)
    return OutlinePanel(
        "t.jpg", image, tile_polygons(pred), m.pred_matched, tile_polygons(truth), m.truth_matched
    )


def _colors(ax) -> dict[tuple[int, ...], int]:
    """Outline colour (RGB 0..255) -> number of rings drawn in it."""
    out = {}
    for c in ax.collections:
        assert isinstance(c, LineCollection)
        out[tuple(np.rint(c.get_edgecolor()[0][:3] * 255).astype(int))] = len(c.get_segments())
    return out


def test_outlines_are_coloured_by_match(tmp_path) -> None:
    fig = building_outlines([_panel(), _panel()], per_row=2)
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    # the TP has an outer ring and a hole: two rings; the FP and FN one each
    assert _colors(ax) == {figures.TP_COLOR: 2, figures.FP_COLOR: 1, figures.FN_COLOR: 1}
    assert ax.get_title() == "t.jpg\nTP 1  FP 1  FN 1"
    assert [t.get_text() for t in fig.legends[0].get_texts()][0].startswith("TP")
    save_figure(fig, tmp_path / "o.png")
    assert (tmp_path / "o.png").stat().st_size > 1000


def test_no_panels_and_spare_axes() -> None:
    assert len(building_outlines([]).axes) == 1
    fig = building_outlines([_panel()] * 4, per_row=3)
    assert [ax.axison for ax in fig.axes] == [True] * 4 + [False] * 2
