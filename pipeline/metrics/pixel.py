"""Segmentation metrics: confusion-matrix metrics (multi-class) and the competition's per-image Dice.

Confusion matrix ``cm`` [C, C], int64: ``cm[t, p]`` counts pixels of true class ``t`` predicted as
``p`` (rows = truth, columns = prediction). Accumulate it over a whole validation set (numpy with
:func:`confusion_matrix`, or on the GPU with :func:`confusion_matrix_torch`), then derive every
dataset-level metric from it with the functions below.

Absent classes. A class with no pixels in the truth *and* none in the prediction has an undefined
(0/0) IoU and Dice: it is NaN in the per-class arrays and excluded from the means (``nanmean``), so a
VOC validation subset without e.g. "sheep" is not credited with a free 1.0 nor penalised with a 0.
A class absent from the truth but predicted somewhere has IoU = Dice = 0 (false positives count).
Per-class accuracy (recall) is NaN for a class absent from the truth. A matrix with no pixel at all
gives NaN everywhere.

Dice. One rule, :func:`dice_from_counts`: ``2|P∩T| / (|P|+|T|)`` from pixel counts, with a chosen value
where both masks are empty. Per class (:func:`dice_per_class`) that value is NaN (absent class, see
above); per image (:func:`dice_per_image`, and the OOF threshold search in
:mod:`pipeline.metrics.postprocess`, which works on counts) it is 1. :func:`dice_per_image_torch` is the same
rule on the device, for validation without host syncs. The competition score is the mean over images
of the per-image Dice (:func:`mean_dice`): an image whose prediction and truth are both empty scores 1,
an empty prediction on a non-empty truth scores 0.

Reports. :func:`metrics_report` turns one confusion matrix into a JSON-ready dict (NaN -> None) and
:func:`format_report` into a plain-text table; ``make predict`` and ``make score`` print and
write them.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = [
    "all_metrics",
    "confusion_matrix",
    "confusion_matrix_torch",
    "dice_from_counts",
    "dice_per_class",
    "dice_per_image",
    "dice_per_image_torch",
    "format_report",
    "fw_iou",
    "iou_per_class",
    "iou_per_image",
    "iou_per_image_torch",
    "mean_dice",
    "mean_iou",
    "mean_pixel_accuracy",
    "metrics_report",
    "pixel_accuracy",
]


# ----------------------------------------------------------------------------- confusion matrix


def confusion_matrix(pred: Any, target: Any, num_classes: int, ignore_index: int | None = None) -> np.ndarray:
    """Confusion matrix [C, C] int64 (rows = truth) of integer label arrays of any equal shape.

    Args:
        pred: predicted class ids [N, ...] (numpy array or torch tensor; tensors are moved to the CPU).
        target: true class ids, same shape; pixels equal to ``ignore_index`` are not counted.
        num_classes: C. Any id outside ``0..C-1`` (other than ignored target pixels) is an error.
    """
    if isinstance(pred, torch.Tensor) or isinstance(target, torch.Tensor):
        return (
            confusion_matrix_torch(torch.as_tensor(pred), torch.as_tensor(target), num_classes, ignore_index)
            .cpu()
            .numpy()
        )
    p = np.asarray(pred)
    t = np.asarray(target)
    if p.shape != t.shape:
        raise ValueError(f"confusion_matrix: pred {p.shape} and target {t.shape} must have the same shape")
    if not (np.issubdtype(p.dtype, np.integer) and np.issubdtype(t.dtype, np.integer)):
        raise TypeError(
            f"confusion_matrix needs integer class ids (argmax first), got {p.dtype} and {t.dtype}"
        )
    p = p.ravel().astype(np.int64)
    t = t.ravel().astype(np.int64)
    if ignore_index is not None:
        keep = t != ignore_index
        p, t = p[keep], t[keep]
    _check_range(p, t, num_classes, ignore_index)
    # One bincount over the pair index t*C + p: a C*C histogram in a single vectorised pass.
    counts = np.bincount(t * num_classes + p, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).astype(np.int64)


def confusion_matrix_torch(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int | None = None
) -> torch.Tensor:
    """Confusion matrix [C, C] int64 on the inputs' device (rows = truth), for accumulation in validation.

    Args:
        pred: predicted class ids [N, ...] (any integer dtype, or bool for binary).
        target: true class ids, same shape; ``ignore_index`` pixels are not counted.
    Note: one host sync (the range check, which ``bincount`` would need anyway for its output size).
    """
    if pred.shape != target.shape:
        raise ValueError(
            f"confusion_matrix_torch: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ"
        )
    if pred.is_floating_point() or target.is_floating_point():
        raise TypeError(
            f"confusion_matrix_torch needs integer class ids, got {pred.dtype} and {target.dtype}"
        )
    p = pred.reshape(-1).long()
    t = target.reshape(-1).to(p.device).long()
    if ignore_index is not None:
        keep = t != ignore_index
        p, t = p[keep], t[keep]
    bad = (p < 0) | (p >= num_classes) | (t < 0) | (t >= num_classes)
    if bool(bad.any()):
        _check_range(p[bad].cpu().numpy(), t[bad].cpu().numpy(), num_classes, ignore_index)
    counts = torch.bincount(t * num_classes + p, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def _check_range(p: np.ndarray, t: np.ndarray, num_classes: int, ignore_index: int | None) -> None:
    for name, a in (("prediction", p), ("target", t)):
        if a.size and (a.min() < 0 or a.max() >= num_classes):
            hint = "" if name == "prediction" or ignore_index is not None else " (set ignore_index, e.g. 255)"
            raise ValueError(
                f"{name} has class ids in [{a.min()}, {a.max()}] outside 0..{num_classes - 1}{hint}"
            )


# ----------------------------------------------------------------------------- metrics of a matrix


def _div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den as float64 with NaN where den == 0 (undefined, e.g. a class absent everywhere)."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den != 0)
    return out


def _nanmean(x: np.ndarray) -> float:
    """Mean ignoring NaN; NaN (without a RuntimeWarning) if everything is NaN."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(np.nanmean(x)) if np.size(x) else float("nan")


