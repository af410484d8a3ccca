"""pipeline.geo.merge: footprints of scenes cut from one mosaic, touching or overlapping, merged into the
footprints of the mosaic itself: every building once, one polygon, in one CRS."""

from __future__ import annotations

import dataclasses

import geopandas as gpd
import numpy as np
import pytest
import shapely
from affine import Affine
from synthetic_scenes import CRS_UTM, TRANSFORM

from pipeline.geo.merge import SceneExtent, common_crs, merge_scenes
from pipeline.geo.vectorize import VectorizeOptions, vectorize_array
from pipeline.metrics.buildings import label_components


def _mosaic(height: int = 160, width: int = 260, seed: int = 0) -> np.ndarray:
    """uint8 0/1 [H, W]: random buildings, and some placed on purpose across columns 100-140 (the seams
    and overlaps below), one longer than any overlap, one touching a seam only diagonally."""
    rng = np.random.default_rng(seed)
    m = np.zeros((height, width), np.uint8)
    for _ in range(40):
        r, c = rng.integers(0, height - 12), rng.integers(0, width - 12)
        m[r : r + rng.integers(3, 12), c : c + rng.integers(3, 12)] = 1
    m[20:40, 110:135] = 1  # across column 120 (and 110/130)
    m[50:60, 90:150] = 1  # longer than the 20-px overlap: cut by both scenes there
    m[70:90, 118:122] = 1  # a thin building on the seam
    m[100, 119] = m[101, 120] = 1  # two pixels meeting diagonally across the seam
    m[120:140, 112:128] = 1
    m[125:135, 117:123] = 0  # a courtyard across the seam
    return m


def _scene(
    mask: np.ndarray, col0: int, col1: int, opts: VectorizeOptions
) -> tuple[gpd.GeoDataFrame, SceneExtent]:
    """Columns col0..col1 of the mosaic as a scene of its own: its own transform, its own footprints."""
    transform = TRANSFORM @ Affine.translation(col0, 0)
    name = f"c{col0}"
    part = np.ascontiguousarray(mask[:, col0:col1])
    exact_cut = dataclasses.replace(opts, exact_cut=True)  # as make predict-scenes writes them
    frame = vectorize_array(part, options=exact_cut, transform=transform, crs=CRS_UTM, scene=name)
    return frame, SceneExtent(name, CRS_UTM, transform, part.shape[0], part.shape[1])


def _whole(mask: np.ndarray, opts: VectorizeOptions) -> gpd.GeoDataFrame:
    return vectorize_array(mask, options=opts, transform=TRANSFORM, crs=CRS_UTM, scene="mosaic")


def _same_polygons(merged: gpd.GeoDataFrame, whole: gpd.GeoDataFrame) -> bool:
    """The same polygons, vertex for vertex after normalising, in any order."""
    key = lambda g: (round(g.bounds[0], 6), round(g.bounds[1], 6))  # noqa: E731
    got, want = sorted(merged.geometry, key=key), sorted(whole.geometry, key=key)
    same = (shapely.normalize(g).equals_exact(shapely.normalize(w), 1e-6) for g, w in zip(got, want))
    return len(got) == len(want) and all(same)


