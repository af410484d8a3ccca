"""``make predict-scene``: a run's ensemble over a large scene by sliding windows, written as a COG.

    python -m pipeline.infer.scenes --run runs/<run> --scene big.tif --out big_mask.tif

The windows, their blending and the output raster are :mod:`pipeline.geo.scene`'s; this module
brings the models (:mod:`pipeline.infer.ensemble`) and the run's settings (its manifest).
:class:`ScenePredictor` loads the ensemble once for any number of scenes (``make predict-scenes``,
:mod:`pipeline.infer.area`). The mask carries what made it in its GeoTIFF tags
(:class:`pipeline.geo.scene.MaskTags`: the run, its threshold and tuned ``min_area``), so that
``make footprints MASK=`` applies the run's post-processing.

Before any model is loaded, the output is checked (a known suffix; never the input scene) and the
scene is opened (readable, 8-bit RGB): a bad argument costs a second, not a model load.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from pipeline.core import tta as tta_mod
from pipeline.core.config import ConfigError
from pipeline.core.device import Dist, pick_device
from pipeline.core.errors import cli
from pipeline.core.progress import format_duration, progress
from pipeline.data import DataError
from pipeline.geo import scene as scene_mod
from pipeline.geo.tiling import check_rgb, open_raster
from pipeline.infer.ensemble import load_ensemble, predict_batch, with_tta
from pipeline.runs.manifest import Manifest, load_manifest

COMMAND = "make predict-scene"


def inspect_scene(path: str | Path) -> tuple[int, int, str | None]:
    """(height, width, CRS as text or None) of a scene that :func:`predict_scene_file` can read: a
    readable raster of >= 3 uint8 bands. Anything else is a :class:`pipeline.geo.GeoError` naming it."""
    path = Path(path)
    with open_raster(path) as src:
        check_rgb(src, path)
        return src.height, src.width, None if src.crs is None else src.crs.to_string()


class ScenePredictor:
    """A run's ensemble, loaded once, and what it writes into every scene mask.

    Args:
        run: run folder, its ``manifest.yaml``, or the :class:`Manifest` a caller already read.
        tta: a TTA set for every model, every run of a blend included (default: the manifest's; a
            blend's runs then keep their own).
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` (under torchrun, ``cuda`` is the rank's GPU).
    """

    def __init__(
        self, run: str | Path | Manifest, tta: str | None = None, device: str = "auto", d: Dist | None = None
    ):
        manifest = run if isinstance(run, Manifest) else load_manifest(run)
        self.tta = check_tta(tta or manifest.infer.tta)
        # A set asked for applies to every run of a blend, as in make submit (else each run keeps its own).
        self.manifest: Manifest = with_tta(manifest, self.tta) if tta else manifest
        self.device = pick_device(device, d or Dist())
        with progress(None, f"load {self.manifest.name} ({len(self.manifest.checkpoints)} checkpoints)"):
            self.models, self.cfg = load_ensemble(self.manifest, self.device)
        self.classes = self.cfg.model.classes
        self.colors = self._colors() if self.classes > 1 else None

    def _colors(self) -> list[tuple[int, int, int]] | None:
        """The run's class colours from its data folder (layout, colormap); else None and a warning."""
        from pipeline.data.layouts import read_source

        data = dataclasses.replace(self.cfg.data, root=self.manifest.data_root or self.cfg.data.root)
        try:
            source = read_source(data, with_train=False, with_test=False)
            if source.num_classes != self.classes:
                raise DataError(f"it has {source.num_classes} classes, the run predicts {self.classes}")
            return source.colors
        except DataError as e:
            warnings.warn(f"no colour table from {data.layout} data at {data.root}: {e}", stacklevel=3)
            return None

    def tags(self, scene: str | Path, command: str = COMMAND) -> scene_mod.MaskTags:
        m = self.manifest
        return scene_mod.MaskTags(
            command,
            m.name,
            str(m.run_dir.resolve()),
            m.infer.threshold,
            m.infer.min_area,
            self.tta,
            self.classes,
            Path(scene).name,
        )

    def predict_fn(self, tiles: np.ndarray) -> np.ndarray:
        """uint8 tiles [B, H, W, 3] -> probabilities [B, H, W] (binary) or [B, H, W, K]."""
        x = torch.from_numpy(np.ascontiguousarray(tiles.transpose(0, 3, 1, 2))).to(self.device)
        probs = predict_batch(self.models, x, self.tta, self.classes, self.manifest.infer.max_images)
        # Binary: the one channel [B, H, W]; multi-class: classes last [B, H, W, K], like the tiles.
        return (probs[:, 0] if self.classes == 1 else probs.permute(0, 2, 3, 1)).cpu().numpy()

    def predict(
        self,
        scene: str | Path,
        out: str | Path,
        probs_out: str | Path | None = None,
        command: str = COMMAND,
        desc: str = "",
        probs_cog: bool = True,
    ) -> scene_mod.SceneStats:
        """Predict ``scene`` into the mask ``out`` (and binary runs' probabilities ``probs_out``, a COG
        unless ``probs_cog`` is False)."""
        infer = self.manifest.infer
        return scene_mod.predict_scene(
            scene,
            out,
            self.predict_fn,
            tile=infer.tile_size,
            overlap=infer.overlap,
            batch_size=infer.batch_size,
            threshold=infer.threshold,
            classes=self.classes,
            colors=self.colors,
            probs_path=probs_out,
            tags=self.tags(scene, command).to_tags(),
            desc=desc,
            probs_cog=probs_cog,
        )


def check_tta(name: str) -> str:
    if name not in tta_mod.TTA_SETS:
        raise ConfigError(f"unknown TTA set {name!r}; use one of {', '.join(tta_mod.TTA_SETS)}")
    return name


def check_outputs(scene: str | Path, outputs: Sequence[str | Path | None]) -> None:
    """Every output has a raster suffix and none is the scene (nor another output); before any model."""
    given = [Path(o) for o in outputs if o]
    for i, out in enumerate(given):
        scene_mod.check_output(out, [scene, *given[:i]])


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
    if tta is not None:
        check_tta(tta)
    check_outputs(scene, [out, probs_out])
    inspect_scene(scene)
    ScenePredictor(manifest_path, tta, device).predict(scene, out, probs_out)
    return Path(out)


def describe(out: str | Path, stats: scene_mod.SceneStats, seconds: float, classes: int = 1) -> str:
    """``wrote m.tif: 2,048 x 2,048 px, EPSG:32631, buildings 12.3 % of pixels, 41 s``."""
    what = "buildings" if classes == 1 else "classes other than 0"
    return (
        f"wrote {out}: {stats.width:,} x {stats.height:,} px, {stats.crs or 'no CRS (pixel coordinates)'}, "
        f"{what} {100 * stats.fraction:.1f} % of pixels, {format_duration(seconds)}"
    )


def note_replaced(path: str | Path) -> None:
    """Say that an existing file is about to be replaced, and who wrote it (never replace silently)."""
    if Path(path).exists():
        print(f"note: replacing {path} ({scene_mod.written_by(path)})", file=sys.stderr)


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
    if a.tta is not None:
        check_tta(a.tta)
    check_outputs(a.scene, [a.out])
    inspect_scene(a.scene)
    t0 = time.monotonic()
    predictor = ScenePredictor(a.run, a.tta, a.device)
    note_replaced(a.out)
    stats = predictor.predict(a.scene, a.out)
    print(describe(a.out, stats, time.monotonic() - t0, predictor.classes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
