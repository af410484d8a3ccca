"""Train k-fold segmentation models: the folds of a run, one after another, then tune post-processing.

    python -m pipeline.train --config configs/default.yaml [--folds 0,1] [--no-resume] [key=value ...]
    torchrun --standalone --nproc_per_node=N -m pipeline.train ...      # several GPUs (make train GPUS=N)

Read top to bottom, a run is: check the data -> resolve the folds (the run's own once it has them)
-> for each fold, :func:`train_fold` -> :func:`pipeline.train.tune.tune_run` (OOF threshold/min-area search,
``manifest.yaml``) -> a table. The step, loaders and validation are in :mod:`pipeline.train.engine`.
Optional late phases: the last ``loss.lovasz_epochs`` train on the Lovász hinge alone, and SWA averages
the weights of the last ``train.swa_epochs`` and keeps the average when it validates better.

Per fold, in ``runs/<run>/fold<k>/``: ``config.yaml``, ``last.pt`` (every epoch; resumable),
``best.pt`` (best validation score), ``metrics.csv``, ``curve.png`` and ``oof.npz`` (validation
predictions of the best model, uint8).

Faults: checkpoints are written atomically; Ctrl-C or SIGTERM saves ``last.pt`` at the end of the step
in progress (a second signal stops at once) and a rerun resumes there; a SIGKILL loses at most one
epoch. The epoch order, every augmentation and the model's own randomness are functions of (seed,
epoch or step, index), so a resumed run computes what an uninterrupted one would. ``last.pt`` records
a hash of the fold split, and a resume on other folds is refused. A run folder has one owner at a
time and holds one config (``pipeline.runs.folder``: ``run_lock``, ``prepare_run_dir``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from pipeline.core import progress
from pipeline.core.config import Config, config_changes, load_config, run_name, save_config, to_dict
from pipeline.core.device import (
    Dist,
    all_reduce_sum,
    barrier,
    broadcast_buffers,
    close_distributed,
    init_distributed,
    pick_device,
    seed_everything,
)
from pipeline.core.errors import cli
from pipeline.core.io import remove_stale_temps
from pipeline.core.schedule import lr_at
from pipeline.data.dataset import IMAGE, MASK, load_pseudo_labels
from pipeline.data.folds import folds_hash, resolve_folds, save_folds
from pipeline.data.layouts import Source, check_source, read_source
from pipeline.model.losses import build_loss
from pipeline.model.registry import check_model
from pipeline.runs.checkpoint import BestCheckpoint, LastCheckpoint, read_last, write_checkpoint
from pipeline.runs.folder import prepare_run_dir, run_lock
from pipeline.runs.history import monitor_key, write_metrics
from pipeline.train import tune
from pipeline.train.curve import draw_curve
from pipeline.train.engine import (
    FoldProgress,
    Interrupted,
    StopRequest,
    TrainingError,
    TrainStep,
    build_training,
    check_fold_sizes,
    evaluate,
    fold_data,
    in_last_epochs,
    progress_bar,
    save_on_signal,
    step_seed,
    update_bn,
)
from pipeline.train.oofpass import write_oof
from pipeline.train.plan import Eta, make_plan, schedule_warnings

__all__ = ["FoldResult", "TrainingError", "main", "run", "train_fold", "write_oof"]


@dataclass
class FoldResult:
    fold: int
    best_score: float  # of ``monitor``
    monitor: str
    best_epoch: int
    epochs_run: int
    oof_path: Path | None


# ----------------------------------------------------------------------------- one fold


class FoldTrainer:
    """One fold's loop: restore or start, epochs of steps + validation, checkpoints, then the OOF file.

    Writes only on rank 0. ``fit`` is the whole fold; the other methods are its steps.
    """

    def __init__(
        self, cfg: Config, source: Source, folds_df: pd.DataFrame, fold: int, run_dir: Path, d: Dist
    ):
        self.cfg, self.fold, self.d = cfg, fold, d
        self.eta: Eta | None = None  # the run's measured rate and ETA (train_fold sets it)
        self.device = pick_device(cfg.train.device, d)
        seed_everything(cfg.train.seed + fold, cfg.train.deterministic)
        self.fold_dir = run_dir / f"fold{fold}"
        self.last_path, self.best_path = self.fold_dir / "last.pt", self.fold_dir / "best.pt"
        self.folds_hash = folds_hash(folds_df)
        self.monitor = monitor_key(cfg)
        self.data = fold_data(cfg, source, folds_df, fold, d, self.device)
        self.prog = FoldProgress()
        steps = len(self.data.sampler) // cfg.train.batch_size
        if cfg.train.max_steps_per_epoch:
            steps = min(steps, cfg.train.max_steps_per_epoch)
        self.steps_per_epoch = steps
        self.total_steps = steps * cfg.train.epochs
        self.warmup = int(cfg.optim.warmup_epochs * steps)
        self.step: TrainStep | None = None
        self.stop = StopRequest()  # fit() replaces it with the one its signal handlers fill

    @property
    def eval_model(self) -> torch.nn.Module:
        return self.step.ema.module if self.step.ema is not None else self.step.model

    def begin(self, resume: bool) -> None:
        """Build the step; restore ``last.pt`` (same config and folds only) or start the fold folder."""
        resuming = resume and self.last_path.is_file()
        self.step = build_training(self.cfg, self.device, self.d, pretrained=not resuming)
        # The loss of each phase: the run's, then the Lovász hinge alone for the last loss.lovasz_epochs.
        finetune = build_loss(self.cfg.model, self.cfg.loss, finetune=True).to(self.device)
        self.losses = (self.step.loss_fn, finetune)
        if resuming:
            self._restore(read_last(self.last_path, map_location=self.device))
        elif self.d.main:
            self.fold_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.fold_dir / "config.yaml")
        self.step.step.fill_(self.prog.global_step)

    def _restore(self, state: LastCheckpoint) -> None:
        changes = config_changes(state.config, to_dict(self.cfg))  # infer.* may change
        if changes:
            raise TrainingError(
                f"{self.last_path} was written with a different config ({'; '.join(changes[:5])}); resume "
                "with the same config, or start afresh under a new run name (name=...) or with --force"
            )
        if state.folds_hash != self.folds_hash:
            raise TrainingError(
                f"{self.last_path} was trained on other folds than {self.fold_dir.parent / 'folds.csv'} "
                "now holds (the file was edited or replaced): resuming would validate on other tiles. "
                "Restore the run's folds.csv, or start afresh under a new run name (name=...)"
            )
        s = self.step
        s.model.load_state_dict(state.model)
        s.optimizer.load_state_dict(state.optimizer)
        if s.scaler is not None and state.scaler:
            s.scaler.load_state_dict(state.scaler)
        if s.ema is not None and state.ema:
            s.ema.load_state_dict(state.ema)
        if s.swa is not None and state.swa:
            s.swa.load_state_dict(state.swa)
        self.prog = FoldProgress.from_state(state.progress)
        if self.d.main and not self.prog.stopped(self.cfg):  # a finished fold says so in fit()
            print(
                f"fold {self.fold}: resuming at epoch {self.prog.epoch + 1}, step {self.prog.step_in_epoch} "
                f"({self.last_path})"
            )

    def checkpoint(self) -> None:
        if not self.d.main:
            return
        s = self.step
        write_checkpoint(
            self.last_path,
            LastCheckpoint(
                model=s.model.state_dict(),
                config=to_dict(self.cfg),
                fold=self.fold,
                folds_hash=self.folds_hash,
                optimizer=s.optimizer.state_dict(),
                scaler=s.scaler.state_dict() if s.scaler else None,
                ema=s.ema.state_dict() if s.ema is not None else None,
                swa=s.swa.state_dict() if s.swa is not None else None,
                progress=self.prog.state(),
            ),
        )

    def _save_best(self, model: torch.nn.Module | None = None) -> None:
        if not self.d.main:
            return
        write_checkpoint(
            self.best_path,
            BestCheckpoint(
                model=(model or self.eval_model).state_dict(),
                config=to_dict(self.cfg),
                fold=self.fold,
                epoch=self.prog.best_epoch,
                monitor=self.monitor,
                score=self.prog.best_score,
                # Until pipeline.train.tune writes the OOF-tuned values, the config's defaults.
                threshold=self.cfg.infer.threshold,
                min_area=self.cfg.infer.min_area,
            ),
        )

    def train_epoch(self, epoch: int) -> tuple[torch.Tensor, int]:
        """Steps of one epoch from where the progress stands; returns (loss sum on the device, steps)."""
        cfg, prog, data = self.cfg, self.prog, self.data
        self.step.model.train()
        data.train_ds.set_epoch(epoch)
        data.sampler.set_epoch(epoch)
        data.sampler.skip = prog.step_in_epoch * cfg.train.batch_size
        self.step.loss_fn = self.losses[in_last_epochs(epoch, cfg.loss.lovasz_epochs, cfg)]
        swa_lr = cfg.train.swa_lr if in_last_epochs(epoch, cfg.train.swa_epochs, cfg) else 0.0
        self.loss_sum = torch.full((), prog.partial_loss[0], dtype=torch.float32, device=self.device)
        self.n_steps = prog.partial_loss[1]
        desc = f"fold {self.fold} epoch {epoch + 1}/{cfg.train.epochs}"
        bar = progress_bar(self.steps_per_epoch, prog.step_in_epoch, desc, self.d)
        for batch in data.train_loader:
            if prog.step_in_epoch >= self.steps_per_epoch:
                break
            o = cfg.optim
            lr = swa_lr or lr_at(
                prog.global_step, self.total_steps, self.warmup, o.lr, o.min_lr_ratio, o.schedule
            )
            torch.manual_seed(step_seed(cfg.train.seed + self.fold, prog.global_step, self.d.rank))
            self.loss_sum += self.step(batch[IMAGE], batch[MASK], lr)
            self.n_steps += 1
            prog.step_in_epoch += 1
            prog.global_step += 1
            prog.partial_loss = (0.0, 0)  # live in loss_sum/n_steps until saved
            if prog.step_in_epoch % 10 == 0 or prog.step_in_epoch == self.steps_per_epoch:
                self.step.check_finite(self.fold, epoch)  # one host sync per 10 steps, not per step
                if bar is not None:  # the first epoch has no validation score yet: none is shown
                    val = {"val": f"{prog.history[-1][self.monitor]:.4f}"} if prog.history else {}
                    bar.set_postfix(loss=f"{float(self.loss_sum) / self.n_steps:.4f}", **val)
            if bar is not None:
                bar.update(1)
            if self.eta is not None and self.d.main:
                for line in self.eta.after_step(self.fold, epoch, prog.step_in_epoch):
                    print(line, flush=True)
            self.honour_stop(sync=prog.step_in_epoch % 10 == 0 or prog.step_in_epoch == self.steps_per_epoch)
        if bar is not None:
            bar.close()
        self.step.check_finite(self.fold, epoch)  # never checkpoint a model that saw a non-finite loss
        return self.loss_sum, self.n_steps

    def validate(self, model: torch.nn.Module, what: str) -> dict[str, float]:
        """Validation metrics of ``model``; rank 0's progress lines say ``fold k <what> validation``."""
        desc = f"fold {self.fold} {what} validation" if self.d.main else ""
        return evaluate(
            model, self.data.val_loader, self.step.loss_fn, self.cfg, self.device, self.d, desc=desc
        )

    def end_epoch(self, epoch: int, t0: float) -> None:
        """Validate, record the row, keep the best weights, checkpoint, log."""
        prog, d = self.prog, self.d
        total = all_reduce_sum(self.loss_sum.double().clone(), d)
        train_loss = float(total) / max(1, self.n_steps * d.world)
        if self.step.swa is not None and in_last_epochs(epoch, self.cfg.train.swa_epochs, self.cfg):
            self.step.swa.update_parameters(self.step.model)
        broadcast_buffers(self.eval_model, d)  # the ranks validate the model rank 0 saves
        metrics = self.validate(self.eval_model, f"epoch {epoch + 1}")
        lr = self.step.optimizer.param_groups[0]["lr"]
        seconds = progress.clock() - t0
        row = {"epoch": epoch + 1, "train_loss": train_loss, **metrics, "lr": lr, "seconds": seconds}
        prog.history.append(row)
        score = metrics[self.monitor]
        improved = score > prog.best_score
        if improved:
            prog.best_score, prog.best_epoch, prog.bad_epochs = score, epoch + 1, 0
            self._save_best()
        else:
            prog.bad_epochs += 1
        prog.epoch, prog.step_in_epoch, prog.partial_loss = epoch + 1, 0, (0.0, 0)
        self.loss_sum, self.n_steps = torch.zeros((), device=self.device), 0
        self.checkpoint()
        if d.main:
            draw_curve(self.fold_dir, write_metrics(self.fold_dir, prog.history), self.monitor)
            name = self.monitor.removeprefix("val_")
            eta = f", {self.eta.after_epoch(self.fold, epoch, seconds)}" if self.eta is not None else ""
            print(
                f"fold {self.fold} epoch {epoch + 1}/{self.cfg.train.epochs}: loss {train_loss:.4f} "
                f"val_loss {metrics['val_loss']:.4f} "
                f"{name} {score:.4f}{' *' if improved else ''} ({seconds:.1f}s{eta})",
                flush=True,
            )

    def honour_stop(self, sync: bool) -> None:
        """Raise :class:`Interrupted` once Ctrl-C/SIGTERM has come; called between steps only. With
        several processes the flag is all-reduced where ``sync`` (every 10 steps, where the loop syncs
        anyway), so every rank stops after the same step."""
        if self.d.world == 1:
            self.stop.check()
        elif sync:
            flag = torch.tensor(float(self.stop.signal is not None), device=self.device)
            if float(all_reduce_sum(flag, self.d)) > 0:
                raise Interrupted(self.stop.signal or "signal on another rank")

    def fit(self) -> None:
        """Epochs until done; Ctrl-C/SIGTERM save at the end of the step in progress and exit 130."""
        if self.prog.stopped(self.cfg) and self.d.main:
            print(f"fold {self.fold}: already finished ({self.prog.epoch} epochs)")
        self.loss_sum, self.n_steps = torch.zeros((), device=self.device), 0
        try:
            with save_on_signal() as self.stop:
                while not self.prog.stopped(self.cfg):
                    self.honour_stop(sync=True)
                    t0 = progress.clock()
                    epoch = self.prog.epoch
                    self.train_epoch(epoch)
                    self.end_epoch(epoch, t0)
                self.finish_swa()
        except Interrupted as e:
            self.prog.partial_loss = (float(self.loss_sum), self.n_steps)
            self.checkpoint()
            if self.d.main:
                print(
                    f"\nfold {self.fold}: interrupted ({e}) at epoch {self.prog.epoch + 1}, "
                    f"step {self.prog.step_in_epoch}; saved {self.last_path}. Run the same command with "
                    "RESUME=1 (--resume) to continue.",
                    file=sys.stderr,
                )
            raise SystemExit(130) from None
        except KeyboardInterrupt:  # a second signal: stopped inside a step, whose state is not saved
            if self.d.main:
                print(
                    f"\nfold {self.fold}: stopped at once (second signal); {self.last_path} keeps the state "
                    "saved before. Run the same command to resume from there.",
                    file=sys.stderr,
                )
            raise SystemExit(130) from None
        except torch.cuda.OutOfMemoryError:
            b = self.cfg.train.batch_size
            raise TrainingError(
                f"CUDA out of memory at batch size {b}: use train.batch_size={max(1, b // 2)} (and optim.lr "
                "scaled down by the same factor), or train.amp=bf16"
            ) from None

    def finish_swa(self) -> None:
        """Validate the SWA average (BN statistics recomputed over the training tiles); it becomes
        ``best.pt`` when it scores higher than the best epoch."""
        swa, prog, data = self.step.swa, self.prog, self.data
        if swa is None or prog.swa_score >= 0 or int(swa.n_averaged) == 0:
            return  # off, done before a resume, or stopped early before the SWA epochs
        data.train_ds.set_epoch(prog.epoch)
        data.sampler.set_epoch(prog.epoch)
        data.sampler.skip = 0
        bn_pass = f"fold {self.fold} SWA BatchNorm pass" if self.d.main else ""
        update_bn(swa.module, data.train_loader, self.device, self.cfg.train.amp, bn_pass)
        broadcast_buffers(swa.module, self.d)
        metrics = self.validate(swa.module, "SWA")
        prog.swa_score = metrics[self.monitor]
        kept = prog.swa_score > prog.best_score
        if kept:
            prog.best_score, prog.best_epoch = prog.swa_score, prog.epoch
            self._save_best(swa.module)
        self.checkpoint()
        if self.d.main:
            print(
                f"fold {self.fold} SWA of the last {int(swa.n_averaged)} epochs: "
                f"{self.monitor.removeprefix('val_')} {prog.swa_score:.4f}"
                f"{' * (best.pt)' if kept else ' (the best epoch stays)'}",
                flush=True,
            )

    def result(self, oof_path: Path | None) -> FoldResult:
        p = self.prog
        return FoldResult(self.fold, p.best_score, self.monitor, p.best_epoch, len(p.history), oof_path)


