"""pipeline.geo.vectorize: one exact polygon per 8-connected building, the same whatever the windows, with
buildings deliberately across every kind of window edge and corner; holes, simplification,
regularisation, minimum areas, probabilities, bounded memory."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import shapely
from affine import Affine

from pipeline.core.config import ConfigError
from pipeline.geo.vectorize import (
    VectorizeOptions,
    full,
    rectangle,
    tile_polygons,
    vectorize,
    vectorize_array,
)
from pipeline.metrics.buildings import label_components

W = 10  # window of the hand-made layout: edges at rows/columns 10, 20, 30


def _exact(window: int, **kw) -> VectorizeOptions:
    return VectorizeOptions(window=window, simplify=0.0, **kw)


def _layout() -> tuple[np.ndarray, dict[str, tuple[int, int]]]:
    """A 40x40 mask, windows of 10: one building per kind of crossing; name -> a pixel (row, col) of it."""
    m = np.zeros((40, 40), np.uint8)
    where = {}

    def put(name: str, rows: slice | int, cols: slice | int) -> None:
        m[rows, cols] = 1
        r = rows.start if isinstance(rows, slice) else rows
        c = cols.start if isinstance(cols, slice) else cols
        where.setdefault(name, (r, c))

    put("across a vertical edge", slice(1, 4), slice(7, 13))
    put("across a horizontal edge", slice(7, 13), slice(25, 28))
    put("over a four-window corner", slice(18, 23), slice(18, 23))
    # diagonal contacts only: pixels meeting at a window corner, and across an edge at a slant
    put("diagonal across a corner", 9, 9 + 20)
    put("diagonal across a corner", 10, 10 + 20)
    put("diagonal across a vertical edge", 5, 19)
    put("diagonal across a vertical edge", 6, 20)
    put("diagonal across a horizontal edge", 29, 25)
    put("diagonal across a horizontal edge", 30, 26)
    # an L around a corner: in three windows of the four, not the fourth
    put("L around a corner", slice(26, 34), slice(28, 30))
    put("L around a corner", slice(32, 34), slice(28, 34))
    # a U whose arms are both in the top strip, joined only two strips below
    put("U joined two strips below", slice(0, 25), 35)
    put("U joined two strips below", slice(0, 25), 38)
    put("U joined two strips below", 24, slice(35, 39))
    # a square ring across four windows, its hole across the same edges
    put("ring with a hole", slice(12, 16), slice(2, 16))
    put("ring with a hole", slice(12, 29), slice(2, 5))
    put("ring with a hole", slice(25, 29), slice(2, 16))
    put("ring with a hole", slice(12, 29), slice(13, 16))
    put("inside one window", slice(34, 37), slice(22, 25))
    put("on the scene border", slice(37, 40), slice(35, 40))
    return m, where


def _named(frame, where: dict[str, tuple[int, int]]) -> dict[str, int]:
    """Building name -> number of polygons holding its pixel centre."""
    return {
        name: int(frame.geometry.contains(shapely.Point(c + 0.5, r + 0.5)).sum())
        for name, (r, c) in where.items()
    }


def test_every_kind_of_window_edge_and_corner_gives_one_polygon() -> None:
    mask, where = _layout()
    n, _ = label_components(mask)
    assert n == len(where)  # the layout itself: every named building is one 8-connected component
    frame = vectorize_array(mask, options=_exact(W))
    assert frame.attrs["windows"] == 16
    assert len(frame) == n
    assert _named(frame, where) == dict.fromkeys(where, 1)
    assert frame.geometry.is_valid.all()
    # exact outlines: polygon area = pixel count, and the union of all polygons is the mask
    np.testing.assert_array_equal(frame.geometry.area.to_numpy(), frame["pixels"].to_numpy())
    assert frame["pixels"].sum() == mask.sum()
    ring = frame.geometry[frame.geometry.contains(shapely.Point(2.5, 12.5))].iloc[0]
    assert len(ring.interiors) == 1 and ring.area == mask[12:29, 2:16].sum()
    # corner contacts are valid MultiPolygons of parts meeting at that corner, still one feature
    diag = frame.geometry[frame.geometry.contains(shapely.Point(29.5, 9.5))].iloc[0]
    assert diag.geom_type == "MultiPolygon" and len(diag.geoms) == 2


@pytest.mark.parametrize("window", [16, 17, 23, 64])
def test_windows_do_not_change_the_polygons(window: int) -> None:
    """Random blobs: every window size gives the single-window result, vertex for vertex."""
    rng = np.random.default_rng(window)
    mask = (rng.random((150, 170)) > 0.7).astype(np.uint8)
    mask[40:80, 30:120] = 1  # and one large building with holes across many windows
    mask[50:60, 40:50] = 0
    whole = vectorize_array(mask, options=_exact(4096))
    assert whole.attrs["windows"] == 1 and len(whole) == label_components(mask)[0]
    for opts in (_exact(window), VectorizeOptions(window=window, simplify=1.5)):
        windowed = vectorize_array(mask, options=opts)
        reference = (
            whole
            if opts.simplify == 0
            else vectorize_array(mask, options=VectorizeOptions(window=4096, simplify=1.5))
        )
        assert windowed.attrs["windows"] > 1
        assert len(windowed) == len(reference)
        assert all(shapely.equals_exact(a, b, 0) for a, b in zip(windowed.geometry, reference.geometry))
        np.testing.assert_array_equal(windowed["pixels"], reference["pixels"])


def test_ids_follow_raster_order_of_first_pixels() -> None:
    m = np.zeros((20, 20), np.uint8)
    m[5, 15] = 1  # first pixel (5, 15)
    m[2:8, 3] = 1  # first pixel (2, 3): first building
    m[5:9, 8:10] = 1  # (5, 8): second, before (5, 15)
    frame = vectorize_array(m, options=_exact(7))
    assert frame["id"].tolist() == [1, 2, 3]
    assert frame["pixels"].tolist() == [6, 8, 1]


def test_simplify_keeps_area_and_drops_stair_steps() -> None:
    """A 45-degree staircase roof line: 1 px of tolerance turns ~80 steps into one edge."""
    m = np.zeros((60, 60), np.uint8)
    for r in range(10, 50):
        m[r, 10 : 10 + r - 8] = 1  # right edge a staircase
    exact = vectorize_array(m, options=_exact(32)).geometry.iloc[0]
    simple = vectorize_array(m, options=VectorizeOptions(window=32, simplify=1.0)).geometry.iloc[0]
    assert shapely.get_num_coordinates(exact) > 80
    assert shapely.get_num_coordinates(simple) <= 8
    assert simple.area == pytest.approx(exact.area, rel=0.05)
    assert simple.hausdorff_distance(exact) <= 1.0 + 1e-9


def test_rectangle_snaps_near_rectangles_only() -> None:
    m = np.zeros((40, 60), np.uint8)
    m[5:25, 5:25] = 1  # 20x20 with a 2x2 notch: fills 99% of its rectangle
    m[5:7, 23:25] = 0
    m[5:25, 35:55] = 1  # an L: fills 64%
    m[5:15, 45:55] = 0
    off = vectorize_array(m, options=_exact(16))
    assert off.geometry.apply(shapely.get_num_coordinates).tolist() == [7, 7]  # off by default: outlines kept
    on = vectorize_array(m, options=_exact(16, regularize="rectangle", rectangle_fill=0.9))
    assert shapely.get_num_coordinates(on.geometry.iloc[0]) == 5
    assert on.geometry.iloc[0].equals(shapely.box(5, 5, 25, 25))
    assert on.geometry.iloc[1].equals(off.geometry.iloc[1])
    ring = shapely.box(0, 0, 10, 10).difference(shapely.box(4, 4, 6, 6))  # a courtyard is never filled in
    assert rectangle(np.array([ring], dtype=object), 0.5)[0].equals(ring)


def _rotated_l(angle: float, size: int = 120) -> np.ndarray:
    """A mask [size, size] of an L-shaped building (40 x 40 px with a 20 x 20 px bite) rotated by ``angle``
    degrees about its centre: its pixel outline is a staircase on every edge."""
    yy, xx = np.mgrid[0:size, 0:size] + 0.5 - size / 2
    t = np.radians(angle)
    u, v = np.cos(t) * xx + np.sin(t) * yy, -np.sin(t) * xx + np.cos(t) * yy
    body = (np.abs(u) < 20) & (np.abs(v) < 20)
    bite = (u > 0) & (v > 0)
    return (body & ~bite).astype(np.uint8)


def _edge_angles(geom) -> np.ndarray:
    """Direction of every exterior edge, degrees modulo 90 (0 = along the first axis or across it)."""
    xy = np.asarray(geom.exterior.coords)
    d = np.diff(xy, axis=0)
    return np.degrees(np.arctan2(d[:, 1], d[:, 0])) % 90


def test_full_regularisation_squares_a_rotated_l_and_keeps_it_an_l() -> None:
    """A staircase L at 30 degrees: 'full' gives 6 edges, every one at 30 or 120 degrees (right angles),
    the L's area within 5 %; 'none' keeps a many-vertex outline at other angles."""
    m = _rotated_l(30.0)
    none = vectorize_array(m, options=VectorizeOptions(window=50)).geometry.iloc[0]
    squared = vectorize_array(m, options=VectorizeOptions(window=50, regularize="full")).geometry.iloc[0]
    assert squared.geom_type == "Polygon" and squared.is_valid
    assert len(squared.exterior.coords) - 1 == 6  # an L: six corners
    assert np.allclose(_edge_angles(squared), 30.0, atol=1.0)
    assert squared.area == pytest.approx(m.sum(), rel=0.05)
    assert len(none.exterior.coords) - 1 > 6
    assert not np.allclose(_edge_angles(none), 30.0, atol=1.0)


