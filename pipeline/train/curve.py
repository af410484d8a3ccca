"""A fold's learning curves: ``curve.png`` beside ``metrics.csv``, redrawn after every epoch.

The figure is the training's own record (a glance at ``runs/<run>/fold<k>/curve.png`` while it runs);
``make report`` draws the same function over every fold.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from pipeline.core.io import save_figure


def fold_color(k: int) -> Any:
    from matplotlib import colormaps

    return colormaps["tab10"](k % 10)


def learning_curves(metrics_by_fold: Mapping[int, pd.DataFrame], score: str = "") -> Figure:
    """Every fold on one figure: losses (train solid, validation dashed) and the validation score.

    Args:
        metrics_by_fold: fold -> metrics.csv frame (columns epoch, train_loss, val_loss and the score).
        score: the score column (``val_dice`` binary, ``val_miou`` multi-class); empty: whichever of
            the two the frames have.
    Returns:
        Figure with 2 axes: 2 lines per fold on the first, 1 per fold on the second (the best epoch
        of each fold is a marker, not a line).
    """
    frames = list(metrics_by_fold.values())
    score = score or next((c for c in ("val_dice", "val_miou") if frames and c in frames[0]), "val_dice")
    fig = Figure(figsize=(10.0, 3.4), layout="constrained")
    a0, a1 = fig.subplots(1, 2)
    for k, df in sorted(metrics_by_fold.items()):
        c = fold_color(k)
        a0.plot(df["epoch"], df["train_loss"], color=c, ls="-")
        a0.plot(df["epoch"], df["val_loss"], color=c, ls="--")
        a1.plot(df["epoch"], df[score], color=c, label=f"fold {k}")
        if len(df):
            best = int(df[score].to_numpy().argmax())
            a1.scatter([df["epoch"].iloc[best]], [df[score].iloc[best]], color=c, marker="*", s=80, zorder=3)
    losses = [df[c].to_numpy() for df in metrics_by_fold.values() for c in ("train_loss", "val_loss")]
    if losses and all((v > 0).all() for v in losses):
        a0.set_yscale("log")  # an early validation spike (8 vs 0.4) would flatten the rest on a linear axis
    a0.set_title("loss", fontsize=9)
    a0.legend(
        handles=[
            Line2D([], [], color="k", ls="-", label="train"),
            Line2D([], [], color="k", ls="--", label="val"),
        ],
        fontsize=7,
    )
    a1.set_title(f"validation {score.removeprefix('val_')} (* best epoch)", fontsize=9)
    a1.legend(fontsize=7)
    for ax in (a0, a1):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    return fig


def draw_curve(fold_dir: Path, history: pd.DataFrame, monitor: str) -> None:
    """Write ``fold_dir/curve.png`` from the fold's metrics (atomically), where matplotlib is installed."""
    try:
        fig = learning_curves({int(fold_dir.name.removeprefix("fold")): history}, score=monitor)
    except ImportError:  # plotting is optional; metrics.csv is the record
        return
    save_figure(fig, fold_dir / "curve.png", dpi=90)
