"""The training engine: one-batch overfit, EMA, gradient clipping, signals, BatchNorm statistics, and
validation (``evaluate``) with known answers."""

from __future__ import annotations

import pytest
import torch

from pipeline.data.dataset import IMAGE, INDEX, MASK, SegDataset
from pipeline.data.layouts import read_source
from pipeline.model.losses import build_loss
from pipeline.model.registry import build_model
from pipeline.train import engine


def test_one_batch_overfit(tiny_cfg):
    """A model must be able to memorise one batch: the loss falls well below its start."""
    cfg = tiny_cfg("aug.d4=false", "aug.shift_scale_rotate_p=0", "aug.color_p=0")
    torch.manual_seed(0)
    source = read_source(cfg.data, with_test=False)
    ds = SegDataset(
        source.train.subset([i for i in range(len(source.train)) if source.train.masks[i].any()][:4])
    )
    batch = torch.utils.data.default_collate([ds[i] for i in range(4)])
    model = build_model(cfg)
    loss_fn = build_loss(cfg.model, cfg.loss)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    step = engine.TrainStep(model, model, loss_fn, opt, None, None, cfg, torch.device("cpu"))
    model.train()
    losses = [float(step(batch[IMAGE], batch[MASK], 3e-3)) for _ in range(60)]
    assert losses[-1] < 0.35 * losses[0], losses[::10]
    assert losses[-1] < 0.25


def _batch_and_step(tiny_cfg, *overrides: str):
    cfg = tiny_cfg("aug.d4=false", "aug.shift_scale_rotate_p=0", "aug.color_p=0", *overrides)
    torch.manual_seed(0)
    source = read_source(cfg.data, with_test=False)
    ds = SegDataset(source.train.subset(range(4)))
    batch = torch.utils.data.default_collate([ds[i] for i in range(4)])
    step = engine.build_training(cfg, torch.device("cpu"), pretrained=False)
    step.model.train()
    return batch, step


def _grad_norm(model: torch.nn.Module) -> float:
    grads = [p.grad.detach().flatten() for p in model.parameters() if p.grad is not None]
    return float(torch.cat(grads).norm())


def test_grad_clip_bounds_the_gradient_norm(tiny_cfg):
    batch, free = _batch_and_step(tiny_cfg)
    free(batch[IMAGE], batch[MASK], 1e-3)
    assert _grad_norm(free.model) > 0.05  # so the bound below is a real constraint
    batch, clipped = _batch_and_step(tiny_cfg, "optim.grad_clip=0.05")
    clipped(batch[IMAGE], batch[MASK], 1e-3)
    assert _grad_norm(clipped.model) == pytest.approx(0.05, rel=1e-4)


def test_ema_follows_the_weights_by_its_decay(tiny_cfg):
    batch, step = _batch_and_step(tiny_cfg, "train.ema=0.5")
    expected = None
    for _ in range(3):
        step(batch[IMAGE], batch[MASK], 1e-3)
        now = {k: v.detach().clone() for k, v in step.model.state_dict().items() if v.is_floating_point()}
        # AveragedModel: the first update copies, later ones blend decay * ema + (1 - decay) * weights
        expected = now if expected is None else {k: 0.5 * expected[k] + 0.5 * now[k] for k in now}
    ema = step.ema.module.state_dict()
    for k, v in expected.items():
        torch.testing.assert_close(ema[k], v, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(ema[k], step.model.state_dict()[k]) for k in expected)


def test_a_signal_is_a_request_the_loop_honours_between_steps():
    """SIGTERM and Ctrl-C only record a request; the loop raises at a step boundary (check); a second
    signal stops at once. The previous handlers come back."""
    import os
    import signal

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with engine.save_on_signal() as stop:
        os.kill(os.getpid(), signal.SIGTERM)  # lands here, mid-"step": nothing is raised
        assert stop.signal == "SIGTERM"
        with pytest.raises(engine.Interrupted, match="SIGTERM"):
            stop.check()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_update_bn_gives_the_exact_mean_and_variance_of_one_pass():
    """Known answer: after update_bn, a BatchNorm's statistics are the mean and unbiased variance of
    every pixel it saw in the pass (not an exponential average; the variance is the mean of the batches'
    unbiased variances, as BatchNorm's cumulative mode keeps it), and its momentum and mode are restored."""
    net = torch.nn.Sequential(torch.nn.BatchNorm2d(3)).eval()
    net[0].running_mean.fill_(5.0)
    g = torch.Generator().manual_seed(0)
    batches = [{engine.IMAGE: torch.randint(0, 256, (2, 3, 4, 4), generator=g).float()} for _ in range(3)]
    engine.update_bn(net, batches, torch.device("cpu"), "none")
    x = torch.cat([b[engine.IMAGE] for b in batches])
    torch.testing.assert_close(net[0].running_mean, x.mean((0, 2, 3)))
    per_batch_var = torch.stack([b[engine.IMAGE].var((0, 2, 3)) for b in batches]).mean(0)
    torch.testing.assert_close(net[0].running_var, per_batch_var)
    assert net[0].momentum == 0.1 and not net.training


