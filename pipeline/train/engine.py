"""The training engine: one optimisation step, a fold's datasets, sampler, loaders and progress record,
validation, signals, and the BatchNorm pass of a weight average (SWA).

``pipeline.train.trainer`` orchestrates folds with these pieces; the benchmarks (``bench/``) assemble the very
same step with :func:`build_training`, so a measured step is the step that trains.

Resumability rests on facts kept here: the learning rate and the model's random draws are pure
functions of the global step (:func:`~pipeline.core.schedule.lr_at`, :func:`step_seed`), the epoch order is a
function of (seed, epoch) that can skip what was already seen (:class:`ResumableSampler`), and a signal stops
the loop only between two steps (:class:`StopRequest`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, DistributedSampler

from pipeline.core import tta
from pipeline.core.config import Config
from pipeline.core.device import (
    Dist,
    all_reduce_sum,
    autocast_ctx,
    grad_scaler,
    resolve_channels_last,
    resolve_workers,
)
from pipeline.core.errors import BuildsegError
from pipeline.core.progress import progress
from pipeline.data.dataset import IMAGE, INDEX, MASK, SegDataset, Split, build_transforms
from pipeline.data.layouts import Source
from pipeline.metrics.pixel import (
    all_metrics,
    confusion_matrix_torch,
    dice_per_image_torch,
    iou_per_image_torch,
    pixel_accuracy,
)
from pipeline.model.losses import build_loss
from pipeline.model.registry import build_model


class TrainingError(BuildsegError, RuntimeError):
    """Training cannot go on; the message says why and what to change."""


# ----------------------------------------------------------------------------- schedule, sampling, loading


def step_seed(seed: int, global_step: int, rank: int) -> int:
    """The torch seed of one training step: the model's own randomness (dropout) is a function of
    (seed, step, rank), like the learning rate, so a resumed run draws what an uninterrupted one would
    without RNG state in the checkpoint."""
    return zlib.crc32(f"{seed}:{global_step}:{rank}".encode())


class ResumableSampler(DistributedSampler):
    """DistributedSampler (also for one process) whose epoch order can skip the first ``skip`` samples.

    The order is a function of (seed, epoch), so skipping the samples already seen before an
    interruption resumes exactly where the run stopped.
    """

    def __init__(self, dataset: Any, d: Dist, seed: int):
        super().__init__(dataset, num_replicas=d.world, rank=d.rank, shuffle=True, seed=seed, drop_last=True)
        self.skip = 0

    def __iter__(self) -> Iterator[int]:
        it = super().__iter__()
        for _ in range(self.skip):
            next(it)
        return it

    def __len__(self) -> int:
        return self.num_samples - self.skip


def make_loader(
    ds: SegDataset, cfg: Config, device: torch.device, sampler: Any = None, batch_size: int = 0
) -> DataLoader:
    """DataLoader, pinned memory on CUDA; persistent workers (the epoch reaches them via shared memory)."""
    workers = resolve_workers(cfg.data.num_workers)
    return DataLoader(
        ds,
        batch_size=batch_size or cfg.train.batch_size,
        sampler=sampler,
        shuffle=False,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        drop_last=sampler is not None,
        prefetch_factor=4 if workers > 0 else None,
        persistent_workers=workers > 0,  # forking workers every (sub-second) epoch would idle the GPU
        worker_init_fn=leave_group_signals_to_main if workers > 0 else None,
    )


def leave_group_signals_to_main(worker_id: int) -> None:
    """In a DataLoader worker: a process group of its own. ``timeout`` and Ctrl-C signal the whole group; a
    worker killed by it ended the run in a traceback, unsaved. Not by ignoring SIGTERM: the loader and
    multiprocessing stop workers with it at exit, and a process whose workers ignored it hung there."""
    os.setpgid(0, 0)


@dataclass
class FoldProgress:
    """Where a fold's training stands; saved in ``last.pt`` so a rerun resumes exactly there.

    ``partial_loss`` is (loss sum, steps) of an unfinished epoch, so its mean survives a resume.
    """

    epoch: int = 0  # finished epochs
    step_in_epoch: int = 0
    global_step: int = 0
    best_score: float = -1.0
    best_epoch: int = -1
    bad_epochs: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    partial_loss: tuple[float, int] = (0.0, 0)
    swa_score: float = -1.0  # of the SWA average, once validated

    def state(self) -> dict[str, Any]:
        return {**asdict(self), "partial_loss": list(self.partial_loss)}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> FoldProgress:
        kw = {f.name: state[f.name] for f in fields(cls) if f.name in state}
        kw["partial_loss"] = tuple(kw.get("partial_loss", (0.0, 0)))
        kw["history"] = list(kw.get("history", []))
        return cls(**kw)

    def stopped(self, cfg: Config) -> bool:
        return self.epoch >= cfg.train.epochs or bool(
            cfg.train.patience and self.bad_epochs >= cfg.train.patience
        )


class Interrupted(Exception):
    """Ctrl-C or SIGTERM, raised by the loop between two steps (:meth:`StopRequest.check`)."""


class StopRequest:
    """Ctrl-C / SIGTERM as a request that the training loop honours between two steps.

    A handler that raised at once would land anywhere: after ``optimizer.step()`` but before the step
    was counted, or inside a forward pass whose BatchNorm layers had already updated their running
    statistics. ``last.pt`` then held weights a step ahead of its counters, the resumed run repeated
    that batch, and its metrics differed from an uninterrupted run's (a kill -9, which resumes from
    the last epoch's checkpoint, did not). So the handler only records the signal, and :meth:`check`
    raises :class:`Interrupted` where the loop calls it: after a step's bookkeeping, between epochs.
    A second signal stops at once with ``KeyboardInterrupt``, without saving.
    """

    def __init__(self) -> None:
        self.signal: str | None = None

    def check(self) -> None:
        if self.signal is not None:
            raise Interrupted(self.signal)


@contextlib.contextmanager
def save_on_signal() -> Iterator[StopRequest]:
    """Record SIGINT (Ctrl-C) and SIGTERM (cluster pre-emption, ``kill``) in the yielded
    :class:`StopRequest` instead of raising; the previous handlers are restored on exit."""
    request = StopRequest()

    def handler(signum: int, frame: Any) -> None:
        if request.signal is not None:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        request.signal = signal.Signals(signum).name

    old = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError):  # not the main thread (a notebook worker): default handling
            old[sig] = signal.signal(sig, handler)
    try:
        yield request
    finally:
        for sig, previous in old.items():
            signal.signal(sig, previous)


def progress_bar(total: int, initial: int, desc: str, d: Dist) -> Any:
    """Rank 0's progress for an epoch (:func:`pipeline.core.progress.progress`); None on the other ranks."""
    return progress(total, desc, initial, unit="step") if d.main else None


