"""Train k-fold segmentation models: one fold's loop, checkpoints, out-of-fold probabilities.

    python -m pipeline.train --config configs/default.yaml [--folds 0,1] [--resume] [key=value ...]
    torchrun --standalone --nproc_per_node=N -m pipeline.train ...      # several GPUs (make train GPUS=N)

Per fold, in ``runs/<run>/fold<k>/``: ``config.yaml``, ``last.pt`` (every epoch; resumable),
``best.pt`` (best validation Dice), ``metrics.csv``, ``curve.png`` and ``oof.npz`` (validation
probabilities of the best model, uint8). After the folds, the threshold and minimum component area
are searched on the whole out-of-fold set and written to ``runs/<run>/manifest.yaml`` (what
``make submit`` reads) and into every ``best.pt``.

Faults: checkpoints are written atomically; Ctrl-C or SIGTERM saves ``last.pt`` at the current step
and a rerun resumes there (``--resume`` or ``RESUME=1``); a SIGKILL loses at most one epoch. The
epoch order and every augmentation are functions of (seed, epoch, index), so a resumed run sees the
same batches as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from pipeline import folds as folds_mod
from pipeline import postprocess, tta
from pipeline.config import Config, ConfigError, load_config, run_name, save_config, to_dict
from pipeline.data import IMAGE, INDEX, MASK, DataError, SegDataset, build_transforms
from pipeline.io import CheckpointError, atomic_write, load_checkpoint, save_checkpoint, save_yaml
from pipeline.layouts import Source, foreground_fraction, read_source
from pipeline.losses import build_loss
from pipeline.metrics import (
    all_metrics,
    confusion_matrix_torch,
    dice_per_image_torch,
    iou_per_image_torch,
    mean_iou,
    pixel_accuracy,
)
from pipeline.models import build_model


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and what to change."""


# ----------------------------------------------------------------------------- distributed


@dataclass(frozen=True)
class Dist:
    """This process's place in a (possibly one-process) job."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_kind: str) -> Dist:
    """Join the torchrun job if there is one (WORLD_SIZE > 1); gloo on CPU, nccl on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def all_reduce_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()


# ----------------------------------------------------------------------------- pieces of the loop


def pick_device(spec: str, d: Dist) -> torch.device:
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cuda" and d.world > 1:
        spec = f"cuda:{d.local_rank}"
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainingError("train.device=cuda but no CUDA GPU is visible; use train.device=cpu")
        torch.cuda.set_device(device)
    return device


def lr_at(step: int, total: int, warmup: int, base: float, min_ratio: float) -> float:
    """Linear warm-up for ``warmup`` steps, then cosine decay from ``base`` to ``base * min_ratio``.

    A pure function of the global step: resuming needs no scheduler state.
    """
    if warmup > 0 and step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


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


def autocast_ctx(device: torch.device, amp: str) -> Any:
    if device.type != "cuda" or amp == "none":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def seed_everything(seed: int, deterministic: bool) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 - seeds third-party code that uses the global state
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True


def make_loader(
    ds: SegDataset, cfg: Config, device: torch.device, sampler: Any = None, batch_size: int = 0
) -> DataLoader:
    """DataLoader, pinned memory on CUDA; persistent workers (the epoch reaches them via shared memory)."""
    workers = cfg.data.num_workers
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
    )


class _Interrupted(Exception):
    """Raised from the signal handler so the loop can save at the current step."""


@contextlib.contextmanager
def save_on_signal() -> Iterator[None]:
    """Turn SIGTERM (cluster pre-emption, `kill`) into the same path as Ctrl-C: save, then exit."""

    def handler(signum: int, frame: Any) -> None:
        raise _Interrupted(signal.Signals(signum).name)

    old = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. inside a notebook worker): keep default handling
        old = None
    try:
        yield
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)


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
        self.channels_last = device.type == "cuda" and cfg.train.channels_last
        # Step counter on the device: creating a tensor from a host int each step would sync.
        self.step = torch.zeros((), dtype=torch.int64, device=device)  # set to the global step on resume
        self.bad_step = torch.full((), -1, dtype=torch.int64, device=device)
        self.bad_loss = torch.zeros((), dtype=torch.float32, device=device)

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


