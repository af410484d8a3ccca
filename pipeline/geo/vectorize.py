"""Building masks -> one polygon per building, window by window (the core of ``make footprints``).

A building is an 8-connected component of the mask (the component filter's connectivity,
:mod:`pipeline.metrics.postprocess`). Its polygon comes from ``rasterio.features.shapes`` in scene pixel
coordinates (integers, so exact), with its holes, and is valid: where pixels touch only diagonally the
outline touches itself, which is stored as a MultiPolygon of parts meeting at that corner (still one
feature). Then per building: the minimum area (pixels; m²), simplification (Douglas-Peucker, tolerance
in pixels, topology kept), the optional regularisation (:data:`REGULARIZERS`: ``none``, ``rectangle``,
``full``), and the raster's transform to its CRS.

Windows: :func:`vectorize` reads the mask (and probabilities) one ``window`` x ``window`` block at a
time. A building that reaches an inner window edge is a piece; pieces that touch across an edge
(8-adjacent pixels share at least a corner) are merged by a union, exactly, once every window that can
touch them has been read. So a building across any edge or corner is one polygon, the same as from a
single window. Memory: one window of raster, the pieces along the lower edge of one strip of windows,
and the finished polygons.

Columns of the result: ``id`` (1.. in raster order of each building's first pixel), ``scene``,
``pixels`` (of the mask), ``area_m2`` (of the written polygon: CRS units when projected in metres, a
local equal-area projection otherwise, NaN without a CRS), ``cut`` (True when the building reaches the
scene's border, so the scene may hold only part of it: :mod:`pipeline.geo.merge` joins such pieces of
neighbouring scenes), ``prob_mean`` and ``prob_max`` (with probabilities).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import geopandas as gpd
import numpy as np
import shapely
from affine import Affine
from pyproj import CRS
from rasterio.features import shapes
from rasterio.windows import Window

from pipeline.core.config import ConfigError
from pipeline.core.errors import BuildsegError
from pipeline.core.progress import progress
from pipeline.metrics import buildings

WINDOW = 2048
IDENTITY = Affine.identity()
_BATCH = 1024  # finished buildings outlined at a time


class FootprintError(BuildsegError, ValueError):
    """A mask, probability raster or polygon file that cannot be used; the message names it and the fix."""


# One window of a scene: a mask [h, w] (non-zero = building) and probabilities float32 [h, w] or None.
Reader = Callable[[Window], tuple[np.ndarray, np.ndarray | None]]


@dataclass(frozen=True)
class VectorizeOptions:
    """How masks become polygons; ``regularize`` names one of :data:`REGULARIZERS`."""

    window: int = WINDOW  # pixels per side of the blocks read at a time
    min_area_px: int = 0  # buildings of fewer mask pixels are dropped
    min_area_m2: float = 0.0  # buildings whose polygon is smaller are dropped (needs a CRS)
    simplify: float = 1.0  # Douglas-Peucker tolerance in pixels; 0 = the exact pixel outline
    # none: the simplified outline (measured best, bench/results/footprints.json); rectangle: a building
    # filling >= rectangle_fill of its minimum rotated rectangle becomes it; full: edges snapped to the
    # building's main direction and its right angle (buildingregulariser), L/T/U shapes kept.
    regularize: str = "none"
    rectangle_fill: float = 0.85
    # Buildings reaching the scene's border (``cut``) keep their exact pixel outline and pass the minimum
    # areas (a piece may be small where its building is not): make predict-scenes joins them with their
    # other pieces exactly, then simplifies and filters them (pipeline.geo.merge).
    exact_cut: bool = False

    def __post_init__(self) -> None:
        problems = [
            f"{k} = {v!r} ({why})"
            for k, v, bad, why in [
                ("window", self.window, self.window < 1, f">= 1 pixel, e.g. {WINDOW}"),
                ("min_area_px", self.min_area_px, self.min_area_px < 0, ">= 0"),
                ("min_area_m2", self.min_area_m2, not self.min_area_m2 >= 0, ">= 0"),
                ("simplify", self.simplify, not self.simplify >= 0, ">= 0 pixels"),
                (
                    "regularize",
                    self.regularize,
                    self.regularize not in REGULARIZERS,
                    " or ".join(REGULARIZERS),
                ),
                ("rectangle_fill", self.rectangle_fill, not 0 < self.rectangle_fill <= 1, "a fill in (0, 1]"),
            ]
            if bad
        ]
        if problems:
            raise ConfigError(f"footprint options out of range: {'; '.join(problems)}")


# ----------------------------------------------------------------------------- pieces of one window


@dataclass
class _Piece:
    """A building, or the part of one that a window (or a strip of windows) holds."""

    geom: Any  # shapely (Multi)Polygon, scene pixel coordinates
    first: tuple[int, int]  # (row, col) of its first pixel in raster order
    pixels: int
    prob_sum: float = 0.0
    prob_max: float = 0.0
    edge: bool = False  # reaches an inner window edge: may go on in a neighbouring window
    below: bool = False  # reaches the lower edge of its strip (not the scene's): may go on below
    cut: bool = False  # reaches the scene's own border: the scene may hold only part of the building


def _piece_geometries(labels: np.ndarray, n: int, row_off: int, col_off: int) -> list[Any]:
    """Valid shapely geometries [n] of labels 1..n of ``labels`` int32 [h, w], in scene pixel coordinates."""
    parts: list[list[Any]] = [[] for _ in range(n + 1)]
    at = Affine.translation(col_off, row_off)
    for geom, value in shapes(labels, mask=labels != 0, connectivity=buildings.CONNECTIVITY, transform=at):
        parts[int(value)].append(shapely.geometry.shape(geom))
    # GDAL joins diagonal neighbours with a self-touching ring, invalid for GEOS: make_valid splits it at
    # the touching corner (a MultiPolygon). Several parts per label are not expected; a union is safe.
    valid = [shapely.make_valid(p) for p in parts[1:]]
    return [v[0] if len(v) == 1 else shapely.union_all(v) for v in valid]


def _window_pieces(
    mask: np.ndarray, probs: np.ndarray | None, row_off: int, col_off: int, height: int, width: int
) -> list[_Piece]:
    """The buildings of one window [h, w] at (row_off, col_off) of a ``height`` x ``width`` scene."""
    h, w = mask.shape
    n, labels = buildings.label_components(mask)
    if n == 0:
        return []
    flat = labels.ravel()
    fg = np.flatnonzero(flat)
    lab = flat[fg]
    pixels = np.bincount(lab, minlength=n + 1)
    first = np.full(n + 1, flat.size, dtype=np.int64)
    np.minimum.at(first, lab, fg)
    psum, pmax = np.zeros(n + 1), np.zeros(n + 1)
    if probs is not None:
        p = probs.ravel()[fg].astype(np.float64)
        psum = np.bincount(lab, weights=p, minlength=n + 1)
        np.maximum.at(pmax, lab, p)
    below, edge, cut = np.zeros(n + 1, bool), np.zeros(n + 1, bool), np.zeros(n + 1, bool)
    # Each side of the window is an inner edge (the building may go on in the next window) or the
    # scene's own border (the building may go on in the next scene).
    for side, inner in (
        (labels[-1], row_off + h < height),
        (labels[0], row_off > 0),
        (labels[:, 0], col_off > 0),
        (labels[:, -1], col_off + w < width),
    ):
        (edge if inner else cut)[side] = True
    if row_off + h < height:
        below[labels[-1]] = True
    geoms = _piece_geometries(labels, n, row_off, col_off)
    return [
        _Piece(
            geoms[k - 1],
            (row_off + int(first[k]) // w, col_off + int(first[k]) % w),
            int(pixels[k]),
            float(psum[k]),
            float(pmax[k]),
            bool(edge[k]),
            bool(below[k]),
            bool(cut[k]),
        )
        for k in range(1, n + 1)
    ]


def components(n: int, a: np.ndarray, b: np.ndarray) -> list[list[int]]:
    """Connected components (lists of indices, each sorted, in order of their first) of ``n`` nodes
    joined by the edges ``a[k]``-``b[k]`` (union-find with path halving)."""
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in zip(a.tolist(), b.tolist()):
        parent[root(i)] = root(j)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(root(i), []).append(i)
    return list(groups.values())


def _merge(pieces: list[_Piece]) -> list[_Piece]:
    """Union the pieces that touch into one piece each.

    Pieces of one window never touch (they are different components); pieces of neighbouring windows
    touch exactly when they hold 8-adjacent pixels, whose unit squares share an edge or a corner.
    """
    if len(pieces) < 2:
        return pieces
    geoms = np.array([p.geom for p in pieces], dtype=object)
    a, b = shapely.STRtree(geoms).query(geoms, predicate="intersects")
    groups = [[pieces[i] for i in group] for group in components(len(pieces), a, b)]
    return [
        g[0]
        if len(g) == 1
        else _Piece(
            shapely.union_all([p.geom for p in g]),
            min(p.first for p in g),
            sum(p.pixels for p in g),
            sum(p.prob_sum for p in g),
            max(p.prob_max for p in g),
            edge=True,
            below=any(p.below for p in g),
            cut=any(p.cut for p in g),
        )
        for g in groups
    ]


def _buildings(read: Reader, height: int, width: int, window: int, stats: dict[str, int]) -> Iterator[_Piece]:
    """Every building of the scene as one piece, strip of windows by strip (see the module notes)."""
    carried: list[_Piece] = []
    bar = progress((-(-height // window)) * (-(-width // window)), "footprints", unit="window")
    for r in range(0, height, window):
        h = min(window, height - r)
        pending = []
        for c in range(0, width, window):
            mask, probs = read(Window(c, r, min(window, width - c), h))
            for p in _window_pieces(mask, probs, r, c, height, width):
                if p.edge:
                    pending.append(p)
                else:
                    yield p
            bar.update(1)
            stats["windows"] += 1
        for p in carried:
            p.below = False  # the strip below their strip has now been read
        carried, merged = [], _merge(carried + pending)
        for p in merged:
            if p.below:
                carried.append(p)
            else:
                yield p
        stats["max_carried"] = max(stats["max_carried"], len(carried))
    bar.close()


# ----------------------------------------------------------------------------- polygons -> features


def rectangle(geoms: np.ndarray, fill: float) -> np.ndarray:
    """Replace each Polygon without holes that fills >= ``fill`` of its minimum rotated rectangle by it.

    Args:
        geoms: object [N] shapely geometries; others (MultiPolygons, holes, irregular shapes) are kept.
    """
    rect = shapely.oriented_envelope(geoms)
    area = shapely.area(rect)
    ratio = np.divide(shapely.area(geoms), area, out=np.zeros(len(geoms)), where=area > 0)
    simple = (shapely.get_type_id(geoms) == 3) & (shapely.get_num_interior_rings(geoms) == 0)
    return np.where(simple & (ratio >= fill), rect, geoms)


# buildingregulariser's settings, in pixels (the outlines are regularised in pixel coordinates, before the
# transform): chosen by a sweep on 60 real masks and kept fixed (measured in bench/footprints.py).
FULL_SETTINGS = {
    "parallel_threshold": 1.0,  # px: nearly parallel neighbouring edges closer than this are merged
    "simplify": True,
    "simplify_tolerance": 2.0,  # px
    "allow_45_degree": True,  # bay windows and cut corners stay diagonal
    "diagonal_threshold_reduction": 15,
    "allow_circles": False,  # silos and round towers are rare; a circle has hundreds of vertices
    "num_cores": 1,  # its default, 0, starts a pool of every core per call
}


def full(geoms: np.ndarray) -> np.ndarray:
    """Edges of each building snapped to its main direction and its right angle (or 45 degrees).

    Args:
        geoms: object [N] shapely (Multi)Polygons in pixel coordinates.
    Returns:
        object [N]: the regularised outlines, made valid; a building the library drops keeps its outline.

    buildingregulariser splits MultiPolygons into one row per part: each row carries its building's
    index, and the parts are joined again by a union.
    """
    if not len(geoms):
        return geoms
    from buildingregulariser import regularize_geodataframe

    frame = gpd.GeoDataFrame({"building": np.arange(len(geoms))}, geometry=list(geoms), crs=None)
    with warnings.catch_warnings():
        # pandas' deprecation of an argument the library passes (not ours to fix), and its note for each
        # building it leaves as it was (its squared outline strayed too far): nothing a user can act on.
        for message in ("The inplace keyword", "Regularized polygon has low IoU"):
            warnings.filterwarnings("ignore", message=message, module=r"buildingregulariser\b")
        out = regularize_geodataframe(frame, **FULL_SETTINGS)
    result = np.array(geoms, dtype=object)
    for k, part in out.groupby("building").geometry:
        parts = [g for g in part if g is not None and not g.is_empty]
        if parts:
            result[int(k)] = shapely.make_valid(parts[0] if len(parts) == 1 else shapely.union_all(parts))
    return result


# ``VectorizeOptions.regularize`` -> what it does to outlines object [N] (pixel coordinates).
REGULARIZERS: dict[str, Callable[[np.ndarray, Any], np.ndarray]] = {
    "none": lambda geoms, opts: geoms,
    "rectangle": lambda geoms, opts: rectangle(geoms, opts.rectangle_fill),
    "full": lambda geoms, opts: full(geoms),
}


def _to_world(geoms: np.ndarray, transform: Affine) -> np.ndarray:
    a, b, c, d, e, f = transform[:6]
    return shapely.transform(
        geoms, lambda xy: np.column_stack([a * xy[:, 0] + b * xy[:, 1] + c, d * xy[:, 0] + e * xy[:, 1] + f])
    )


def local_equal_area(frame: gpd.GeoDataFrame) -> CRS:
    """A Lambert azimuthal equal-area projection (metres) centred on the frame's features."""
    x0, y0, x1, y1 = frame.to_crs(4326).total_bounds if len(frame) else (0, 0, 0, 0)
    return CRS.from_proj4(f"+proj=laea +lat_0={(y0 + y1) / 2} +lon_0={(x0 + x1) / 2} +datum=WGS84 +units=m")


