"""What a training run will cost, said before it starts and measured as it goes.

Before the first epoch :func:`make_plan` gives the plan (folds x epochs x steps, images seen) and
:func:`schedule_warnings` the settings that defeat themselves (a warm-up longer than the run: the rate
never reaches ``optim.lr``). While it trains, :class:`Eta` says once, after the first minute of steps,
the measured rate and how long the fold and the run will take (and, on a CPU where that is hours,
how to shorten it), then the ETA at every epoch's end from the measured epochs, validation included.
Every time comes from :func:`pipeline.core.progress.clock`, so a test can run it on simulated time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd

from pipeline.core import progress
from pipeline.core.config import Config
from pipeline.core.progress import format_duration
from pipeline.core.schedule import lr_at

# On a CPU, a run longer than this gets a note on how to shorten it (the GPU recipe costs days there).
LONG_CPU_RUN_SECONDS = 3600.0


@dataclass(frozen=True)
class Plan:
    """The work of a run: ``steps[f]`` optimisation steps per epoch of fold ``f`` (per process),
    ``images_per_step`` tiles per step over all processes, ``val_tiles[f]`` validation tiles."""

    folds: tuple[int, ...]
    epochs: int
    steps: dict[int, int]
    images_per_step: int
    val_tiles: dict[int, int]
    device: str

    @property
    def total_steps(self) -> int:
        return self.epochs * sum(self.steps[f] for f in self.folds)

    def lines(self) -> list[str]:
        per_epoch = sorted({self.steps[f] for f in self.folds})
        steps = f"{per_epoch[0]}" if len(per_epoch) == 1 else f"{per_epoch[0]}-{per_epoch[-1]}"
        n = len(self.folds)
        return [
            f"plan: {n} fold{'s' * (n != 1)} ({', '.join(map(str, self.folds))}) x {self.epochs} epochs x "
            f"{steps} steps of {self.images_per_step} tiles = {self.total_steps:,} steps, "
            f"{self.total_steps * self.images_per_step:,} training images seen; "
            f"{max(self.val_tiles.values()):,} validation tiles per epoch, then the OOF pass; "
            f"on {self.device}"
        ]


def make_plan(
    cfg: Config, folds_df: pd.DataFrame, todo: Sequence[int], world: int, device: str, n_extra: int = 0
) -> Plan:
    """The plan of training ``todo`` on ``folds_df`` (name, fold) with ``world`` processes; ``n_extra``
    tiles join every fold's training set (pseudo labels). Steps as the sampler makes them: each process
    gets ``n // world`` tiles, in whole batches, capped by ``train.max_steps_per_epoch``."""
    bs, cap = cfg.train.batch_size, cfg.train.max_steps_per_epoch
    steps, val = {}, {}
    for f in todo:
        val[f] = int((folds_df["fold"] == f).sum())
        per_process = (len(folds_df) - val[f] + n_extra) // world
        steps[f] = min(per_process // bs, cap) if cap else per_process // bs
    return Plan(tuple(todo), cfg.train.epochs, steps, bs * world, val, device)


def schedule_warnings(cfg: Config, steps_per_epoch: int) -> list[str]:
    """Settings that defeat themselves, said before any step: a warm-up as long as the run keeps the
    rate below ``optim.lr`` to the end."""
    o, epochs = cfg.optim, cfg.train.epochs
    total, warmup = steps_per_epoch * epochs, int(o.warmup_epochs * steps_per_epoch)
    if total and warmup >= total:
        peak = lr_at(total - 1, total, warmup, o.lr, o.min_lr_ratio, o.schedule)
        return [
            f"warning: optim.warmup_epochs={o.warmup_epochs:g} >= train.epochs={epochs}: the learning rate "
            f"rises for the whole run and never reaches optim.lr={o.lr:g} (it ends at {peak:.3g}); "
            f"set optim.warmup_epochs below train.epochs (e.g. optim.warmup_epochs={epochs / 4:g})"
        ]
    return []


class Eta:
    """Measured rate and ETA of a run in this process (a resumed run measures from its restart).

    :meth:`after_step` returns the lines to print once, the first time a minute of steps has passed;
    :meth:`after_epoch` the ETA to append to each epoch's line.
    """

    def __init__(self, plan: Plan, first_after: float = 60.0):
        self.plan, self.first_after = plan, first_after
        self.t0: float | None = None
        self.steps_done = 0
        self.said = False
        self.epoch_seconds: list[float] = []

    def _remaining_steps(self, fold: int, epoch: int, step_in_epoch: int) -> tuple[int, int]:
        """(steps left in this fold, steps of the folds after it)."""
        p = self.plan
        here = (p.epochs - epoch - 1) * p.steps[fold] + p.steps[fold] - step_in_epoch
        later = p.folds[p.folds.index(fold) + 1 :] if fold in p.folds else ()
        return here, p.epochs * sum(p.steps[f] for f in later)

    def after_step(self, fold: int, epoch: int, step_in_epoch: int) -> list[str]:
        now = progress.clock()
        if self.t0 is None:
            self.t0 = now
            return []
        self.steps_done += 1
        if self.said or now - self.t0 < self.first_after:
            return []
        self.said = True
        per_step = (now - self.t0) / self.steps_done
        here, later = self._remaining_steps(fold, epoch, step_in_epoch)
        imgs = self.plan.images_per_step / per_step
        rate = f"{per_step:.2f} s/step" if per_step >= 1 else f"{1 / per_step:.1f} step/s"
        steps = f"{self.steps_done} step{'s' * (self.steps_done != 1)}"
        lines = [
            f"fold {fold}: {steps} in {format_duration(now - self.t0)} ({rate}, "
            f"{imgs:.1f} img/s); training steps alone: this fold {format_duration(here * per_step)} "
            f"more, the run {format_duration((here + later) * per_step)} more (validation and the OOF "
            "pass add to it)"
        ]
        run_seconds = (here + later) * per_step
        if self.plan.device == "cpu" and run_seconds > LONG_CPU_RUN_SECONDS:
            lines.append(
                f"note: on this CPU the run takes at least {format_duration(run_seconds)} at the measured "
                f"{rate}; the recipe is sized for a GPU. Shorter: one fold (make train FOLDS=0), fewer "
                'epochs (ARGS="train.epochs=20"), capped epochs (ARGS="train.max_steps_per_epoch=20"), '
                'a smaller model (ARGS="model.encoder=resnet18"), or a CUDA machine'
            )
        return lines

    def after_epoch(self, fold: int, epoch: int, seconds: float) -> str:
        """``ETA fold 1 h 10 min, run 5 h 50 min`` from the mean measured epoch (validation included)."""
        self.epoch_seconds.append(seconds)
        per_epoch = sum(self.epoch_seconds) / len(self.epoch_seconds)
        p = self.plan
        per_step = per_epoch / max(1, p.steps.get(fold, 1))
        here, later = self._remaining_steps(fold, epoch, p.steps.get(fold, 0))
        if here + later == 0:
            return "the last epoch of the run"
        return (
            f"ETA fold {format_duration(here * per_step)}, run {format_duration((here + later) * per_step)}"
        )
