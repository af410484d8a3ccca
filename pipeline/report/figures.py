"""Figures for the notebooks, ``make report`` and training's ``curve.png``; numbers come from ``analysis``.

Every figure function is pure: it takes arrays or frames and returns a new
:class:`matplotlib.figure.Figure`, built without ``pyplot``. No global figure state, no backend
switch, safe under Agg and in worker processes; Jupyter shows a returned figure after
``%matplotlib inline``, and :func:`save_figure` writes it as PNG atomically.

Array conventions: images are uint8 RGB [H, W, 3]; masks are [H, W] (stacks [N, H, W]) of class
ids, binary 0/1 for buildings.

Error colours (prediction against truth), used by :func:`error_overlay` and the galleries:

* true positive  ``TP_COLOR`` green  (0, 200, 0)
* false positive ``FP_COLOR`` red    (230, 0, 0)    predicted building, none there
* false negative ``FN_COLOR`` blue   (0, 140, 255)  building missed

Blue rather than yellow for misses: yellow and green look alike to red-green colour-blind readers,
blue does not.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from pipeline.data.dataset import Split
from pipeline.data.images import read_image
from pipeline.data.labels import colorize
from pipeline.train.curve import fold_color

Color = tuple[int, int, int]
MASK_COLOR: Color = (255, 0, 0)
TP_COLOR: Color = (0, 200, 0)
FP_COLOR: Color = (230, 0, 0)
FN_COLOR: Color = (0, 140, 255)

PANEL_INCHES = 2.4  # one image panel; 512 px tiles stay legible at the default 100 dpi
GALLERY_INCHES = 3.2  # error panels are read for thin FP/FN edges: larger


# ----------------------------------------------------------------------------- arrays


def _blend(image: np.ndarray, where: np.ndarray, color: np.ndarray, alpha: float) -> np.ndarray:
    """``image`` with pixels in ``where`` replaced by ``(1 - alpha) * image + alpha * color``, rounded.

    Args:
        image: uint8 [H, W, 3]. where: bool [H, W]. color: [3] or [H, W, 3] (per-pixel colours).
    """
    out = image.copy()
    color = np.asarray(color, dtype=np.float32)
    c = color[where] if color.ndim == 3 else color
    out[where] = np.rint((1.0 - alpha) * image[where].astype(np.float32) + alpha * c).astype(np.uint8)
    return out


def _check_image_mask(image: np.ndarray, *masks: np.ndarray) -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 RGB image [H, W, 3], got {image.dtype} {image.shape}")
    for m in masks:
        if m.shape != image.shape[:2]:
            raise ValueError(
                f"mask {m.shape} does not match image {image.shape[:2]}; masks must match their tiles"
            )


def overlay(image: np.ndarray, mask: np.ndarray, color: Color = MASK_COLOR, alpha: float = 0.4) -> np.ndarray:
    """The image with ``mask`` (non-zero pixels) tinted by ``color``.

    Args:
        image: uint8 [H, W, 3]. mask: [H, W], non-zero = tinted. alpha: 0 = image only, 1 = solid colour.
    Returns:
        uint8 [H, W, 3]; pixels outside the mask are unchanged.
    """
    _check_image_mask(image, mask)
    return _blend(image, np.asarray(mask) != 0, np.asarray(color), alpha)


def error_overlay(image: np.ndarray, pred: np.ndarray, truth: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """The image with true positives, false positives and false negatives in ``TP/FP/FN_COLOR``.

    Args:
        image: uint8 [H, W, 3]. pred, truth: [H, W], non-zero = building.
        alpha: opacity of the colours; 1.0 paints them exactly.
    Returns:
        uint8 [H, W, 3]; true-negative pixels are unchanged.
    """
    _check_image_mask(image, pred, truth)
    p, t = np.asarray(pred) != 0, np.asarray(truth) != 0
    colors = np.zeros((*p.shape, 3), dtype=np.float32)
    colors[p & t] = TP_COLOR
    colors[p & ~t] = FP_COLOR
    colors[~p & t] = FN_COLOR
    return _blend(image, p | t, colors, alpha)


def read_images(paths: Sequence[str | Path]) -> np.ndarray:
    """Read tiles of one size into uint8 [N, H, W, 3]."""
    return np.stack([read_image(p) for p in paths]) if len(paths) else np.zeros((0, 0, 0, 3), np.uint8)


# ----------------------------------------------------------------------------- figures


def _figure(
    nrows: int, ncols: int, panel: tuple[float, float] = (PANEL_INCHES, PANEL_INCHES)
) -> tuple[Figure, Any]:
    fig = Figure(figsize=(panel[0] * ncols, panel[1] * nrows), layout="constrained")
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def _show(ax: Any, img: np.ndarray, title: str = "", cmap: str | None = None) -> None:
    """An image panel without ticks; ``cmap`` (with a 0..1 range) for single-channel masks.

    Antialiased resampling: a 512 px tile drawn in ~300 px would lose 1-2 px error edges to
    nearest-neighbour sampling; antialiasing keeps them visible as fainter lines.
    """
    if cmap:
        ax.imshow(img, cmap=cmap, vmin=0, vmax=1, interpolation="antialiased")
    else:
        ax.imshow(img, interpolation="antialiased")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=8)


def fraction_histogram(
    fractions: Sequence[float] | np.ndarray, title: str = "building fraction per tile"
) -> Figure:
    """Histogram of per-tile building fractions (40 bins over 0..1); the title counts empty tiles."""
    f = np.asarray(fractions, dtype=float)
    fig, axes = _figure(1, 1, (6.0, 3.0))
    ax = axes[0, 0]
    ax.hist(f, bins=np.linspace(0.0, 1.0, 41), color="tab:blue")
    ax.set_xlabel("fraction of pixels that are building")
    ax.set_ylabel("tiles")
    mean = f"{f.mean():.3f}" if f.size else "n/a"
    ax.set_title(f"{title}: {f.size} tiles, {int((f == 0).sum())} empty, mean {mean}", fontsize=9)
    return fig


def example_grid(
    images: Sequence[np.ndarray] | np.ndarray,
    masks: Sequence[np.ndarray] | np.ndarray,
    names: Sequence[str],
    colors: Sequence[Color] | None = None,
    tiles_per_row: int = 2,
) -> Figure:
    """Tiles as image | overlay | mask, ``tiles_per_row`` tiles (3 panels each) side by side.

    Args:
        images: N uint8 [H, W, 3]. masks: N [H, W] class ids. names: N titles.
        colors: a class palette for multi-class masks (more than two colours): drawn with
            :func:`colorize`. Binary masks are drawn red over the image and white on black.
    """
    n = len(images)
    per_row = max(1, min(tiles_per_row, n))
    rows = max(1, -(-n // per_row))
    fig, axes = _figure(rows, 3 * per_row)
    multi = colors is not None and len(colors) > 2
    for i in range(rows * per_row):
        trio = axes[i // per_row, 3 * (i % per_row) : 3 * (i % per_row) + 3]
        if i >= n:
            for ax in trio:
                ax.axis("off")
            continue
        img, m = np.asarray(images[i]), np.asarray(masks[i])
        if multi:
            rgb = colorize(m, colors)
            shown = _blend(img, (m != 0) & (m != 255), rgb, 0.5)
            _show(trio[2], rgb, "classes")
        else:
            shown = overlay(img, m)
            _show(trio[2], (m != 0).astype(np.float32), f"mask ({(m == 1).mean():.1%})", cmap="gray")
        _show(trio[0], img, str(names[i]))
        _show(trio[1], shown, "overlay")
    return fig


def _error_legend(fig: Figure) -> None:
    fig.legend(
        handles=[
            Patch(color=np.array(TP_COLOR) / 255, label="TP"),
            Patch(color=np.array(FP_COLOR) / 255, label="FP (predicted, not there)"),
            Patch(color=np.array(FN_COLOR) / 255, label="FN (missed)"),
        ],
        loc="outside upper center",
        ncols=3,
        fontsize=8,
        frameon=False,
    )


def prediction_gallery(
    images: Sequence[np.ndarray] | np.ndarray,
    preds: Sequence[np.ndarray] | np.ndarray,
    truths: Sequence[np.ndarray] | np.ndarray,
    names: Sequence[str],
    scores: Sequence[float] | np.ndarray,
) -> Figure:
    """One row per tile: image (titled name and Dice) | error overlay (TP/FP/FN colours) | true mask.

    Args:
        images: N uint8 [H, W, 3]. preds, truths: N binary [H, W]. names: N. scores: N per-tile Dice.
    """
    n = len(images)
    fig, axes = _figure(max(n, 1), 3, (GALLERY_INCHES, GALLERY_INCHES))
    if n == 0:
        for ax in axes.ravel():
            ax.axis("off")
        return fig
    _error_legend(fig)
    for i in range(n):
        img, p, t = np.asarray(images[i]), np.asarray(preds[i]), np.asarray(truths[i])
        _show(axes[i, 0], img, f"{names[i]}  Dice {float(scores[i]):.3f}")
        _show(axes[i, 1], error_overlay(img, p, t), f"prediction ({(p != 0).mean():.1%})")
        _show(axes[i, 2], (t != 0).astype(np.float32), f"truth ({(t != 0).mean():.1%})", cmap="gray")
    return fig


def worst_tiles_gallery(scores: Any, k: int = 8) -> Figure:
    """:func:`prediction_gallery` of the ``k`` tiles with the lowest Dice (ties: by name).

    ``scores`` is a :class:`pipeline.report.analysis.TileScores` (which keeps those tiles' masks).
    """
    worst = scores.worst(k)
    preds, truths = scores.masks(worst)
    fold = (lambda i: f" (fold {scores.folds[i]})") if scores.folds is not None else (lambda i: "")
    return prediction_gallery(
        read_images([scores.image_paths[i] for i in worst]),
        preds,
        truths,
        [f"{scores.names[i]}{fold(i)}" for i in worst],
        scores.dice[worst],
    )


def split_grid(
    split: Split,
    indices: Sequence[int] | np.ndarray,
    colors: Sequence[Color] | None = None,
    tiles_per_row: int = 2,
) -> Figure:
    """:func:`example_grid` of the tiles of ``split`` (which must have masks) at ``indices``."""
    if split.masks is None:
        raise ValueError("split_grid draws masks; this split has none")
    idx = [int(i) for i in indices]
    return example_grid(
        read_images([split.image_paths[i] for i in idx]),
        [split.masks[i] for i in idx],
        [split.names[i] for i in idx],
        colors,
        tiles_per_row,
    )


def fold_summary_plot(summary: pd.DataFrame) -> Figure:
    """Bars per fold from :func:`fold_summary`: tiles (empty ones darker) and mean building fraction."""
    fig, axes = _figure(1, 2, (4.0, 3.0))
    x = np.arange(len(summary))
    labels = [str(f) for f in summary.index]
    a0, a1 = axes[0]
    a0.bar(x, summary["tiles"] - summary["empty"], color="tab:blue", label="with buildings")
    a0.bar(x, summary["empty"], bottom=summary["tiles"] - summary["empty"], color="tab:gray", label="empty")
    a0.set_title("tiles per fold", fontsize=9)
    a0.set_ylim(0, 1.3 * max(int(summary["tiles"].max()), 1))  # headroom so the legend covers no bar
    a0.legend(fontsize=7, loc="upper center", ncols=2)
    a1.bar(x, summary["mean_fraction"], color="tab:orange")
    a1.axhline(
        float(np.average(summary["mean_fraction"], weights=summary["tiles"])), color="k", lw=0.8, ls=":"
    )
    a1.set_title("mean building fraction (dotted: all)", fontsize=9)
    for ax in (a0, a1):
        ax.set_xticks(x, labels)
        ax.set_xlabel("fold")
    return fig


def threshold_curve(
    search_df: pd.DataFrame, chosen_threshold: float | None = None, chosen_min_area: int | None = None
) -> Figure:
    """OOF Dice against threshold, one line per min_area, the chosen (threshold, min_area) starred.

    Args:
        search_df: threshold_search.csv (columns threshold, min_area, dice).
        chosen_threshold, chosen_min_area: the manifest's values; the chosen min_area's line is drawn thicker.
    Returns:
        Figure with 1 axes and one line per distinct min_area.
    """
    fig, axes = _figure(1, 1, (6.0, 3.6))
    ax = axes[0, 0]
    areas = sorted(search_df["min_area"].unique())
    for i, a in enumerate(areas):
        d = search_df[search_df["min_area"] == a].sort_values("threshold")
        chosen = chosen_min_area is not None and int(a) == int(chosen_min_area)
        ax.plot(
            d["threshold"],
            d["dice"],
            marker=".",
            lw=2.4 if chosen else 1.0,
            label=f"min_area {a}",
            color=fold_color(i),
            alpha=1.0 if chosen else 0.7,
        )
    title = "OOF Dice against threshold"
    if chosen_threshold is not None and chosen_min_area is not None:
        row = search_df[
            np.isclose(search_df["threshold"], chosen_threshold)
            & (search_df["min_area"] == int(chosen_min_area))
        ]
        if len(row):
            y = float(row["dice"].iloc[0])
            ax.scatter([chosen_threshold], [y], marker="*", s=200, color="k", zorder=4)
            # In the title, not beside the star (a label there collides with the curves), on a line of
            # its own: on one line the title ran past the figure's right edge.
            title += (
                f"\nchosen (star): threshold {chosen_threshold:.2f}, min_area {chosen_min_area}, Dice {y:.4f}"
            )
    ax.set_xlabel("threshold")
    ax.set_ylabel("OOF mean Dice")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncols=2)
    return fig


def dice_histogram(per_tile: Sequence[float] | np.ndarray, title: str = "per-tile Dice") -> Figure:
    """Histogram of per-tile Dice (20 bins over 0..1) with the mean as a vertical line."""
    d = np.asarray(per_tile, dtype=float)
    fig, axes = _figure(1, 1, (6.0, 3.0))
    ax = axes[0, 0]
    ax.hist(d, bins=np.linspace(0.0, 1.0, 21), color="tab:green")
    if d.size:
        ax.axvline(d.mean(), color="k", ls="--", lw=1)
    mean = f"{d.mean():.4f}" if d.size else "n/a"
    ax.set_title(f"{title}: {d.size} tiles, mean {mean}, {int((d < 0.5).sum())} below 0.5", fontsize=9)
    ax.set_xlabel("Dice")
    ax.set_ylabel("tiles")
    return fig


def agreement_heatmap(agreement: pd.DataFrame) -> Figure:
    """Heatmap of :func:`pairwise_agreement` with the values written in; 2 axes (map and colour bar)."""
    k = len(agreement)
    fig, axes = _figure(1, 1, (1.2 * k + 2.0, 1.0 * k + 1.2))
    ax = axes[0, 0]
    values = agreement.to_numpy(dtype=float)
    lo = float(values.min()) if values.size else 0.0
    im = ax.imshow(values, vmin=min(lo, 0.9), vmax=1.0, cmap="viridis")
    for i in range(k):
        for j in range(k):
            ax.text(
                j,
                i,
                f"{values[i, j]:.3f}",
                ha="center",
                va="center",
                fontsize=8,
                color="w" if values[i, j] < (lo + 1) / 2 else "k",
            )
    ax.set_xticks(range(k), agreement.columns, rotation=45, fontsize=8)
    ax.set_yticks(range(k), agreement.index, fontsize=8)
    ax.set_title("agreement between folds (mean per-tile Dice)", fontsize=9)
    fig.colorbar(im, ax=ax)
    return fig


def blend_summary(
    runs: Sequence[str],
    dice: Sequence[float | None],
    weights: Sequence[float],
    blend: float,
    nested: float | None = None,
) -> Figure:
    """A blend (``make blend``) beside its runs: OOF Dice, and the weights it chose.

    Args:
        runs: the runs' names [R]. dice: each run's OOF Dice at its own tuned threshold [R] (None: not
            recorded). weights: the blend's weight of each run [R]. blend: the blend's in-sample OOF Dice.
        nested: its nested OOF Dice (weights and threshold chosen on the other folds), if computed.
    Returns:
        Figure with 2 axes: Dice bars (runs grey, blend in-sample blue, nested light blue, values written
        above), and weight bars.
    """
    labels = [*runs, "blend\nin-sample", *(["blend\nnested"] if nested is not None else [])]
    values = [np.nan if d is None else float(d) for d in dice] + [
        blend,
        *([nested] if nested is not None else []),
    ]
    colors = ["tab:gray"] * len(runs) + ["tab:blue", "lightskyblue"][: len(labels) - len(runs)]
    fig, axes = _figure(1, 2, (max(3.0, 0.9 * len(labels) + 1.0), 3.2))
    a0, a1 = axes[0]
    x = np.arange(len(labels))
    a0.bar(x, np.nan_to_num(values), color=colors)
    for i, v in enumerate(values):
        text, y = ("-", 0.0) if np.isnan(v) else (f"{v:.4f}", v)
        a0.text(i, y, text, ha="center", va="bottom", fontsize=7)
    known = [v for v in values if not np.isnan(v)]
    a0.set_ylim(max(0.0, min(known) - 0.05) if known else 0.0, min(1.0, max(known, default=1.0) + 0.03))
    a0.set_xticks(x, labels, fontsize=7)
    a0.set_title("OOF Dice: each run (its own threshold) and the blend", fontsize=9)
    a1.bar(np.arange(len(runs)), weights, color="tab:blue")
    for i, w in enumerate(weights):
        a1.text(i, w, f"{w:g}", ha="center", va="bottom", fontsize=7)
    a1.set_xticks(np.arange(len(runs)), list(runs), fontsize=7)
    a1.set_ylim(0, 1.1)
    a1.set_title("blend weights", fontsize=9)
    return fig