@dataclass
class FoldData:
    """One fold's datasets and loaders (validation sharded over ranks without padding)."""

    train_ds: SegDataset
    val_ds: SegDataset
    sampler: ResumableSampler
    train_loader: DataLoader
    val_loader: DataLoader


def check_fold_sizes(
    cfg: Config, folds_df: pd.DataFrame, folds: Sequence[int], world: int, n_pseudo: int = 0
) -> None:
    """Refuse folds that cannot train before anything is written: each fold needs validation tiles and,
    per process, at least one batch of training tiles (its sampler's ``n // world``: it drops the rest)."""
    counts = folds_df["fold"].value_counts()
    for fold in folds:
        n_val = int(counts.get(fold, 0))
        n_train = len(folds_df) - n_val + n_pseudo
        if not n_val or not n_train:
            raise TrainingError(
                f"fold {fold} has {n_train} training and {n_val} validation tiles; "
                f"folds.csv has folds {sorted(counts.index.tolist())}"
            )
        per_process = n_train // world  # as ResumableSampler (drop_last) and make_plan count them
        if per_process < cfg.train.batch_size:
            raise TrainingError(
                f"fold {fold}: {per_process} training tiles per process is less than one batch of "
                f"{cfg.train.batch_size}; lower train.batch_size (at most {per_process})"
            )


