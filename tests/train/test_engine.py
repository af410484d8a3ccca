"""The training engine: one-batch overfit, EMA, gradient clipping, validation."""

from __future__ import annotations

import pytest
import torch

from pipeline.data.dataset import IMAGE, MASK, SegDataset
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


def test_in_last_epochs():
    from pipeline.core.config import Config, TrainConfig

    cfg = Config(train=TrainConfig(epochs=5))
    assert [engine.in_last_epochs(e, 2, cfg) for e in range(5)] == [False, False, False, True, True]
    assert not any(engine.in_last_epochs(e, 0, cfg) for e in range(5))
