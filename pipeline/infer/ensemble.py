"""Ensemble inference: rebuild fold models from their checkpoints, TTA, average probabilities.

A :class:`Manifest` (``runs/<run>/manifest.yaml``, written by training and editable by hand) lists
checkpoints, the TTA set, the OOF-tuned threshold and minimum component area. A single model is an
ensemble of one: there is no separate code path. Every stage that predicts (the OOF pass aside:
it has the fold's model in hand) goes through :func:`load_ensemble` and :func:`predict_batch`.

A blend's manifest (``make blend``) lists runs with weights: its models come as :class:`BlendMember` s,
and :func:`predict_batch` averages each run's folds (what the run alone predicts), then the runs by
weight. A blend of one run is that run, bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from pipeline.core import tta as tta_mod
from pipeline.core.config import Config, ConfigError, DataConfig, InferConfig, TrainConfig, config_from_dict
from pipeline.core.device import autocast_ctx, pick_device, resolve_channels_last, resolve_workers
from pipeline.core.io import CheckpointError, remove_stale_temps
from pipeline.data.dataset import IMAGE, NAME, SegDataset, Split
from pipeline.model.registry import build_model
from pipeline.runs.checkpoint import BestCheckpoint, check_run_config, read_best
from pipeline.runs.manifest import Manifest, Member, load_manifest

MAX_IMAGES = InferConfig.max_images
# Where :func:`load_model` leaves the run's ``train.amp`` on the model it rebuilds, so every caller of
# :func:`predict_batch` (submit, predict, pseudo, scenes) predicts in the precision of the run's OOF pass.
RUN_AMP = "buildseg_train_amp"


def run_precision(model: torch.nn.Module) -> str:
    """The ``train.amp`` of the run ``model`` was loaded from (a blend's :class:`BlendMember` brings its
    run's); ``auto`` for a model :func:`load_model` did not rebuild."""
    if isinstance(model, BlendMember):
        return model.amp
    return getattr(model, RUN_AMP, TrainConfig.amp)


def load_model(
    path: str | Path, device: torch.device | str = "cpu"
) -> tuple[torch.nn.Module, Config, BestCheckpoint]:
    """Rebuild a model from its ``best.pt`` alone (config inside), in eval mode on ``device``."""
    ckpt = read_best(path, map_location="cpu")
    check_run_config(path, ckpt)  # a best.pt of another recipe copied into a run folder is refused
    try:
        cfg = config_from_dict(ckpt.config)
    except ConfigError as e:
        raise CheckpointError(
            f"{path}: the config inside is not valid for this version of buildseg: {e}"
        ) from None
    model = build_model(cfg, pretrained=False)  # the checkpoint has the weights: never download
    model.load_state_dict(ckpt.model)
    setattr(model, RUN_AMP, cfg.train.amp)
    return model.to(device).eval(), cfg, ckpt


class BlendMember(torch.nn.Module):
    """A fold model of a blend's run, with what :func:`predict_batch` needs to weight it.

    ``member``: the run's index in the blend; ``weight``: the run's weight; ``tta``: the run's TTA set,
    used unless a caller asks for another set than the blend's own ``tta`` key (``blend_tta``), which
    then applies to every run; ``amp``: the run's ``train.amp`` (the precision of its OOF pass).
    """

    def __init__(
        self, model: torch.nn.Module, member: int, weight: float, tta: str, blend_tta: str, amp: str
    ) -> None:
        super().__init__()
        self.model = model
        self.member, self.weight, self.tta, self.blend_tta, self.amp = member, weight, tta, blend_tta, amp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def tta_for(self, requested: str) -> str:
        return self.tta if requested == self.blend_tta else requested


def _checkpoint_paths(manifest: Manifest) -> list[tuple[Path, tuple[int, Member] | None]]:
    """(checkpoint path, (member index, member) of a blend or None) in manifest order; a blend's runs
    of weight 0 are left out (nothing to load)."""
    if not manifest.members:
        return [(manifest.run_dir / c, None) for c in manifest.checkpoints]
    return [
        (manifest.member_dir(m) / c, (i, m))
        for i, m in enumerate(manifest.members)
        if m.weight > 0
        for c in m.checkpoints
    ]


def with_tta(manifest: Manifest, tta: str) -> Manifest:
    """``manifest`` predicting with TTA set ``tta``: a run's set, and every run's of a blend (whose runs
    otherwise keep their own; a caller's set other than the blend's ``tta`` key overrides them too)."""
    members = tuple(dataclasses.replace(m, tta=tta) for m in manifest.members)
    return dataclasses.replace(manifest, infer=dataclasses.replace(manifest.infer, tta=tta), members=members)


def load_ensemble(manifest: Manifest, device: torch.device) -> tuple[list[torch.nn.Module], Config]:
    """The manifest's models on ``device`` (a blend's as :class:`BlendMember` s) and the first's config.

    Every stage that predicts from a run comes here: a dead writer's temp files (a checkpoint's size) and
    half-committed tuning (:func:`pipeline.core.io.transaction`) of the run are settled first."""
    with contextlib.suppress(OSError):  # a read-only copy of a run can still be predicted from
        remove_stale_temps(manifest.run_dir)
    models, cfgs = [], []
    for path, member in _checkpoint_paths(manifest):
        model, cfg, _ = load_model(path, device)
        if resolve_channels_last(device, cfg.train.channels_last):
            model = model.to(memory_format=torch.channels_last)
        if member is not None:
            i, m = member
            model = BlendMember(model, i, m.weight, m.tta, manifest.infer.tta, cfg.train.amp)
        models.append(model)
        cfgs.append(cfg)
    classes = {c.model.classes for c in cfgs}
    if len(classes) != 1:
        raise ConfigError(
            f"{manifest.run_dir}: checkpoints disagree on model.classes ({classes}); "
            "an ensemble must predict the same classes"
        )
    return models, cfgs[0]


@torch.no_grad()
def predict_batch(
    models: Sequence[torch.nn.Module],
    x: torch.Tensor,
    tta: str,
    classes: int = 1,
    max_images: int = MAX_IMAGES,
    amp: str | None = None,
) -> torch.Tensor:
    """Average probabilities over models and TTA views.

    Args:
        x: uint8 or float [B, 3, H, W] on the models' device (0..255; models normalise).
        max_images: images of x's H x W per forward in pixels, TTA views included (``infer.max_images``,
            :func:`pipeline.core.tta.predict_tta`): bounds memory for every TTA set.
        amp: the run's ``train.amp`` (:func:`pipeline.core.device.resolve_amp`), the precision its OOF
            pass, and so its tuned threshold, used; None: each model's own run's (:func:`run_precision`).
    Returns:
        float32 [B, K, H, W] probabilities (K = 1 for binary, sigmoid; else softmax).

    A blend's :class:`BlendMember` s bring their run's TTA set and precision; each run's models are
    averaged, then the runs by weight (normalised to sum 1).
    """
    activation = "sigmoid" if classes == 1 else "softmax"
    sums: dict[int | None, torch.Tensor] = {}  # run of a blend (None: a plain model) -> sum of its models
    counts: dict[int | None, int] = {}
    weights: dict[int | None, float] = {}
    for m in models:
        blend = isinstance(m, BlendMember)
        key = m.member if blend else None
        view = m.tta_for(tta) if blend else tta
        precision = run_precision(m) if blend or amp is None else amp
        with autocast_ctx(x.device, precision):
            p = tta_mod.predict_tta(m, x, view, activation, max_images=max_images).float()
        sums[key] = sums[key].add_(p) if key in sums else p
        counts[key] = counts.get(key, 0) + 1
        weights[key] = m.weight if blend else 1.0
    if list(sums) == [None]:
        return sums[None] / counts[None]
    total = None
    for key, s in sums.items():
        term = s.div_(counts[key]).mul_(weights[key])
        total = term if total is None else total.add_(term)
    return total / sum(weights.values())


def iter_predictions(
    models: Sequence[torch.nn.Module],
    split: Split,
    tta: str,
    device: torch.device,
    batch_size: int = InferConfig.batch_size,
    num_workers: int = DataConfig.num_workers,
    classes: int = 1,
    threshold: float | None = None,
    max_images: int = MAX_IMAGES,
    amp: str | None = None,
) -> Iterator[tuple[list[str], np.ndarray]]:
    """Yield (names, out) per batch in split order.

    ``out`` is float32 probabilities [B, H, W] (binary) or [B, K, H, W]; with ``threshold`` set
    (binary), uint8 masks [B, H, W] thresholded on the device, so 4x less comes back to the host.
    ``amp``: the run's ``train.amp``, None: each model's own (see :func:`predict_batch`).
    JPEG decoding runs in DataLoader workers with pinned memory, overlapping the device.
    """
    workers = resolve_workers(num_workers)
    loader = torch.utils.data.DataLoader(
        SegDataset(Split(split.names, split.image_paths, None)),
        batch_size=batch_size,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if workers else None,
    )
    for batch in loader:
        x = batch[IMAGE].to(device, non_blocking=True)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        probs = predict_batch(models, x, tta, classes, max_images, amp)
        out = probs[:, 0] if classes == 1 else probs
        if threshold is not None and classes == 1:
            out = (out > threshold).to(torch.uint8)
        yield list(batch[NAME]), out.cpu().numpy()


def predict_folds(
    manifest_path: str | Path, image_paths: Sequence[str | Path], tta: str = "none", device: str = "auto"
) -> dict[int, np.ndarray]:
    """Per-fold probabilities float32 [N, H, W] for the given images (notebooks: fold agreement)."""
    manifest = load_manifest(manifest_path)
    dev = pick_device(device)
    paths = [Path(p) for p in image_paths]
    split = Split([p.name for p in paths], paths, None)
    out = {}
    for c in manifest.checkpoints:
        model, cfg, ckpt = load_model(manifest.run_dir / c, dev)
        probs = [
            p
            for _, p in iter_predictions(
                [model], split, tta, dev, manifest.infer.batch_size, 0, cfg.model.classes
            )
        ]
        out[ckpt.fold] = np.concatenate(probs)
    return out
