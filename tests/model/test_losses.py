"""pipeline.model.losses: known answers (hand-computed on 4-pixel tensors), numerics and the modules."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.core.config import LossConfig, ModelConfig
from pipeline.metrics.pixel import dice_per_image
from pipeline.model.losses import (
    BCEDiceLoss,
    CEDiceLoss,
    bce_dice_loss,
    build_loss,
    ce_dice_loss,
    dice_score,
    masked_bce_with_logits,
    masked_cross_entropy,
    multiclass_soft_dice,
    soft_dice_binary,
)

BIG = 100.0  # sigmoid(+-100) is exactly 1/0 in float32: logits that act as hard probabilities


def hard_logits(probs: list[float], shape=(1, 1, 2, 2)) -> torch.Tensor:
    """0/1 pattern -> logits +-BIG of ``shape``."""
    return (torch.tensor(probs, dtype=torch.float32) * 2 - 1).mul(BIG).reshape(shape)


def t4(values: list[float], shape=(1, 1, 2, 2)) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).reshape(shape)


# ----------------------------------------------------------------------------- binary Dice


def test_dice_score_known_answer_two_thirds():
    assert dice_score(t4([1, 1, 1, 1]), t4([1, 1, 0, 0])).item() == pytest.approx(2 / 3, abs=1e-7)
    assert dice_score(t4([1, 1, 1, 1]), t4([1, 1, 0, 0]), smooth=1.0).item() == pytest.approx(5 / 7, abs=1e-7)
    assert dice_score(t4([0.5, 0.5, 0, 0]), t4([1, 1, 0, 0])).item() == pytest.approx(2 / 3, abs=1e-7)


def test_dice_score_empty_cases():
    zero = t4([0, 0, 0, 0])
    assert dice_score(zero, zero).item() == 0.0  # 0/0 guarded by eps, not NaN
    assert dice_score(zero, zero, smooth=1.0).item() == 1.0  # the competition's empty/empty = 1


def test_soft_dice_binary_from_logits():
    logits = hard_logits([1, 1, 1, 1])
    assert soft_dice_binary(logits, t4([1, 1, 0, 0]), smooth=0.0).item() == pytest.approx(1 / 3, abs=1e-6)
    # Random logits: 1 - dice(sigmoid) by hand.
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 1, 8, 8, generator=g)
    target = (torch.rand(2, 1, 8, 8, generator=g) > 0.5).float()
    p = torch.sigmoid(logits)
    expected = 1 - (2 * (p * target).sum() + 1) / (p.sum() + target.sum() + 1)
    assert soft_dice_binary(logits, target).item() == pytest.approx(expected.item(), abs=1e-6)


def test_soft_dice_per_image_vs_batch_known_answer():
    # Image A: 4 true pixels predicted exactly. Image B: empty truth, 4 false-positive pixels.
    logits = hard_logits([1, 1, 1, 1, 0, 0, 0, 0] + [1, 1, 1, 1, 0, 0, 0, 0], shape=(2, 1, 2, 4))
    target = t4([1, 1, 1, 1, 0, 0, 0, 0] + [0] * 8, shape=(2, 1, 2, 4))
    # per image, smooth=1: A = 9/9 = 1, B = 1/(4+1) = 0.2 -> loss 1 - 0.6.
    assert soft_dice_binary(logits, target, per_image=True).item() == pytest.approx(0.4, abs=1e-6)
    # whole batch: inter 4, |P|+|T| = 8 + 4 -> 1 - 9/13.
    assert soft_dice_binary(logits, target, per_image=False).item() == pytest.approx(4 / 13, abs=1e-6)


def test_soft_dice_valid_mask_excludes_pixels():
    valid = t4([1, 1, 1, 0]).bool()
    # probs [1,1,1,(1)] vs target [1,1,0,(0)]: 2*2 / (3 + 2) = 0.8
    loss = soft_dice_binary(hard_logits([1, 1, 1, 1]), t4([1, 1, 0, 0]), smooth=0.0, valid=valid)
    assert loss.item() == pytest.approx(0.2, abs=1e-6)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.booleans()), min_size=1, max_size=64))
def test_dice_score_on_hard_masks_matches_competition_metric(pairs):
    pred = np.array([p for p, _ in pairs])
    truth = np.array([t for _, t in pairs])
    if not (pred.any() or truth.any()):
        return  # empty/empty: dice_score(smooth=0) is 0 by design, the metric says 1 (covered above)
    soft = dice_score(torch.from_numpy(pred).float(), torch.from_numpy(truth).float()).item()
    assert soft == pytest.approx(dice_per_image(pred[None, None], truth[None, None])[0], abs=1e-6)


# ----------------------------------------------------------------------------- BCE and combination


def test_bce_at_zero_logits_is_ln2_and_ignored_pixels_do_not_count():
    target = t4([1, 0, 1, 0])
    assert masked_bce_with_logits(torch.zeros(1, 1, 2, 2), target).item() == pytest.approx(
        math.log(2), abs=1e-6
    )
    logits = t4([0, 0, 0, -50])  # last pixel: confidently wrong, but ignored
    valid = t4([1, 1, 1, 0]).bool()
    target = t4([1, 0, 1, 1])
    assert masked_bce_with_logits(logits, target, valid).item() == pytest.approx(math.log(2), abs=1e-6)
    assert masked_bce_with_logits(logits, target, torch.zeros_like(valid)).item() == 0.0


def test_bce_dice_is_the_weighted_sum():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 1, 8, 8, generator=g)
    target = (torch.rand(2, 1, 8, 8, generator=g) > 0.7).float()
    bce = masked_bce_with_logits(logits, target)
    dice = soft_dice_binary(logits, target)
    got = bce_dice_loss(logits, target, ce_weight=0.3, dice_weight=0.7)
    assert got.item() == pytest.approx((0.3 * bce + 0.7 * dice).item(), abs=1e-6)
    assert bce_dice_loss(logits, target, 1.0, 0.0).item() == pytest.approx(bce.item(), abs=1e-7)


def test_binary_shape_errors_say_how_to_fix():
    with pytest.raises(ValueError, match="unsqueeze"):
        soft_dice_binary(torch.zeros(2, 1, 4, 4), torch.zeros(2, 4, 4))


# ----------------------------------------------------------------------------- multi-class


def test_cross_entropy_known_answers():
    logits = torch.zeros(1, 3, 2, 2)
    target = torch.tensor([[[0, 1], [2, 255]]])
    assert masked_cross_entropy(logits, target, 255).item() == pytest.approx(math.log(3), abs=1e-6)
    all_ignored = torch.full((1, 2, 2), 255)
    loss = masked_cross_entropy(logits, all_ignored, 255)
    assert loss.item() == 0.0  # F.cross_entropy(reduction="mean") would give NaN here


def test_multiclass_dice_known_answer_over_present_classes():
    # target [0,0,1,1], hard prediction [0,0,0,1]:
    # class 0: 2*2/(3+2) = 4/5; class 1: 2*1/(1+2) = 2/3; mean 11/15 (class 2 absent: excluded).
    pred = torch.tensor([0, 0, 0, 1]).reshape(1, 2, 2)
    logits = torch.nn.functional.one_hot(pred, 3).permute(0, 3, 1, 2).float() * 2 * BIG - BIG
    target = torch.tensor([0, 0, 1, 1]).reshape(1, 2, 2)
    loss = multiclass_soft_dice(logits, target, smooth=0.0)
    assert loss.item() == pytest.approx(1 - 11 / 15, abs=1e-6)
    # A perfect prediction scores 0 with or without smoothing.
    perfect = torch.nn.functional.one_hot(target, 3).permute(0, 3, 1, 2).float() * 2 * BIG - BIG
    assert multiclass_soft_dice(perfect, target).item() == pytest.approx(0.0, abs=1e-6)


def test_multiclass_dice_ignored_pixels_excluded():
    target = torch.tensor([0, 0, 1, 255]).reshape(1, 2, 2)
    pred_a = torch.tensor([0, 0, 1, 1]).reshape(1, 2, 2)
    pred_b = torch.tensor([0, 0, 1, 0]).reshape(1, 2, 2)  # differs only on the ignored pixel

    def logits(p):
        return torch.nn.functional.one_hot(p, 2).permute(0, 3, 1, 2).float() * 2 * BIG - BIG

    a = ce_dice_loss(logits(pred_a), target, 0.5, 0.5, ignore_index=255)
    b = ce_dice_loss(logits(pred_b), target, 0.5, 0.5, ignore_index=255)
    assert a.item() == pytest.approx(b.item(), abs=1e-6)
    assert a.item() == pytest.approx(0.0, abs=1e-6)  # perfect on the valid pixels
    all_ignored = torch.full((1, 2, 2), 255)
    assert ce_dice_loss(logits(pred_a), all_ignored, ignore_index=255).item() == 0.0


# ----------------------------------------------------------------------------- numerics under autocast


def _conv_logits(channels: int, size: int) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, channels, 3, padding=1)
    return conv, torch.randn(2, 3, size, size)


def test_binary_loss_under_bf16_autocast_is_float32_and_matches_fp32():
    conv, x = _conv_logits(1, 512)
    target = (torch.rand(2, 1, 512, 512) > 0.5).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = conv(x)
        assert logits.dtype == torch.bfloat16  # the case that matters: low-precision logits
        loss = bce_dice_loss(logits, target, 0.5, 0.5)
    assert loss.dtype == torch.float32
    reference = bce_dice_loss(logits.detach().float(), target, 0.5, 0.5)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)


def test_binary_dice_of_fp16_logits_does_not_overflow():
    # sum of 2*512*512 probabilities ~ 2.6e5 > fp16 max 65504: must be summed in float32.
    logits = torch.zeros(2, 1, 512, 512, dtype=torch.float16)
    target = torch.ones(2, 1, 512, 512)
    loss = soft_dice_binary(logits, target, smooth=0.0)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(1 - 2 * 0.5 / 1.5, abs=1e-6)  # p = 0.5 everywhere: dice 2/3


def test_multiclass_loss_under_bf16_autocast_is_float32_and_matches_fp32():
    conv, x = _conv_logits(4, 256)
    target = torch.randint(0, 4, (2, 256, 256))
    target[:, :8] = 255
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = conv(x)
        loss = ce_dice_loss(logits, target, 0.5, 0.5, ignore_index=255)
    assert logits.dtype == torch.bfloat16
    assert loss.dtype == torch.float32
    reference = ce_dice_loss(logits.detach().float(), target, 0.5, 0.5, ignore_index=255)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)


# ----------------------------------------------------------------------------- build_loss modules


def test_build_loss_binary_converts_uint8_mask():
    loss_fn = build_loss(ModelConfig(classes=1), LossConfig(ce_weight=0.4, dice_weight=0.6))
    assert isinstance(loss_fn, BCEDiceLoss)
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 1, 16, 16, generator=g)
    mask = (torch.rand(2, 16, 16, generator=g) > 0.5).to(torch.uint8)
    expected = bce_dice_loss(logits, mask.unsqueeze(1).float(), 0.4, 0.6, per_image=True)  # auto, binary
    assert loss_fn(logits, mask).item() == pytest.approx(expected.item(), abs=1e-7)


def test_build_loss_binary_ignore_index_has_zero_gradient_on_ignored_pixels():
    loss_fn = build_loss(ModelConfig(classes=1), LossConfig(ignore_index=255))
    mask = torch.zeros(2, 8, 8, dtype=torch.uint8)
    mask[:, 2:5, 2:5] = 1
    mask[:, 0, :] = 255
    logits = torch.randn(2, 1, 8, 8, requires_grad=True)
    loss = loss_fn(logits, mask)
    loss.backward()
    assert torch.all(logits.grad[:, :, 0, :] == 0)
    assert torch.all(logits.grad[:, :, 1:, :] != 0)
    # changing the logits on ignored pixels does not change the loss
    moved = logits.detach().clone()
    moved[:, :, 0, :] = 50.0
    assert loss_fn(moved, mask).item() == pytest.approx(loss.item(), abs=1e-7)


def test_build_loss_binary_rejects_0_255_masks():
    loss_fn = build_loss(ModelConfig(classes=1), LossConfig())
    mask = torch.zeros(1, 4, 4, dtype=torch.uint8)
    mask[0, 0, 0] = 255
    with pytest.raises(ValueError, match="0/1"):
        loss_fn(torch.zeros(1, 1, 4, 4), mask)
    with pytest.raises(TypeError, match="integer class ids"):
        loss_fn(torch.zeros(1, 1, 4, 4), mask.float())
    with pytest.raises(ValueError, match=r"mask \[B,H,W\]"):
        loss_fn(torch.zeros(1, 1, 4, 4), mask.unsqueeze(1))


def test_build_loss_multiclass():
    loss_fn = build_loss(ModelConfig(classes=3), LossConfig(ignore_index=255))
    assert isinstance(loss_fn, CEDiceLoss)
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 8, 8, generator=g)
    mask = torch.randint(0, 3, (2, 8, 8), generator=g).to(torch.uint8)
    mask[0, 0] = 255
    expected = ce_dice_loss(logits, mask.long(), 0.5, 0.5, ignore_index=255)
    assert loss_fn(logits, mask).item() == pytest.approx(expected.item(), abs=1e-7)
    no_ignore = build_loss(ModelConfig(classes=3), LossConfig())
    with pytest.raises(ValueError, match="ignore_index"):
        no_ignore(logits, mask)


@pytest.mark.parametrize("classes", [1, 3])
def test_loss_falls_when_fitting_one_batch(classes):
    """Optimising free logits against one mask must drive the loss down: checks gradient signs."""
    torch.manual_seed(0)
    loss_fn = build_loss(ModelConfig(classes=classes), LossConfig())
    mask = torch.randint(0, max(classes, 2), (2, 16, 16), dtype=torch.uint8)
    logits = torch.zeros(2, classes, 16, 16, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=0.1)
    first = loss_fn(logits, mask).item()
    for _ in range(60):
        opt.zero_grad()
        loss = loss_fn(logits, mask)
        loss.backward()
        opt.step()
    assert loss.item() < 0.1 * first


def test_value_check_runs_on_every_cpu_batch_and_once_on_accelerators():
    from types import SimpleNamespace

    from pipeline.model.losses import _check_due

    loss_fn = BCEDiceLoss()
    cpu = torch.zeros(1, 2, 2, dtype=torch.uint8)
    assert [_check_due(loss_fn, cpu) for _ in range(3)] == [True, True, True]
    cuda_like = SimpleNamespace(device=torch.device("cuda"))  # only .device is read: no GPU needed
    assert [_check_due(loss_fn, cuda_like) for _ in range(3)] == [True, False, False]


# ----------------------------------------------------------------------------- Lovász hinge


def _iou(pred: torch.Tensor, truth: torch.Tensor) -> float:
    inter = (pred & truth).sum().item()
    union = (pred | truth).sum().item()
    return inter / union if union else 1.0


def test_lovasz_hinge_is_twice_the_jaccard_loss_at_unit_logits():
    """Known answer: with logits +-1 predicting a mask, the Lovász hinge is exactly 2 * (1 - IoU)."""
    from pipeline.model.losses import lovasz_hinge

    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        truth = torch.rand(1, 1, 12, 12, generator=g) > 0.6
        pred = torch.rand(1, 1, 12, 12, generator=g) > 0.5
        logits = pred.float() * 2 - 1
        got = lovasz_hinge(logits, truth.float())
        assert got.item() == pytest.approx(2 * (1 - _iou(pred, truth)), abs=1e-6)


def test_lovasz_hinge_known_values_and_batch_mean():
    from pipeline.model.losses import lovasz_hinge

    t = torch.zeros(2, 1, 2, 2)
    t[0, 0, 0, 0] = 1
    # Right with a margin of at least 1 everywhere: no hinge error, loss 0.
    assert lovasz_hinge(torch.where(t > 0, 3.0, -3.0), t).item() == pytest.approx(0.0)
    # One pixel, label 1, logit x: the loss is relu(1 - x).
    one = torch.ones(1, 1, 1, 1)
    assert lovasz_hinge(torch.full((1, 1, 1, 1), 0.25), one).item() == pytest.approx(0.75)
    # The batch value is the mean of the per-image values.
    logits = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    each = [lovasz_hinge(logits[i : i + 1], t[i : i + 1]).item() for i in range(2)]
    assert lovasz_hinge(logits, t).item() == pytest.approx(sum(each) / 2)


def test_lovasz_hinge_ignores_invalid_pixels_and_has_gradients():
    from pipeline.model.losses import lovasz_hinge

    t = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    logits = torch.tensor([[[[2.0, -2.0], [5.0, 2.0]]]], requires_grad=True)  # one wrong pixel
    valid = torch.tensor([[[[True, True], [False, True]]]])
    assert lovasz_hinge(logits, t, valid).item() == pytest.approx(0.0)  # the wrong pixel is ignored
    loss = lovasz_hinge(logits, t)
    loss.backward()
    assert loss.item() > 0 and logits.grad[0, 0, 1, 0] > 0  # pushes the wrong logit down


def test_binary_loss_adds_the_weighted_lovasz_term_and_finetune_is_lovasz_alone():
    from pipeline.core.config import LossConfig, ModelConfig
    from pipeline.model.losses import bce_dice_loss, build_loss, lovasz_hinge

    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 1, 8, 8, generator=g)
    mask = (torch.rand(2, 8, 8, generator=g) > 0.5).to(torch.uint8)
    target = mask.unsqueeze(1).float()
    cfg = LossConfig(lovasz_weight=0.7)
    got = build_loss(ModelConfig(classes=1), cfg)(logits, mask)
    want = bce_dice_loss(logits, target, per_image=True) + 0.7 * lovasz_hinge(logits, target)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    finetune = build_loss(ModelConfig(classes=1), cfg, finetune=True)(logits, mask)
    assert finetune.item() == pytest.approx(lovasz_hinge(logits, target).item(), rel=1e-6)


def test_lovasz_is_refused_for_multiclass_and_counts_as_a_loss_term():
    from pipeline.core.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="loss.lovasz_weight and loss.lovasz_epochs are for binary runs"):
        load_config(None, ["model.classes=3", "loss.lovasz_weight=1", "model.encoder_weights=null"])
    cfg = load_config(None, ["loss.ce_weight=0", "loss.dice_weight=0", "loss.lovasz_weight=1"])
    assert cfg.loss.lovasz_weight == 1.0


def _loss_of(cfg):
    return build_loss(cfg.model, cfg.loss)


def test_dice_per_image_is_a_config_key_that_reaches_the_loss():
    from pipeline.core.config import load_config

    logits = torch.tensor([[[[4.0, -4.0]]], [[[-4.0, -4.0]]]])  # tile 0 half found, tile 1 empty and right
    mask = torch.tensor([[[1, 1]], [[0, 0]]], dtype=torch.uint8)
    batch = _loss_of(load_config(None, ["loss.ce_weight=0", "loss.dice_per_image=false"]))(logits, mask)
    per_image = _loss_of(load_config(None, ["loss.ce_weight=0", "loss.dice_per_image=true"]))(logits, mask)
    default = _loss_of(load_config(None, ["loss.ce_weight=0"]))(logits, mask)  # auto: per image when binary
    torch.testing.assert_close(default, per_image)
    # By hand (smooth 1, p = sigmoid(+-4)): batch Dice pools both tiles; per image, the empty tile scores 1.
    p, q = torch.sigmoid(torch.tensor(4.0)), torch.sigmoid(torch.tensor(-4.0))
    pooled = 1 - (2 * (p + q) + 1) / (p + 3 * q + 2 + 1)
    tile0 = 1 - (2 * (p + q) + 1) / (p + q + 2 + 1)
    tile1 = 1 - (0 + 1) / (2 * q + 0 + 1)
    torch.testing.assert_close(batch, 0.5 * pooled)
    torch.testing.assert_close(per_image, 0.5 * (tile0 + tile1) / 2)


def test_dice_per_image_auto_is_batch_dice_for_multiclass_and_true_is_refused_there():
    from pipeline.core.config import ConfigError, load_config

    assert load_config(None, ["model.classes=3", "model.encoder_weights=null"]).loss.dice_per_image == "auto"
    with pytest.raises(ConfigError, match="loss.dice_per_image is for binary runs"):
        load_config(None, ["model.classes=3", "model.encoder_weights=null", "loss.dice_per_image=true"])
    with pytest.raises(ConfigError, match="loss.dice_per_image must be true, false or auto, not 'sometimes'"):
        load_config(None, ["loss.dice_per_image=sometimes"])
