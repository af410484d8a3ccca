"""Building footprints: georeferenced polygons, one per building, from a scene and a run or from a mask.

    python -m pipeline.infer.footprints --mask mask.tif [--probs probs.tif] --out buildings.gpkg
    python -m pipeline.infer.footprints --scene big.tif --run runs/<run> --out buildings.gpkg

From a scene and a run, the sliding-window prediction of ``make predict-scene`` first writes
``<out>_mask.tif`` and the blended probabilities ``<out>_probs.tif`` (Cloud-Optimised GeoTIFFs) beside
the output, and the run's tuned ``min_area`` (pixels) is the default minimum size. The mask is then
vectorised window by window (:mod:`pipeline.geo.vectorize`: one polygon per 8-connected building, also
across window edges; the attributes are listed there).

Output by the suffix of ``--out``: GeoPackage ``.gpkg`` (default), GeoJSON ``.geojson`` (EPSG:4326, as
RFC 7946 requires) or FlatGeobuf ``.fgb`` (with its spatial index: features come back in index order,
sort by ``id``); written atomically, with the CRS. :func:`score_footprints`
scores a footprint file per building against true polygons or a true mask (``make score FOOTPRINTS=``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pyogrio
import rasterio
from rasterio.windows import Window

from pipeline.core.config import ConfigError
from pipeline.core.errors import cli
from pipeline.core.io import atomic_write_bytes
from pipeline.geo.tiling import open_raster
from pipeline.geo.vectorize import WINDOW, FootprintError, Reader, VectorizeOptions, metric_frame, vectorize
from pipeline.metrics import buildings
from pipeline.runs.manifest import latest_run, load_manifest

LAYER = "buildings"
DRIVERS = {".gpkg": "GPKG", ".geojson": "GeoJSON", ".json": "GeoJSON", ".fgb": "FlatGeobuf"}
RASTER_SUFFIXES = (".tif", ".tiff", ".png")
GDAL_CACHE_MB = 64


def _raster_reader(mask_path: Path, probs_path: Path | None, stack: Any) -> tuple[Reader, Any]:
    """A :data:`Reader` over band 1 of ``mask_path`` (0/1 or 0/255) and ``probs_path`` (uint8 0..255
    or float 0..1), and the mask's dataset. Bad values are errors naming the file and the rows."""
    src = stack.enter_context(open_raster(mask_path))
    prob_src = stack.enter_context(open_raster(probs_path)) if probs_path else None
    if prob_src is not None and (prob_src.height, prob_src.width) != (src.height, src.width):
        raise FootprintError(
            f"{probs_path} is {prob_src.height}x{prob_src.width} but the mask {mask_path} is "
            f"{src.height}x{src.width}; pass the probabilities written with this mask"
        )

    def read(win: Window) -> tuple[np.ndarray, np.ndarray | None]:
        m = src.read(1, window=win)
        bad = (m != 0) & (m != 1) & (m != 255)
        if bad.any():
            raise FootprintError(
                f"{mask_path}: a building mask holds 0 and 1 (or 255); found "
                f"{np.unique(m[bad])[:5].tolist()} in rows {win.row_off}..{win.row_off + win.height}. Pass "
                "the 0/1 mask of make predict-scene with --mask and probabilities with --probs"
            )
        if prob_src is None:
            return m, None
        p = prob_src.read(1, window=win)
        return m, (p.astype(np.float32) / 255 if p.dtype == np.uint8 else p.astype(np.float32))

    return read, src


def vectorize_raster(
    mask_path: str | Path,
    probs_path: str | Path | None = None,
    scene: str | None = None,
    options: VectorizeOptions | None = None,
) -> gpd.GeoDataFrame:
    """:func:`pipeline.geo.vectorize.vectorize` of a mask raster (GeoTIFF, PNG) in its CRS; ``scene`` defaults
    to the file's stem."""
    mask_path = Path(mask_path)
    if not mask_path.is_file():
        raise FileNotFoundError(f"mask {mask_path} not found; make predict-scene writes one (OUT=mask.tif)")
    with contextlib.ExitStack() as stack:
        # Every block is read once, so GDAL's block cache (by default up to 5% of RAM) cannot help: keep it
        # small. GDAL reads the setting when a process first reads a raster (so: in the CLI).
        stack.enter_context(rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB))
        read, src = _raster_reader(mask_path, Path(probs_path) if probs_path else None, stack)
        crs = src.crs.to_wkt() if src.crs else None
        name = scene or mask_path.stem
        opts = options or VectorizeOptions()
        return vectorize(read, src.height, src.width, src.transform, crs, name, opts, bool(probs_path))