@pytest.mark.parametrize("overlap", [0, 20, 60])
def test_two_scenes_of_one_mosaic_merge_into_the_mosaic_exactly(overlap: int) -> None:
    """Exact pixel outlines: touching (overlap 0) or overlapping scenes give the mosaic's polygons, every
    building once, vertex for vertex (after normalising), with the right pixel counts."""
    mask = _mosaic()
    exact = VectorizeOptions(window=64, simplify=0)
    seam = 120
    a, ea = _scene(mask, 0, seam + overlap // 2, exact)
    b, eb = _scene(mask, seam - overlap // 2, mask.shape[1], exact)
    assert a["cut"].sum() >= 2 and b["cut"].sum() >= 2
    merged, note = merge_scenes([a, b], [ea, eb], options=exact)
    whole = _whole(mask, exact)
    key = lambda g: (round(g.bounds[0], 6), round(g.bounds[1], 6))  # noqa: E731
    assert len(merged) == len(whole) == label_components(mask)[0]
    assert "all 2 scenes in EPSG:32631" in note and merged.crs.to_epsg() == 32631
    assert _same_polygons(merged, whole)
    by_bounds = {key(g): p for g, p in zip(whole.geometry, whole["pixels"])}
    assert all(by_bounds[key(g)] == p for g, p in zip(merged.geometry, merged["pixels"]))
    assert merged["id"].tolist() == list(range(1, len(merged) + 1))
    assert set(merged["scene"]) == {"c0", f"c{seam - overlap // 2}"}
    assert merged["pieces"].max() >= 2  # the seam's buildings: joined from pieces (or copies) of each scene
    # cut now means "reaches the border of the whole area": what it means for the mosaic itself
    cut_of = {key(g): c for g, c in zip(whole.geometry, whole["cut"])}
    assert [cut_of[key(g)] for g in merged.geometry] == merged["cut"].tolist()


@pytest.mark.parametrize("overlap", [0, 20])
def test_pieces_each_below_the_minimum_area_still_make_their_building(overlap: int) -> None:
    """min_area_px 35: a 1 x 40 px building across the seam whose pieces hold 20 or 30 px each comes out
    whole, as from the mosaic (the scenes keep cut pieces whatever their size; the merge filters what it
    joined), and a 15-px building cut by the area's border is dropped, as from the mosaic."""
    mask = _mosaic(seed=2)
    mask[143:148, 95:145] = 0
    mask[145, 100:140] = 1  # pieces 100-119 and 120-139 touching; 100-129 and 110-139 overlapping
    mask[0:3, 200:205] = 1
    opts = VectorizeOptions(window=64, simplify=0, min_area_px=35)
    a, ea = _scene(mask, 0, 120 + overlap // 2, opts)
    b, eb = _scene(mask, 120 - overlap // 2, mask.shape[1], opts)
    assert (a["pixels"][a["cut"]] < 35).any() and (b["pixels"][b["cut"]] < 35).any()  # pieces kept
    merged, _ = merge_scenes([a, b], [ea, eb], options=opts)
    whole = _whole(mask, opts)
    assert _same_polygons(merged, whole) and (merged["pixels"] >= 35).all()
    assert sorted(merged["pixels"]) == sorted(whole["pixels"])
    thin = merged[(merged.bounds["minx"] - (TRANSFORM @ (100, 145))[0]).abs() < 1e-6]
    assert 40 in thin["pixels"].tolist() and thin["pieces"].max() == 2  # from both scenes' pieces


@pytest.mark.parametrize(("overlap", "regularize"), [(0, "none"), (24, "none"), (0, "full")])
def test_simplified_and_regularised_pieces_come_out_once_as_the_mosaic_has_them(
    overlap: int, regularize: str
) -> None:
    """With simplification (and full regularisation) the pieces are joined exact, then finished as the
    mosaic's own buildings are: every building once, its outline the mosaic's (IoU > 0.99 simplified;
    the regulariser depends a little on where a ring starts: > 0.8). Below 10 px (a 2-pixel diagonal)
    simplification itself decides the shape."""
    mask = _mosaic(seed=1)
    opts = VectorizeOptions(window=64, regularize=regularize)
    a, ea = _scene(mask, 0, 120 + overlap // 2, opts)
    b, eb = _scene(mask, 120 - overlap // 2, mask.shape[1], opts)
    merged, _ = merge_scenes([a, b], [ea, eb], options=opts)
    whole = _whole(mask, opts)
    assert len(merged) == len(whole) and merged.geometry.is_valid.all()
    tree = shapely.STRtree(whole.geometry.values)
    for g, pixels in zip(merged.geometry, merged["pixels"]):
        w = whole.geometry.values[tree.query(g, predicate="intersects")]
        iou = max(g.intersection(x).area / g.union(x).area for x in w)
        assert pixels < 10 or iou > (0.99 if regularize == "none" else 0.8)


def test_a_complete_copy_wins_over_pieces_and_the_deeper_copy_over_the_other() -> None:
    """In an overlap, scene a sees a building whole near its own border, scene b whole far from its
    borders with another outline: b's copy is kept; a piece of it cut by a's border is dropped too."""
    px = 0.3
    ea = SceneExtent("a", CRS_UTM, TRANSFORM, 100, 100)
    eb = SceneExtent("b", CRS_UTM, TRANSFORM @ Affine.translation(60, 0), 100, 100)
    x0, y0 = TRANSFORM @ (0, 0)

    def box(c0: float, r0: float, c1: float, r1: float) -> shapely.Polygon:
        return shapely.box(x0 + c0 * px, y0 - r1 * px, x0 + c1 * px, y0 - r0 * px)

    frame = lambda geoms, cut, scene: gpd.GeoDataFrame(  # noqa: E731
        {"id": np.arange(1, len(geoms) + 1), "scene": scene, "pixels": 100, "cut": cut},
        geometry=geoms,
        crs=CRS_UTM,
    )
    a = frame([box(85, 40, 98, 50), box(95, 70, 100, 80)], [False, True], "a")
    b = frame([box(84, 40, 97, 51), box(95, 70, 105, 80)], [False, False], "b")
    merged, note = merge_scenes([a, b], [ea, eb])
    assert len(merged) == 2 and (merged["scene"] == "b").all()
    assert merged.geometry.iloc[0].equals(box(84, 40, 97, 51)) and merged["pieces"].tolist() == [2, 2]
    assert "2 buildings joined" in note


def test_scenes_in_two_crss_come_out_in_the_most_common_one() -> None:
    """Two scenes in UTM 31N and one in UTM 32N near their common meridian: footprints in 31N, said."""
    target, note = common_crs(["EPSG:32631", "EPSG:32632", "EPSG:32631"])
    assert target.to_epsg() == 32631
    assert note == "scenes in 2 CRSs: reprojected EPSG:32632 (1) to EPSG:32631, the CRS of 2"
    assert common_crs(["EPSG:32632", "EPSG:32631"])[0].to_epsg() == 32632  # a tie: the first listed
    mask = np.zeros((40, 40), np.uint8)
    mask[10:20, 10:20] = 1
    frames, extents = [], []
    for k, epsg in enumerate((32631, 32632, 32631)):
        t = Affine(0.5, 0, 700_000.0 + 100 * k, 0, -0.5, 5_400_000.0) if epsg == 32631 else None
        if t is None:  # the same place in the next zone: the 31N origin reprojected
            x, y = (
                gpd.GeoSeries([shapely.Point(700_100.0, 5_400_000.0)], crs=32631)
                .to_crs(32632)
                .iloc[0]
                .coords[0]
            )
            t = Affine(0.5, 0, x, 0, -0.5, y)
        frames.append(vectorize_array(mask, transform=t, crs=f"EPSG:{epsg}", scene=f"s{k}"))
        extents.append(SceneExtent(f"s{k}", f"EPSG:{epsg}", t, 40, 40))
    merged, note = merge_scenes(frames, extents)
    assert merged.crs.to_epsg() == 32631 and len(merged) == 3 and "reprojected EPSG:32632" in note
    assert merged["area_m2"].to_numpy() == pytest.approx(25.0, rel=0.01)  # 100 px of 0.25 m²