def metric_frame(frame: gpd.GeoDataFrame) -> gpd.GeoDataFrame:
    """``frame`` in metres: itself when its CRS is projected in metres, else a local equal-area projection."""
    crs = frame.crs
    if crs is None:
        raise FootprintError("footprints without a CRS have no area in m²; use pixels (min_area_px)")
    if crs.is_projected and crs.axis_info[0].unit_conversion_factor == 1.0:
        return frame
    return frame.to_crs(local_equal_area(frame))


def _outline(pieces: list[_Piece], opts: VectorizeOptions) -> list[_Piece]:
    """Finished buildings with their final outline, in pixel coordinates (simplified, regularised).

    Done as buildings finish, not at the end: a pixel outline has a vertex per pixel step, a simplified
    one a few, so only the few are held for the whole scene.
    """
    if not pieces:
        return pieces
    geoms = np.array([p.geom for p in pieces], dtype=object)
    # Canonical first (no collinear vertices, fixed ring starts), so that the simplified outline does not
    # depend on how windows cut the building.
    geoms = shapely.normalize(shapely.simplify(geoms, 0.0))
    todo = ~np.array([p.cut for p in pieces]) if opts.exact_cut else np.ones(len(pieces), dtype=bool)
    geoms[todo] = finish(geoms[todo], opts)
    for p, g in zip(pieces, geoms):
        p.geom = g
    return pieces


