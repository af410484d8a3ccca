"""Known-answer tests for pipeline.metrics.pixel: hand-computed confusion matrices and competition Dice."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pipeline.metrics.pixel import (
    all_metrics,
    confusion_matrix,
    confusion_matrix_torch,
    dice_from_counts,
    dice_per_class,
    dice_per_image,
    dice_per_image_torch,
    format_report,
    fw_iou,
    iou_per_class,
    iou_per_image,
    iou_per_image_torch,
    mean_dice,
    mean_iou,
    mean_pixel_accuracy,
    metrics_report,
    pixel_accuracy,
)

# ----------------------------------------------------------------------------- confusion matrix

# Two classes. (truth, pred) pairs: (0,0) (1,1) (0,1) (0,0) (1,1) (1,0)
PRED2 = np.array([0, 1, 1, 0, 1, 0])
TRUE2 = np.array([0, 1, 0, 0, 1, 1])
CM2 = np.array([[2, 1], [1, 2]])

# Three classes with an ignored pixel; (truth, pred): (0,0) (0,1) (1,1) (2,2) [255 ignored] (1,0) (0,0)
PRED3 = np.array([[0, 1, 1], [2, 2, 0], [0, 0, 0]])
TRUE3 = np.array([[0, 0, 1], [2, 255, 1], [0, 255, 255]])
CM3 = np.array([[2, 1, 0], [1, 1, 0], [0, 0, 1]])


def test_confusion_matrix_two_classes_rows_are_truth():
    cm = confusion_matrix(PRED2, TRUE2, 2)
    np.testing.assert_array_equal(cm, CM2)
    assert cm.dtype == np.int64
    # asymmetric case pins the orientation: truth 0 predicted as 1 three times
    np.testing.assert_array_equal(confusion_matrix(np.ones(3, int), np.zeros(3, int), 2), [[0, 3], [0, 0]])


def test_confusion_matrix_three_classes_with_ignore():
    np.testing.assert_array_equal(confusion_matrix(PRED3, TRUE3, 3, ignore_index=255), CM3)
    with pytest.raises(ValueError, match="ignore_index"):
        confusion_matrix(PRED3, TRUE3, 3)
    with pytest.raises(ValueError, match="prediction"):
        confusion_matrix(PRED3 + 5, TRUE3, 3, ignore_index=255)
    with pytest.raises(TypeError, match="argmax"):
        confusion_matrix(PRED3.astype(float), TRUE3, 3, ignore_index=255)


def test_confusion_matrix_torch_matches_and_accepts_tensors():
    cm_t = confusion_matrix_torch(torch.from_numpy(PRED3), torch.from_numpy(TRUE3).to(torch.uint8), 3, 255)
    assert cm_t.dtype == torch.int64
    np.testing.assert_array_equal(cm_t.numpy(), CM3)
    np.testing.assert_array_equal(
        confusion_matrix(torch.from_numpy(PRED3), torch.from_numpy(TRUE3), 3, 255), CM3
    )
    with pytest.raises(ValueError, match="target"):
        confusion_matrix_torch(torch.from_numpy(PRED3), torch.from_numpy(TRUE3), 3)


@settings(max_examples=40, deadline=None)
@given(arrays(np.int64, st.integers(1, 200), elements=st.integers(0, 4)), st.integers(0, 2**31 - 1))
def test_confusion_matrix_torch_equals_numpy_and_loop(target, seed):
    pred = np.random.default_rng(seed).integers(0, 4, size=target.shape)
    target = np.where(target == 4, 255, target)
    cm = confusion_matrix(pred, target, 4, ignore_index=255)
    loop = np.zeros((4, 4), np.int64)
    for p, t in zip(pred, target):
        if t != 255:
            loop[t, p] += 1
    np.testing.assert_array_equal(cm, loop)
    np.testing.assert_array_equal(
        confusion_matrix_torch(torch.from_numpy(pred), torch.from_numpy(target), 4, 255), cm
    )


# ----------------------------------------------------------------------------- metrics of a matrix


def test_metrics_three_class_known_answers():
    # rows (truth) [3, 2, 1], cols (pred) [3, 2, 1], diag [2, 1, 1], 6 pixels
    assert pixel_accuracy(CM3) == pytest.approx(4 / 6)
    assert mean_pixel_accuracy(CM3) == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    np.testing.assert_allclose(iou_per_class(CM3), [2 / 4, 1 / 3, 1.0])
    assert mean_iou(CM3) == pytest.approx((1 / 2 + 1 / 3 + 1) / 3)
    assert fw_iou(CM3) == pytest.approx(3 / 6 * 1 / 2 + 2 / 6 * 1 / 3 + 1 / 6 * 1)
    np.testing.assert_allclose(dice_per_class(CM3), [4 / 6, 2 / 4, 1.0])


def test_metrics_two_class_known_answers():
    assert pixel_accuracy(CM2) == pytest.approx(4 / 6)
    np.testing.assert_allclose(iou_per_class(CM2), [0.5, 0.5])
    np.testing.assert_allclose(dice_per_class(CM2), [2 / 3, 2 / 3])


def test_absent_classes_are_nan_and_excluded_from_means():
    # class 2: absent from truth and prediction -> NaN; class 3: predicted only -> IoU 0 (counts).
    cm = np.array([[3, 0, 0, 1], [0, 2, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    iou = iou_per_class(cm)
    assert math.isnan(iou[2])
    np.testing.assert_allclose(iou[[0, 1, 3]], [3 / 4, 1.0, 0.0])
    assert mean_iou(cm) == pytest.approx((3 / 4 + 1 + 0) / 3)
    assert mean_pixel_accuracy(cm) == pytest.approx((3 / 4 + 1) / 2)  # recall undefined for 2 and 3
    assert fw_iou(cm) == pytest.approx(4 / 6 * 3 / 4 + 2 / 6 * 1)
    assert math.isnan(dice_per_class(cm)[2])


def test_empty_matrix_is_nan_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = all_metrics(np.zeros((2, 2), np.int64))
    assert all(math.isnan(v) for v in m.values())


def test_all_metrics_keys_and_values():
    m = all_metrics(CM3, class_names=["background", "building", "road"])
    assert m["iou/road"] == 1.0
    assert m["dice/building"] == pytest.approx(0.5)
    assert m["mean_iou"] == pytest.approx(mean_iou(CM3))
    assert m["mean_dice"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    assert set(m) >= {"pixel_accuracy", "mean_pixel_accuracy", "mean_iou", "fw_iou", "mean_dice"}
    assert all(isinstance(v, float) for v in m.values())
    assert "iou/0" in all_metrics(CM3)
    with pytest.raises(ValueError, match="class names"):
        all_metrics(CM3, ["a", "b"])


def test_metrics_report_known_answer():
    cm = np.array([[3, 1, 0], [0, 2, 0], [0, 0, 0]])  # rows = truth; class 2 absent everywhere
    r = metrics_report(cm, ["bg", "a", "b"])
    assert r["pixel_accuracy"] == pytest.approx(5 / 6)
    assert r["mean_pixel_accuracy"] == pytest.approx((3 / 4 + 1) / 2)
    assert [c["iou"] for c in r["per_class"]] == [pytest.approx(3 / 4), pytest.approx(2 / 3), None]
    assert r["mean_iou"] == pytest.approx((3 / 4 + 2 / 3) / 2)
    assert r["fw_iou"] == pytest.approx(4 / 6 * 3 / 4 + 2 / 6 * 2 / 3)
    assert r["per_class"][1]["dice"] == pytest.approx(4 / 5)
    assert r["per_class"][0]["truth_pixels"] == 4 and r["per_class"][1]["pred_pixels"] == 3
    json.dumps(r, allow_nan=False)  # None, not NaN: standard JSON
    text = format_report(r)
    assert "mean IoU       0.7083" in text and "b" in text.splitlines()[-1]


def test_format_report_known_table():
    r = metrics_report(np.array([[3, 1], [0, 0]]), ["background", "building"])  # no building in the truth
    assert format_report(r).splitlines() == [
        "pixel accuracy 0.7500   mean pixel accuracy 0.7500",
        "mean IoU       0.3750   frequency-weighted IoU 0.7500   mean Dice 0.4286",
        "class          IoU    Dice     acc  truth px   pred px",
        "background  0.7500  0.8571  0.7500         4         3",
        "building    0.0000  0.0000       -         0         1",
    ]


# ----------------------------------------------------------------------------- competition Dice


def _dice1(pred, truth) -> float:
    """Dice of one image [H, W], through the batch function."""
    return float(dice_per_image(np.asarray(pred)[None], np.asarray(truth)[None])[0])


def test_dice_from_counts_known_answers_and_empty_empty() -> None:
    # |P & T|, |P| + |T|: half-overlap 2 of 4 -> 2/3; empty/empty -> 1; FP on empty truth -> 0.
    np.testing.assert_allclose(
        dice_from_counts(np.array([2, 0, 0, 0]), np.array([6, 0, 1, 1])), [2 / 3, 1, 0, 0]
    )
    # Per class, empty/empty is undefined (NaN), not a free 1.
    out = dice_from_counts([3, 0], [4, 0], empty=float("nan"))
    assert out[0] == 1.5 and math.isnan(out[1]) and out.dtype == np.float64


def test_dice_of_one_image_known_answers():
    empty = np.zeros((2, 2), np.uint8)
    full = np.ones((2, 2), np.uint8)
    half = np.array([[1, 1], [0, 0]], np.uint8)
    assert _dice1(full, half) == pytest.approx(2 / 3)
    assert _dice1(empty, empty) == 1.0  # empty prediction on empty truth scores 1
    assert _dice1(empty, half) == 0.0
    assert _dice1(half, empty) == 0.0
    assert _dice1(half.astype(bool), half) == 1.0


def test_dice_rejects_probabilities_and_0_255():
    with pytest.raises(ValueError, match="threshold"):
        _dice1(np.full((2, 2), 0.7), np.ones((2, 2)))
    with pytest.raises(ValueError, match="255"):
        _dice1(np.ones((2, 2)), np.full((2, 2), 255))
    with pytest.raises(ValueError, match="equal shapes"):
        _dice1(np.ones((2, 2)), np.ones((2, 3)))


def test_dice_and_iou_per_image_known_answers():
    pred = np.array([[[1, 1], [1, 1]], [[0, 0], [0, 0]], [[0, 0], [0, 0]], [[1, 0], [0, 0]]])
    truth = np.array([[[1, 1], [0, 0]], [[0, 0], [0, 0]], [[1, 0], [0, 0]], [[1, 0], [0, 0]]])
    np.testing.assert_allclose(dice_per_image(pred, truth), [2 / 3, 1.0, 0.0, 1.0])
    np.testing.assert_allclose(iou_per_image(pred, truth), [1 / 2, 1.0, 0.0, 1.0])
    assert mean_dice(pred, truth) == pytest.approx((2 / 3 + 1 + 0 + 1) / 4)
    pt, tt = torch.from_numpy(pred).bool(), torch.from_numpy(truth).to(torch.uint8)
    np.testing.assert_allclose(dice_per_image_torch(pt, tt).numpy(), [2 / 3, 1.0, 0.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(iou_per_image_torch(pt, tt).numpy(), [1 / 2, 1.0, 0.0, 1.0], rtol=1e-6)
    assert dice_per_image_torch(pt, tt).dtype == torch.float32
    with pytest.raises(TypeError, match="threshold"):
        dice_per_image_torch(pt.float(), tt)
    with pytest.raises(ValueError, match="batch axis"):  # [H, W] would silently score rows as images
        dice_per_image(pred[0], truth[0])
    with pytest.raises(ValueError, match="batch axis"):
        iou_per_image_torch(pt[0], tt[0])


def test_mean_dice_over_images_of_different_sizes():
    preds = [np.ones((2, 2)), np.zeros((3, 5))]
    truths = [np.array([[1, 1], [0, 0]]), np.zeros((3, 5))]
    assert mean_dice(preds, truths) == pytest.approx((2 / 3 + 1) / 2)
    with pytest.raises(ValueError, match="1 truths"):
        mean_dice(preds, truths[:1])


@settings(max_examples=50, deadline=None)
@given(
    arrays(np.bool_, st.tuples(st.integers(1, 4), st.integers(1, 6), st.integers(1, 6))), st.integers(0, 99)
)
def test_vectorised_dice_equals_per_image_loop_and_torch(truth, seed):
    rng = np.random.default_rng(seed)
    pred = rng.random(truth.shape) < rng.random()
    # An independent per-image loop from the definition (not through pipeline.metrics.pixel).
    loop = np.array(
        [2 * (p & t).sum() / (p.sum() + t.sum()) if (p | t).any() else 1.0 for p, t in zip(pred, truth)]
    )
    np.testing.assert_allclose(dice_per_image(pred, truth), loop)
    np.testing.assert_allclose(mean_dice(list(pred), list(truth)), loop.mean())
    np.testing.assert_allclose(
        dice_per_image_torch(torch.from_numpy(pred), torch.from_numpy(truth)).numpy(), loop, rtol=1e-6
    )
    iou = iou_per_image(pred, truth)
    np.testing.assert_allclose(loop, 2 * iou / (1 + iou))  # Dice = 2 IoU / (1 + IoU), per image
