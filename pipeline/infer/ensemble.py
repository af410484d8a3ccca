"""Ensemble inference: rebuild fold models from their checkpoints, TTA, average probabilities.

A :class:`Manifest` (``runs/<run>/manifest.yaml``, written by training and editable by hand) lists
checkpoints, the TTA set, the OOF-tuned threshold and minimum component area. A single model is an
ensemble of one: there is no separate code path. Every stage that predicts (the OOF pass aside:
it has the fold's model in hand) goes through :func:`load_ensemble` and :func:`predict_batch`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from pipeline.core import tta as tta_mod
from pipeline.core.config import Config, ConfigError, DataConfig, InferConfig, config_from_dict
from pipeline.core.device import autocast_ctx, pick_device, resolve_workers
from pipeline.core.io import CheckpointError
from pipeline.data.dataset import IMAGE, NAME, SegDataset, Split
from pipeline.model.registry import build_model
from pipeline.runs.checkpoint import BestCheckpoint, read_best
from pipeline.runs.manifest import Manifest, load_manifest

MAX_IMAGES = InferConfig.max_images


def load_model(
    path: str | Path, device: torch.device | str = "cpu"
) -> tuple[torch.nn.Module, Config, BestCheckpoint]:
    """Rebuild a model from its ``best.pt`` alone (config inside), in eval mode on ``device``."""
    ckpt = read_best(path, map_location="cpu")
    try:
        cfg = config_from_dict(ckpt.config)
    except ConfigError as e:
        raise CheckpointError(
            f"{path}: the config inside is not valid for this version of buildseg: {e}"
        ) from None
    model = build_model(cfg, pretrained=False)  # the checkpoint has the weights: never download
    model.load_state_dict(ckpt.model)
    return model.to(device).eval(), cfg, ckpt


def load_ensemble(manifest: Manifest, device: torch.device) -> tuple[list[torch.nn.Module], Config]:
    models, cfgs = [], []
    for c in manifest.checkpoints:
        model, cfg, _ = load_model(manifest.run_dir / c, device)
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
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
) -> torch.Tensor:
    """Average probabilities over models and TTA views.

    Args:
        x: uint8 or float [B, 3, H, W] on the models' device (0..255; models normalise).
        max_images: images per forward, TTA views included (``infer.max_images``): bounds memory.
    Returns:
        float32 [B, K, H, W] probabilities (K = 1 for binary, sigmoid; else softmax).
    """
    activation = "sigmoid" if classes == 1 else "softmax"
    total = None
    for m in models:
        with autocast_ctx(x.device):
            p = tta_mod.predict_tta(m, x, tta, activation, max_images=max_images).float()
        total = p if total is None else total.add_(p)
    return total / len(models)


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
) -> Iterator[tuple[list[str], np.ndarray]]:
    """Yield (names, out) per batch in split order.

    ``out`` is float32 probabilities [B, H, W] (binary) or [B, K, H, W]; with ``threshold`` set
    (binary), uint8 masks [B, H, W] thresholded on the device, so 4x less comes back to the host.
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
        probs = predict_batch(models, x, tta, classes, max_images)
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
