"""Scene prediction: georeferencing kept, exact blending, memory bounded by a strip of tile rows,
multi-class argmax with a colour table."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import rasterio
from PIL import Image
from synthetic_scenes import CRS_UTM, TRANSFORM
from synthetic_scenes import scene as _scene
from synthetic_scenes import write_tif as _write_tif

from pipeline.geo.scene import predict_scene
from pipeline.geo.tiling import TileGrid, merge, split
from pipeline.metrics.postprocess import binarize

# ----------------------------------------------------------------------------- predict_scene


def _red_prob(tiles: np.ndarray) -> np.ndarray:
    """A fixed function of the pixels: [B, H, W, 3] uint8 -> red / 255 float32 [B, H, W]."""
    return tiles[..., 0].astype(np.float32) / np.float32(255)


@pytest.mark.parametrize(
    ("tile", "overlap", "window"),
    [
        (512, 128, "cosine"),
        (256, 0, "uniform"),
        (200, 73, "gaussian"),
        (160, 120, "cosine"),
        (2048, 0, "cosine"),
    ],
)
def test_predict_scene_identity_is_exact_and_keeps_georeferencing(
    tmp_path: Path, tile: int, overlap: int, window: str
) -> None:
    rgb, _ = _scene(1000, 1300)
    src = tmp_path / "scene.tif"
    _write_tif(src, rgb)
    dst = tmp_path / "pred.tif"
    # A threshold equal to a value the scene holds (red == 150): any rounding error in the blend
    # would flip those pixels, so equality below checks that blending identical values is exact.
    threshold = float(np.float32(150) / np.float32(255))
    assert (rgb[..., 0] == 150).sum() > 100
    stats = predict_scene(
        src, dst, _red_prob, tile=tile, overlap=overlap, batch_size=3, threshold=threshold, window=window
    )
    with rasterio.open(dst) as out:
        assert out.crs == CRS_UTM
        assert out.transform == TRANSFORM
        assert (out.count, out.dtypes[0]) == (1, "uint8")
        assert out.profile["compress"] == "deflate" and out.profile["tiled"]
        pred = out.read(1)
    expected = binarize(_red_prob(rgb), threshold)
    np.testing.assert_array_equal(pred, expected)
    assert sum(stats.flushed_rows) == 1000
    assert stats.n_tiles == len(TileGrid(1000, 1300, tile, overlap))


def test_predict_scene_matches_in_memory_blend(tmp_path: Path) -> None:
    """Tiles that disagree (a per-tile offset): the strip-wise blend equals merge() over the whole scene."""
    rgb, _ = _scene(700, 500, seed=3)
    src = tmp_path / "scene.tif"
    _write_tif(src, rgb)

    def make_fn():
        count = [0]

        def fn(tiles: np.ndarray) -> np.ndarray:
            offsets = 0.2 * np.sin(np.arange(count[0], count[0] + len(tiles), dtype=np.float32))
            count[0] += len(tiles)
            return np.clip(_red_prob(tiles) + offsets[:, None, None], 0, 1).astype(np.float32)

        return fn

    grid = TileGrid(700, 500, 192, 64)
    blended = merge(make_fn()(split(rgb, grid)), grid, window="cosine", dtype=np.float32)
    stats = predict_scene(
        src, tmp_path / "p.tif", make_fn(), tile=192, overlap=64, threshold=0.45, foreground=255
    )
    with rasterio.open(tmp_path / "p.tif") as out:
        pred = out.read(1)
    np.testing.assert_array_equal(pred, binarize(blended, 0.45) * 255)
    assert not np.array_equal(pred, binarize(_red_prob(rgb), 0.45) * 255)  # the offsets did change the result
    assert stats.n_batches == len(grid.row_offsets) * 1  # 3 columns, batch_size 8 -> one batch per tile row


def test_predict_scene_writes_cloud_optimised_geotiffs_and_probabilities(tmp_path: Path) -> None:
    """The mask is a COG (tiled, deflate, overviews); probs_path adds round(p * 255), here exactly red."""
    rgb, _ = _scene(1000, 1300)
    _write_tif(tmp_path / "scene.tif", rgb)
    src, probs = tmp_path / "scene.tif", tmp_path / "probs.tif"
    predict_scene(src, tmp_path / "mask.tif", _red_prob, tile=256, overlap=64, probs_path=probs)
    for path in (tmp_path / "mask.tif", probs):
        with rasterio.open(path) as out:
            assert out.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
            assert out.block_shapes == [(256, 256)] and out.profile["compress"] == "deflate"
            assert out.overviews(1) == [2, 4, 8]
            assert out.crs == CRS_UTM and out.transform == TRANSFORM
    with rasterio.open(probs) as out:
        np.testing.assert_array_equal(out.read(1), rgb[..., 0])
    with pytest.raises(ValueError, match="binary runs only"):
        predict_scene(src, tmp_path / "ids.tif", _red_prob, classes=3, probs_path=probs)


def test_predict_scene_memory_is_a_strip_not_the_scene(tmp_path: Path) -> None:
    height, width, tile, overlap = 6000, 256, 128, 32
    rgb = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    src = tmp_path / "tall.tif"
    _write_tif(src, rgb)
    del rgb
    tracemalloc.start()
    try:
        stats = predict_scene(src, tmp_path / "p.tif", _red_prob, tile=tile, overlap=overlap)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    stride = tile - overlap
    assert stats.accumulator_rows <= tile + stride
    assert sum(stats.flushed_rows) == height
    assert max(stats.flushed_rows[:-1]) <= stride  # the last flush is the whole last tile row
    # One whole-scene float64 accumulator alone would be 6000 x 256 x 8 = 12 MB; the strip buffers,
    # one strip of RGB and a batch of tiles stay far below a quarter of that.
    assert peak < height * width * 8 / 4, f"peak traced memory {peak / 1e6:.1f} MB"


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_predict_scene_plain_png(tmp_path: Path) -> None:
    rgb, _ = _scene(300, 410, seed=5)
    src = tmp_path / "scene.png"
    Image.fromarray(rgb).save(src)
    for name in ("pred.png", "pred.tif"):
        predict_scene(src, tmp_path / name, _red_prob, tile=128, overlap=32, foreground=255)
        with rasterio.open(tmp_path / name) as out:
            assert out.crs is None
            pred = out.read(1)
        np.testing.assert_array_equal(pred, binarize(_red_prob(rgb), 0.5) * 255)


def _three_class_probs(tiles: np.ndarray) -> np.ndarray:
    """Softmax over 3 classes of per-pixel scores from the colours: uint8 [B, H, W, 3] -> [B, H, W, 3]."""
    x = tiles.astype(np.float32) / 255
    scores = np.stack([x[..., 0] - x[..., 1], x[..., 1] - x[..., 2], x[..., 2] - x[..., 0]], axis=-1) * 4
    e = np.exp(scores - scores.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("suffix", [".tif", ".png"])
@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_predict_scene_multiclass_writes_argmax_of_blended_probabilities(tmp_path: Path, suffix: str) -> None:
    """classes > 1: per-class probabilities are blended, then argmax: class ids, not a thresholded channel."""
    rgb, _ = _scene(300, 410, seed=7)
    src = tmp_path / "scene.tif"
    _write_tif(src, rgb)
    count = [0]

    def fn(tiles: np.ndarray) -> np.ndarray:  # tiles disagree (per-tile shifts), so the blend matters
        shifts = 0.3 * np.sin(np.arange(count[0], count[0] + len(tiles), dtype=np.float32))
        count[0] += len(tiles)
        p = _three_class_probs(tiles)
        p[..., 1] += shifts[:, None, None]
        return np.clip(p, 0, 1)

    grid = TileGrid(300, 410, 128, 48)
    expected = merge(fn(split(rgb, grid)), grid, window="cosine", dtype=np.float32).argmax(-1).astype("uint8")
    assert set(np.unique(expected)) == {0, 1, 2}
    count[0] = 0
    colors = [(0, 0, 0), (200, 40, 40), (40, 40, 200)]
    dst = tmp_path / f"ids{suffix}"
    stats = predict_scene(src, dst, fn, tile=128, overlap=48, batch_size=2, classes=3, colors=colors)
    with rasterio.open(dst) as out:
        assert (out.count, out.dtypes[0]) == (1, "uint8")
        ids = out.read(1)
        cmap = out.colormap(1)
    np.testing.assert_array_equal(ids, expected)
    assert [cmap[c][:3] for c in range(3)] == colors
    assert sum(stats.flushed_rows) == 300
    with pytest.raises(ValueError, match=r"\[B, H, W, K\] = \(2, 128, 128, 3\)"):
        predict_scene(src, tmp_path / "p.tif", _red_prob, tile=128, overlap=48, batch_size=2, classes=3)
    assert not (tmp_path / "p.tif").exists()


def test_predict_scene_bad_predict_fn(tmp_path: Path) -> None:
    rgb, _ = _scene(100, 100)
    _write_tif(tmp_path / "s.tif", rgb)
    with pytest.raises(ValueError, match=r"\[B, H, W\]"):
        predict_scene(
            tmp_path / "s.tif", tmp_path / "p.tif", lambda t: t[..., :1] / 255.0, tile=64, overlap=0
        )
    assert not (tmp_path / "p.tif").exists()  # atomic: no partial output
    with pytest.raises(ValueError, match=".tif"):
        predict_scene(tmp_path / "s.tif", tmp_path / "p.jpg", _red_prob, tile=64, overlap=0)