# ----------------------------------------------------------------------------- validation


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    loader: DataLoader,
    loss_fn: Any,
    cfg: Config,
    device: torch.device,
    d: Dist,
    tta_name: str = "none",
    keep_probs: bool = False,
) -> tuple[dict[str, float], dict[int, np.ndarray]]:
    """Validation loss, competition Dice (mean per image, empty/empty = 1) and IoU at threshold 0.5.

    With a TTA set other than ``none`` (the out-of-fold pass) the model runs once per view and no loss
    is computed (``val_loss`` is NaN): one forward of the plain view would be work done twice.

    Binary adds pixel accuracy; multi-class logs pixel accuracy, mean pixel accuracy, mIoU, FW IoU and
    mean Dice, all from one confusion matrix (``val_dice`` = mIoU, the model selection key). Sums are
    all-reduced over ranks. With ``keep_probs`` returns {dataset index: uint8 [H, W] probability*255}
    (binary) or class ids (multi-class) for the out-of-fold file.
    """
    model.eval()
    binary = cfg.model.classes == 1
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss*n, dice, iou, n
    k = max(2, cfg.model.classes)
    cm = torch.zeros(k, k, dtype=torch.int64, device=device)
    kept: dict[int, np.ndarray] = {}
    for batch in loader:
        x = batch[IMAGE].to(device, non_blocking=True)
        y = batch[MASK].to(device, non_blocking=True)
        with autocast_ctx(device, cfg.train.amp):
            if tta_name == "none":
                logits = model(x)
                loss = loss_fn(logits, y).detach()
                probs = torch.sigmoid(logits.float()) if binary else torch.softmax(logits.float(), 1)
            else:  # the out-of-fold pass: probabilities exactly as the submission makes them, no loss
                probs = tta.predict_tta(model, x, tta_name, "sigmoid" if binary else "softmax")
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
        if keep_probs:
            out = (probs[:, 0] * 255).round().to(torch.uint8) if binary else pred.to(torch.uint8)
            for i, arr in zip(batch[INDEX].tolist(), out.cpu().numpy()):
                kept[i] = arr
    all_reduce_sum(sums, d)
    all_reduce_sum(cm, d)
    n = max(1.0, float(sums[3]))
    metrics = {"val_loss": float(sums[0]) / n}
    cm_np = cm.cpu().numpy()
    if binary:
        metrics["val_dice"] = float(sums[1]) / n
        metrics["val_iou"] = float(sums[2]) / n
        metrics["val_acc"] = float(pixel_accuracy(cm_np))
    else:
        cmm = all_metrics(cm_np)
        metrics["val_miou"] = cmm["mean_iou"]
        metrics["val_dice"] = metrics["val_miou"]  # model selection key for multi-class
        metrics["val_iou"] = metrics["val_miou"]
        metrics["val_acc"] = cmm["pixel_accuracy"]
        metrics["val_mean_acc"] = cmm["mean_pixel_accuracy"]
        metrics["val_fw_iou"] = cmm["fw_iou"]
        metrics["val_mdice"] = cmm["mean_dice"]
    return metrics, kept


# ----------------------------------------------------------------------------- one fold


@dataclass
class FoldResult:
    fold: int
    best_dice: float
    best_epoch: int
    epochs_run: int
    oof_path: Path | None


def _write_metrics(fold_dir: Path, history: list[dict[str, float]]) -> None:
    df = pd.DataFrame(history)
    with atomic_write(fold_dir / "metrics.csv", "w") as f:
        df.to_csv(f, index=False)
    try:
        from pipeline.viz import learning_curves

        fig = learning_curves({int(fold_dir.name.removeprefix("fold")): df})
        with atomic_write(fold_dir / "curve.png", "wb") as f:
            fig.savefig(f, format="png", dpi=90)
        import matplotlib.pyplot as plt

        plt.close(fig)
    except ImportError:  # plotting is optional; metrics.csv is the record
        pass


@dataclass
class FoldProgress:
    """Where a fold's training stands; saved in ``last.pt`` so a rerun resumes exactly there.

    ``partial_loss`` is (loss sum, steps) of an unfinished epoch, so its mean survives a resume.
    """

    epoch: int = 0  # finished epochs
    step_in_epoch: int = 0
    global_step: int = 0
    best_dice: float = -1.0
    best_epoch: int = -1
    bad_epochs: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    partial_loss: tuple[float, int] = (0.0, 0)

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


