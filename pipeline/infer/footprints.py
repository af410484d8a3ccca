"""Building footprints: georeferenced polygons, one per building, from a scene and a run or from a mask.

    python -m pipeline.infer.footprints --mask mask.tif [--probs probs.tif] --out buildings.gpkg
    python -m pipeline.infer.footprints --scene big.tif --run runs/<run> --out buildings.gpkg

From a scene and a run, the sliding-window prediction of ``make predict-scene`` first writes
``<out>_mask.tif`` and the blended probabilities ``<out>_probs.tif`` (Cloud-Optimised GeoTIFFs) beside
the output, and the run's tuned ``min_area`` (pixels) is the default minimum size. The mask is then
vectorised window by window (:mod:`pipeline.geo.vectorize`: one polygon per 8-connected building, also
across window edges; the attributes are listed there).

A mask written by ``make predict-scene`` carries its run's tuned ``min_area`` in its tags
(:class:`pipeline.geo.scene.MaskTags`): ``--mask`` uses it unless ``--min-area-px`` says otherwise, so a
mask from ``predict-scene`` gives the footprints ``--scene`` gives with the same run.

Output by the suffix of ``--out`` (:data:`WRITERS`): GeoPackage ``.gpkg`` (default), GeoJSON ``.geojson``
(EPSG:4326, as RFC 7946 requires), FlatGeobuf ``.fgb`` (with its spatial index: features come back in index
order, sort by ``id``) or GeoParquet ``.parquet`` (for object stores); written atomically, with the CRS.
An existing GeoPackage keeps its other layers (only ``--layer``, default ``buildings``, is replaced); an
existing file is never replaced without a note saying so. :func:`score_footprints` scores a footprint
file per building against true polygons or a true mask (``make score FOOTPRINTS=``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import shutil
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pyogrio
import rasterio
import shapely
from rasterio.windows import Window

from pipeline.core.config import ConfigError
from pipeline.core.errors import cli
from pipeline.core.io import atomic_write, atomic_write_bytes
from pipeline.core.progress import progress
from pipeline.geo.scene import MaskTags, same_file, temp_beside
from pipeline.geo.tiling import open_raster
from pipeline.geo.vectorize import FootprintError, Reader, VectorizeOptions, metric_frame, vectorize
from pipeline.metrics import buildings
from pipeline.runs.manifest import latest_run, load_manifest

LAYER = "buildings"
DRIVERS = {
    ".gpkg": "GPKG",
    ".geojson": "GeoJSON",
    ".json": "GeoJSON",
    ".fgb": "FlatGeobuf",
    ".parquet": "Parquet",
}
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


def _existing_mask(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mask {path} not found; make predict-scene writes one (OUT=mask.tif)")
    return path


def vectorize_raster(
    mask_path: str | Path,
    probs_path: str | Path | None = None,
    scene: str | None = None,
    options: VectorizeOptions | None = None,
) -> gpd.GeoDataFrame:
    """:func:`pipeline.geo.vectorize.vectorize` of a mask raster (GeoTIFF, PNG) in its CRS; ``scene`` defaults
    to the file's stem."""
    mask_path = _existing_mask(mask_path)
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
    """The format of an output file, by its suffix."""
    driver = DRIVERS.get(Path(path).suffix.lower())
    if driver is None:
        raise ConfigError(f"{path}: footprints are written as {', '.join(DRIVERS)}: use one of them")
    return driver


def _write_ogr(
    frame: gpd.GeoDataFrame, target: Path | io.BytesIO, driver: str, layer: str, **extra: Any
) -> None:
    """``frame`` as the layer ``layer`` of ``target`` (a file, or bytes in memory) through pyogrio."""
    geometry_type = None if len(frame) else "Polygon"  # an empty layer still needs a geometry type
    with warnings.catch_warnings():
        if frame.crs is None:  # a plain PNG/JPEG mask: pixel coordinates, said by summary(); no warning
            warnings.filterwarnings("ignore", "'crs' was not provided", UserWarning)
        # a copy's name ends in .tmp (so a killed run's copy is cleaned up): GDAL notes the suffix
        warnings.filterwarnings("ignore", "File .* non conformant file extension", RuntimeWarning)
        pyogrio.write_dataframe(
            frame, target, layer=layer, driver=driver, geometry_type=geometry_type, **extra
        )