class ImageIsLogits(torch.nn.Module):
    """A fixed "model": the first ``k`` image channels are its logits, so every prediction is chosen."""

    def __init__(self, k: int = 1):
        super().__init__()
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, : self.k].float()


def _batches(logits: torch.Tensor, masks: torch.Tensor, sizes: list[int]) -> list[dict]:
    out, i = [], 0
    for n in sizes:
        out.append({IMAGE: logits[i : i + n], MASK: masks[i : i + n], INDEX: torch.arange(i, i + n)})
        i += n
    return out


def test_evaluate_binary_known_answer():
    """Three 4x4 tiles, predictions at p = 0.75 (logit ln 3) or 0.25, in batches of 2 and 1:
    A: truth the top row, predicted with one pixel more (Dice 8/9, IoU 4/5); B: empty and predicted empty
    (1 and 1, the competition's convention); C: two pixels, none predicted (0 and 0)."""
    import math

    import numpy as np
    import torch.nn.functional as F

    from pipeline.core.config import load_config
    from pipeline.core.device import Dist

    truth = torch.zeros(3, 4, 4, dtype=torch.uint8)
    truth[0, 0, :] = 1
    truth[2, 3, 2:] = 1
    pred = torch.zeros(3, 4, 4, dtype=torch.bool)
    pred[0, 0, :] = True
    pred[0, 1, 0] = True
    logits = torch.where(pred, math.log(3), -math.log(3)).unsqueeze(1).repeat(1, 3, 1, 1)
    batches = _batches(logits, truth, [2, 1])
    cfg = load_config(None, ["train.device=cpu"])

    def bce(out: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(out[:, 0], mask.float())

    cpu = torch.device("cpu")
    metrics = engine.evaluate(ImageIsLogits(), batches, bce, cfg, cpu, Dist())
    right, wrong = math.log(4 / 3), math.log(4)  # BCE of a pixel at p = 0.75 on the right / wrong side
    batch_losses = [(31 * right + wrong) / 32, (14 * right + 2 * wrong) / 16]  # 1 and 2 wrong pixels
    assert metrics["val_loss"] == pytest.approx((2 * batch_losses[0] + batch_losses[1]) / 3, rel=1e-6)
    assert metrics["val_dice"] == pytest.approx((8 / 9 + 1 + 0) / 3, rel=1e-6)
    assert metrics["val_iou"] == pytest.approx((4 / 5 + 1 + 0) / 3, rel=1e-6)
    assert metrics["val_acc"] == pytest.approx(45 / 48)  # one false positive, two false negatives
    # The OOF pass: TTA, no loss, and each tile's uint8 round(p * 255) to the sink with its index.
    got: dict[int, np.ndarray] = {}
    metrics = engine.evaluate(
        ImageIsLogits(), batches, bce, cfg, cpu, Dist(), "flip", lambda i, a: got.update(zip(i, a))
    )
    assert math.isnan(metrics["val_loss"]) and metrics["val_dice"] == pytest.approx((8 / 9 + 1) / 3, rel=1e-6)
    assert sorted(got) == [0, 1, 2]
    for i in range(3):
        np.testing.assert_array_equal(got[i], np.where(pred[i].numpy(), 191, 64))  # 0.75*255 = 191.25


def test_evaluate_multiclass_known_answer():
    """Two 2x2 images, 3 classes, one void pixel (255): the confusion matrix, truth by prediction, is
    [[2, 0, 1], [0, 3, 0], [0, 1, 0]], so IoU 2/3, 3/4, 0 and Dice 4/5, 6/7, 0 per class."""
    import math

    import numpy as np

    from pipeline.core.config import load_config
    from pipeline.core.device import Dist

    truth = torch.tensor([[[0, 1], [2, 255]], [[1, 1], [0, 0]]], dtype=torch.uint8)
    pred = torch.tensor([[[0, 1], [1, 2]], [[1, 1], [0, 2]]])
    logits = torch.nn.functional.one_hot(pred, 3).permute(0, 3, 1, 2).float() * 4
    cfg = load_config(None, ["train.device=cpu", "model.classes=3", "loss.ignore_index=255"])
    got: dict[int, np.ndarray] = {}
    metrics = engine.evaluate(
        ImageIsLogits(3),
        _batches(logits, truth, [1, 1]),
        None,
        cfg,
        torch.device("cpu"),
        Dist(),
        sink=lambda i, a: got.update(zip(i, a)),
    )
    assert math.isnan(metrics["val_loss"])
    assert metrics["val_miou"] == pytest.approx((2 / 3 + 3 / 4 + 0) / 3)
    assert metrics["val_acc"] == pytest.approx(5 / 7)
    assert metrics["val_mean_acc"] == pytest.approx((2 / 3 + 3 / 3 + 0) / 3)
    assert metrics["val_mdice"] == pytest.approx((4 / 5 + 6 / 7 + 0) / 3)
    assert metrics["val_fw_iou"] == pytest.approx(3 / 7 * 2 / 3 + 3 / 7 * 3 / 4 + 1 / 7 * 0)
    np.testing.assert_array_equal(np.stack([got[0], got[1]]), pred.numpy())  # class ids to the OOF file


def test_in_last_epochs():
    from pipeline.core.config import Config, TrainConfig

    cfg = Config(train=TrainConfig(epochs=5))
    assert [engine.in_last_epochs(e, 2, cfg) for e in range(5)] == [False, False, False, True, True]
    assert not any(engine.in_last_epochs(e, 0, cfg) for e in range(5))


class _ProcessGroup(torch.utils.data.Dataset):
    """Reports, from inside the worker, its process group and what SIGTERM does there."""

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> tuple[int, bool]:
        import os
        import signal

        return os.getpgrp(), signal.getsignal(signal.SIGTERM) == signal.SIG_IGN


def test_loader_workers_leave_group_signals_to_the_main_process(tiny_cfg):
    """A signal to the whole process group (timeout, a terminal's Ctrl-C) must not kill the workers: the
    main process saves at the end of its step, then the loader stops them. They are in a group of their
    own, and do not ignore SIGTERM (with which the loader and multiprocessing stop them)."""
    import os

    loader = engine.make_loader(
        _ProcessGroup(), tiny_cfg("data.num_workers=1"), torch.device("cpu"), batch_size=1
    )
    got = [(int(g), bool(ignored)) for g, ignored in loader]
    assert all(g != os.getpgrp() for g, _ in got) and not any(ignored for _, ignored in got)


EXIT_WITH_LIVE_WORKERS = """
import torch
from pipeline.core.config import load_config
from pipeline.train import engine

class DS(torch.utils.data.Dataset):
    def __len__(self): return 64
    def __getitem__(self, i): return torch.zeros(3)

cfg = load_config(None, ["data.num_workers=2"])
loader = engine.make_loader(DS(), cfg, torch.device("cpu"), batch_size=2)
with engine.save_on_signal():
    it = iter(loader)
    next(it)
KEEP = [it]  # persistent workers still alive when the interpreter exits
"""


def test_a_process_whose_loader_workers_are_alive_still_exits():
    """Workers that ignored SIGTERM made every such process hang at exit (the multiprocessing exit
    handler terminates them with it, then waits): the test suite and a proxy bench never ended."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", EXIT_WITH_LIVE_WORKERS], cwd=root, timeout=120)
    assert done.returncode == 0


def test_fold_sizes_count_tiles_per_process_as_the_sampler_does():
    """9 training tiles on 2 processes: the sampler (drop_last) gives each 4, less than a batch of 5; the
    check once rounded up to 5 and let a run of 0-step epochs through."""
    import pandas as pd

    from pipeline.core.config import Config, TrainConfig

    folds = pd.DataFrame({"name": [f"t{i}" for i in range(10)], "fold": [0] + [1] * 9})
    cfg = Config(train=TrainConfig(batch_size=5))
    engine.check_fold_sizes(cfg, folds, [0], world=1)  # 9 tiles, one process: a batch
    with pytest.raises(engine.TrainingError, match="fold 0: 4 training tiles per process is less than one"):
        engine.check_fold_sizes(cfg, folds, [0], world=2)