@dataclass
class FoldData:
    """One fold's splits, datasets and loaders (validation sharded over ranks without padding)."""

    train_ds: SegDataset
    val_ds: SegDataset
    sampler: ResumableSampler
    train_loader: DataLoader
    val_loader: DataLoader


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
    crop, ignore = cfg.data.crop_size, cfg.loss.ignore_index if cfg.loss.ignore_index is not None else 0
    train_ds = SegDataset(
        train_split, build_transforms(cfg.aug, True, crop, ignore), seed=cfg.train.seed + fold
    )
    val_ds = SegDataset(val_split, build_transforms(cfg.aug, False, crop, ignore))
    sampler = ResumableSampler(train_ds, d, seed=cfg.train.seed + fold)
    if len(sampler) < cfg.train.batch_size:
        raise TrainingError(
            f"fold {fold}: {len(train_split)} training tiles per process is less than one batch of "
            f"{cfg.train.batch_size}; lower train.batch_size"
        )
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


def build_training(cfg: Config, device: torch.device, d: Dist = Dist(), pretrained: bool = True) -> TrainStep:
    """Model, loss, AdamW (no weight decay on norms and biases), fp16 scaler, EMA, DDP and compile wrappers.

    The one place a training step is assembled: ``train_fold`` and the benchmarks share it.
    """
    model = build_model(cfg, pretrained=pretrained).to(device)
    if device.type == "cuda" and cfg.train.channels_last:
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
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" and cfg.train.amp == "fp16" else None
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
    return TrainStep(model, fwd, loss_fn, optimizer, scaler, ema, cfg, device)


