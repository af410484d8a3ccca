"""pipeline.infer.footprints: mask rasters -> georeferenced polygon files, scored per building; footprints
from a mask and from a scene + a trained run; a scene of real tiles with a real CRS."""

from __future__ import annotations

import json
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pyogrio
import pytest
import rasterio
import shapely
from affine import Affine
from conftest import TINY_OVERRIDES, real_data_or_skip
from PIL import Image
from rasterio.crs import CRS
from synthetic_scenes import CRS_UTM, TRANSFORM, write_tif

from pipeline.core.config import ConfigError
from pipeline.data import rle
from pipeline.geo.vectorize import FootprintError, VectorizeOptions
from pipeline.infer import footprints
from pipeline.metrics.buildings import label_components

EXACT = VectorizeOptions(window=32, simplify=0.0)


def _mask() -> np.ndarray:
    """100 x 120 uint8 0/1: four buildings, one with a hole, one across the 32-px window edges."""
    m = np.zeros((100, 120), np.uint8)
    m[5:15, 5:25] = 1  # 200 px
    m[28:40, 28:45] = 1  # across windows: 204 px
    m[60:90, 60:100] = 1  # with a 10x10 hole: 1100 px
    m[70:80, 75:85] = 0
    m[95:100, 110:120] = 1  # on the scene border: 50 px
    return m


# ----------------------------------------------------------------------------- rasters -> polygons


def test_georeferenced_mask_gives_polygons_in_its_crs(tmp_path: Path) -> None:
    write_tif(tmp_path / "scene7_mask.tif", _mask() * 255)  # 0/255 masks are accepted too
    frame = footprints.vectorize_raster(tmp_path / "scene7_mask.tif", options=EXACT)
    assert frame.crs == CRS_UTM.to_wkt() or frame.crs.to_epsg() == 32631
    assert frame["pixels"].tolist() == [200, 204, 1100, 50]
    assert frame["area_m2"].to_numpy() == pytest.approx(frame["pixels"].to_numpy() * 0.09)
    assert (frame["scene"] == "scene7_mask").all() and frame["id"].tolist() == [1, 2, 3, 4]
    # pixel (row 5, col 5) .. (15, 25) -> x = 431250 + 0.3 col, y = 5411200 - 0.3 row
    assert frame.geometry.iloc[0].bounds == pytest.approx((431251.5, 5411195.5, 431257.5, 5411198.5))
    assert len(frame.geometry.iloc[2].interiors) == 1
    x0, y0, x1, y1 = frame.total_bounds
    assert (x0, y0, x1, y1) <= (x1, y1, 431250 + 36, 5411200)  # inside the scene's bounds


def test_probabilities_become_attributes(tmp_path: Path) -> None:
    m = _mask()
    probs = np.where(m > 0, 200, 10).astype(np.uint8)
    probs[30, 30] = 255
    write_tif(tmp_path / "m.tif", m)
    write_tif(tmp_path / "p.tif", probs)
    frame = footprints.vectorize_raster(tmp_path / "m.tif", tmp_path / "p.tif", options=EXACT)
    assert frame["prob_max"].tolist() == pytest.approx([200 / 255, 1.0, 200 / 255, 200 / 255])
    assert frame["prob_mean"].iloc[1] == pytest.approx((203 * 200 + 255) / 204 / 255)


def test_output_formats_keep_the_crs(tmp_path: Path) -> None:
    write_tif(tmp_path / "m.tif", _mask())
    frame = footprints.vectorize_raster(tmp_path / "m.tif")
    for suffix in (".gpkg", ".fgb", ".geojson"):
        out = footprints.write_footprints(frame, tmp_path / f"b{suffix}")
        back = gpd.read_file(out).sort_values("id", ignore_index=True)  # FlatGeobuf: spatial index order
        assert len(back) == 4 and list(back["id"]) == [1, 2, 3, 4]
        assert back.crs.to_epsg() == (4326 if suffix == ".geojson" else 32631)
        assert back.to_crs(32631).geometry.iloc[2].equals_exact(frame.geometry.iloc[2], 0.05)
    assert pyogrio.read_info(tmp_path / "b.gpkg", layer="buildings")["features"] == 4
    lon, lat = json.loads((tmp_path / "b.geojson").read_text())["features"][0]["geometry"]["coordinates"][0][
        0
    ]
    assert 2 < lon < 3 and 48 < lat < 49  # UTM 31N near Paris, as lon/lat (RFC 7946 axis order)
    assert not list(tmp_path.glob(".*.tmp"))
    with pytest.raises(ConfigError, match=r"\.gpkg"):
        footprints.write_footprints(frame, tmp_path / "b.shp")
    empty = footprints.vectorize_raster(_write_empty(tmp_path / "empty.tif"))
    assert len(gpd.read_file(footprints.write_footprints(empty, tmp_path / "e.gpkg"))) == 0


