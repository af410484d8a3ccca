"""Test-time augmentation as paired pure functions over [B, C, H, W] tensors.

A TTA set is a tuple of :class:`Transform` s, each an ``augment``/``deaugment`` pair of pure torch
functions (flips and 90 degree rotations of the last two dimensions) with
``deaugment(augment(x)) == x`` exactly: they only move pixels, never interpolate. A multi-scale view
also resizes its input by ``scale`` (bilinear, antialiased when shrinking) before the symmetry, and
:func:`predict_tta` resizes its probabilities back to the input's H x W after undoing the symmetry.

``TTA_SETS`` is the registry used by ``InferConfig.tta``:

* ``"none"``: the identity;
* ``"flip"``: identity, horizontal flip, vertical flip;
* ``"d4"``: the 8 symmetries of the square (4 rotations x optional horizontal flip);
* ``"ms"``: the identity at scales 0.75, 1 and 1.25 (:data:`SCALES`);
* ``"d4_ms"``: the 8 symmetries at each of those scales (24 views).

D4 on non-square inputs: a 90 or 270 degree rotation turns [B, C, H, W] into [B, C, W, H]. The
model must therefore accept both orientations; our model wrapper pads to a multiple of 32 on each
side, so any H, W works. ``deaugment`` rotates the prediction back, so the output of
:func:`predict_tta` always has the input's H and W.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ACTIVATIONS", "SCALES", "TTA_SETS", "Transform", "predict_tta"]

# Multi-scale TTA: buildings are seen a little smaller and larger than in training (scale jitter of 0.2).
SCALES = (0.75, 1.0, 1.25)


# ----------------------------------------------------------------------------- pure transforms
# Module-level functions (and partials of them) rather than lambdas: transforms stay picklable,
# so a TTA set can cross a DataLoader worker or a multiprocessing boundary.


def _identity(x: Tensor) -> Tensor:
    return x


def _hflip(x: Tensor) -> Tensor:
    return torch.flip(x, dims=(-1,))


def _vflip(x: Tensor) -> Tensor:
    return torch.flip(x, dims=(-2,))


def _rot90(x: Tensor, k: int) -> Tensor:
    """Rotate the last two dims by ``k`` x 90 degrees counter-clockwise (as ``torch.rot90``)."""
    return torch.rot90(x, k, dims=(-2, -1))


def _hflip_then_rot90(x: Tensor, k: int) -> Tensor:
    return _rot90(_hflip(x), k)


def _unrot90_then_hflip(x: Tensor, k: int) -> Tensor:
    return _hflip(_rot90(x, -k))


@dataclass(frozen=True)
class Transform:
    """One TTA view: ``augment`` maps the input [B, C, H, W] to the view the model sees;
    ``deaugment`` maps the model's output [B, K, H', W'] back to the input's frame.
    """

    name: str
    augment: Callable[[Tensor], Tensor]
    deaugment: Callable[[Tensor], Tensor]
    scale: float = 1.0  # != 1: augment resized the input; predict_tta resizes the output back


def _resize_then(x: Tensor, scale: float, then: Callable[[Tensor], Tensor]) -> Tensor:
    """``then`` of ``x`` [B, C, H, W] resized to round(H * scale) x round(W * scale), as float."""
    size = (round(x.shape[-2] * scale), round(x.shape[-1] * scale))
    return then(
        F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False, antialias=scale < 1)
    )


def _at_scales(views: tuple[Transform, ...], scales: tuple[float, ...]) -> tuple[Transform, ...]:
    """Every view at every scale (scale 1 keeps the view as it is)."""
    return tuple(
        t
        if s == 1
        else Transform(f"{t.name}@{s:g}", partial(_resize_then, scale=s, then=t.augment), t.deaugment, s)
        for s in scales
        for t in views
    )


IDENTITY = Transform("identity", _identity, _identity)
HFLIP = Transform("hflip", _hflip, _hflip)
VFLIP = Transform("vflip", _vflip, _vflip)


def _d4() -> tuple[Transform, ...]:
    """The dihedral group of the square: rot90^k and rot90^k after a horizontal flip, k = 0..3."""
    views = []
    for flip in (False, True):
        for k in range(4):
            if not flip and k == 0:
                views.append(IDENTITY)
            elif not flip:
                views.append(Transform(f"rot{90 * k}", partial(_rot90, k=k), partial(_rot90, k=-k)))
            elif k == 0:
                views.append(HFLIP)
            else:
                views.append(
                    Transform(
                        f"hflip_rot{90 * k}",
                        partial(_hflip_then_rot90, k=k),
                        partial(_unrot90_then_hflip, k=k),
                    )
                )
    return tuple(views)


TTA_SETS: dict[str, tuple[Transform, ...]] = {
    "none": (IDENTITY,),
    "flip": (IDENTITY, HFLIP, VFLIP),
    "d4": _d4(),
    "ms": _at_scales((IDENTITY,), SCALES),
    "d4_ms": _at_scales(_d4(), SCALES),
}


def _softmax(logits: Tensor) -> Tensor:
    return torch.softmax(logits, dim=1)


def _no_activation(probs: Tensor) -> Tensor:
    return probs


# "none" is for a model_fn that already returns probabilities (e.g. a fold ensemble).
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "sigmoid": torch.sigmoid,
    "softmax": _softmax,
    "none": _no_activation,
}


def _lookup(registry: dict, key: str, what: str) -> object:
    if key not in registry:
        raise ValueError(f"unknown {what} {key!r}; use one of {', '.join(registry)}")
    return registry[key]


def _chunks(views: list[int], batch: int, per_forward: int) -> list[list[tuple[int, int, int]]]:
    """The work of same-shaped ``views`` over a batch of ``batch`` images, cut into forwards of at most
    ``per_forward`` images: each forward is a list of (view, first image, end image), view-major."""
    chunks: list[list[tuple[int, int, int]]] = [[]]
    room = per_forward
    for v in views:
        start = 0
        while start < batch:
            if room == 0:
                chunks.append([])
                room = per_forward
            end = min(batch, start + room)
            chunks[-1].append((v, start, end))
            room -= end - start
            start = end
    return chunks


def _view_groups(transforms: tuple[Transform, ...], x: Tensor, merge_batch: bool) -> list[list[int]]:
    """View indices grouped by the shape each view has (one forward can only hold one shape); with
    ``merge_batch=False`` every view is its own group."""
    if not merge_batch:
        return [[i] for i in range(len(transforms))]
    groups: dict[tuple[int, ...], list[int]] = {}
    probe = x[:1]
    for i, t in enumerate(transforms):
        groups.setdefault(tuple(t.augment(probe).shape[-2:]), []).append(i)
    return list(groups.values())


@torch.no_grad()
def predict_tta(
    model_fn: Callable[[Tensor], Tensor],
    x: Tensor,
    tta: str = "d4",
    activation: str = "sigmoid",
    merge_batch: bool = True,
    max_images: int | None = None,
) -> Tensor:
    """Average the model's probabilities over the views of TTA set ``tta``.

    Args:
        model_fn: maps a batch [B', C, H', W'] to logits [B', K, H', W'] (any float dtype).
        x: input batch [B, C, H, W].
        tta: a key of :data:`TTA_SETS` (``none`` | ``flip`` | ``d4`` | ``ms`` | ``d4_ms``).
        activation: ``sigmoid`` (binary, K = 1), ``softmax`` (over K) or ``none`` (model_fn already
            returns probabilities).
        merge_batch: run same-shaped views together, ``len(views) * B`` images per forward (fastest
            on a GPU); a non-square input under ``d4`` takes two shapes (H x W and W x H), ``ms``
            three sizes. ``False``: one view per forward.
        max_images: bounds memory by pixels: a forward holds at most ``max_images`` images of the
            input's H x W in pixels, so a 1.25-scale view (640 px for a 512 px tile) counts 1.5625
            images and a 0.75-scale view 0.5625 (at least one image per forward). ``None``: no bound.

    Returns:
        float32 probabilities [B, K, H, W].

    Views are made per forward and their probabilities added to the running sum at once, so memory is
    the sum [B, K, H, W], one forward's views and the model's activations, whatever the TTA set: all
    24 views of ``d4_ms`` are never held together.

    Probabilities, not logits, are averaged: the mean of logits is dominated by the most confident
    view (logits are unbounded), whereas the mean of probabilities is bounded and keeps the scale
    the threshold is tuned on. It also composes: the mean over folds of the mean over views is the
    mean over all (fold, view) pairs, so ensembling and TTA can be done in any order.
    """
    if x.ndim != 4:
        raise ValueError(f"predict_tta expects a batch [B, C, H, W], got shape {tuple(x.shape)}")
    transforms: tuple[Transform, ...] = _lookup(TTA_SETS, tta, "TTA set")
    act = _lookup(ACTIVATIONS, activation, "activation")
    batch, (h, w) = x.shape[0], x.shape[-2:]
    total: Tensor | None = None
    for group in _view_groups(transforms, x, merge_batch):
        vh, vw = transforms[group[0]].augment(x[:1]).shape[-2:]
        per_forward = len(group) * batch
        if max_images is not None:
            per_forward = max(1, min(per_forward, max_images * h * w // (vh * vw)))
        for chunk in _chunks(group, batch, per_forward):
            views = [transforms[v].augment(x[a:b]) for v, a, b in chunk]
            inp = torch.cat(views) if len(views) > 1 else views[0]
            del views
            out = model_fn(inp)
            if out.ndim != 4 or (out.shape[0], *out.shape[-2:]) != (len(inp), vh, vw):
                raise ValueError(
                    f"model_fn returned shape {tuple(out.shape)} for an input of shape {tuple(inp.shape)}; "
                    "it must return logits [B, K, H, W] with the input's batch size, H and W (pad the "
                    "input to a multiple of the model's stride)"
                )
            del inp
            pos = 0
            for v, a, b in chunk:
                t = transforms[v]
                # Activation in float32: bf16/fp16 logits would lose precision in the sum.
                probs = t.deaugment(act(out[pos : pos + b - a].float()))
                pos += b - a
                if t.scale != 1:
                    probs = F.interpolate(probs, size=(h, w), mode="bilinear", align_corners=False)
                if total is None:
                    total = torch.zeros((batch, probs.shape[1], h, w), dtype=torch.float32, device=x.device)
                total[a:b] += probs
            del out
    return total / len(transforms)