def train_fold(
    cfg: Config,
    source: Source,
    folds_df: pd.DataFrame,
    fold: int,
    run_dir: Path,
    d: Dist,
    resume: bool = True,
) -> FoldResult:
    """Train one fold; return its best validation Dice. Writes only on rank 0."""
    device = pick_device(cfg.train.device, d)
    seed_everything(cfg.train.seed + fold, cfg.train.deterministic)
    fold_dir = run_dir / f"fold{fold}"
    last_path, best_path = fold_dir / "last.pt", fold_dir / "best.pt"
    data = fold_data(cfg, source, folds_df, fold, d, device)
    resuming = resume and last_path.is_file()

    train_step = build_training(cfg, device, d, pretrained=not resuming)
    model, loss_fn, optimizer = train_step.model, train_step.loss_fn, train_step.optimizer
    scaler, ema = train_step.scaler, train_step.ema

    steps_per_epoch = len(data.sampler) // cfg.train.batch_size
    if cfg.train.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.train.max_steps_per_epoch)
    total_steps = steps_per_epoch * cfg.train.epochs
    warmup = int(cfg.optim.warmup_epochs * steps_per_epoch)

    prog = FoldProgress()
    if resuming:
        state = load_checkpoint(last_path, map_location=device)
        if state.get("config") != to_dict(cfg):
            raise TrainingError(
                f"{last_path} was written with a different config; resume with the same config, or start "
                f"afresh with a new run name (name=...) or RESUME=0 after deleting {fold_dir}"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        if ema is not None and state.get("ema"):
            ema.load_state_dict(state["ema"])
        prog = FoldProgress.from_state(state)
        if d.main:
            print(f"fold {fold}: resuming at epoch {prog.epoch + 1}, step {prog.step_in_epoch} ({last_path})")
    elif d.main:
        fold_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, fold_dir / "config.yaml")

    train_step.step.fill_(prog.global_step)
    eval_model = ema.module if ema is not None else model

    def checkpoint() -> None:
        if d.main:
            save_checkpoint(
                last_path,
                {
                    "model": model.state_dict(),
                    "config": to_dict(cfg),
                    "fold": fold,
                    "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict() if scaler else None,
                    "ema": ema.state_dict() if ema is not None else None,
                    **prog.state(),
                },
            )

    if prog.stopped(cfg) and d.main:
        print(f"fold {fold}: already finished ({prog.epoch} epochs)")
    loss_sum, n_steps = torch.zeros((), device=device), 0
    try:
        with save_on_signal():
            while not prog.stopped(cfg):
                epoch = prog.epoch
                model.train()
                data.train_ds.set_epoch(epoch)
                data.sampler.set_epoch(epoch)
                data.sampler.skip = prog.step_in_epoch * cfg.train.batch_size
                t0 = time.time()
                loss_sum = torch.full((), prog.partial_loss[0], dtype=torch.float32, device=device)
                n_steps = prog.partial_loss[1]
                bar = _progress(
                    steps_per_epoch,
                    prog.step_in_epoch,
                    f"fold {fold} epoch {epoch + 1}/{cfg.train.epochs}",
                    d,
                )
                for batch in data.train_loader:
                    if prog.step_in_epoch >= steps_per_epoch:
                        break
                    lr = lr_at(prog.global_step, total_steps, warmup, cfg.optim.lr, cfg.optim.min_lr_ratio)
                    loss_sum += train_step(batch[IMAGE], batch[MASK], lr)
                    n_steps += 1
                    prog.step_in_epoch += 1
                    prog.global_step += 1
                    prog.partial_loss = (0.0, 0)  # live in loss_sum/n_steps until saved
                    if prog.step_in_epoch % 10 == 0 or prog.step_in_epoch == steps_per_epoch:
                        train_step.check_finite(fold, epoch)  # one host sync per 10 steps, not per step
                        if bar is not None:
                            last = prog.history[-1]["val_dice"] if prog.history else float("nan")
                            bar.set_postfix(loss=f"{float(loss_sum) / n_steps:.4f}", val_dice=f"{last:.4f}")
                    if bar is not None:
                        bar.update(1)
                if bar is not None:
                    bar.close()
                train_step.check_finite(fold, epoch)  # never checkpoint a model that saw a non-finite loss
                train_loss = float(all_reduce_sum(loss_sum.double().clone(), d)) / max(1, n_steps * d.world)
                metrics, _ = evaluate(eval_model, data.val_loader, loss_fn, cfg, device, d)
                row = {
                    "epoch": epoch + 1,
                    "train_loss": train_loss,
                    **metrics,
                    "lr": optimizer.param_groups[0]["lr"],
                    "seconds": time.time() - t0,
                }
                prog.history.append(row)
                improved = metrics["val_dice"] > prog.best_dice
                if improved:
                    prog.best_dice, prog.best_epoch, prog.bad_epochs = metrics["val_dice"], epoch + 1, 0
                    if d.main:
                        save_checkpoint(
                            best_path,
                            {
                                "model": eval_model.state_dict(),
                                "config": to_dict(cfg),
                                "fold": fold,
                                "epoch": epoch + 1,
                                "val_dice": prog.best_dice,
                                "threshold": cfg.infer.threshold,
                                "min_area": cfg.infer.min_area,
                            },
                        )
                else:
                    prog.bad_epochs += 1
                prog.epoch, prog.step_in_epoch, prog.partial_loss = epoch + 1, 0, (0.0, 0)
                loss_sum, n_steps = torch.zeros((), device=device), 0
                checkpoint()
                if d.main:
                    _write_metrics(fold_dir, prog.history)
                    print(
                        f"fold {fold} epoch {epoch + 1}: loss {train_loss:.4f} "
                        f"val_loss {metrics['val_loss']:.4f} "
                        f"dice {metrics['val_dice']:.4f} iou {metrics['val_iou']:.4f}"
                        f"{' *' if improved else ''} ({row['seconds']:.1f}s)",
                        flush=True,
                    )
    except (KeyboardInterrupt, _Interrupted) as e:
        prog.partial_loss = (float(loss_sum), n_steps)
        checkpoint()
        if d.main:
            print(
                f"\nfold {fold}: interrupted ({type(e).__name__} {e}) at epoch {prog.epoch + 1}, "
                f"step {prog.step_in_epoch}; saved {last_path}. Run the same command with RESUME=1 "
                "(--resume) to continue.",
                file=sys.stderr,
            )
        raise SystemExit(130) from None
    except torch.cuda.OutOfMemoryError:
        raise TrainingError(
            f"CUDA out of memory at batch size {cfg.train.batch_size}: use train.batch_size="
            f"{max(1, cfg.train.batch_size // 2)} (and optim.lr scaled down by the same factor), "
            "or train.amp=bf16"
        ) from None

    barrier(d)
    oof_path = (
        write_oof(cfg, eval_model, loss_fn, data.val_ds, best_path, fold_dir / "oof.npz", device)
        if d.main
        else None
    )
    barrier(d)
    return FoldResult(fold, prog.best_dice, prog.best_epoch, len(prog.history), oof_path)