def _ogr_bytes(frame: gpd.GeoDataFrame, driver: str, layer: str, **extra: Any) -> bytes:
    buf = io.BytesIO()
    _write_ogr(frame, buf, driver, layer, **extra)
    return buf.getvalue()


def _write_gpkg(frame: gpd.GeoDataFrame, path: Path, layer: str) -> None:
    """A new GeoPackage; or the layer written into a copy of an existing one (its other layers kept),
    which then replaces it atomically."""
    if not path.exists():
        atomic_write_bytes(path, _ogr_bytes(frame, "GPKG", layer))
        return
    copy = temp_beside(path)
    try:
        shutil.copyfile(path, copy)
        _write_ogr(frame, copy, "GPKG", layer)
        with atomic_write(path) as f, open(copy, "rb") as src:
            shutil.copyfileobj(src, f, 1 << 20)
    finally:
        copy.unlink(missing_ok=True)


def _write_geojson(frame: gpd.GeoDataFrame, path: Path, layer: str) -> None:
    if frame.crs is None:
        raise ConfigError(
            f"{path}: GeoJSON is in EPSG:4326 (RFC 7946) but this mask has no CRS; write .gpkg instead"
        )
    data = _ogr_bytes(frame.to_crs(4326), "GeoJSON", layer, layer_options={"RFC7946": "YES"})
    atomic_write_bytes(path, data)


def _write_parquet(frame: gpd.GeoDataFrame, path: Path, layer: str) -> None:
    import pyarrow  # noqa: F401 - geopandas writes GeoParquet through it: fail here, naming it, if absent

    with atomic_write(path) as f:
        frame.to_parquet(f, index=False)


# Output suffix's format -> writer(frame, path, layer); every one writes atomically.
WRITERS: dict[str, Callable[[gpd.GeoDataFrame, Path, str], None]] = {
    "GPKG": _write_gpkg,
    "GeoJSON": _write_geojson,
    "FlatGeobuf": lambda frame, path, layer: atomic_write_bytes(path, _ogr_bytes(frame, "FlatGeobuf", layer)),
    "Parquet": _write_parquet,
}


def existing_output(path: str | Path, layer: str = LAYER) -> str | None:
    """What writing ``path`` will replace, as a note (None: nothing). A GeoPackage keeps its other layers;
    a file of the suffix's format that cannot be read is refused (it may be someone's data)."""
    path = Path(path)
    if not path.exists():
        return None
    if output_driver(path) != "GPKG":
        return f"replacing {path}"
    try:
        layers = [str(name) for name, _ in pyogrio.list_layers(path)]
    except Exception as e:  # pyogrio's errors have no common base: report the file and GDAL's words
        raise FootprintError(
            f"{path} exists and is not a GeoPackage ({e}); it is not replaced: move it or choose another name"
        ) from None
    others = [n for n in layers if n != layer]
    kept = f"; its other layers ({', '.join(others)}) are kept" if others else ""
    verb = "replacing layer" if layer in layers else "adding layer"
    return f"{verb} {layer} of {path}{kept}"


def write_footprints(frame: gpd.GeoDataFrame, path: str | Path, layer: str = LAYER) -> Path:
    """Write ``frame`` atomically by the suffix (:data:`WRITERS`): GeoPackage (into layer ``layer``, any
    other layers of an existing file kept), GeoJSON (reprojected to EPSG:4326), FlatGeobuf, GeoParquet."""
    path = Path(path)
    WRITERS[output_driver(path)](frame, path, layer)
    return path


