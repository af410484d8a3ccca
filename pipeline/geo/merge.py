"""Footprints of many scenes -> one layer for the whole area: one CRS, every building once.

Scenes of an area touch or overlap. A building on the border of two scenes is cut by both: each
scene's footprints hold a piece of it, flagged ``cut`` and kept as its exact pixel outline
(``VectorizeOptions.exact_cut``, :mod:`pipeline.geo.vectorize`); a building in the overlap of two scenes
is found by both. :func:`merge_scenes` brings every scene's polygons to one CRS (:func:`common_crs`) and
resolves each group of polygons of different scenes that touch (within half a pixel) and lie where
another scene also looks:

* the group holds a complete building (not ``cut``): the complete copy farthest inside its own scene
  is kept (it was predicted with the most context), and every polygon of the group it covers for at
  least half of that polygon's area is its duplicate (dropped); what is left is resolved the same way;
* every polygon of the group is cut (a building across a seam, or longer than the overlap): their
  union, one polygon, exact as the pieces are.

Polygons nowhere near another scene are kept as they are. Exact outlines (the joined buildings and the
cut ones at the area's border) are then simplified and regularised as the scenes' other buildings were
(:func:`finish`, in pixel units), and held to the minimum areas (``min_area_px``, ``min_area_m2``) that
each scene let them through whatever their size: a piece may be small where its building is not.
Columns: those of the scenes' footprints with ``id`` renumbered, ``area_m2`` recomputed in the common
CRS, ``cut`` now "reaches the border of the whole area", and ``pieces``: how many scenes' polygons became
this one (1 = one scene's polygon).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
from affine import Affine
from pyproj import CRS

from pipeline.geo.vectorize import VectorizeOptions, components, metric_frame
from pipeline.geo.vectorize import finish as vector_finish

COVERED = 0.5  # a polygon covered this much by a kept complete building is a copy of it


@dataclass(frozen=True)
class SceneExtent:
    """Where a scene lies: its raster grid (``transform``, ``height`` x ``width`` pixels) in ``crs``."""

    name: str
    crs: Any  # anything pyproj.CRS takes
    transform: Affine
    height: int
    width: int

    def polygon(self, target: CRS) -> Any:
        """The scene's outline in ``target`` (edges densified, so a reprojected border stays close)."""
        t = self.transform
        corners = [t @ (0, 0), t @ (self.width, 0), t @ (self.width, self.height), t @ (0, self.height)]
        outline = shapely.Polygon(corners)
        step = max(abs(t.a), abs(t.e)) * max(self.height, self.width) / 64
        outline = shapely.segmentize(outline, step)
        return gpd.GeoSeries([outline], crs=CRS(self.crs)).to_crs(target).iloc[0]


def common_crs(crss: Sequence[Any]) -> tuple[CRS, str]:
    """The CRS of most scenes (ties: the first listed) and a line saying which and why."""
    parsed = [CRS(c) for c in crss]
    names = [c.to_string() for c in parsed]
    counts = Counter(names)
    best = max(counts, key=lambda n: (counts[n], -names.index(n)))
    target = parsed[names.index(best)]
    if len(counts) == 1:
        return target, f"all {len(names)} scenes in {best}"
    others = ", ".join(f"{n} ({k})" for n, k in counts.items() if n != best)
    return target, f"scenes in {len(counts)} CRSs: reprojected {others} to {best}, the CRS of {counts[best]}"