def fold_data(
    cfg: Config, source: Source, folds_df: pd.DataFrame, fold: int, d: Dist, device: torch.device
) -> FoldData:
    fold_of = dict(zip(folds_df["name"], folds_df["fold"]))
    train_idx = [i for i, n in enumerate(source.train.names) if fold_of[n] != fold]
    val_idx = [i for i, n in enumerate(source.train.names) if fold_of[n] == fold]
    if not val_idx or not train_idx:
        raise TrainingError(
            f"fold {fold} has {len(train_idx)} training and {len(val_idx)} validation tiles; "
            f"folds.csv has folds {sorted(set(fold_of.values()))}"
        )
    train_split, val_split = source.train.subset(train_idx), source.train.subset(val_idx)
    if (
        source.pseudo is not None
    ):  # teacher-labelled test tiles (pipeline.infer.pseudo): every fold trains on them
        t, p = train_split, source.pseudo
        masks = [*(t.masks[i] for i in range(len(t))), *p.masks]  # per-tile views: a memmap stays on disk
        train_split = Split(t.names + p.names, t.image_paths + p.image_paths, masks)
    crop, ignore = cfg.data.crop_size, cfg.loss.ignore_index if cfg.loss.ignore_index is not None else 0
    train_ds = SegDataset(
        train_split, build_transforms(cfg.aug, True, crop, ignore), seed=cfg.train.seed + fold
    )
    val_ds = SegDataset(val_split, build_transforms(cfg.aug, False, crop, ignore))
    sampler = ResumableSampler(train_ds, d, seed=cfg.train.seed + fold)
    shard = val_ds
    if d.world > 1:  # each rank validates its own tiles; sums are all-reduced (no tile counts twice)
        shard = SegDataset(val_split.subset(range(d.rank, len(val_split), d.world)), val_ds.transform)
    return FoldData(
        train_ds,
        val_ds,
        sampler,
        make_loader(train_ds, cfg, device, sampler),
        make_loader(shard, cfg, device),
    )


# ----------------------------------------------------------------------------- the step


