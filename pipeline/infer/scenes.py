"""``make predict-scene``: a run's ensemble over a large scene by sliding windows, written as a COG.

    python -m pipeline.infer.scenes --run runs/<run> --scene big.tif --out big_mask.tif

The windows, their blending and the output raster are :mod:`pipeline.geo.scene`'s; this module
brings the models (:mod:`pipeline.infer.ensemble`) and the run's settings (its manifest).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from pipeline.core import tta as tta_mod
from pipeline.core.config import ConfigError
from pipeline.core.device import pick_device
from pipeline.core.errors import cli
from pipeline.data import DataError
from pipeline.infer.ensemble import load_ensemble, predict_batch
from pipeline.runs.manifest import load_manifest


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

    from pipeline.data.layouts import read_source
    from pipeline.geo import scene as scene_mod

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
    p = argparse.ArgumentParser(
        prog="python -m pipeline.infer.scenes",
        description="predict a large scene (GeoTIFF/JPEG/PNG) by sliding windows",
    )
    p.add_argument("--run", required=True, help="run folder or manifest.yaml")
    p.add_argument("--scene", required=True)
    p.add_argument("--out", required=True, help="output mask (GeoTIFF keeps the input's CRS and transform)")
    p.add_argument("--tta", default=None)
    p.add_argument("--device", default="auto")
    a = p.parse_args(argv)
    out = predict_scene_file(a.run, a.scene, a.out, a.tta, a.device)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