def finish(geoms: np.ndarray, opts: VectorizeOptions) -> np.ndarray:
    """Simplified (Douglas-Peucker, topology kept) and regularised outlines object [N], pixel units."""
    if opts.simplify > 0 and len(geoms):
        geoms = shapely.simplify(geoms, opts.simplify, preserve_topology=True)
    return REGULARIZERS[opts.regularize](geoms, opts)


def _features(
    pieces: list[_Piece], transform: Affine, crs: Any, scene: str, opts: VectorizeOptions, with_probs: bool
) -> gpd.GeoDataFrame:
    """The finished buildings as a GeoDataFrame, one row each (see the module notes for the columns)."""
    pieces = sorted(pieces, key=lambda p: p.first)
    geoms = np.array([p.geom for p in pieces], dtype=object)
    pixels = np.array([p.pixels for p in pieces], dtype=np.int64)
    columns: dict[str, Any] = {"scene": [scene] * len(pieces), "pixels": pixels}
    columns["cut"] = np.array([p.cut for p in pieces], dtype=bool)
    if with_probs:
        columns["prob_mean"] = np.array([p.prob_sum for p in pieces]) / np.maximum(pixels, 1)
        columns["prob_max"] = np.array([p.prob_max for p in pieces])
    frame = gpd.GeoDataFrame(columns, geometry=_to_world(geoms, transform), crs=crs)
    frame.insert(2, "area_m2", metric_frame(frame).area.to_numpy() if crs is not None else np.nan)
    if opts.min_area_m2 > 0:
        keep = (frame["area_m2"].to_numpy() >= opts.min_area_m2) | (opts.exact_cut & columns["cut"])
        frame = frame[keep].reset_index(drop=True)
    frame.insert(0, "id", np.arange(1, len(frame) + 1))
    return frame