def write_oof(
    cfg: Config,
    model: torch.nn.Module,
    loss_fn: Any,
    val_ds: SegDataset,
    best_path: Path,
    out: Path,
    device: torch.device,
) -> Path:
    """Predict the fold's validation tiles with its best weights (and the submission's TTA) -> oof.npz."""
    if not best_path.is_file():
        raise TrainingError(f"{best_path} was never written (no epoch ran?)")
    model.load_state_dict(load_checkpoint(best_path, map_location=device)["model"])
    loader = make_loader(val_ds, cfg, device)
    _, kept = evaluate(model, loader, loss_fn, cfg, device, Dist(), tta_name=cfg.infer.tta, keep_probs=True)
    with atomic_write(out, "wb") as f:
        np.savez_compressed(
            f, names=np.array(val_ds.split.names), probs=np.stack([kept[i] for i in range(len(val_ds))])
        )
    return out


def _progress(total: int, initial: int, desc: str, d: Dist) -> Any:
    if not d.main:
        return None
    from tqdm import tqdm  # not tqdm.auto: it warns in Jupyter without ipywidgets

    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        leave=False,
        dynamic_ncols=True,
        disable=not sys.stderr.isatty() and os.environ.get("BUILDSEG_PROGRESS") != "1",
    )


# ----------------------------------------------------------------------------- folds + OOF search


def resolve_folds(cfg: Config, source: Source, run_dir: Path) -> pd.DataFrame:
    """folds.csv from ``data.folds_csv`` or ``<root>/folds.csv``, else made from the seed (kept in run)."""
    root = Path(cfg.data.root)
    candidates = (
        [Path(cfg.data.folds_csv)] if cfg.data.folds_csv else [root / "folds.csv", run_dir / "folds.csv"]
    )
    for path in candidates:
        if path.is_file():
            df = folds_mod.load_folds(path, source.train.names)
            break
    else:
        if cfg.data.folds_csv:
            raise DataError(f"data.folds_csv={cfg.data.folds_csv} not found; make it with `make folds`")
        # An explicit data.group_csv must exist; the default <root>/manifest.csv is used only when present
        # (VOC and Cityscapes folders have none).
        group_csv = Path(cfg.data.group_csv) if cfg.data.group_csv else root / "manifest.csv"
        groups = (
            folds_mod.read_groups(group_csv, source.train.names)
            if cfg.data.group_csv or group_csv.is_file()
            else None
        )
        # Stratify binary runs by building fraction, multi-class runs by the labelled non-background fraction.
        fractions = (
            source.train.building_fraction()
            if cfg.model.classes == 1
            else foreground_fraction(source.train, cfg.loss.ignore_index)
        )
        df = folds_mod.make_folds(source.train.names, fractions, cfg.data.n_folds, cfg.train.seed, groups)
    n = int(df["fold"].max()) + 1
    if n != cfg.data.n_folds:
        print(f"note: folds.csv has {n} folds; data.n_folds={cfg.data.n_folds} is ignored")
    return df


def tune_postprocess(cfg: Config, source: Source, run_dir: Path) -> dict[str, Any]:
    """Search threshold and min component area on every fold's OOF file; write the search table."""
    files = sorted(run_dir.glob("fold*/oof.npz"))
    if not files:
        raise TrainingError(f"no out-of-fold files in {run_dir}; train at least one fold")
    names, probs, per_fold = [], [], {}
    for f in files:
        with np.load(f) as z:
            fold_names, fold_probs = [str(n) for n in z["names"]], z["probs"]
        names += fold_names
        probs.append(fold_probs)
        per_fold[int(f.parent.name.removeprefix("fold"))] = (len(names) - len(fold_names), len(names))
    probs_all = np.concatenate(probs)
    if cfg.model.classes > 1:
        return _multiclass_oof(cfg, source, names, probs_all)
    truths = np.asarray(source.train.select(names).masks)
    result = postprocess.search_threshold(probs_all, truths, cfg.infer.thresholds, cfg.infer.min_areas)
    with atomic_write(run_dir / "threshold_search.csv", "w") as f:
        result.table.to_csv(f, index=False)
    rows = {}
    for fold, (a, b) in sorted(per_fold.items()):
        at_half = postprocess.mean_dice_at(probs_all[a:b], truths[a:b], 0.5, 0)
        tuned = postprocess.mean_dice_at(probs_all[a:b], truths[a:b], result.threshold, result.min_area)
        rows[fold] = {"n": b - a, "dice@0.5": at_half, "dice@tuned": tuned}
    return {
        "threshold": float(result.threshold),
        "min_area": int(result.min_area),
        "oof_dice": float(result.dice),
        "oof_dice@0.5": postprocess.mean_dice_at(probs_all, truths, 0.5, 0),
        "per_fold": rows,
        "n_oof": len(names),
    }