def test_full_regularisation_keeps_holes_and_joins_multipolygons() -> None:
    """A courtyard stays a hole; a building of two parts meeting at a corner (a MultiPolygon) comes back
    as one feature; every building comes back, in order."""
    ring = shapely.box(0, 0, 30, 30).difference(shapely.box(10, 10, 20, 20))
    corner = shapely.MultiPolygon([shapely.box(40, 40, 50, 50), shapely.box(50, 50, 60, 60)])
    out = full(np.array([ring, corner, shapely.box(70, 0, 80, 8)], dtype=object))
    assert len(out) == 3
    assert len(out[0].interiors) == 1 and out[0].area == pytest.approx(800)
    assert out[1].geom_type == "MultiPolygon" and out[1].area == pytest.approx(200)
    assert out[2].symmetric_difference(shapely.box(70, 0, 80, 8)).area < 1e-9  # a rectangle stays itself
    assert len(full(np.array([], dtype=object))) == 0


@pytest.mark.parametrize("regularize", ["rectangle", "full"])
def test_regularised_outlines_do_not_depend_on_the_windows(regularize: str) -> None:
    m = np.zeros((120, 130), np.uint8)
    m[10:110, 10:120] = _rotated_l(20.0, 120)[10:110, 0:110]
    m[5:9, 5:40] = 1
    whole = vectorize_array(m, options=VectorizeOptions(window=4096, regularize=regularize))
    windowed = vectorize_array(m, options=VectorizeOptions(window=37, regularize=regularize))
    assert windowed.attrs["windows"] > 1 and len(windowed) == len(whole)
    assert all(shapely.equals_exact(a, b, 0) for a, b in zip(windowed.geometry, whole.geometry))


