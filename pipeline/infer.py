"""Ensemble inference: rebuild fold models from their checkpoints, TTA, average probabilities.

A :class:`Manifest` (``runs/<run>/manifest.yaml``, written by training and editable by hand) lists
checkpoints, the TTA set, the OOF-tuned threshold and minimum component area. A single model is an
ensemble of one: there is no separate code path.

    python -m pipeline.infer scene --run runs/<run> --scene big.tif --out big_mask.tif   # make predict-scene
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from pipeline import tta as tta_mod
from pipeline.config import Config, ConfigError, InferConfig, config_from_dict
from pipeline.data import IMAGE, NAME, DataError, SegDataset, Split
from pipeline.device import autocast_ctx, pick_device
from pipeline.errors import cli
from pipeline.io import CheckpointError, load_checkpoint
from pipeline.models import build_model
from pipeline.runs import Manifest, load_manifest

MAX_IMAGES = InferConfig().max_images

def load_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, Config, dict]:
    """Rebuild a model from its checkpoint alone (config inside), in eval mode on ``device``."""
    state = load_checkpoint(path, map_location="cpu")
    try:
        cfg = config_from_dict(state["config"])
    except ConfigError as e:
        raise CheckpointError(
            f"{path}: the config inside is not valid for this version of buildseg: {e}"
        ) from None
    model = build_model(cfg, pretrained=False)  # the checkpoint has the weights: never download
    model.load_state_dict(state["model"])
    return model.to(device).eval(), cfg, state


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
    batch_size: int = 16,
    num_workers: int = 2,
    classes: int = 1,
    threshold: float | None = None,
    max_images: int = MAX_IMAGES,
) -> Iterator[tuple[list[str], np.ndarray]]:
    """Yield (names, out) per batch in split order.

    ``out`` is float32 probabilities [B, H, W] (binary) or [B, K, H, W]; with ``threshold`` set
    (binary), uint8 masks [B, H, W] thresholded on the device, so 4x less comes back to the host.
    JPEG decoding runs in DataLoader workers with pinned memory, overlapping the device.
    """
    loader = torch.utils.data.DataLoader(
        SegDataset(Split(split.names, split.image_paths, None)),
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if num_workers else None,
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
        model, cfg, state = load_model(manifest.run_dir / c, dev)
        probs = [
            p
            for _, p in iter_predictions(
                [model], split, tta, dev, manifest.infer.batch_size, 0, cfg.model.classes
            )
        ]
        out[int(state.get("fold", len(out)))] = np.concatenate(probs)
    return out


# ----------------------------------------------------------------------------- large scenes


def predict_scene_file(
    manifest_path: str | Path,
    scene: str | Path,
    out: str | Path,
    tta: str | None = None,
    device: str = "auto",
    probs_out: str | Path | None = None,
) -> Path:
    """Sliding-window ensemble prediction over a large GeoTIFF/JPEG into a uint8 raster at ``out``.

    Binary runs: a 0/1 mask (the manifest's threshold), and with ``probs_out`` (.tif) the blended
    probabilities as uint8 ``round(p * 255)``. Multi-class runs: class ids, the argmax of the
    blended per-class probabilities, with the run's class colours as the colour table when its data
    folder (layout, colormap) can be read; otherwise a warning, and the ids without colours.
    """
    import dataclasses
    import warnings

    from pipeline import scene as scene_mod
    from pipeline.layouts import read_source

    manifest = load_manifest(manifest_path)
    tta_name = tta or manifest.infer.tta
    if tta_name not in tta_mod.TTA_SETS:
        raise ConfigError(f"unknown TTA set {tta_name!r}; use one of {', '.join(tta_mod.TTA_SETS)}")
    dev = pick_device(device)
    models, cfg = load_ensemble(manifest, dev)
    classes = cfg.model.classes
    colors = None
    if classes > 1:
        data = dataclasses.replace(cfg.data, root=manifest.data_root or cfg.data.root)
        try:
            source = read_source(data, with_train=False, with_test=False)
            if source.num_classes != classes:
                raise DataError(f"it has {source.num_classes} classes, the run predicts {classes}")
            colors = source.colors
        except DataError as e:
            warnings.warn(f"{out}: no colour table from {data.layout} data at {data.root}: {e}", stacklevel=2)

    def predict_fn(tiles: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(tiles.transpose(0, 3, 1, 2))).to(dev)
        probs = predict_batch(models, x, tta_name, classes, manifest.infer.max_images)
        # Binary: the one channel [B, H, W]; multi-class: classes last [B, H, W, K], like the tiles.
        return (probs[:, 0] if classes == 1 else probs.permute(0, 2, 3, 1)).cpu().numpy()

    scene_mod.predict_scene(
        scene,
        out,
        predict_fn,
        tile=manifest.infer.tile_size,
        overlap=manifest.infer.overlap,
        batch_size=manifest.infer.batch_size,
        threshold=manifest.infer.threshold,
        classes=classes,
        colors=colors,
        probs_path=probs_out,
    )
    return Path(out)


@cli
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.infer")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("scene", help="predict a large scene (GeoTIFF/JPEG/PNG) by sliding windows")
    s.add_argument("--run", required=True, help="run folder or manifest.yaml")
    s.add_argument("--scene", required=True)
    s.add_argument("--out", required=True, help="output mask (GeoTIFF keeps the input's CRS and transform)")
    s.add_argument("--tta", default=None)
    s.add_argument("--device", default="auto")
    a = p.parse_args(argv)
    out = predict_scene_file(a.run, a.scene, a.out, a.tta, a.device)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