def _write_empty(path: Path) -> Path:
    write_tif(path, np.zeros((40, 40), np.uint8))
    return path


def test_geographic_crs_gets_areas_in_metres(tmp_path: Path) -> None:
    """A mask in EPSG:4326 (1e-5 degree pixels at 48.85 N): areas from a local equal-area projection."""
    m = np.zeros((50, 50), np.uint8)
    m[10:30, 10:40] = 1
    deg = 1e-5
    write_tif(tmp_path / "m.tif", m, crs=CRS.from_epsg(4326), transform=Affine(deg, 0, 2.35, 0, -deg, 48.85))
    frame = footprints.vectorize_raster(tmp_path / "m.tif", options=EXACT)
    # one pixel: (deg in metres along a meridian) x (along the parallel at 48.85 N)
    px = (deg * 111_200) * (deg * 111_320 * np.cos(np.radians(48.85)))
    assert frame["area_m2"].iloc[0] == pytest.approx(600 * px, rel=0.005)


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_mask_without_crs(tmp_path: Path) -> None:
    Image.fromarray(_mask() * 255).save(tmp_path / "m.png")
    frame = footprints.vectorize_raster(tmp_path / "m.png", options=EXACT)
    assert frame.crs is None and frame["area_m2"].isna().all()
    assert frame.geometry.area.tolist() == [200, 204, 1100, 50]  # pixel coordinates
    footprints.write_footprints(frame, tmp_path / "b.gpkg")
    assert footprints.summary(frame).startswith("4 buildings, 1,554 pixels (no CRS: coordinates are pixels")
    with pytest.raises(ConfigError, match="no CRS"):
        footprints.write_footprints(frame, tmp_path / "b.geojson")
    with pytest.raises(ConfigError, match="min_area_px"):
        footprints.vectorize_raster(tmp_path / "m.png", options=VectorizeOptions(min_area_m2=5))


def test_bad_inputs_name_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    probs = np.linspace(0, 250, 40 * 40).reshape(40, 40).astype(np.uint8)
    write_tif(tmp_path / "probs.tif", probs)
    with pytest.raises(FootprintError, match=r"probs.tif: a building mask holds 0 and 1.*--probs"):
        footprints.vectorize_raster(tmp_path / "probs.tif")
    write_tif(tmp_path / "m.tif", np.zeros((30, 40), np.uint8))
    with pytest.raises(FootprintError, match="is 40x40 but the mask"):
        footprints.vectorize_raster(tmp_path / "m.tif", tmp_path / "probs.tif")
    (tmp_path / "broken.gpkg").write_text("not a geopackage")
    with pytest.raises(FootprintError, match="broken.gpkg"):
        footprints.read_footprints(tmp_path / "broken.gpkg")
    assert footprints.main(["--mask", str(tmp_path / "probs.tif"), "--out", str(tmp_path / "b.gpkg")]) == 2
    assert footprints.main(["--mask", str(tmp_path / "nope.tif")]) == 2
    assert footprints.main(["--mask", str(tmp_path / "m.tif"), "--out", str(tmp_path / "b.csv")]) == 2
    assert footprints.main(["--mask", str(tmp_path / "m.tif"), "--simplify", "-1"]) == 2
    err = capsys.readouterr().err
    assert err.count("error: ") == 4 and "Traceback" not in err
    assert "nope.tif not found" in err and "simplify = -1" in err
    assert not (tmp_path / "b.gpkg").exists()