def test_cut_marks_buildings_on_the_scene_border_only() -> None:
    """``cut``: the building reaches the scene's own border (it may go on in a neighbouring scene); inner
    window edges do not count."""
    m = np.zeros((40, 40), np.uint8)
    m[0:3, 5:8] = 1  # top border
    m[15:25, 15:25] = 1  # across the inner 10-px window edges, inside the scene
    m[30:33, 37:40] = 1  # right border
    m[37:40, 0:2] = 1  # bottom-left corner
    m[5:8, 12:14] = 1  # inside
    frame = vectorize_array(m, options=_exact(10))
    assert frame["cut"].tolist() == [True, False, False, True, True]


def test_minimum_areas_and_ids() -> None:
    m = np.zeros((30, 30), np.uint8)
    m[2:4, 2:4] = 1  # 4 px = 0.36 m² at 30 cm
    m[10:20, 10:20] = 1  # 100 px = 9 m²
    m[25:28, 2:28] = 1  # 78 px = 7.02 m²
    geo = {"transform": Affine(0.3, 0, 500000, 0, -0.3, 4500000), "crs": "EPSG:32631"}
    frame = vectorize_array(m, options=_exact(16, min_area_px=5), **geo)
    assert frame["pixels"].tolist() == [100, 78] and frame["id"].tolist() == [1, 2]
    frame = vectorize_array(m, options=_exact(16, min_area_m2=8.0), **geo)
    assert frame["pixels"].tolist() == [100] and frame["id"].tolist() == [1]
    assert frame["area_m2"].iloc[0] == pytest.approx(9.0)
    # exact_cut: a building on the scene's border may be a piece of a larger one; it passes (the merge
    # of make predict-scenes filters the joined building)
    m[0, 20:22] = 1
    for small in ({"min_area_px": 5}, {"min_area_m2": 8.0}):
        frame = vectorize_array(m, options=_exact(16, exact_cut=True, **small), **geo)
        assert frame["cut"].tolist() == [True, False] + [False] * ("min_area_px" in small)
        assert frame["pixels"].tolist()[0] == 2
    with pytest.raises(ConfigError, match="no CRS"):
        vectorize_array(m, options=_exact(16, min_area_m2=1.0))


