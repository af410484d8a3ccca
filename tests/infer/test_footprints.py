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


def test_a_mask_from_predict_scene_gives_the_footprints_of_scene_and_run(
    tiny_run: Path, demo_root: Path, tmp_path: Path, capsys
) -> None:
    """make predict-scene then make footprints MASK= applies the run's tuned min_area (from the mask's
    tags), as make footprints SCENE= RUN= does: the same polygons (it used to keep every speck)."""
    import dataclasses
    import shutil

    from pipeline.infer import scenes
    from pipeline.runs.manifest import load_manifest, write_manifest

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    manifest = load_manifest(run)
    write_manifest(
        dataclasses.replace(manifest, run_dir=run, infer=dataclasses.replace(manifest.infer, min_area=30))
    )
    tiles = [np.asarray(Image.open(p)) for p in sorted((demo_root / "test_a").iterdir())[:6]]
    write_tif(
        tmp_path / "scene.tif",
        np.concatenate([np.concatenate(tiles[:3], 1), np.concatenate(tiles[3:], 1)], 0),
    )
    cpu = ["--device", "cpu"]
    assert (
        scenes.main(
            [
                "--run",
                str(run),
                "--scene",
                str(tmp_path / "scene.tif"),
                "--out",
                str(tmp_path / "m.tif"),
                *cpu,
            ]
        )
        == 0
    )
    assert (
        footprints.main(["--mask", str(tmp_path / "m.tif"), "--out", str(tmp_path / "from_mask.gpkg")]) == 0
    )
    assert "minimum area 30 px (run run's tuned min_area, from the mask's tags)" in capsys.readouterr().out
    args = [
        "--scene",
        str(tmp_path / "scene.tif"),
        "--run",
        str(run),
        "--out",
        str(tmp_path / "from_scene.gpkg"),
    ]
    assert footprints.main([*args, *cpu]) == 0
    a, b = gpd.read_file(tmp_path / "from_mask.gpkg"), gpd.read_file(tmp_path / "from_scene.gpkg")
    small = int((label_components(rasterio.open(tmp_path / "m.tif").read(1))[1] > 0).sum())
    assert 0 < len(a) == len(b) and small > 0
    assert (a["pixels"] >= 30).all() and a["pixels"].tolist() == b["pixels"].tolist()
    assert all(x.equals_exact(y, 0) for x, y in zip(a.geometry, b.geometry))
    assert (
        footprints.main(
            ["--mask", str(tmp_path / "m.tif"), "--out", str(tmp_path / "all.gpkg"), "--min-area-px", "0"]
        )
        == 0
    )
    assert len(gpd.read_file(tmp_path / "all.gpkg")) > len(a)  # told otherwise: every component


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


# ----------------------------------------------------------------------------- outputs never destroy inputs


def _layers(path: Path) -> list[str]:
    return [str(name) for name, _ in pyogrio.list_layers(path)]


def test_a_geopackage_keeps_its_other_layers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """make footprints OUT=x.gpkg into a GeoPackage of other layers writes its own layer and keeps theirs
    (it used to replace the whole file); a second run replaces its layer, and says so."""
    write_tif(tmp_path / "m.tif", _mask())
    out = tmp_path / "city.gpkg"
    roads = gpd.GeoDataFrame({"name": ["a"]}, geometry=[shapely.box(0, 0, 1, 1)], crs=CRS_UTM)
    roads.to_file(out, layer="roads")
    assert footprints.main(["--mask", str(tmp_path / "m.tif"), "--out", str(out)]) == 0
    assert "note: adding layer buildings" in capsys.readouterr().err
    assert _layers(out) == ["roads", "buildings"]
    assert gpd.read_file(out, layer="roads")["name"].tolist() == ["a"]
    assert len(gpd.read_file(out, layer="buildings")) == 4
    assert (
        footprints.main(["--mask", str(tmp_path / "m.tif"), "--out", str(out), "--min-area-px", "100"]) == 0
    )
    err = capsys.readouterr().err
    assert f"note: replacing layer buildings of {out}; its other layers (roads) are kept" in err
    assert len(gpd.read_file(out, layer="buildings")) == 3 and _layers(out) == ["roads", "buildings"]
    assert not list(tmp_path.glob(".*.tmp"))


def test_existing_outputs_are_replaced_with_a_note_or_refused(tmp_path: Path, capsys) -> None:
    """A FlatGeobuf is replaced with a note; a .gpkg that is no GeoPackage is someone's file: refused,
    untouched, before any work."""
    write_tif(tmp_path / "m.tif", _mask())
    (tmp_path / "old.fgb").write_bytes(b"x")
    assert footprints.main(["--mask", str(tmp_path / "m.tif"), "--out", str(tmp_path / "old.fgb")]) == 0
    assert f"note: replacing {tmp_path / 'old.fgb'}" in capsys.readouterr().err
    (tmp_path / "notes.gpkg").write_text("my notes")
    assert footprints.main(["--mask", str(tmp_path / "m.tif"), "--out", str(tmp_path / "notes.gpkg")]) == 2
    err = capsys.readouterr().err
    assert "notes.gpkg exists and is not a GeoPackage" in err and err.count("\n") == 1
    assert (tmp_path / "notes.gpkg").read_text() == "my notes"