class TrainStep:
    """One optimisation step (forward, loss, backward, clip, step, EMA); shared with the benchmark.

    Non-finite losses are detected without a host sync per step: the first bad global step is
    recorded on the device and :meth:`check_finite` (called every few steps) raises naming it.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        fwd: torch.nn.Module,
        loss_fn: Any,
        optimizer: torch.optim.Optimizer,
        scaler: Any,
        ema: Any,
        cfg: Config,
        device: torch.device,
    ):
        self.model, self.fwd, self.loss_fn, self.optimizer = model, fwd, loss_fn, optimizer
        self.scaler, self.ema, self.cfg, self.device = scaler, ema, cfg, device
        self.channels_last = resolve_channels_last(device, cfg.train.channels_last)
        # Step counter on the device: creating a tensor from a host int each step would sync.
        self.step = torch.zeros((), dtype=torch.int64, device=device)  # set to the global step on resume
        self.bad_step = torch.full((), -1, dtype=torch.int64, device=device)
        self.bad_loss = torch.zeros((), dtype=torch.float32, device=device)
        self.swa: Any = None  # torch.optim.swa_utils.AveragedModel when train.swa_epochs > 0

    def __call__(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> torch.Tensor:
        """x: uint8 [B, 3, H, W], y: uint8 [B, H, W] (host or device). Returns the detached loss."""
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast_ctx(self.device, self.cfg.train.amp):
            loss = self.loss_fn(self.fwd(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        if self.cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        loss = loss.detach()
        self.step += 1
        first_bad = (self.bad_step < 0) & ~torch.isfinite(loss)
        self.bad_step = torch.where(first_bad, self.step, self.bad_step)
        self.bad_loss = torch.where(first_bad, loss.float(), self.bad_loss)
        return loss

    def check_finite(self, fold: int, epoch: int) -> None:
        bad = int(self.bad_step)
        if bad >= 0:
            raise TrainingError(
                f"fold {fold}: loss is {float(self.bad_loss)} at global step {bad} (epoch {epoch + 1}); "
                "lower "
                f"optim.lr (now {self.cfg.optim.lr}), set optim.grad_clip=1.0, or check that batch's inputs. "
                "last.pt holds the state of the last finished epoch"
            )


def build_training(
    cfg: Config, device: torch.device, d: Dist | None = None, pretrained: bool = True
) -> TrainStep:
    """Model, loss, AdamW (no weight decay on norms and biases), fp16 scaler, EMA, DDP and compile wrappers.

    The one place a training step is assembled: ``train_fold`` and the benchmarks share it. Precision,
    channels_last and compile follow ``cfg.train`` on any device (:func:`pipeline.core.device.resolve_amp`):
    the GPU recipe runs on CPU too when asked, so its code paths are tested without a GPU.
    """
    d = d or Dist()
    model = build_model(cfg, pretrained=pretrained).to(device)
    if resolve_channels_last(device, cfg.train.channels_last):
        model = model.to(memory_format=torch.channels_last)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.optim.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.optim.lr,
        fused=device.type == "cuda",
    )
    scaler = grad_scaler(device, cfg.train.amp)
    ema = None
    if cfg.train.ema > 0:
        ema = torch.optim.swa_utils.AveragedModel(
            model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.train.ema), use_buffers=True
        )
    net: torch.nn.Module = model
    if d.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    fwd = torch.compile(net) if cfg.train.compile else net
    loss_fn = build_loss(cfg.model, cfg.loss).to(device)
    step = TrainStep(model, fwd, loss_fn, optimizer, scaler, ema, cfg, device)
    if cfg.train.swa_epochs:
        # Plain average of the weights; BN statistics are recomputed for it at the end (update_bn).
        step.swa = torch.optim.swa_utils.AveragedModel(model)
    return step


def in_last_epochs(epoch: int, n: int, cfg: Config) -> bool:
    """Whether 0-based ``epoch`` is one of the last ``n`` of the run (the SWA and Lovász phases)."""
    return n > 0 and epoch >= cfg.train.epochs - n


@torch.no_grad()
def update_bn(
    model: torch.nn.Module, loader: DataLoader, device: torch.device, amp: str, desc: str = ""
) -> None:
    """Recompute the BatchNorm running statistics of ``model`` (an average of weights, whose own
    statistics are stale) as the exact mean over one pass of ``loader`` (batches of uint8 images);
    ``desc`` names its progress lines (rank 0)."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = {m: m.momentum for m in bns}
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the pass, not an exponential one
    was_training = model.training
    model.train()
    with progress(len(loader), desc, unit="batch") if desc else contextlib.nullcontext() as bar:
        for batch in loader:
            with autocast_ctx(device, amp):
                model(batch[IMAGE].to(device, non_blocking=True))
            if bar is not None:
                bar.update(1)
    for m in bns:
        m.momentum = momenta[m]
    model.train(was_training)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    loader: DataLoader,
    loss_fn: Any | None,
    cfg: Config,
    device: torch.device,
    d: Dist,
    tta_name: str = "none",
    sink: Callable[[list[int], np.ndarray], None] | None = None,
    desc: str = "",
) -> dict[str, float]:
    """Validation loss, competition Dice (mean per image, empty/empty = 1) and IoU at threshold 0.5.

    With a TTA set other than ``none`` (the out-of-fold pass) the model runs once per view and no loss
    is computed (``val_loss`` is NaN): one forward of the plain view would be work done twice.

    Binary adds pixel accuracy; multi-class logs pixel accuracy, mean pixel accuracy, mIoU, FW IoU and
    mean Dice, all from one confusion matrix (see :data:`MONITORS` for the selection key). Sums are
    all-reduced over ranks. ``sink(indices, arrays)``, if given, receives each batch's dataset indices
    and uint8 [B, H, W] maps (``round(p * 255)`` binary, class ids multi-class): the out-of-fold file is
    written batch by batch, never held whole. ``desc`` (rank 0 only) names a progress phase: a pass of
    minutes on a CPU prints its lines like training does.
    """
    model.eval()
    binary = cfg.model.classes == 1
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss*n, dice, iou, n
    k = max(2, cfg.model.classes)
    cm = torch.zeros(k, k, dtype=torch.int64, device=device)
    bar = progress(len(loader), desc, unit="batch") if desc else None
    for batch in loader:
        x = batch[IMAGE].to(device, non_blocking=True)
        y = batch[MASK].to(device, non_blocking=True)
        with autocast_ctx(device, cfg.train.amp):
            if tta_name == "none":
                logits = model(x)
                loss = (
                    loss_fn(logits, y).detach()
                    if loss_fn is not None
                    else torch.full((), float("nan"), device=device)
                )
                probs = torch.sigmoid(logits.float()) if binary else torch.softmax(logits.float(), 1)
            else:  # the out-of-fold pass: probabilities exactly as the submission makes them, no loss
                act = "sigmoid" if binary else "softmax"
                probs = tta.predict_tta(model, x, tta_name, act, max_images=cfg.infer.max_images)
                loss = torch.full((), float("nan"), device=device)
        n = x.shape[0]
        if binary:
            pred = probs[:, 0] > 0.5
            valid = y != cfg.loss.ignore_index if cfg.loss.ignore_index is not None else None
            truth = y == 1
            if valid is not None:
                pred, truth = pred & valid, truth & valid
            sums[1] += dice_per_image_torch(pred, truth).sum()
            sums[2] += iou_per_image_torch(pred, truth).sum()
            cm += confusion_matrix_torch(pred.long(), y.long(), 2, ignore_index=cfg.loss.ignore_index)
        else:
            pred = probs.argmax(1)
            cm += confusion_matrix_torch(pred, y.long(), k, ignore_index=cfg.loss.ignore_index)
        sums[0] += loss.double() * n  # stays on the device: no sync per batch
        sums[3] += n
        if sink is not None:
            out = (probs[:, 0] * 255).round().to(torch.uint8) if binary else pred.to(torch.uint8)
            sink(batch[INDEX].tolist(), out.cpu().numpy())
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return _metrics(all_reduce_sum(sums, d), all_reduce_sum(cm, d).cpu().numpy(), binary)


def _metrics(sums: torch.Tensor, cm: np.ndarray, binary: bool) -> dict[str, float]:
    """:func:`evaluate`'s result from its sums (loss * n, Dice, IoU, n) and confusion matrix [K, K]."""
    n = max(1.0, float(sums[3]))
    metrics = {"val_loss": float(sums[0]) / n}
    if binary:
        metrics["val_dice"] = float(sums[1]) / n
        metrics["val_iou"] = float(sums[2]) / n
        metrics["val_acc"] = float(pixel_accuracy(cm))
    else:
        cmm = all_metrics(cm)
        metrics["val_miou"] = cmm["mean_iou"]
        metrics["val_acc"] = cmm["pixel_accuracy"]
        metrics["val_mean_acc"] = cmm["mean_pixel_accuracy"]
        metrics["val_fw_iou"] = cmm["fw_iou"]
        metrics["val_mdice"] = cmm["mean_dice"]
    return metrics