def read_footprints(path: str | Path, layer: str | None = None) -> gpd.GeoDataFrame:
    """Polygons from any vector file GDAL reads (GeoPackage, GeoJSON, FlatGeobuf, Shapefile...) or
    GeoParquet. Invalid polygons (self-intersections, a bow tie) are repaired with ``make_valid``; their
    count is ``attrs["repaired"]``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"footprints {path} not found; make footprints writes them (OUT=x.gpkg)")
    try:
        if path.suffix.lower() == ".parquet":
            frame = gpd.read_parquet(path)
        else:
            frame = gpd.read_file(path, engine="pyogrio", layer=layer)
    except Exception as e:  # pyogrio's and pyarrow's errors have no common base: report the file and theirs
        raise FootprintError(f"cannot read polygons from {path}: {e}") from None
    kinds = set(frame.geom_type.dropna()) - {"Polygon", "MultiPolygon"}
    if kinds:
        raise FootprintError(f"{path} holds {', '.join(sorted(kinds))}; building footprints must be polygons")
    invalid = ~frame.geometry.is_valid.to_numpy() & frame.geometry.notna().to_numpy()
    if invalid.any():
        repaired = shapely.make_valid(frame.geometry.values[invalid])
        # make_valid may add lines or points where a ring folded onto itself: keep the polygonal part.
        frame.loc[invalid, frame.geometry.name] = [_polygonal(g) for g in repaired]
    frame.attrs["repaired"] = int(invalid.sum())
    return frame


def _polygonal(geom: Any) -> Any:
    if geom.geom_type in ("Polygon", "MultiPolygon"):
        return geom
    parts = [g for g in getattr(geom, "geoms", []) if g.geom_type in ("Polygon", "MultiPolygon")]
    return shapely.union_all(parts) if parts else shapely.Polygon()


def _truth_frame(path: Path) -> gpd.GeoDataFrame:
    if path.suffix.lower() in RASTER_SUFFIXES:
        return vectorize_raster(path, options=VectorizeOptions(simplify=0.0))  # exact pixel outlines
    return read_footprints(path)


def score_footprints(
    pred_path: str | Path, truth_path: str | Path, iou_threshold: float = buildings.IOU_THRESHOLD
) -> dict[str, Any]:
    """Per-building scores of a footprint file against true polygons or a true mask raster.

    Both are brought to metres (the predictions' CRS when projected in metres, else a local equal-area
    projection); without CRS on both, pixel units and the pixel size classes are used. Invalid polygons
    are repaired with ``make_valid`` and counted (``repaired``).
    """
    pred, truth = read_footprints(pred_path), _truth_frame(Path(truth_path))
    # invalid polygons repaired with make_valid on reading (read_footprints), per file
    repaired = {"footprints": pred.attrs.get("repaired", 0), "truth": truth.attrs.get("repaired", 0)}
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
        "repaired": repaired,
        "buildings": report,
    }


# ----------------------------------------------------------------------------- scene + run


def sidecar_paths(out: str | Path) -> tuple[Path, Path]:
    """Where ``make footprints SCENE=`` puts the mask and probabilities: ``<out>_mask.tif``, ``_probs.tif``"""
    out = Path(out)
    return out.with_name(f"{out.stem}_mask.tif"), out.with_name(f"{out.stem}_probs.tif")


def check_paths(out: str | Path, inputs: Sequence[str | Path | None], layer: str = LAYER) -> str | None:
    """Before any work: ``out`` has a known suffix and is none of ``inputs`` (the scene, the mask), nor
    are the sidecar rasters ``make footprints SCENE=`` writes; returns the note of what it replaces."""
    output_driver(out)
    given = [Path(i) for i in inputs if i]
    for path in [Path(out), *sidecar_paths(out)]:
        for src in given:
            if same_file(path, src):
                raise ConfigError(f"{path} would overwrite the input {src}; choose another OUT name")
    return existing_output(out, layer)


def mask_options(
    mask: str | Path, options: VectorizeOptions, min_area_px: int | None
) -> tuple[VectorizeOptions, str]:
    """``options`` with the minimum area a mask's run tuned (its :class:`MaskTags`) unless ``min_area_px``
    is given, and a line saying which was used. A mask of class ids is refused."""
    tags = MaskTags.read(_existing_mask(mask))
    if tags is not None and tags.classes != 1:
        raise FootprintError(
            f"{mask} holds the class ids of {tags.run}, a {tags.classes}-class run; footprints need the mask "
            "of a binary building run"
        )
    if min_area_px is not None:
        px, why = min_area_px, "as given"
    elif tags is not None:
        px, why = tags.min_area, f"run {tags.run}'s tuned min_area, from the mask's tags"
    else:
        px, why = 0, "the mask carries no run's min_area (not from make predict-scene)"
    return dataclasses.replace(options, min_area_px=px), f"minimum area {px} px ({why})"


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
    from pipeline.infer.scenes import ScenePredictor, check_outputs, inspect_scene

    manifest = load_manifest(run)
    if manifest.classes != 1:
        raise ConfigError(
            f"{manifest.run_dir} predicts {manifest.classes} classes; footprints need a binary building run"
        )
    px = manifest.infer.min_area if min_area_px is None else min_area_px
    options = dataclasses.replace(options or VectorizeOptions(), min_area_px=px)
    mask_path, probs_path = sidecar_paths(out)
    check_outputs(scene, [mask_path, probs_path])
    inspect_scene(scene)
    ScenePredictor(manifest, tta, device).predict(scene, mask_path, probs_path, command="make footprints")
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


def add_options(p: argparse.ArgumentParser) -> None:
    """The vectorising options (:class:`VectorizeOptions`) of ``make footprints`` and ``predict-scenes``."""
    d = VectorizeOptions()
    p.add_argument("--window", type=int, default=d.window, help="pixels per side of each block read")
    p.add_argument("--min-area-m2", type=float, default=d.min_area_m2)
    p.add_argument("--min-area-px", type=int, default=None, help="default: the run's tuned min_area (else 0)")
    p.add_argument(
        "--simplify", type=float, default=d.simplify, help="tolerance in pixels (0 = pixel outlines)"
    )
    p.add_argument(
        "--regularize", default=d.regularize, help="none, rectangle or full (see README Footprints)"
    )
    p.add_argument(
        "--rectangle-fill", type=float, default=d.rectangle_fill, help="with --regularize rectangle"
    )


def options_of(a: argparse.Namespace) -> VectorizeOptions:
    return VectorizeOptions(
        a.window, a.min_area_px or 0, a.min_area_m2, a.simplify, a.regularize, a.rectangle_fill
    )


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
    p.add_argument("--out", default="buildings.gpkg", help=f"{', '.join(DRIVERS)} (default .gpkg)")
    p.add_argument("--layer", default=LAYER, help="GeoPackage layer (other layers of the file are kept)")
    add_options(p)
    p.add_argument("--tta", default=None)
    p.add_argument("--device", default="auto")
    a = p.parse_args(argv)
    opts = options_of(a)
    replaced = check_paths(a.out, [a.mask, a.probs, a.scene], a.layer)  # before any work
    if a.mask:
        opts, how = mask_options(a.mask, opts, a.min_area_px)
        print(how)
        frame = vectorize_raster(a.mask, a.probs or None, options=opts)
    else:
        run = a.run or latest_run()
        frame = footprints_from_scene(run, a.scene, a.out, opts, a.tta, a.device, a.min_area_px)
        print(f"wrote {' and '.join(map(str, sidecar_paths(a.out)))}")
    if replaced:
        print(f"note: {replaced}", file=sys.stderr)
    with progress(None, f"write {a.out}"):
        write_footprints(frame, a.out, a.layer)
    print(f"{summary(frame)} -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