def _pairs(geoms: np.ndarray, scene: np.ndarray, tol: float) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of polygons of different scenes within ``tol`` of each other."""
    a, b = shapely.STRtree(geoms).query(geoms, predicate="dwithin", distance=tol)
    keep = scene[a] != scene[b]
    return a[keep], b[keep]


def _join(geoms: list[Any]) -> Any:
    """The union of the exact pieces of one building (they share pixel edges or corners)."""
    return shapely.normalize(shapely.simplify(shapely.union_all(geoms), 0.0))  # no vertices left on a seam


def finish(geoms: np.ndarray, pixel: np.ndarray, options: VectorizeOptions) -> np.ndarray:
    """Simplify and regularise exact outlines object [N] as :mod:`pipeline.geo.vectorize` does, in pixel
    units: each scaled by 1 / its scene's pixel size ``pixel`` [N] (Douglas-Peucker and the regulariser do
    not care where the origin is), finished, and scaled back."""
    out = np.array(geoms, dtype=object)
    for size in np.unique(pixel):
        k = pixel == size
        px = shapely.transform(out[k], lambda xy, s=size: xy / s)
        out[k] = shapely.transform(vector_finish(px, options), lambda xy, s=size: xy * s)
    return out


def _resolve(
    members: list[int], geoms: np.ndarray, scene: np.ndarray, cut: np.ndarray, depth: np.ndarray, tol: float
) -> list[tuple[list[int], int | None]]:
    """A group of touching polygons of different scenes -> [(the polygons one building stands for, the
    complete copy kept, or None: their union)]."""
    if len(members) == 1:
        return [(members, members[0])]
    complete = [m for m in members if not cut[m]]
    if not complete:
        return [(members, None)]
    best = max(complete, key=lambda m: (depth[m], -scene[m], -m))
    inter = shapely.area(shapely.intersection(geoms[best], geoms[members]))
    share = inter / np.maximum(shapely.area(geoms[members]), 1e-12)
    copies = [m for m, s in zip(members, share) if m == best or s >= COVERED]
    rest = np.array([m for m in members if m not in copies], dtype=np.int64)
    out: list[tuple[list[int], int | None]] = [(copies, best)]
    if len(rest):
        a, b = _pairs(geoms[rest], scene[rest], tol)
        for group in components(len(rest), a, b):
            out += _resolve(rest[group].tolist(), geoms, scene, cut, depth, tol)
    return out


def _near_other_scene(frame_geoms: np.ndarray, k: int, extents: list[Any], tol: float) -> np.ndarray:
    """bool [N]: polygons of scene ``k`` within ``tol`` of another scene's outline or inside it."""
    near = np.zeros(len(frame_geoms), dtype=bool)
    for j, ext in enumerate(extents):
        if j != k and shapely.dwithin(extents[k], ext, tol):
            near |= shapely.dwithin(ext, frame_geoms, tol)  # the prepared outline first: GEOS uses it
    return near


def _attributes(
    rows: pd.DataFrame, members: list[int], kept: int | None, pixel_area: np.ndarray
) -> dict[str, Any]:
    """One output row for the polygons ``members`` (row positions) stand for: the row of the copy ``kept``,
    or for the union of pieces (``kept`` None) the row of the largest piece (its scene names the building)
    with the union as geometry, ``pixels`` its area over the pixel area (the pieces may overlap) and the
    probabilities of all pieces."""
    if kept is not None:
        return {**rows.iloc[kept].to_dict(), "pieces": len(members)}
    geoms = rows.geometry.to_numpy()[members]
    largest = members[int(np.argmax(shapely.area(geoms)))]
    union = _join(list(geoms))
    out = {**rows.iloc[largest].to_dict(), "geometry": union, "pieces": len(members), "cut": True}
    out["pixels"] = round(union.area / pixel_area[largest])
    if "prob_mean" in rows:
        w = rows["pixels"].to_numpy()[members].astype(float)
        out["prob_mean"] = float(np.average(rows["prob_mean"].to_numpy()[members], weights=np.maximum(w, 1)))
        out["prob_max"] = float(rows["prob_max"].to_numpy()[members].max())
    return out