def train_fold(
    cfg: Config,
    source: Source,
    folds_df: pd.DataFrame,
    fold: int,
    run_dir: Path,
    d: Dist,
    resume: bool = True,
    eta: Eta | None = None,
) -> FoldResult:
    """Train one fold (resuming from ``last.pt`` when asked and present), then write its OOF file."""
    trainer = FoldTrainer(cfg, source, folds_df, fold, run_dir, d)
    trainer.eta = eta
    trainer.begin(resume)
    trainer.fit()
    barrier(d)
    oof_path = None
    if d.main:
        oof_path = write_oof(cfg, trainer.eval_model, trainer.data.val_ds, trainer.fold_dir, trainer.device)
    barrier(d)
    return trainer.result(oof_path)


# ----------------------------------------------------------------------------- entry point


def run(cfg: Config, folds: Sequence[int] | None = None, resume: bool = True, force: bool = False) -> Path:
    """Train the given folds (default: all) of ``cfg`` and tune post-processing; returns the run folder.

    Before any work: the model is checked against the registry (the config's values were checked when
    it was loaded), the run folder is owned (:func:`pipeline.runs.folder.run_lock`: a second ``make train``
    of the same run is refused), and it is kept one run (:func:`pipeline.runs.folder.prepare_run_dir`: a
    resume needs the run's config, except ``infer.*``; ``resume=False`` on an existing run is refused
    unless ``force``, which moves the old run aside). Stale temp files of killed writes are removed.
    """
    check_model(cfg)
    d = init_distributed(cfg.train.device)
    pick_device(cfg.train.device, d)  # a device this machine lacks is refused before any folder is made
    run_dir = Path(cfg.train.runs_dir) / run_name(cfg)
    quiet = contextlib.nullcontext()  # the other ranks: rank 0 owns the run folder and speaks for the run
    with run_lock(run_dir) if d.main else quiet, progress.phase(f"train {run_dir.name}") if d.main else quiet:
        if d.main:
            from pipeline.data.check import require_clean
            from pipeline.data.masks import cache_dir

            require_clean(cfg.data, train=True, test=False)  # before FORCE=1 moves an old run aside
            removed = remove_stale_temps(run_dir) + remove_stale_temps(cache_dir())
            if removed:
                print(f"note: removed {len(removed)} temp files of killed writes ({removed[0]}, ...)")
            prepare_run_dir(run_dir, to_dict(cfg), resume=resume, force=force)
        barrier(d)  # the other ranks read the run folder once rank 0 has settled it
        _train_run(cfg, folds, resume or force, run_dir, d)
    close_distributed(d)
    return run_dir