def _multiclass_oof(cfg: Config, source: Source, names: list[str], preds: np.ndarray) -> dict[str, Any]:
    """mIoU and pixel accuracy of the OOF class ids [N, h, w] from one confusion matrix.

    With ``data.crop_size`` the OOF predictions are of the validation view (pad + centre crop), so each
    truth goes through the same transform first; images may differ in size (VOC).
    """
    from pipeline.metrics import confusion_matrix

    ignore = cfg.loss.ignore_index if cfg.loss.ignore_index is not None else 0
    view = build_transforms(cfg.aug, False, cfg.data.crop_size, ignore)
    k = cfg.model.classes
    cm = np.zeros((k, k), dtype=np.int64)
    truths = source.train.select(names).masks
    for i, pred in enumerate(preds):
        truth = np.asarray(truths[i])
        if view is not None:
            truth = view(image=np.zeros((*truth.shape, 3), np.uint8), mask=truth)["mask"]
        cm += confusion_matrix(pred, truth, k, ignore_index=cfg.loss.ignore_index)
    return {
        "threshold": None,
        "min_area": None,
        "oof_miou": float(mean_iou(cm)),
        "oof_pixel_accuracy": float(pixel_accuracy(cm)),
        "per_fold": {},
        "n_oof": len(names),
    }


def check_source(cfg: Config, source: Source) -> None:
    """The data must fit the model: class count, ignore value, and one image size unless cropping."""
    k = max(2, cfg.model.classes)
    if source.num_classes != k:
        raise TrainingError(
            f"data.layout={cfg.data.layout} at {cfg.data.root} has {source.num_classes} classes "
            f"({', '.join(source.class_names[:4])}, ...) but model.classes={cfg.model.classes}; set "
            f"model.classes={source.num_classes if source.num_classes > 2 else 1}"
        )
    ignore = source.ignore_index
    if cfg.model.classes > 1 and ignore is not None and cfg.loss.ignore_index != ignore:
        raise TrainingError(
            f"the {cfg.data.layout} masks use {source.ignore_index} for unlabelled pixels; set "
            f"loss.ignore_index={source.ignore_index} (now {cfg.loss.ignore_index})"
        )
    if cfg.data.layout != "competition" and not cfg.data.crop_size:
        from pipeline.data import image_size

        sizes = {image_size(p) for p in source.train.image_paths}
        if len(sizes) > 1:
            raise TrainingError(
                f"the training images have {len(sizes)} different sizes (e.g. {sorted(sizes)[:3]}); set "
                "data.crop_size (e.g. 320) so batches pad and crop them to one size"
            )


def write_manifest(cfg: Config, run_dir: Path, tuned: dict[str, Any]) -> Path:
    """The ensemble description ``make submit`` reads (editable by hand)."""
    ckpts = sorted(str(p.relative_to(run_dir)) for p in run_dir.glob("fold*/best.pt"))
    threshold = tuned["threshold"] if tuned["threshold"] is not None else cfg.infer.threshold
    min_area = tuned["min_area"] if tuned["min_area"] is not None else cfg.infer.min_area
    manifest = {
        "run": run_dir.name,
        "data_root": cfg.data.root,
        "checkpoints": ckpts,
        "tta": cfg.infer.tta,
        "threshold": threshold,
        "min_area": min_area,
        "batch_size": cfg.infer.batch_size,
        "tile_size": cfg.infer.tile_size,
        "overlap": cfg.infer.overlap,
        "classes": cfg.model.classes,
        "oof": {k: v for k, v in tuned.items() if k not in ("threshold", "min_area")},
    }
    save_yaml(run_dir / "manifest.yaml", manifest)
    # The tuned values also travel inside each checkpoint, so a single .pt is self-sufficient.
    for c in ckpts:
        state = load_checkpoint(run_dir / c)
        state["threshold"], state["min_area"] = threshold, min_area
        save_checkpoint(run_dir / c, state)
    return run_dir / "manifest.yaml"