def output_driver(path: str | Path) -> str:
    """The OGR driver for an output file, by its suffix."""
    driver = DRIVERS.get(Path(path).suffix.lower())
    if driver is None:
        raise ConfigError(f"{path}: footprints are written as {', '.join(DRIVERS)}: use one of them")
    return driver


def write_footprints(frame: gpd.GeoDataFrame, path: str | Path) -> Path:
    """Write ``frame`` atomically as GeoPackage, GeoJSON (reprojected to EPSG:4326) or FlatGeobuf."""
    path = Path(path)
    driver = output_driver(path)
    extra: dict[str, Any] = {}
    if driver == "GeoJSON":
        if frame.crs is None:
            raise ConfigError(
                f"{path}: GeoJSON is in EPSG:4326 (RFC 7946) but this mask has no CRS; write .gpkg instead"
            )
        frame = frame.to_crs(4326)
        extra["layer_options"] = {"RFC7946": "YES"}
    buf = io.BytesIO()
    geometry_type = None if len(frame) else "Polygon"  # an empty layer still needs a geometry type
    with warnings.catch_warnings():
        if frame.crs is None:  # a plain PNG/JPEG mask: pixel coordinates, said by summary(); no warning
            warnings.filterwarnings("ignore", "'crs' was not provided", UserWarning)
        pyogrio.write_dataframe(frame, buf, layer=LAYER, driver=driver, geometry_type=geometry_type, **extra)
    atomic_write_bytes(path, buf.getvalue())
    return path


def read_footprints(path: str | Path) -> gpd.GeoDataFrame:
    """Polygons from any vector file GDAL reads (GeoPackage, GeoJSON, FlatGeobuf, Shapefile...)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"footprints {path} not found; make footprints writes them (OUT=x.gpkg)")
    try:
        frame = gpd.read_file(path, engine="pyogrio")
    except Exception as e:  # pyogrio's errors have no common base: report the file and GDAL's words
        raise FootprintError(f"cannot read polygons from {path}: {e}") from None
    kinds = set(frame.geom_type.dropna()) - {"Polygon", "MultiPolygon"}
    if kinds:
        raise FootprintError(f"{path} holds {', '.join(sorted(kinds))}; building footprints must be polygons")
    return frame


def _truth_frame(path: Path) -> gpd.GeoDataFrame:
    if path.suffix.lower() in RASTER_SUFFIXES:
        return vectorize_raster(path, options=VectorizeOptions(simplify=0.0))  # exact pixel outlines
    return read_footprints(path)


def score_footprints(
    pred_path: str | Path, truth_path: str | Path, iou_threshold: float = buildings.IOU_THRESHOLD
) -> dict[str, Any]:
    """Per-building scores of a footprint file against true polygons or a true mask raster.

    Both are brought to metres (the predictions' CRS when projected in metres, else a local equal-area
    projection); without CRS on both, pixel units and the pixel size classes are used.
    """
    pred, truth = read_footprints(pred_path), _truth_frame(Path(truth_path))
    if (pred.crs is None) != (truth.crs is None):
        raise FootprintError(
            f"{pred_path} and {truth_path}: one has a CRS and the other not; they cannot be compared"
        )
    if pred.crs is None:
        report = buildings.score_polygons(
            pred.geometry.values, truth.geometry.values, iou_threshold, buildings.PIXEL_SIZE_BINS, "px"
        )
    else:
        pred = metric_frame(pred)
        truth = truth.to_crs(pred.crs)
        report = buildings.score_polygons(pred.geometry.values, truth.geometry.values, iou_threshold)
    return {
        "footprints": str(pred_path),
        "truth": str(truth_path),
        "n_pred": len(pred),
        "n_truth": len(truth),
        "buildings": report,
    }


# ----------------------------------------------------------------------------- scene + run


def sidecar_paths(out: str | Path) -> tuple[Path, Path]:
    """Where ``make footprints SCENE=`` puts the mask and probabilities: ``<out>_mask.tif``, ``_probs.tif``"""
    out = Path(out)
    return out.with_name(f"{out.stem}_mask.tif"), out.with_name(f"{out.stem}_probs.tif")


def footprints_from_scene(
    run: str | Path,
    scene: str | Path,
    out: str | Path,
    options: VectorizeOptions | None = None,
    tta: str | None = None,
    device: str = "auto",
    min_area_px: int | None = None,
) -> gpd.GeoDataFrame:
    """Predict ``scene`` with the run's ensemble (mask and probability COGs beside ``out``), then vectorise
    with ``options`` (default: the defaults); ``min_area_px`` None = the run's tuned ``min_area``."""
    from pipeline.infer.scenes import predict_scene_file

    manifest = load_manifest(run)
    if manifest.classes != 1:
        raise ConfigError(
            f"{manifest.run_dir} predicts {manifest.classes} classes; footprints need a binary building run"
        )
    px = manifest.infer.min_area if min_area_px is None else min_area_px
    options = dataclasses.replace(options or VectorizeOptions(), min_area_px=px)
    mask_path, probs_path = sidecar_paths(out)
    predict_scene_file(run, scene, mask_path, tta, device, probs_out=probs_path)
    return vectorize_raster(mask_path, probs_path, Path(scene).stem, options)


