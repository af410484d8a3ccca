"""Tiling: exact split/merge round trips, make_tiles on a synthetic GeoTIFF, and predict_scene
(georeferencing kept, exact blending, memory bounded by a strip of tile rows)."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from rasterio.crs import CRS

from pipeline import rle
from pipeline.postprocess import binarize
from pipeline.tiling import (
    BLEND_WINDOWS,
    TileGrid,
    blend_window,
    main,
    make_tiles,
    merge,
    predict_scene,
    split,
)

CRS_UTM = CRS.from_epsg(32631)
TRANSFORM = Affine(0.3, 0.0, 431250.0, 0.0, -0.3, 5411200.0)  # 30 cm pixels, north-up


# ----------------------------------------------------------------------------- grid, split, merge


@st.composite
def grids(draw: st.DrawFn) -> TileGrid:
    tile = draw(st.integers(1, 24))
    return TileGrid(draw(st.integers(1, 70)), draw(st.integers(1, 70)), tile, draw(st.integers(0, tile - 1)))


@settings(max_examples=150, deadline=None)
@given(grid=grids())
def test_grid_covers_scene_and_ends_on_border(grid: TileGrid) -> None:
    covered = np.zeros((grid.height, grid.width), dtype=bool)
    for r, c, h, w in grid.windows:
        assert r >= 0 and c >= 0 and r + h <= grid.height and c + w <= grid.width
        assert h == min(grid.tile, grid.height) and w == min(grid.tile, grid.width)
        covered[r : r + h, c : c + w] = True
    assert covered.all()
    assert grid.row_offsets[-1] + min(grid.tile, grid.height) == grid.height
    assert grid.col_offsets[-1] + min(grid.tile, grid.width) == grid.width
    # Neighbours are never further apart than the stride (no gaps) and offsets strictly increase.
    assert all(0 < b - a <= grid.stride for a, b in zip(grid.row_offsets, grid.row_offsets[1:]))
    assert len(grid.windows) == len(grid)


@settings(max_examples=150, deadline=None)
@given(
    grid=grids(),
    channels=st.sampled_from([(), (1,), (3,)]),
    dtype=st.sampled_from([np.uint8, np.float32]),
    window=st.sampled_from(BLEND_WINDOWS),
    seed=st.integers(0, 2**16),
)
def test_merge_split_round_trip_is_exact(grid: TileGrid, channels, dtype, window: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    shape = (grid.height, grid.width, *channels)
    x = (
        rng.integers(0, 256, shape).astype(dtype)
        if dtype == np.uint8
        else rng.random(shape, dtype=np.float32)
    )
    tiles = split(x, grid)
    assert tiles.shape == (len(grid), grid.tile, grid.tile, *channels)
    y = merge(tiles, grid, window=window)
    assert y.dtype == x.dtype
    np.testing.assert_array_equal(y, x)


def test_split_pads_small_scene_by_reflection() -> None:
    x = np.arange(6, dtype=np.uint8).reshape(2, 3)
    grid = TileGrid(2, 3, tile=4)
    assert grid.windows == [(0, 0, 2, 3)]
    np.testing.assert_array_equal(split(x, grid)[0], [[0, 1, 2, 1], [3, 4, 5, 4], [0, 1, 2, 1], [3, 4, 5, 4]])


def test_grid_offsets_known_answer() -> None:
    grid = TileGrid(1000, 1300, tile=512, overlap=128)
    assert grid.row_offsets == (0, 384, 488)
    assert grid.col_offsets == (0, 384, 768, 788)
    with pytest.raises(ValueError, match="overlap"):
        TileGrid(100, 100, tile=64, overlap=64)


@pytest.mark.parametrize("kind", BLEND_WINDOWS)
def test_blend_window_positive(kind: str) -> None:
    for tile in (1, 2, 7, 512):
        w = blend_window(tile, kind)
        assert w.dtype == np.float32 and w.shape == (tile, tile)
        assert (w > 0).all() and w.max() == 1.0
        np.testing.assert_array_equal(w, w.T)
    if kind != "uniform":
        w = blend_window(64, kind)
        assert w[0, 0] < w[16, 16] < w[32, 32]  # borders count less than the centre
    with pytest.raises(ValueError, match="cosine"):
        blend_window(8, "hann")


# ----------------------------------------------------------------------------- synthetic scenes


def _scene(height: int, width: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """RGB uint8 [H, W, 3] with rectangular 'buildings', and the gt mask 0/255 [H, W]."""
    rng = np.random.default_rng(seed)
    gt = np.zeros((height, width), dtype=np.uint8)
    for _ in range(height * width // 20000 + 3):
        y, x = rng.integers(0, height), rng.integers(0, width)
        gt[y : y + rng.integers(5, 60), x : x + rng.integers(5, 60)] = 255
    # Smooth texture (JPEG keeps it) with a little noise; buildings 100 levels brighter.
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([np.sin(xx / 37 + k) * np.cos(yy / 23 - k) for k in range(3)], axis=-1) * 50 + 75
    rgb = (base + rng.integers(0, 8, base.shape) + (gt[..., None] > 0) * 100).astype(np.uint8)
    return rgb, gt


def _write_tif(
    path: Path, bands: np.ndarray, crs: CRS | None = CRS_UTM, transform: Affine = TRANSFORM
) -> None:
    """Write [H, W] or [H, W, C] uint8 as a striped GeoTIFF (like Inria's)."""
    data = bands[None] if bands.ndim == 2 else np.moveaxis(bands, -1, 0)
    profile = dict(
        driver="GTiff", height=data.shape[1], width=data.shape[2], count=data.shape[0], dtype="uint8"
    )
    with rasterio.open(path, "w", crs=crs, transform=transform, **profile) as dst:
        dst.write(data)


@pytest.fixture
def inria(tmp_path: Path) -> tuple[Path, dict[str, tuple[np.ndarray, np.ndarray]]]:
    (tmp_path / "images").mkdir()
    (tmp_path / "gt").mkdir()
    scenes = {"austin1": _scene(1000, 1300, 0), "tiny": _scene(300, 200, 1)}
    for name, (rgb, gt) in scenes.items():
        _write_tif(tmp_path / "images" / f"{name}.tif", rgb)
        _write_tif(tmp_path / "gt" / f"{name}.tif", gt)
    return tmp_path, scenes


def _read_mask_csv(path: Path) -> dict[str, str]:
    rows = [line.split("\t") for line in path.read_text().splitlines()]
    assert all(len(r) == 2 for r in rows), "train_mask.csv must be name<TAB>rle, no header"
    return dict(rows)


def test_make_tiles_rle_decodes_to_gt_windows(inria) -> None:
    root, scenes = inria
    out = root / "out"
    assert (
        main(["make-tiles", "--images", str(root / "images"), "--gt", str(root / "gt"), "--out", str(out)])
        == 0
    )
    masks = _read_mask_csv(out / "train_mask.csv")
    # austin1: rows (0, 488) x cols (0, 512, 788); tiny (300x200 < 512): one reflect-padded tile.
    expected_names = [f"austin1_{r}_{c}.jpg" for r in (0, 488) for c in (0, 512, 788)] + ["tiny_0_0.jpg"]
    assert list(masks) == expected_names
    manifest = (out / "manifest.csv").read_text().splitlines()
    assert manifest[0] == "name,group"
    assert manifest[1:] == [f"{n},{n.split('_')[0]}" for n in expected_names]

    rgb, gt = scenes["austin1"]
    for name in expected_names[:-1]:
        r, c = (int(v) for v in Path(name).stem.split("_")[1:])
        np.testing.assert_array_equal(
            rle.decode(masks[name], (512, 512)), gt[r : r + 512, c : c + 512] // 255
        )
        img = np.asarray(Image.open(out / "train" / name))
        assert img.shape == (512, 512, 3)
        err = np.abs(img.astype(int) - rgb[r : r + 512, c : c + 512]).mean()
        shifted = np.abs(img[:-8].astype(int) - rgb[r + 8 : r + 512, c : c + 512]).mean()
        assert err < 4 < shifted, (err, shifted)  # JPEG q95 of the right window, not a neighbour

    tiny_rgb, tiny_gt = scenes["tiny"]
    tiny_mask = rle.decode(masks["tiny_0_0.jpg"], (512, 512))
    np.testing.assert_array_equal(tiny_mask[:300, :200], tiny_gt // 255)
    np.testing.assert_array_equal(tiny_mask[300:302, :200], tiny_gt[298:296:-1] // 255)  # reflected rows


def test_make_tiles_cli_error_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            ["make-tiles", "--images", str(tmp_path / "nope"), "--gt", str(tmp_path), "--out", str(tmp_path)]
        )
        == 2
    )
    assert "images folder" in capsys.readouterr().err


def test_make_tiles_errors_name_the_files(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "gt").mkdir()
    rgb, gt = _scene(100, 120)
    _write_tif(tmp_path / "images" / "a.tif", rgb)
    _write_tif(tmp_path / "gt" / "a.tif", gt[:90])
    with pytest.raises(ValueError, match=r"a\.tif is 100x120 but its ground truth .*gt/a\.tif is 90x120"):
        make_tiles(tmp_path / "images", tmp_path / "gt", tmp_path / "out", tile=64)
    _write_tif(tmp_path / "images" / "b.tif", rgb)
    with pytest.raises(FileNotFoundError, match=r"b\.tif -> expected .*gt/b\.tif"):
        make_tiles(tmp_path / "images", tmp_path / "gt", tmp_path / "out", tile=64)
    (tmp_path / "images" / "b.tif").unlink()
    _write_tif(tmp_path / "gt" / "a.tif", (gt // 255 * 128))  # 0/128: not a building mask
    with pytest.raises(ValueError, match=r"\[128\]"):
        make_tiles(tmp_path / "images", tmp_path / "gt", tmp_path / "out", tile=64)


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
