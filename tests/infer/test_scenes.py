"""Ensemble inference over large scenes (``make predict-scene``) with a multi-class run.

The ensemble is a fixed pixel-wise model (no training): logits from the pixel colours, so the class of
every pixel is known by construction and the written GeoTIFF can be checked pixel for pixel.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasterio.transform import from_origin

from pipeline.core.config import ConfigError, load_config
from pipeline.infer import scenes
from pipeline.runs.manifest import Manifest, write_manifest

COLORS = [(0, 0, 0), (200, 40, 40), (40, 40, 200)]
GRAY, RED, BLUE = (90, 90, 90), (200, 40, 40), (40, 40, 200)


class ColourModel(torch.nn.Module):
    """Pixel-wise logits [B, 3, H, W] from uint8 RGB: grey -> 0, red -> 1, blue -> 2, by wide margins."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255
        r, b = x[:, 0:1], x[:, 2:3]
        return torch.cat([torch.zeros_like(r), 10 * (r - b) - 2, 10 * (b - r) - 2], dim=1)


def _scene(height: int = 150, width: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """RGB uint8 [H, W, 3] of grey ground with red and blue rectangles, and its class ids uint8 [H, W]."""
    ids = np.zeros((height, width), np.uint8)
    ids[10:40, 20:90] = 1
    ids[60:140, 150:190] = 2
    ids[100:120, 5:60] = 1
    ids[0:20, 120:200] = 2  # touches the border
    rgb = np.array([GRAY, RED, BLUE], np.uint8)[ids]
    return rgb, ids


@pytest.fixture
def multiclass_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A 3-class run folder (VOC layout with a colormap) whose ensemble is :class:`ColourModel`."""
    data = tmp_path / "voc"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (data / sub).mkdir(parents=True)
    names = ("bg", "roof", "pool")
    classes = [{"id": i, "name": n, "color": list(c)} for i, (n, c) in enumerate(zip(names, COLORS))]
    (data / "colormap.json").write_text(json.dumps({"classes": classes, "ignore_index": 255}))
    cfg = load_config(
        None,
        [
            f"data.root={data}",
            "data.layout=voc",
            "data.colormap_json=colormap.json",
            "model.classes=3",
            "loss.ignore_index=255",
        ],
    )
    run = tmp_path / "run"
    infer = dataclasses.replace(cfg.infer, tta="flip", tile_size=64, overlap=16, batch_size=4)
    write_manifest(Manifest(run, ("fold0/best.pt",), infer, classes=3))
    monkeypatch.setattr(scenes, "load_ensemble", lambda manifest, device: ([ColourModel().eval()], cfg))
    return run


def _write_scene(path: Path, rgb: np.ndarray) -> None:
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        height=rgb.shape[0],
        width=rgb.shape[1],
        count=3,
        dtype="uint8",
        crs="EPSG:32631",
        transform=from_origin(500000.0, 4500000.0, 0.5, 0.5),
    ) as dst:
        dst.write(rgb.transpose(2, 0, 1))


def test_predict_scene_multiclass_writes_class_ids_with_the_run_colours(multiclass_run, tmp_path):
    """make predict-scene on a multi-class run: argmax class ids (not a thresholded background channel)."""
    rgb, ids = _scene()
    _write_scene(tmp_path / "scene.tif", rgb)
    out = scenes.predict_scene_file(
        multiclass_run, tmp_path / "scene.tif", tmp_path / "ids.tif", device="cpu"
    )
    with rasterio.open(out) as r:
        assert (r.count, r.dtypes[0]) == (1, "uint8")
        assert r.crs.to_epsg() == 32631 and r.transform == from_origin(500000.0, 4500000.0, 0.5, 0.5)
        np.testing.assert_array_equal(r.read(1), ids)
        assert [r.colormap(1)[c][:3] for c in range(3)] == COLORS


def test_predict_scene_multiclass_without_the_data_folder_still_writes_ids(multiclass_run, tmp_path):
    """The colour table comes from the run's data folder; without it the class ids are still right."""
    import shutil

    rgb, ids = _scene(70, 90)
    _write_scene(tmp_path / "scene.tif", rgb)
    shutil.rmtree(tmp_path / "voc")
    with pytest.warns(UserWarning, match="colour"):
        out = scenes.predict_scene_file(multiclass_run, tmp_path / "scene.tif", tmp_path / "ids.tif", "none")
    with rasterio.open(out) as r:
        np.testing.assert_array_equal(r.read(1), ids)


def test_predict_scene_unknown_tta_names_the_sets(multiclass_run, tmp_path):
    with pytest.raises(ConfigError, match="none, flip, d4"):
        scenes.predict_scene_file(multiclass_run, tmp_path / "scene.tif", tmp_path / "ids.tif", "d8", "cpu")
    assert not (tmp_path / "ids.tif").exists()