def test_make_footprints_from_a_mask(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_tif(tmp_path / "m.tif", _mask())
    write_tif(tmp_path / "p.tif", (_mask() * 230).astype(np.uint8))
    out = tmp_path / "b.gpkg"
    args = ["--mask", str(tmp_path / "m.tif"), "--probs", str(tmp_path / "p.tif"), "--out", str(out)]
    assert footprints.main([*args, "--window", "32", "--min-area-px", "60", "--simplify", "0"]) == 0
    printed = capsys.readouterr().out
    assert f"3 buildings, total area 135 m² (mean 45.1 m²) -> {out}" in printed  # 1504 px x 0.09 m²
    frame = gpd.read_file(out)
    assert frame["pixels"].tolist() == [200, 204, 1100]
    assert frame["prob_mean"].tolist() == pytest.approx([230 / 255] * 3)


# ----------------------------------------------------------------------------- per-building score of files


def test_score_footprints_against_a_mask_and_polygons(tmp_path: Path) -> None:
    truth = _mask()
    write_tif(tmp_path / "truth.tif", truth)
    pred = truth.copy()
    pred[5:15, 5:15] = 0  # building 1 halved: IoU 0.5 -> still a match
    pred[28:40, 28:45] = 0  # building 2 missed
    pred[50:52, 5:7] = 1  # a false positive
    write_tif(tmp_path / "pred.tif", pred)
    for name in ("pred", "truth"):
        frame = footprints.vectorize_raster(tmp_path / f"{name}.tif", options=EXACT)
        footprints.write_footprints(frame, tmp_path / f"{name}.gpkg")
    r = footprints.score_footprints(tmp_path / "pred.gpkg", tmp_path / "truth.tif")
    b = r["buildings"]
    assert (r["n_pred"], r["n_truth"], b["tp"], b["fp"], b["fn"]) == (4, 4, 3, 1, 1)
    assert b["unit"] == "m2" and b["f1"] == pytest.approx(6 / 8)
    same = footprints.score_footprints(tmp_path / "truth.gpkg", tmp_path / "truth.gpkg")["buildings"]
    assert (same["f1"], same["fn"]) == (1.0, 0)


# ----------------------------------------------------------------------------- scene + a trained run


@pytest.fixture(scope="module")
def tiny_run(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One fold of the tiny recipe, predicting 64-px tiles with 16 px of overlap (seconds on CPU)."""
    from pipeline.core.config import load_config
    from pipeline.train import trainer

    runs = tmp_path_factory.mktemp("runs")
    cfg = load_config(
        None,
        [
            f"data.root={demo_root}",
            f"train.runs_dir={runs}",
            "name=fp",
            *TINY_OVERRIDES,
            "infer.tta=none",
            "infer.tile_size=64",
            "train.epochs=1",
            "infer.overlap=16",
        ],
    )
    return trainer.run(cfg, folds=[0])


def test_make_footprints_from_a_scene_and_a_run(
    tiny_run: Path, demo_root: Path, tmp_path: Path, capsys
) -> None:
    tiles = [np.asarray(Image.open(p)) for p in sorted((demo_root / "test_a").iterdir())[:6]]
    scene = np.concatenate([np.concatenate(tiles[:3], 1), np.concatenate(tiles[3:], 1)], 0)  # 128 x 192
    write_tif(tmp_path / "scene.tif", scene)
    out = tmp_path / "b.gpkg"
    args = ["--scene", str(tmp_path / "scene.tif"), "--run", str(tiny_run), "--out", str(out)]
    assert footprints.main([*args, "--device", "cpu", "--window", "50"]) == 0
    printed = capsys.readouterr().out
    mask_path, probs_path = tmp_path / "b_mask.tif", tmp_path / "b_probs.tif"
    assert f"wrote {mask_path} and {probs_path}" in printed
    with rasterio.open(mask_path) as m, rasterio.open(probs_path) as p:
        assert m.crs == CRS_UTM and m.transform == TRANSFORM and p.transform == TRANSFORM
        assert m.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        mask = m.read(1)
    frame = gpd.read_file(out)
    assert len(frame) == label_components(mask)[0] > 0  # the run's min_area is 0 here
    assert f"{len(frame)} buildings, total area" in printed
    assert frame.crs.to_epsg() == 32631 and (frame["scene"] == "scene").all()
    assert (frame["prob_mean"] > 0.5).all() and (frame["prob_max"] >= frame["prob_mean"]).all()
    # the same through the function: the options reach the vectoriser (128 x 192 px in 50-px windows)
    again = footprints.footprints_from_scene(
        tiny_run, tmp_path / "scene.tif", tmp_path / "c.gpkg", VectorizeOptions(window=50), device="cpu"
    )
    assert again.attrs["windows"] == 3 * 4 and again["pixels"].tolist() == frame["pixels"].tolist()


# ----------------------------------------------------------------------------- real tiles, real CRS


def _gray(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("L"), np.float32)


def _seam(a: np.ndarray, b: np.ndarray) -> float:
    """How well ``b`` continues ``a`` to its right: the jump at the border over the mean jump inside
    (about 1 for adjacent tiles, 2.5-3.5 for others)."""
    inner = (np.abs(np.diff(a, axis=1)).mean() + np.abs(np.diff(b, axis=1)).mean()) / 2
    return float(np.abs(a[:, -1] - b[:, 0]).mean() / inner)


def _adjacent_tiles(real: Path) -> tuple[str, str, int]:
    """Two train tiles of one scene group that continue each other (the data's own adjacency test,
    threshold 1.9): (first, second, axis) with axis 1 = side by side, 0 = one above the other."""
    manifest = pd.read_csv(real / "manifest.csv")
    pairs = manifest[manifest["split"] == "train"].groupby("group")["name"].apply(sorted)
    for names in pairs[pairs.apply(len) == 2]:
        a, b = (_gray(real / "train" / n) for n in names)
        for (x, y, first, second), axis in (((a, b, *names), 1), ((b, a, *names[::-1]), 1)):
            for arr_x, arr_y, ax in ((x, y, axis), (x.T, y.T, 0)):
                if _seam(arr_x, arr_y) < 1.9:
                    return first, second, ax
    pytest.skip("no two adjacent tiles found in the real data")


def test_real_tiles_as_a_georeferenced_scene(tmp_path: Path) -> None:
    real = real_data_or_skip()
    first, second, axis = _adjacent_tiles(real)
    masks = pd.read_csv(real / "train_mask.csv", sep="\t", header=None, names=["name", "rle"]).set_index(
        "name"
    )
    truth = np.concatenate([rle.decode(masks.loc[n, "rle"], (512, 512)) for n in (first, second)], axis)
    rgb = np.concatenate([np.asarray(Image.open(real / "train" / n)) for n in (first, second)], axis)
    # UTM 50N (eastern China, where the data seems to come from), 0.45 m pixels
    crs, px = CRS.from_epsg(32650), 0.45
    transform = Affine(px, 0, 352_000.0, 0, -px, 3_460_000.0)
    write_tif(tmp_path / "scene.tif", rgb, crs, transform)
    write_tif(tmp_path / "truth.tif", truth, crs, transform)
    with rasterio.open(tmp_path / "scene.tif") as src:
        scene_bounds = src.bounds
    n_components = label_components(truth)[0]

    exact = footprints.vectorize_raster(
        tmp_path / "truth.tif", options=VectorizeOptions(window=200, simplify=0)
    )
    assert exact.attrs["windows"] > 4 and len(exact) == n_components
    assert np.abs(exact["area_m2"] / (exact["pixels"] * px * px) - 1).max() < 1e-9
    default = footprints.vectorize_raster(tmp_path / "truth.tif", options=VectorizeOptions(window=200))
    assert len(default) == n_components
    # 1 px of simplification moves outlines by < 1 px: areas change a little, small buildings most
    error = np.abs(default["area_m2"] / (default["pixels"] * px * px) - 1)
    assert error.mean() < 0.01 and error[default["pixels"] >= 1000].max() < 0.05
    assert default["area_m2"].sum() == pytest.approx(truth.sum() * px * px, rel=0.01)
    x0, y0, x1, y1 = default.total_bounds
    assert scene_bounds.left <= x0 and scene_bounds.bottom <= y0 and x1 <= scene_bounds.right
    assert y1 <= scene_bounds.top
    # to EPSG:4326 and back, in memory and through a GeoJSON file (RFC 7946: 7 decimals, ~1 cm)
    back = default.to_crs(4326).to_crs(32650)
    assert shapely.equals_exact(back.geometry.values, default.geometry.values, tolerance=1e-6).all()
    footprints.write_footprints(default, tmp_path / "truth.geojson")
    from_file = gpd.read_file(tmp_path / "truth.geojson").to_crs(32650)
    assert shapely.equals_exact(from_file.geometry.values, default.geometry.values, tolerance=0.02).all()
    # the truth scores 1.0 against itself, from its polygons and from its mask
    footprints.write_footprints(exact, tmp_path / "truth.gpkg")
    report = footprints.score_footprints(tmp_path / "truth.gpkg", tmp_path / "truth.tif")["buildings"]
    assert (report["precision"], report["recall"], report["f1"]) == (1.0, 1.0, 1.0)
    assert report["tp"] == n_components