def _train_run(cfg: Config, folds: Sequence[int] | None, resume: bool, run_dir: Path, d: Dist) -> None:
    """The folds, then tuning: :func:`run`'s work once the run folder is owned and settled."""
    source = read_source(cfg.data, with_test=False)
    check_source(cfg, source)
    if cfg.data.pseudo_labels:  # read and checked once, not once per fold
        source = dataclasses.replace(source, pseudo=load_pseudo_labels(cfg.data, cfg.loss.ignore_index))
    folds_df = resolve_folds(cfg, source, run_dir, announce=d.main)
    n_folds = int(folds_df["fold"].max()) + 1
    todo = list(folds) if folds is not None else list(range(n_folds))
    bad = [f for f in todo if not 0 <= f < n_folds]
    if bad:
        raise TrainingError(f"folds {bad} do not exist; folds.csv has folds 0..{n_folds - 1}")
    n_pseudo = len(source.pseudo.names) if source.pseudo is not None else 0
    check_fold_sizes(cfg, folds_df, todo, d.world, n_pseudo)  # every check passes before the first write
    if d.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")  # infer.* may have changed since the run began
        save_folds(run_dir / "folds.csv", folds_df)
    plan = make_plan(cfg, folds_df, todo, d.world, str(pick_device(cfg.train.device, d)), n_pseudo)
    if d.main:  # before the first step: what the run will do, and settings that defeat themselves
        for line in plan.lines() + schedule_warnings(cfg, plan.steps[todo[0]]):
            print(line, flush=True)
    eta = Eta(plan)
    for f in todo:
        train_fold(cfg, source, folds_df, f, run_dir, d, resume=resume, eta=eta)
    if d.main:
        tuned = tune.tune_run(cfg, source, run_dir)
        print(tune.format_table(tuned))
        print(f"run: {run_dir}   manifest: {run_dir / 'manifest.yaml'}")
    barrier(d)


def fold_list(text: str) -> list[int]:
    try:
        return [int(f) for f in text.split(",") if f.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of fold numbers, e.g. 0,1") from None


def parse_args(argv: Sequence[str] | None) -> tuple[Config, list[int] | None, bool, bool]:
    p = argparse.ArgumentParser(prog="python -m pipeline.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/default.yaml", help="YAML recipe (configs/*.yaml)")
    p.add_argument("--folds", type=fold_list, default=None, help="folds to train, e.g. 0,1 (default: all)")
    p.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="continue the run from its last.pt files (default); --no-resume refuses an existing run",
    )
    p.add_argument("--force", action="store_true", help="start afresh; a run there moves to <run>.old-<t>/")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.epochs=3 data.root=data/real")
    a = p.parse_args(argv)
    cfg = load_config(a.config, a.overrides)
    return cfg, a.folds or None, a.resume, a.force


@cli
def main(argv: Sequence[str] | None = None) -> int:
    cfg, folds, resume, force = parse_args(argv)
    run(cfg, folds, resume, force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