def _as_cm(cm: Any) -> np.ndarray:
    cm = cm.cpu().numpy() if isinstance(cm, torch.Tensor) else np.asarray(cm)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"expected a square confusion matrix [C, C], got shape {cm.shape}")
    return cm.astype(np.float64)


def pixel_accuracy(cm: Any) -> float:
    """Correct pixels / all counted pixels: ``trace(cm) / sum(cm)``; NaN for an empty matrix."""
    cm = _as_cm(cm)
    return float(_div(np.trace(cm), cm.sum()))


def mean_pixel_accuracy(cm: Any) -> float:
    """Mean over classes of per-class accuracy (recall) ``cm[c,c] / sum(cm[c,:])``; classes absent from
    the truth are NaN and excluded."""
    cm = _as_cm(cm)
    return _nanmean(_div(np.diag(cm), cm.sum(1)))


def iou_per_class(cm: Any) -> np.ndarray:
    """IoU [C] float64: ``TP / (TP + FP + FN)``; NaN where a class is absent from truth and prediction."""
    cm = _as_cm(cm)
    tp = np.diag(cm)
    return _div(tp, cm.sum(0) + cm.sum(1) - tp)


def mean_iou(cm: Any) -> float:
    """Mean of :func:`iou_per_class` over the classes where it is defined."""
    return _nanmean(iou_per_class(cm))


def fw_iou(cm: Any) -> float:
    """Frequency-weighted IoU: ``sum_c (truth pixels of c / all pixels) * IoU_c``.

    Classes absent from the truth have weight 0 (their IoU, possibly NaN, does not enter the sum).
    """
    cm = _as_cm(cm)
    total = cm.sum()
    if total == 0:
        return float("nan")
    freq = cm.sum(1) / total
    iou = iou_per_class(cm)
    present = freq > 0
    return float(np.sum(freq[present] * iou[present]))


def dice_from_counts(inter: Any, total: Any, empty: float = 1.0) -> np.ndarray:
    """The one Dice rule, elementwise from pixel counts: ``2 |P & T| / (|P| + |T|)``, float64.

    Args:
        inter: ``|P & T|`` counts (any shape; ints or floats).
        total: ``|P| + |T|``, broadcastable with ``inter``.
        empty: the value where ``total == 0`` (prediction and truth both empty): 1.0, the
            competition's per-image convention; NaN for a class absent everywhere.
    """
    inter = np.asarray(inter, dtype=np.float64)
    total = np.asarray(total, dtype=np.float64)
    out = np.full(np.broadcast(inter, total).shape, empty, dtype=np.float64)
    np.divide(2.0 * inter, total, out=out, where=total > 0)
    return out


def dice_per_class(cm: Any) -> np.ndarray:
    """Dice (F1) [C] float64: ``2 TP / (2 TP + FP + FN)``; NaN where a class is absent everywhere."""
    cm = _as_cm(cm)
    return dice_from_counts(np.diag(cm), cm.sum(0) + cm.sum(1), empty=float("nan"))


