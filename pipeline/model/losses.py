"""Cross-entropy + soft Dice (+ Lovász hinge) losses: pure functions over tensors, and thin modules.

Binary (``model.classes == 1``, buildings): BCE-with-logits + soft Dice on ``sigmoid(logits)``, plus
optionally the Lovász hinge (Berman et al. 2018, a convex surrogate of 1 - IoU per image, the loss
many top Inria/SpaceNet/Kaggle building solutions fine-tune with).
Multi-class (VOC, Cityscapes): softmax cross-entropy + multi-class soft Dice on ``softmax(logits)``.

Numerics. Every loss casts the logits to float32 *before* sigmoid/softmax and the Dice sums: under
bf16/fp16 autocast a 512x512 (x batch) sum overflows fp16 (max 65504) and loses all precision in bf16
(8 mantissa bits), so the Dice ratio would be garbage. The result is always a float32 scalar.

Smoothing. :func:`dice_score` is the plain ratio (``smooth=0``) for known-answer tests and metrics-like
use. The training losses use ``smooth=1`` added to numerator and denominator, chosen because:

* with ``per_image=True`` an empty tile predicted empty gets Dice ``1/1 = 1`` (loss 0), exactly the
  competition's convention (empty prediction on empty truth scores 1), and an empty tile with
  predicted mass ``S`` gets Dice ``1/(S+1)``, so false positives on empty tiles are pushed down;
* with batch Dice (``per_image=False``, the default) the sums run over ``B*H*W`` pixels, so ``+1`` is a
  negligible bias while still keeping the ratio finite on an all-empty, all-ignored batch.

Ignored pixels (``ignore_index``) are removed from *both* terms: they contribute nothing to the CE mean
(which divides by the number of valid pixels) and nothing to the Dice sums.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.core.config import LossConfig, ModelConfig

__all__ = [
    "LOSSES",
    "BCEDiceLoss",
    "CEDiceLoss",
    "bce_dice_loss",
    "build_loss",
    "ce_dice_loss",
    "dice_score",
    "lovasz_hinge",
    "masked_bce_with_logits",
    "masked_cross_entropy",
    "multiclass_soft_dice",
    "soft_dice_binary",
]


# ----------------------------------------------------------------------------- pure functions


def dice_score(
    probs: Tensor, target: Tensor, smooth: float = 0.0, eps: float = 1e-7, dims: tuple[int, ...] | None = None
) -> Tensor:
    """Soft Dice ``(2 sum(p t) + smooth) / (sum(p) + sum(t) + smooth)``, computed in float32.

    Args:
        probs: probabilities in [0, 1], any shape.
        target: same shape, 0/1 (float or int).
        smooth: added to numerator and denominator (0 = the exact ratio, e.g. [1,1,1,1] vs [1,1,0,0] = 2/3).
        eps: lower bound of the denominator, so 0/0 (empty vs empty with ``smooth=0``) gives 0, not NaN.
        dims: dimensions to sum over; None = all (one scalar). E.g. ``dims=(1, 2, 3)`` on [B,1,H,W]
            gives one Dice per image [B].
    """
    if probs.shape != target.shape:
        raise ValueError(f"dice_score: probs {tuple(probs.shape)} and target {tuple(target.shape)} differ")
    p = probs.float()
    t = target.float()
    dims = tuple(range(p.ndim)) if dims is None else dims
    inter = (p * t).sum(dims)
    card = p.sum(dims) + t.sum(dims)
    return (2.0 * inter + smooth) / (card + smooth).clamp_min(eps)


def soft_dice_binary(
    logits: Tensor,
    target: Tensor,
    smooth: float = 1.0,
    per_image: bool = False,
    valid: Tensor | None = None,
) -> Tensor:
    """Binary soft Dice loss ``1 - dice(sigmoid(logits), target)``: a float32 scalar.

    Args:
        logits: [B, 1, H, W] raw scores (any float dtype; cast to float32 first).
        target: [B, 1, H, W] float 0/1.
        smooth: see the module docstring; 1 makes empty-on-empty score 1 per image.
        per_image: True = one Dice per image, then the mean over the batch (mirrors the competition's
            mean per-image Dice); False = one Dice over all pixels of the batch (smoother gradients).
        valid: optional [B, 1, H, W] bool/0-1 mask; pixels where it is 0 are excluded.
    """
    _check_binary_shapes(logits, target)
    probs = torch.sigmoid(logits.float())
    t = target.float()
    if valid is not None:
        v = valid.float()
        probs, t = probs * v, t * v
    dims = (1, 2, 3) if per_image else None
    return 1.0 - dice_score(probs, t, smooth=smooth, dims=dims).mean()


def _lovasz_grad(gt_sorted: Tensor) -> Tensor:
    """Gradient of the Lovász extension of the Jaccard loss w.r.t. errors sorted in decreasing order.

    gt_sorted: float [P] 0/1 labels in the order of the sorted errors -> float [P].
    """
    gts = gt_sorted.sum()
    intersection = gts - gt_sorted.cumsum(0)
    union = gts + (1.0 - gt_sorted).cumsum(0)
    jaccard = 1.0 - intersection / union
    return torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]])


def lovasz_hinge(logits: Tensor, target: Tensor, valid: Tensor | None = None) -> Tensor:
    """Binary Lovász hinge, one per image then the batch mean: a float32 scalar.

    Args:
        logits: [B, 1, H, W] raw scores; target: [B, 1, H, W] float 0/1; valid: optional [B, 1, H, W]
            bool/0-1 mask of the pixels that count (an image with none contributes 0).

    With logits of +-1 that predict a mask, the hinge errors are 0 (right) or 2 (wrong) and the loss is
    exactly ``2 * (1 - IoU)`` of that mask (the Lovász extension equals the Jaccard loss on vertices and is
    positively homogeneous): the known answer tests check.
    """
    _check_binary_shapes(logits, target)
    losses = []
    for i in range(logits.shape[0]):
        x, t = logits[i].float().flatten(), target[i].float().flatten()
        if valid is not None:
            keep = valid[i].flatten().bool()
            x, t = x[keep], t[keep]
        if x.numel() == 0:
            losses.append(logits.new_zeros((), dtype=torch.float32) + 0.0 * logits[i].float().sum())
            continue
        errors = 1.0 - x * (2.0 * t - 1.0)
        errors_sorted, order = torch.sort(errors, descending=True)
        losses.append(torch.dot(F.relu(errors_sorted), _lovasz_grad(t[order])))
    return torch.stack(losses).mean()


def masked_bce_with_logits(logits: Tensor, target: Tensor, valid: Tensor | None = None) -> Tensor:
    """Mean BCE-with-logits over valid pixels (float32 scalar; 0 when no pixel is valid).

    Args:
        logits: [B, 1, H, W]; target: [B, 1, H, W] float 0/1; valid: optional [B, 1, H, W] bool/0-1.
    """
    _check_binary_shapes(logits, target)
    bce = F.binary_cross_entropy_with_logits(logits.float(), target.float(), reduction="none")
    if valid is None:
        return bce.mean()
    v = valid.float()
    # Divide by the valid count, not H*W: ignored pixels must not dilute the loss either.
    return (bce * v).sum() / v.sum().clamp_min(1.0)


def bce_dice_loss(
    logits: Tensor,
    target: Tensor,
    ce_weight: float = 0.5,
    dice_weight: float = 0.5,
    valid: Tensor | None = None,
    smooth: float = 1.0,
    per_image: bool = False,
    lovasz_weight: float = 0.0,
) -> Tensor:
    """``ce_weight * BCE + dice_weight * (1 - soft Dice) + lovasz_weight * Lovász hinge`` for binary
    masks; float32 scalar.

    Args:
        logits: [B, 1, H, W]; target: [B, 1, H, W] float 0/1; valid: optional [B, 1, H, W] bool mask
        of pixels that count (every term). ``smooth`` and ``per_image`` as in :func:`soft_dice_binary`.
    """
    loss = logits.new_zeros((), dtype=torch.float32)
    if ce_weight:
        loss = loss + ce_weight * masked_bce_with_logits(logits, target, valid)
    if dice_weight:
        loss = loss + dice_weight * soft_dice_binary(logits, target, smooth, per_image, valid)
    if lovasz_weight:
        loss = loss + lovasz_weight * lovasz_hinge(logits, target, valid)
    return loss


def masked_cross_entropy(logits: Tensor, target: Tensor, ignore_index: int | None = None) -> Tensor:
    """Softmax cross-entropy averaged over non-ignored pixels (float32 scalar; 0 if all are ignored).

    ``F.cross_entropy(reduction='mean')`` returns NaN when every pixel is ignored (0/0), e.g. a VOC crop
    that is all border; summing and dividing by ``max(count, 1)`` gives 0 instead.

    Args:
        logits: [B, C, H, W]; target: [B, H, W] int64 class ids (``ignore_index`` allowed).
    """
    ii = -100 if ignore_index is None else ignore_index
    total = F.cross_entropy(logits.float(), target, ignore_index=ii, reduction="sum")
    count = (target != ii).sum().clamp_min(1)
    return total / count


def multiclass_soft_dice(
    logits: Tensor, target: Tensor, ignore_index: int | None = None, smooth: float = 1.0
) -> Tensor:
    """Multi-class soft Dice loss ``1 - mean_c dice_c`` over the classes *present* in the target.

    Each class's Dice is computed over the whole batch (all B*H*W valid pixels). The mean runs over the
    classes that occur in the (non-ignored) target of this batch: with 21 VOC classes most are absent
    from any batch, and an absent class's soft Dice ``smooth/(sum p_c + smooth)`` is ~0 (softmax never
    gives exactly 0 over a quarter-million pixels), so averaging over all classes would add a large,
    noisy constant that dominates the loss. False positives of absent classes are still penalised
    through the present classes' intersections and through the CE term. Returns 0 when no pixel is valid.

    Args:
        logits: [B, C, H, W] raw scores (cast to float32 before softmax and sums).
        target: [B, H, W] int64 class ids; pixels equal to ``ignore_index`` are excluded.
    """
    if logits.ndim != 4 or target.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(
            f"multiclass_soft_dice expects logits [B,C,H,W] and target [B,H,W], got "
            f"{tuple(logits.shape)} and {tuple(target.shape)}"
        )
    num_classes = logits.shape[1]
    probs = torch.softmax(logits.float(), dim=1)
    if ignore_index is None:
        valid = torch.ones_like(target, dtype=torch.bool)
        safe = target
    else:
        valid = target != ignore_index
        safe = torch.where(valid, target, torch.zeros_like(target))  # any in-range id; masked out below
    v = valid.unsqueeze(1).float()  # [B,1,H,W]
    onehot = F.one_hot(safe, num_classes).permute(0, 3, 1, 2).float() * v  # [B,C,H,W]
    probs = probs * v
    dims = (0, 2, 3)
    inter = (probs * onehot).sum(dims)
    support = onehot.sum(dims)
    card = probs.sum(dims) + support
    # clamp: an absent, unpredicted class is 0/0 with smooth=0; NaN * 0 would still poison the mean.
    dice = (2.0 * inter + smooth) / (card + smooth).clamp_min(1e-7)
    present = (support > 0).float()
    # Weighted mean instead of boolean indexing: no host sync and a defined value when nothing is present.
    mean_dice = (dice * present).sum() / present.sum().clamp_min(1.0)
    return (1.0 - mean_dice) * (present.sum() > 0).float()


def ce_dice_loss(
    logits: Tensor,
    target: Tensor,
    ce_weight: float = 0.5,
    dice_weight: float = 0.5,
    ignore_index: int | None = None,
    smooth: float = 1.0,
) -> Tensor:
    """``ce_weight * softmax CE + dice_weight * multi-class soft Dice``; float32 scalar.

    Args:
        logits: [B, C, H, W]; target: [B, H, W] int64 ids; ``ignore_index`` pixels excluded from both.
    """
    loss = logits.new_zeros((), dtype=torch.float32)
    if ce_weight:
        loss = loss + ce_weight * masked_cross_entropy(logits, target, ignore_index)
    if dice_weight:
        loss = loss + dice_weight * multiclass_soft_dice(logits, target, ignore_index, smooth)
    return loss


def _check_binary_shapes(logits: Tensor, target: Tensor) -> None:
    if logits.ndim != 4 or logits.shape[1] != 1 or target.shape != logits.shape:
        raise ValueError(
            f"binary loss expects logits and target both [B,1,H,W], got {tuple(logits.shape)} and "
            f"{tuple(target.shape)}; add the channel axis with mask.unsqueeze(1)"
        )


# ----------------------------------------------------------------------------- modules


class BCEDiceLoss(nn.Module):
    """Binary loss module: ``(logits [B,1,H,W], mask [B,H,W] uint8 0/1) -> float32 scalar``.

    Converts the data loader's uint8 mask to float [B,1,H,W]; pixels equal to ``ignore_index`` (if set)
    are excluded from both terms. Any other value > 1 is an error: a 0/255 building mask fed as a
    target would otherwise train silently on nonsense. The value check needs a host sync, so on an
    accelerator only the first batch is checked (the training step stays sync-free); CPU masks always are.
    """

    def __init__(
        self,
        ce_weight: float = 0.5,
        dice_weight: float = 0.5,
        ignore_index: int | None = None,
        smooth: float = 1.0,
        per_image: bool = False,
        lovasz_weight: float = 0.0,
    ) -> None:
        super().__init__()
        self.ce_weight, self.dice_weight, self.lovasz_weight = ce_weight, dice_weight, lovasz_weight
        self.ignore_index, self.smooth, self.per_image = ignore_index, smooth, per_image
        self._device_checked = False

    def forward(self, logits: Tensor, mask: Tensor) -> Tensor:
        mask = _check_mask(logits, mask)
        valid = None
        if self.ignore_index is not None:
            valid = (mask != self.ignore_index).unsqueeze(1)
            mask = torch.where(valid.squeeze(1), mask, torch.zeros_like(mask))
        if _check_due(self, mask) and bool((mask > 1).any()):
            raise ValueError(
                f"binary mask has values > 1 (max {int(mask.max())}); building masks must be 0/1 "
                "(divide 0/255 masks by 255 when decoding) or set loss.ignore_index for the void value"
            )
        target = mask.unsqueeze(1).float()
        return bce_dice_loss(
            logits,
            target,
            self.ce_weight,
            self.dice_weight,
            valid,
            self.smooth,
            self.per_image,
            self.lovasz_weight,
        )

    def extra_repr(self) -> str:
        return (
            f"ce_weight={self.ce_weight}, dice_weight={self.dice_weight}, "
            f"lovasz_weight={self.lovasz_weight}, "
            f"ignore_index={self.ignore_index}, smooth={self.smooth}, per_image={self.per_image}"
        )


class CEDiceLoss(nn.Module):
    """Multi-class loss module: ``(logits [B,C,H,W], mask [B,H,W] uint8 ids) -> float32 scalar``.

    Converts the mask to int64; ids ``>= C`` other than ``ignore_index`` are an error (cross-entropy
    would fail with an opaque device-side assert on CUDA). Checked on every CPU batch and on the first
    accelerator batch only, as in :class:`BCEDiceLoss`.
    """

    def __init__(
        self,
        ce_weight: float = 0.5,
        dice_weight: float = 0.5,
        ignore_index: int | None = None,
        smooth: float = 1.0,
    ) -> None:
        super().__init__()
        self.ce_weight, self.dice_weight = ce_weight, dice_weight
        self.ignore_index, self.smooth = ignore_index, smooth
        self._device_checked = False

    def forward(self, logits: Tensor, mask: Tensor) -> Tensor:
        target = _check_mask(logits, mask).long()
        num_classes = logits.shape[1]
        bad = target >= num_classes
        if self.ignore_index is not None:
            bad &= target != self.ignore_index
        if _check_due(self, mask) and bool(bad.any()):
            raise ValueError(
                f"mask has class id {int(target[bad].max())} but the model has {num_classes} classes; "
                "set model.classes to the number of classes, or loss.ignore_index (e.g. 255 for VOC borders)"
            )
        return ce_dice_loss(logits, target, self.ce_weight, self.dice_weight, self.ignore_index, self.smooth)

    def extra_repr(self) -> str:
        return (
            f"ce_weight={self.ce_weight}, dice_weight={self.dice_weight}, "
            f"ignore_index={self.ignore_index}, smooth={self.smooth}"
        )


def _check_due(module: BCEDiceLoss | CEDiceLoss, mask: Tensor) -> bool:
    """Whether to run the value check (a host sync): always on CPU, once per module on accelerators."""
    if mask.device.type == "cpu":
        return True
    if module._device_checked:
        return False
    module._device_checked = True
    return True


def _check_mask(logits: Tensor, mask: Tensor) -> Tensor:
    """Check that ``mask`` [B,H,W] matches ``logits`` [B,C,H,W]; return it (a tensor on logits' device)."""
    if mask.ndim != 3 or logits.ndim != 4 or mask.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(
            f"loss expects logits [B,C,H,W] and mask [B,H,W] with the same B,H,W, got logits "
            f"{tuple(logits.shape)} and mask {tuple(mask.shape)}"
        )
    if mask.is_floating_point():
        raise TypeError(f"mask must hold integer class ids (uint8 from the data loader), got {mask.dtype}")
    return mask


# Binary vs multi-class is decided by model.classes; the key is the task, the value builds the module.
LOSSES: dict[str, Callable[[LossConfig], nn.Module]] = {
    "binary": lambda loss_cfg: BCEDiceLoss(
        loss_cfg.ce_weight,
        loss_cfg.dice_weight,
        loss_cfg.ignore_index,
        per_image=loss_cfg.dice_per_image in (True, "auto"),  # auto: per image for binary runs
        lovasz_weight=loss_cfg.lovasz_weight,
    ),
    "multiclass": lambda loss_cfg: CEDiceLoss(
        loss_cfg.ce_weight, loss_cfg.dice_weight, loss_cfg.ignore_index
    ),
}


def build_loss(model_cfg: ModelConfig, loss_cfg: LossConfig, finetune: bool = False) -> nn.Module:
    """The loss for a run: ``module(logits [B,C,H,W], mask [B,H,W] uint8) -> float32 scalar``.

    ``model_cfg.classes == 1`` -> :class:`BCEDiceLoss`, otherwise :class:`CEDiceLoss`; weights and
    ``ignore_index`` come from ``loss_cfg`` (a :class:`pipeline.core.config.LossConfig`). ``finetune``: the
    loss of the last ``loss.lovasz_epochs`` epochs, the Lovász hinge alone (binary runs only).
    """
    if finetune:
        return BCEDiceLoss(0.0, 0.0, loss_cfg.ignore_index, lovasz_weight=1.0)
    task = "binary" if model_cfg.classes == 1 else "multiclass"
    return LOSSES[task](loss_cfg)