def vectorize(
    read: Reader,
    height: int,
    width: int,
    transform: Affine = IDENTITY,
    crs: Any = None,
    scene: str = "",
    options: VectorizeOptions = VectorizeOptions(),
    with_probs: bool = False,
) -> gpd.GeoDataFrame:
    """Polygons of every building of a ``height`` x ``width`` mask read window by window by ``read``.

    Returns a GeoDataFrame (columns in the module notes) in ``crs``; ``attrs`` holds ``windows`` (read)
    and ``max_carried`` (most pieces held between strips).
    """
    if options.min_area_m2 > 0 and crs is None:
        raise ConfigError(f"{scene or 'the mask'} has no CRS, so no area in m²: use min_area_px instead")
    stats = {"windows": 0, "max_carried": 0}
    pieces: list[_Piece] = []
    batch: list[_Piece] = []
    for p in _buildings(read, height, width, options.window, stats):
        if p.pixels >= options.min_area_px or (options.exact_cut and p.cut):
            batch.append(p)
        if len(batch) == _BATCH:
            pieces += _outline(batch, options)
            batch = []
    with progress(None, f"outline {len(pieces) + len(batch):,} buildings"):
        pieces += _outline(batch, options)
        frame = _features(pieces, transform, crs, scene, options, with_probs)
    frame.attrs.update(stats)
    return frame


def vectorize_array(
    mask: np.ndarray,
    probs: np.ndarray | None = None,
    options: VectorizeOptions = VectorizeOptions(),
    **kw: Any,
) -> gpd.GeoDataFrame:
    """:func:`vectorize` of an in-memory mask [H, W] (and probabilities [H, W] in 0..1)."""

    def read(win: Window) -> tuple[np.ndarray, np.ndarray | None]:
        rows, cols = win.toslices()
        return mask[rows, cols], None if probs is None else probs[rows, cols]

    return vectorize(read, *mask.shape, options=options, with_probs=probs is not None, **kw)


def tile_polygons(mask: np.ndarray) -> list[Any]:
    """Exact polygons of the buildings of a mask [H, W], in pixel coordinates (x = column, y = row);
    item ``k`` is component ``k + 1`` of :func:`pipeline.metrics.buildings.label_components` (as in its
    matches)."""
    n, labels = buildings.label_components(mask)
    return _piece_geometries(labels, n, 0, 0) if n else []