def test_an_output_that_is_an_input_is_refused_before_any_model(tmp_path: Path, capsys, monkeypatch) -> None:
    """OUT whose mask sidecar is the scene itself (b.gpkg -> b_mask.tif) is refused before the run is read."""
    from pipeline.infer import scenes

    monkeypatch.setattr(scenes, "load_ensemble", lambda *a: pytest.fail("a model was loaded"))
    rgb = np.zeros((40, 40, 3), np.uint8)
    write_tif(tmp_path / "b_mask.tif", rgb)
    before = (tmp_path / "b_mask.tif").read_bytes()
    args = ["--scene", str(tmp_path / "b_mask.tif"), "--run", str(tmp_path / "no-run"), "--out"]
    assert footprints.main([*args, str(tmp_path / "b.gpkg")]) == 2
    assert "b_mask.tif would overwrite the input" in capsys.readouterr().err
    assert (tmp_path / "b_mask.tif").read_bytes() == before


def test_geoparquet_round_trip(tmp_path: Path) -> None:
    write_tif(tmp_path / "m.tif", _mask())
    frame = footprints.vectorize_raster(tmp_path / "m.tif", options=EXACT)
    out = footprints.write_footprints(frame, tmp_path / "b.parquet")
    back = footprints.read_footprints(out)
    assert back.crs.to_epsg() == 32631 and back["id"].tolist() == [1, 2, 3, 4]
    assert all(a.equals_exact(b, 0) for a, b in zip(back.geometry, frame.geometry))
    assert gpd.read_parquet(out)["pixels"].tolist() == [200, 204, 1100, 50]  # plain GeoParquet


def test_invalid_polygons_are_repaired_and_counted(tmp_path: Path, capsys) -> None:
    """A bow tie (self-intersecting ring) in make score FOOTPRINTS=: repaired with make_valid, counted and
    said, not a GEOS traceback."""
    from pipeline.infer import score

    bow = shapely.Polygon([(0, 0), (20, 20), (20, 0), (0, 20)])
    pred = gpd.GeoDataFrame({"id": [1, 2]}, geometry=[bow, shapely.box(40, 40, 60, 60)], crs=CRS_UTM)
    truth = gpd.GeoDataFrame({"id": [1]}, geometry=[shapely.box(40, 40, 60, 60)], crs=CRS_UTM)
    pred.to_file(tmp_path / "pred.gpkg")
    truth.to_file(tmp_path / "truth.gpkg")
    frame = footprints.read_footprints(tmp_path / "pred.gpkg")
    assert frame.attrs["repaired"] == 1 and frame.geometry.is_valid.all()
    assert frame.geometry.iloc[0].area == pytest.approx(200)  # the two triangles of the bow tie
    result = footprints.score_footprints(tmp_path / "pred.gpkg", tmp_path / "truth.gpkg")
    assert result["repaired"] == {"footprints": 1, "truth": 0}
    assert result["buildings"]["tp"] == 1 and result["buildings"]["fp"] == 1
    assert (
        score.main(["--footprints", str(tmp_path / "pred.gpkg"), "--truth", str(tmp_path / "truth.gpkg")])
        == 0
    )
    assert "repaired 1 invalid polygon of" in capsys.readouterr().err


def test_a_class_id_mask_is_refused(tmp_path: Path) -> None:
    from pipeline.geo.scene import MaskTags

    tags = MaskTags("make predict-scene", "voc", "/runs/voc", 0.5, 0, "none", 21, "s.tif")
    write_tif(tmp_path / "ids.tif", _mask())
    with rasterio.open(tmp_path / "ids.tif", "r+") as dst:
        dst.update_tags(**tags.to_tags())
    with pytest.raises(FootprintError, match="21-class run"):
        footprints.mask_options(tmp_path / "ids.tif", VectorizeOptions(), None)


def test_every_phase_prints_a_line_in_a_log(tmp_path: Path, capsys, monkeypatch, simulated_progress) -> None:
    """Output to a file, simulated time: every window read, the outlines and the write each print a
    progress line when a minute has passed (the heartbeat stands in for the thread)."""
    from pipeline.core import progress as progress_mod

    now = [0.0]

    def clock() -> float:
        now[0] += 61.0  # a minute passes between any two looks at the clock
        return now[0]

    simulated_progress(clock)
    write = footprints.WRITERS["GPKG"]
    monkeypatch.setitem(footprints.WRITERS, "GPKG", lambda *a: (progress_mod.beat(), write(*a))[1])
    write_tif(tmp_path / "m.tif", _mask())
    assert (
        footprints.main(
            ["--mask", str(tmp_path / "m.tif"), "--out", str(tmp_path / "b.gpkg"), "--window", "32"]
        )
        == 0
    )
    err = capsys.readouterr().err.splitlines()
    windows = [ln for ln in err if ln.startswith("footprints: ")]
    assert len(windows) == 16 and windows[-1].startswith("footprints: 16/16 (100%)")  # 4 x 4 windows of 32 px
    assert any(ln.startswith(f"write {tmp_path / 'b.gpkg'}: ") for ln in err)