def all_metrics(cm: Any, class_names: Sequence[str] | None = None) -> dict[str, float]:
    """Every confusion-matrix metric as a flat dict of Python floats (NaN where undefined).

    Keys: ``pixel_accuracy``, ``mean_pixel_accuracy``, ``mean_iou``, ``fw_iou``, ``mean_dice`` and, per
    class, ``iou/<name>`` and ``dice/<name>`` (names default to the class ids ``"0"``, ``"1"``, ...).
    """
    cm = _as_cm(cm)
    n = cm.shape[0]
    names = [str(i) for i in range(n)] if class_names is None else list(class_names)
    if len(names) != n:
        raise ValueError(f"{len(names)} class names for a {n}-class confusion matrix")
    iou = iou_per_class(cm)
    dice = dice_per_class(cm)
    out = {
        "pixel_accuracy": pixel_accuracy(cm),
        "mean_pixel_accuracy": mean_pixel_accuracy(cm),
        "mean_iou": _nanmean(iou),
        "fw_iou": fw_iou(cm),
        "mean_dice": _nanmean(dice),
    }
    out.update({f"iou/{name}": float(v) for name, v in zip(names, iou)})
    out.update({f"dice/{name}": float(v) for name, v in zip(names, dice)})
    return out


# ----------------------------------------------------------------------------- reports of a matrix


def _finite(v: float) -> float | None:
    """NaN (undefined, e.g. a class absent everywhere) -> None, so the JSON stays standard."""
    return None if math.isnan(v) else float(v)