def test_probabilities_over_windows() -> None:
    m = np.zeros((20, 20), np.uint8)
    m[8:12, 6:14] = 1  # across the 10-px edges: 32 px
    probs = np.zeros((20, 20), np.float32)
    probs[8:12, 6:14] = 0.6
    probs[11, 13] = 0.9
    frame = vectorize_array(m, probs, options=_exact(10))
    assert len(frame) == 1
    assert frame["prob_mean"].iloc[0] == pytest.approx((31 * 0.6 + 0.9) / 32)
    assert frame["prob_max"].iloc[0] == pytest.approx(0.9)
    assert "prob_mean" not in vectorize_array(m, options=_exact(10)).columns


def test_memory_is_a_window_not_the_scene() -> None:
    """The reader is asked for one window at a time; Python memory stays far below the scene's."""
    height, width, window = 4000, 600, 200
    rng = np.random.default_rng(0)
    mask = np.zeros((height, width), np.uint8)
    for _ in range(600):
        r, c = rng.integers(0, height - 40), rng.integers(0, width - 40)
        mask[r : r + rng.integers(4, 40), c : c + rng.integers(4, 40)] = 1
    asked = []

    def read(win):
        asked.append(win.width * win.height)
        rows, cols = win.toslices()
        return mask[rows, cols], None

    tracemalloc.start()
    try:
        frame = vectorize(read, height, width, options=VectorizeOptions(window=window))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(frame) == label_components(mask)[0]
    assert max(asked) == window * window and len(asked) == frame.attrs["windows"] == 20 * 3
    # The whole scene's int32 labels alone would be 4000 x 600 x 4 = 9.6 MB.
    assert peak < height * width * 4 / 4, f"peak traced memory {peak / 1e6:.1f} MB"


def test_tile_polygons_follow_the_component_labels() -> None:
    m = np.zeros((10, 10), np.uint8)
    m[0:2, 0:2] = 1
    m[5:9, 5:7] = 1
    n, labels = label_components(m)
    polys = tile_polygons(m)
    assert len(polys) == n == 2
    assert [p.area for p in polys] == [float((labels == k).sum()) for k in (1, 2)]
    assert tile_polygons(np.zeros((4, 4), np.uint8)) == []


def test_options_out_of_range_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"window = 0.*simplify = -1"):
        VectorizeOptions(window=0, simplify=-1)
    with pytest.raises(ConfigError, match="regularize = 'square' .none or rectangle or full"):
        VectorizeOptions(regularize="square")
    with pytest.raises(ConfigError, match="rectangle_fill"):
        VectorizeOptions(rectangle_fill=1.5)


def test_exact_cut_keeps_the_pixel_outline_of_buildings_on_the_scene_border() -> None:
    """exact_cut (make predict-scenes): a staircase building on the border keeps every pixel corner (its
    pieces in the next scene must fit exactly); the same building inside the scene is simplified."""
    m = np.zeros((60, 100), np.uint8)
    for r in range(10, 50):
        m[r, 0 : r - 8] = 1  # on the left border, a staircase edge
        m[r, 40 : 40 + r - 8] = 1  # the same shape inside
    m[:, 38:40] = 0
    exact = vectorize_array(m, options=_exact(32))
    cut = vectorize_array(m, options=VectorizeOptions(window=32, exact_cut=True))
    plain = vectorize_array(m, options=VectorizeOptions(window=32))
    assert cut["cut"].tolist() == [True, False]
    assert cut.geometry.iloc[0].equals_exact(exact.geometry.iloc[0], 0)
    assert cut.geometry.iloc[1].equals_exact(plain.geometry.iloc[1], 0)
    assert shapely.get_num_coordinates(cut.geometry.iloc[1]) < shapely.get_num_coordinates(
        cut.geometry.iloc[0]
    )
