"""pipeline.train.plan: the plan before the first epoch, the measured rate and ETA, settings that defeat
themselves."""

from __future__ import annotations

import pandas as pd
import pytest

from pipeline.core import progress
from pipeline.core.config import load_config
from pipeline.train.plan import Eta, make_plan, schedule_warnings


def _folds(sizes: list[int]) -> pd.DataFrame:
    fold = [k for k, n in enumerate(sizes) for _ in range(n)]
    return pd.DataFrame({"name": [f"t{i}" for i in range(len(fold))], "fold": fold})


def test_the_plan_counts_steps_as_the_sampler_makes_them():
    """448 tiles in 5 folds of 90/90/89/90/89 at batch 16: 358 or 359 training tiles, 22 whole steps."""
    cfg = load_config(None, ["train.epochs=200"])
    plan = make_plan(cfg, _folds([90, 90, 89, 90, 89]), [0, 1, 2, 3, 4], world=1, device="cpu")
    assert plan.steps == {0: 22, 1: 22, 2: 22, 3: 22, 4: 22} and plan.total_steps == 22_000
    assert plan.lines() == [
        "plan: 5 folds (0, 1, 2, 3, 4) x 200 epochs x 22 steps of 16 tiles = 22,000 steps, 352,000 training "
        "images seen; 90 validation tiles per epoch, then the OOF pass; on cpu"
    ]
    two = make_plan(load_config(None, ["train.max_steps_per_epoch=5"]), _folds([40, 60]), [1], 2, "cuda:0")
    assert two.steps == {1: 1} and two.images_per_step == 32  # 40 tiles // 2 ranks // 16 = 1 step
    pseudo = make_plan(
        load_config(None, ["train.max_steps_per_epoch=5"]), _folds([40, 60]), [0], 1, "cpu", 64
    )
    assert pseudo.steps == {0: 5}  # (60 + 64) // 16 = 7, capped at 5


def test_a_warm_up_longer_than_the_run_is_announced():
    assert schedule_warnings(load_config(None, ["train.epochs=3"]), steps_per_epoch=22) == []
    (line,) = schedule_warnings(load_config(None, ["train.epochs=1"]), steps_per_epoch=22)
    # 22 of 44 warm-up steps: the rate ends at 22/44 of its peak
    assert line.startswith(
        "warning: optim.warmup_epochs=2 >= train.epochs=1: the learning rate rises for the whole"
    )
    assert "never reaches optim.lr=0.001 (it ends at 0.0005)" in line and "optim.warmup_epochs=0.25" in line


class Clock:
    t = 0.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock(monkeypatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(progress, "clock", c)
    return c


def test_after_a_minute_the_rate_and_eta_and_on_a_cpu_how_to_shorten(clock):
    plan = make_plan(load_config(None, ["train.epochs=200"]), _folds([90] * 5), [0, 1, 2, 3, 4], 1, "cpu")
    eta = Eta(plan)
    said = []
    for step in range(1, 5):  # 30 s a step; the first step (start-up) is not measured
        clock.t = 10 + 30 * step
        said += eta.after_step(0, 0, step)
    assert said[0] == (
        "fold 0: 2 steps in 1 min 0 s (30.00 s/step, 0.5 img/s); training steps alone: this fold 1 d 12 h "
        "more, the run 7 d 15 h more (validation and the OOF pass add to it)"
    )  # (200 * 22 - 3) steps x 30 s = 36.6 h for the fold; 21,997 steps = 7.6 days for the run
    assert said[1].startswith(
        "note: on this CPU the run takes at least 7 d 15 h at the measured 30.00 s/step"
    )
    assert "make train FOLDS=0" in said[1] and 'ARGS="train.epochs=20"' in said[1]
    assert len(said) == 2  # said once
    assert eta.after_epoch(0, 0, 700.0) == "ETA fold 1 d 14 h, run 8 d 2 h"  # 199 and 999 epochs of 700 s
    assert eta.after_epoch(0, 199, 700.0) == "ETA fold 0 s, run 6 d 11 h"
    assert eta.after_epoch(4, 199, 700.0) == "the last epoch of the run"


def test_a_gpu_rate_gets_no_cpu_note(clock):
    eta = Eta(make_plan(load_config(None), _folds([90] * 5), [0], 1, "cuda:0"))
    lines = []
    for step in range(1, 400):
        clock.t = step * 0.2
        lines += eta.after_step(0, 0, step % 22)
    assert len(lines) == 1 and "5.0 step/s, 80.0 img/s" in lines[0]