def metrics_report(cm: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """Everything derived from one confusion matrix ``cm`` [K, K] (rows = truth), JSON-ready.

    Returns ``{"pixel_accuracy", "mean_pixel_accuracy", "mean_iou", "fw_iou", "mean_dice",
    "per_class": [{"name", "iou", "dice", "accuracy", "truth_pixels", "pred_pixels"}],
    "confusion_matrix": [[...]]}``; undefined values (NaN) are ``None``.
    """
    cm = np.asarray(cm, dtype=np.int64)
    flat = all_metrics(cm, class_names)
    truth, pred = cm.sum(1), cm.sum(0)
    accuracy = _div(np.diag(cm), truth)  # per-class recall, as in mean_pixel_accuracy
    per_class = []
    for c, name in enumerate(class_names):
        per_class.append(
            {
                "name": str(name),
                "iou": _finite(flat[f"iou/{name}"]),
                "dice": _finite(flat[f"dice/{name}"]),
                "accuracy": _finite(float(accuracy[c])),
                "truth_pixels": int(truth[c]),
                "pred_pixels": int(pred[c]),
            }
        )
    keys = ("pixel_accuracy", "mean_pixel_accuracy", "mean_iou", "fw_iou", "mean_dice")
    return {
        **{k: _finite(flat[k]) for k in keys},
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
    }


def format_report(report: dict[str, Any]) -> str:
    """A plain-text table of :func:`metrics_report` (None prints as ``-``)."""

    def f(v: float | None) -> str:
        return "     -" if v is None else f"{v:6.4f}"

    lines = [
        f"pixel accuracy {f(report['pixel_accuracy'])}   "
        f"mean pixel accuracy {f(report['mean_pixel_accuracy'])}",
        f"mean IoU       {f(report['mean_iou'])}   "
        f"frequency-weighted IoU {f(report['fw_iou'])}   mean Dice {f(report['mean_dice'])}",
    ]
    width = max(8, *(len(c["name"]) for c in report["per_class"]))
    lines.append(f"{'class':<{width}}     IoU    Dice     acc  truth px   pred px")
    for c in report["per_class"]:
        lines.append(
            f"{c['name']:<{width}}  {f(c['iou'])}  {f(c['dice'])}  {f(c['accuracy'])} "
            f"{c['truth_pixels']:>9} {c['pred_pixels']:>9}"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- competition Dice


def _as_bool(x: Any, name: str) -> np.ndarray:
    """A 0/1 (or bool) array as bool; anything else (probabilities, 0/255) is an error."""
    a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if a.dtype == bool:
        return a
    if a.size and not np.isin(a, (0, 1)).all():
        raise ValueError(
            f"{name} must be a 0/1 mask, got values in [{a.min()}, {a.max()}]; threshold probabilities "
            "first (p > t) and divide 0/255 masks by 255"
        )
    return a.astype(bool)


def dice_per_image(pred: Any, truth: Any) -> np.ndarray:
    """Dice of each image [N] float64 for binary masks [N, H, W] (0/1 or bool).

    An image where prediction and truth are both empty scores 1.0 (the competition's convention).
    For one mask [H, W] add the batch axis: ``dice_per_image(pred[None], truth[None])[0]``.
    """
    p, t = _flat_bool_pair_np(pred, truth, "dice_per_image")
    inter = np.count_nonzero(p & t, axis=1)
    card = np.count_nonzero(p, axis=1) + np.count_nonzero(t, axis=1)
    return dice_from_counts(inter, card)


def iou_per_image(pred: Any, truth: Any) -> np.ndarray:
    """IoU (Jaccard) of each image [N] float64 for binary masks [N, H, W]; empty/empty = 1.0."""
    p, t = _flat_bool_pair_np(pred, truth, "iou_per_image")
    inter = np.count_nonzero(p & t, axis=1)
    union = np.count_nonzero(p | t, axis=1)
    return np.where(union == 0, 1.0, inter / np.maximum(union, 1))


def _flat_bool_pair_np(pred: Any, truth: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Checked bool masks [N, H, W] flattened to [N, H*W]."""
    p = _as_bool(pred, "pred")
    t = _as_bool(truth, "truth")
    if p.shape != t.shape or p.ndim < 3:
        raise ValueError(
            f"{name} expects equal shapes [N, H, W], got {p.shape} and {t.shape}; for one image add "
            "a batch axis (mask[None])"
        )
    return p.reshape(p.shape[0], -1), t.reshape(t.shape[0], -1)


def mean_dice(preds: Any, truths: Any) -> float:
    """The competition score: mean per-image Dice.

    Args:
        preds, truths: arrays [N, H, W], or equal-length iterables of [H, W] masks (sizes may differ
            between images).
    """
    if isinstance(preds, (np.ndarray, torch.Tensor)) and isinstance(truths, (np.ndarray, torch.Tensor)):
        scores = dice_per_image(preds, truths)
    else:
        preds, truths = list(preds), list(truths)
        if len(preds) != len(truths):
            raise ValueError(f"mean_dice: {len(preds)} predictions but {len(truths)} truths")
        pairs = zip(preds, truths)
        each = [dice_per_image(_as_bool(p, "pred")[None], _as_bool(t, "truth")[None]) for p, t in pairs]
        scores = np.concatenate(each) if each else np.empty(0)
    if scores.size == 0:
        raise ValueError("mean_dice of zero images is undefined; check that predictions were produced")
    return float(scores.mean())


def dice_per_image_torch(pred: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Dice of each image [N] float32 on the inputs' device; empty/empty = 1.

    The device twin of :func:`dice_per_image`: the same rule as :func:`dice_from_counts`, written in
    torch so validation never copies masks to the host nor waits for the device (no sync).

    Args:
        pred: [N, H, W] bool (e.g. ``probs > threshold``); truth: [N, H, W] bool or integers, where
            non-zero = building (not range-checked, to keep validation free of host syncs).
    Counts are exact int64 sums, so no precision is lost on large tiles.
    """
    p, t = _flat_bool_pair(pred, truth, "dice_per_image_torch")
    inter = (p & t).sum(1)
    card = p.sum(1) + t.sum(1)
    dice = 2.0 * inter.double() / card.clamp_min(1).double()
    return torch.where(card == 0, torch.ones_like(dice), dice).float()


def iou_per_image_torch(pred: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """IoU of each image [N] float32 on the inputs' device; empty/empty = 1. Shapes as
    :func:`dice_per_image_torch`."""
    p, t = _flat_bool_pair(pred, truth, "iou_per_image_torch")
    inter = (p & t).sum(1)
    union = (p | t).sum(1)
    iou = inter.double() / union.clamp_min(1).double()
    return torch.where(union == 0, torch.ones_like(iou), iou).float()


def _flat_bool_pair(pred: torch.Tensor, truth: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if pred.shape != truth.shape or pred.ndim < 3:
        raise ValueError(
            f"{name} expects equal shapes [N, H, W], got {tuple(pred.shape)} and {tuple(truth.shape)}; "
            "add a batch axis (mask[None]) for one image"
        )
    if pred.dtype != torch.bool or truth.is_floating_point():
        raise TypeError(
            f"{name} expects pred bool (threshold first: probs > t) and integer/bool truth, got "
            f"{pred.dtype} and {truth.dtype}"
        )
    n = pred.shape[0]
    return pred.reshape(n, -1), (truth != 0).reshape(n, -1).to(pred.device)