def format_table(tuned: dict[str, Any], results: Sequence[FoldResult]) -> str:
    best = {r.fold: r for r in results}
    if "oof_miou" in tuned:
        return (
            "fold  best val mIoU\n"
            + "\n".join(f"{r.fold:>4}  {r.best_dice:13.4f}" for r in results)
            + f"\nout-of-fold ({tuned['n_oof']} images): mIoU {tuned['oof_miou']:.4f}, "
            f"pixel accuracy {tuned['oof_pixel_accuracy']:.4f}"
        )
    lines = ["fold      n   val_dice(best)  oof_dice@0.5  oof_dice@tuned"]
    for fold, row in sorted(tuned.get("per_fold", {}).items()):
        b = f"{best[fold].best_dice:14.4f}" if fold in best else f"{'-':>14}"
        lines.append(f"{fold:>4} {row['n']:>6} {b}  {row['dice@0.5']:12.4f}  {row['dice@tuned']:14.4f}")
    if "oof_dice" in tuned:
        lines.append(
            f" all {tuned['n_oof']:>6} {'':>14}  {tuned['oof_dice@0.5']:12.4f}  {tuned['oof_dice']:14.4f}"
        )
        lines.append(f"threshold {tuned['threshold']:.2f}, min_area {tuned['min_area']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- entry point


def run(cfg: Config, folds: Sequence[int] | None = None, resume: bool = True) -> Path:
    """Train the given folds (default: all) of ``cfg`` and tune post-processing; returns the run folder."""
    d = init_distributed(
        "cuda"
        if cfg.train.device.startswith("cuda") or (cfg.train.device == "auto" and torch.cuda.is_available())
        else "cpu"
    )
    run_dir = Path(cfg.train.runs_dir) / run_name(cfg)
    if d.main:
        from pipeline.check_data import require_clean

        require_clean(cfg.data, train=True, test=False)
    source = read_source(cfg.data, with_test=False)
    check_source(cfg, source)
    folds_df = resolve_folds(cfg, source, run_dir)
    if d.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        with atomic_write(run_dir / "folds.csv", "w") as f:
            folds_df.to_csv(f, index=False)
    n_folds = int(folds_df["fold"].max()) + 1
    todo = list(folds) if folds is not None else list(range(n_folds))
    bad = [f for f in todo if not 0 <= f < n_folds]
    if bad:
        raise TrainingError(f"folds {bad} do not exist; folds.csv has folds 0..{n_folds - 1}")
    results = [train_fold(cfg, source, folds_df, f, run_dir, d, resume=resume) for f in todo]
    if d.main:
        tuned = tune_postprocess(cfg, source, run_dir)
        manifest = write_manifest(cfg, run_dir, tuned)
        print(format_table(tuned, results))
        print(f"run: {run_dir}   manifest: {manifest}")
    barrier(d)
    if d.world > 1:
        dist.destroy_process_group()
    return run_dir


def parse_args(argv: Sequence[str] | None) -> tuple[Config, list[int] | None, bool]:
    p = argparse.ArgumentParser(prog="python -m pipeline.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/default.yaml", help="YAML recipe (configs/*.yaml)")
    p.add_argument("--folds", default="", help="comma-separated folds to train, e.g. 0,1 (default: all)")
    p.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="continue from last.pt when present (default); --no-resume starts the folds afresh",
    )
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.epochs=3 data.root=data/real")
    a = p.parse_args(argv)
    cfg = load_config(a.config, a.overrides)
    folds = [int(f) for f in a.folds.split(",") if f.strip()] if a.folds else None
    return cfg, folds, a.resume


def main(argv: Sequence[str] | None = None) -> int:
    try:
        cfg, folds, resume = parse_args(argv)
        run(cfg, folds, resume)
    except (ConfigError, DataError, TrainingError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
