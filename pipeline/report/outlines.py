"""Figures of buildings as polygons: outlines over tiles, coloured by their per-building match.

Pure functions returning a :class:`matplotlib.figure.Figure` without ``pyplot``, as in
:mod:`pipeline.report.figures` (whose error colours they use): a predicted building matched to a true one at
IoU >= 0.5 is outlined green (TP), an unmatched prediction red (FP), a missed true building blue and
dashed (FN). Polygons are in pixel coordinates (x = column, y = row, pixel corners on integers), as
:func:`pipeline.geo.vectorize.tile_polygons` makes them; :func:`pipeline.report.analysis.building_panels`
builds the
panels for ``make report`` and notebook 03.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from pipeline.report.figures import FN_COLOR, FP_COLOR, GALLERY_INCHES, TP_COLOR


@dataclass(frozen=True)
class OutlinePanel:
    """One tile: image uint8 [H, W, 3]; polygons of predicted and true buildings; bool [n] matched flags."""

    title: str
    image: np.ndarray
    pred: Sequence[Any]
    pred_matched: np.ndarray
    truth: Sequence[Any]
    truth_matched: np.ndarray


def _rings(geoms: Sequence[Any]) -> list[np.ndarray]:
    """Coordinates [n, 2] of every exterior and interior ring of (Multi)Polygons."""
    out = []
    for g in geoms:
        for part in getattr(g, "geoms", [g]):
            out.append(np.asarray(part.exterior.coords))
            out += [np.asarray(r.coords) for r in part.interiors]
    return out


def _draw(ax: Any, panel: OutlinePanel) -> None:
    h, w = panel.image.shape[:2]
    ax.imshow(panel.image, extent=(0, w, h, 0), interpolation="antialiased")
    pred_ok = np.asarray(panel.pred_matched, dtype=bool)
    missed = ~np.asarray(panel.truth_matched, dtype=bool)
    layers = [
        ([g for g, m in zip(panel.truth, missed) if m], FN_COLOR, "--"),
        ([g for g, m in zip(panel.pred, pred_ok) if not m], FP_COLOR, "-"),
        ([g for g, m in zip(panel.pred, pred_ok) if m], TP_COLOR, "-"),
    ]
    for geoms, color, style in layers:
        if geoms:
            ax.add_collection(
                LineCollection(
                    _rings(geoms), colors=[np.array(color) / 255], linestyles=style, linewidths=1.5
                )
            )
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    tp, fp, fn = int(pred_ok.sum()), int((~pred_ok).sum()), int(missed.sum())
    ax.set_title(f"{panel.title}\nTP {tp}  FP {fp}  FN {fn}", fontsize=8)


def building_outlines(panels: Sequence[OutlinePanel], per_row: int = 3) -> Figure:
    """Tiles with building outlines coloured by match, ``per_row`` tiles side by side, and a legend."""
    n = len(panels)
    cols = max(1, min(per_row, n))
    rows = max(1, -(-n // cols))
    fig = Figure(figsize=(GALLERY_INCHES * cols, (GALLERY_INCHES + 0.3) * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    fig.legend(
        handles=[
            Line2D([], [], color=np.array(TP_COLOR) / 255, label="TP (matched, IoU >= 0.5)"),
            Line2D([], [], color=np.array(FP_COLOR) / 255, label="FP (predicted, no match)"),
            Line2D([], [], color=np.array(FN_COLOR) / 255, linestyle="--", label="FN (missed)"),
        ],
        loc="outside upper center",
        ncols=3,
        fontsize=8,
        frameon=False,
    )
    for i, ax in enumerate(axes.ravel()):
        if i < n:
            _draw(ax, panels[i])
        else:
            ax.axis("off")
    return fig
