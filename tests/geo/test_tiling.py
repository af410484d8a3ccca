"""Tiling: exact split/merge round trips and blend windows, make_tiles on a synthetic GeoTIFF."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from synthetic_scenes import scene as _scene
from synthetic_scenes import write_tif as _write_tif

from pipeline.data import rle
from pipeline.geo.tiling import BLEND_WINDOWS, TileGrid, blend_window, main, make_tiles, merge, split

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
    window=st.sampled_from(list(BLEND_WINDOWS)),
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


@pytest.mark.parametrize("kind", list(BLEND_WINDOWS))
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