# ----------------------------------------------------------------------------- CLI


def summary(frame: gpd.GeoDataFrame) -> str:
    """``N buildings, total area A m² (mean a m²)``, or pixels without a CRS."""
    n = len(frame)
    if frame.crs is None or not n:
        where = "" if frame.crs is not None else " (no CRS: coordinates are pixels, x = column, y = row)"
        return f"{n} buildings, {int(frame['pixels'].sum()) if n else 0:,} pixels{where}"
    total = float(frame["area_m2"].sum())
    return f"{n} buildings, total area {total:,.0f} m² (mean {total / n:,.1f} m²)"


@cli
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.infer.footprints", description=__doc__.split("\n\n")[0]
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--mask", help="building mask raster (0/1 or 0/255), e.g. from make predict-scene")
    src.add_argument("--scene", help="RGB scene to predict with --run first")
    p.add_argument("--run", default="", help="with --scene: run folder or manifest.yaml (default: newest)")
    p.add_argument("--probs", default="", help="with --mask: probability raster (uint8 0..255 or float)")
    p.add_argument("--out", default="buildings.gpkg", help=".gpkg (default), .geojson (EPSG:4326) or .fgb")
    p.add_argument("--window", type=int, default=WINDOW, help="pixels per side of each block read")
    p.add_argument("--min-area-m2", type=float, default=0.0)
    p.add_argument("--min-area-px", type=int, default=None, help="default 0; with --scene the run's min_area")
    p.add_argument("--simplify", type=float, default=VectorizeOptions.simplify, help="tolerance in pixels")
    p.add_argument("--regularize", type=float, default=0.0, help="e.g. 0.85: snap to rectangles (0 = off)")
    p.add_argument("--tta", default=None)
    p.add_argument("--device", default="auto")
    a = p.parse_args(argv)
    opts = VectorizeOptions(a.window, a.min_area_px or 0, a.min_area_m2, a.simplify, a.regularize)
    output_driver(a.out)  # before any work
    if a.mask:
        frame = vectorize_raster(a.mask, a.probs or None, options=opts)
    else:
        run = a.run or latest_run()
        frame = footprints_from_scene(run, a.scene, a.out, opts, a.tta, a.device, a.min_area_px)
        print(f"wrote {' and '.join(map(str, sidecar_paths(a.out)))}")
    write_footprints(frame, a.out)
    print(f"{summary(frame)} -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
