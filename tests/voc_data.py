"""A tiny 3-class VOC-layout data set generated for the tests, and a tiny training config on it.

Palette PNGs with classes 0/1/2 (background, roof, pool) and a 255 "void" border around every object;
training images 64x64, validation images of varying sizes (:data:`VAL_SIZES`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from conftest import TINY_OVERRIDES
from PIL import Image

from pipeline.core.config import Config, DataConfig, load_config
from pipeline.data.layouts import voc_colors

COLORMAP = {
    "classes": [
        {"id": 0, "name": "background", "color": [0, 0, 0]},
        {"id": 1, "name": "roof", "color": [200, 40, 40]},
        {"id": 2, "name": "pool", "color": [40, 40, 200]},
    ],
    "ignore_index": 255,
}
VAL_SIZES = ((64, 64), (64, 64), (60, 72), (48, 80))


def draw_scene(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """An image uint8 [h, w, 3] and its mask uint8 [h, w]: a red square (1), a blue disk (2), void rims."""
    img = rng.integers(60, 100, (h, w, 3)).astype(np.uint8)
    mask = np.zeros((h, w), np.uint8)
    yy, xx = np.mgrid[:h, :w]
    for cls, color in ((1, (200, 40, 40)), (2, (40, 40, 200))):
        cy, cx, r = rng.integers(12, h - 12), rng.integers(12, w - 12), rng.integers(6, 11)
        if cls == 1:
            inside = (abs(yy - cy) <= r) & (abs(xx - cx) <= r)
            rim = (abs(yy - cy) <= r + 1) & (abs(xx - cx) <= r + 1) & ~inside
        else:
            d2 = (yy - cy) ** 2 + (xx - cx) ** 2
            inside, rim = d2 <= r * r, (d2 <= (r + 1.5) ** 2) & (d2 > r * r)
        mask[rim & (mask == 0)] = 255
        mask[inside] = cls
        img[inside] = color
    return img, mask


def save_palette_png(path: Path, mask: np.ndarray) -> None:
    im = Image.fromarray(mask, mode="P")
    im.putpalette([v for c in voc_colors() for v in c])
    im.save(path)


def make_voc(root: Path, n_train: int = 8, val_sizes=VAL_SIZES, seed: int = 0, colormap: bool = True) -> Path:
    """A VOC-layout folder: JPEGImages/, SegmentationClass/ (palette PNGs), ImageSets/Segmentation/*.txt."""
    rng = np.random.default_rng(seed)
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    ids = []
    for i, (h, w) in enumerate([(64, 64)] * n_train + list(val_sizes)):
        img, mask = draw_scene(rng, h, w)
        ids.append(f"2007_{i:06d}")
        Image.fromarray(img).save(root / "JPEGImages" / f"{ids[-1]}.jpg", quality=95)
        save_palette_png(root / "SegmentationClass" / f"{ids[-1]}.png", mask)
    lists = root / "ImageSets" / "Segmentation"
    (lists / "train.txt").write_text("\n".join(ids[:n_train]) + "\n")
    if ids[n_train:]:
        (lists / "val.txt").write_text("\n".join(ids[n_train:]) + "\n")
    if colormap:
        (root / "colormap.json").write_text(json.dumps(COLORMAP))
    return root


def voc_cfg(root: Path) -> DataConfig:
    return DataConfig(root=str(root), layout="voc", colormap_json="colormap.json")


# One short epoch: enough to exercise every stage, not to learn.
FAST = ["train.epochs=1", "train.max_steps_per_epoch=2", "train.batch_size=2", "infer.tta=none"]


def multi_cfg(voc_root: Path, tmp_path: Path, *extra: str) -> Config:
    """A tiny 3-class training config on ``voc_root`` (CPU, one short epoch), runs under ``tmp_path``."""
    return load_config(
        None,
        [
            f"data.root={voc_root}",
            "data.layout=voc",
            "data.colormap_json=colormap.json",
            "model.classes=3",
            "loss.ignore_index=255",
            f"train.runs_dir={tmp_path / 'runs'}",
            "name=voc",
            *TINY_OVERRIDES,
            *FAST,
            *extra,
        ],
    )
