"""pipeline.train.curve: a fold's learning curves."""

from __future__ import annotations

import pytest
from fake_runs import metrics_frame
from matplotlib.figure import Figure

from pipeline.train import curve

# ----------------------------------------------------------------------------- arrays


def test_learning_curves_axes_and_lines() -> None:
    fig = curve.learning_curves({0: metrics_frame(0), 1: metrics_frame(1), 2: metrics_frame(2)})
    assert isinstance(fig, Figure)
    loss, dice = fig.axes
    assert len(loss.lines) == 6 and len(dice.lines) == 3  # train + val per fold; Dice per fold
    assert len(dice.collections) == 3  # best-epoch markers
    assert dice.lines[0].get_ydata()[-1] == pytest.approx(0.9)
    assert (
        loss.get_yscale() == "log"
    )  # positive losses: a log axis keeps early spikes from flattening the rest
    negative = metrics_frame(0).assign(train_loss=-1.0)
    assert curve.learning_curves({0: negative}).axes[0].get_yscale() == "linear"