def merge_scenes(
    frames: Sequence[gpd.GeoDataFrame],
    extents: Sequence[SceneExtent],
    crs: Any = None,
    options: VectorizeOptions | None = None,
) -> tuple[gpd.GeoDataFrame, str]:
    """Every scene's footprints (``frames[k]`` of ``extents[k]``) as one GeoDataFrame; see the module notes.

    Args:
        frames: each scene's footprints, its ``cut`` buildings exact (``VectorizeOptions.exact_cut``).
        crs: the output CRS; None: :func:`common_crs`.
        options: how the scenes' other buildings were simplified and regularised (default: the defaults);
            the exact outlines are finished the same way.
    Returns:
        (the merged frame, a line saying the CRS chosen and how many buildings were joined).
    """
    if crs is None:
        target, note = common_crs([e.crs for e in extents])
    else:
        target, note = CRS(crs), f"reprojected to {CRS(crs).to_string()} as asked"
    outlines = [e.polygon(target) for e in extents]
    shapely.prepare(outlines)  # every polygon of a scene is tested against its neighbours' outlines
    pixel_area = [o.area / (e.height * e.width) for o, e in zip(outlines, extents)]  # in target's units
    tol = 0.5 * max(np.sqrt(pixel_area))  # exact pieces touch: distance 0
    parts, candidates = [], []
    for k, frame in enumerate(frames):
        f = frame.to_crs(target).assign(_scene=k, _pixel_area=pixel_area[k])
        near = _near_other_scene(f.geometry.to_numpy(), k, outlines, tol) | f["cut"].to_numpy(bool)
        parts.append(f[~near].assign(pieces=1))
        candidates.append(f[near])
    cand = pd.concat(candidates, ignore_index=True) if candidates else None
    if cand is not None and len(cand):
        geoms = cand.geometry.to_numpy()
        scene = cand["_scene"].to_numpy()
        cut = cand["cut"].to_numpy(bool)
        exteriors = np.array([o.exterior for o in outlines], dtype=object)
        depth = shapely.distance(geoms, exteriors[scene])
        a, b = _pairs(geoms, scene, tol)
        rows, px_area = [], cand["_pixel_area"].to_numpy()
        for group in components(len(cand), a, b):
            for members, kept in _resolve(group, geoms, scene, cut, depth, tol):
                rows.append(_attributes(cand, members, kept, px_area))
        parts.append(gpd.GeoDataFrame(rows, geometry="geometry", crs=target) if rows else cand.iloc[:0])
    merged = pd.concat(parts, ignore_index=True).sort_values(
        ["_scene", "id"], kind="stable", ignore_index=True
    )
    merged = _finish_area(gpd.GeoDataFrame(merged, geometry="geometry", crs=target), outlines, tol, options)
    joined = int((merged["pieces"] > 1).sum())
    return merged, f"{note}; {joined} buildings joined from pieces or copies in several scenes"


def _finish_area(
    merged: gpd.GeoDataFrame, outlines: list[Any], tol: float, options: VectorizeOptions | None
) -> gpd.GeoDataFrame:
    """The exact outlines (joined pieces, pieces cut by the area's border) simplified and regularised,
    then held to the minimum areas their scenes let them through (a piece is smaller than its building);
    ``cut``, ``area_m2`` and ``id`` for the whole area."""
    opts = options or VectorizeOptions()
    area = shapely.union_all(outlines).boundary
    shapely.prepare(area)
    exact = merged["cut"].to_numpy(bool)  # pieces, joined pieces and buildings cut at the area's border
    pixel = np.sqrt(merged["_pixel_area"].to_numpy(float))
    merged.loc[exact, "geometry"] = finish(merged.geometry.to_numpy()[exact], pixel[exact], opts)
    merged["area_m2"] = metric_frame(merged).area.to_numpy() if len(merged) else []
    small = (merged["pixels"].to_numpy() < opts.min_area_px) | (
        merged["area_m2"].to_numpy() < opts.min_area_m2
    )
    merged = merged[~(exact & small)].reset_index(drop=True)
    # a piece was cut by its scene's border; the building it now belongs to only by the area's border
    merged["cut"] = merged["cut"].to_numpy(bool) & shapely.dwithin(area, merged.geometry.to_numpy(), tol)
    merged["id"] = np.arange(1, len(merged) + 1)
    return merged.drop(columns=["_scene", "_pixel_area"])
