"""Sliding-window prediction of a whole scene into a mask raster, with memory bounded by one strip.

:func:`predict_scene` reads one strip of tile rows of a large GeoTIFF (or JPEG/PNG) at a time, runs
``predict_fn`` on the tiles of :class:`pipeline.geo.tiling.TileGrid`, blends overlapping tiles with
:func:`pipeline.geo.tiling.blend_window` weights, and writes every row as soon as no later tile reaches
it (``make predict-scene``; :func:`pipeline.infer.scenes.predict_scene_file` supplies the ensemble).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.shutil
from rasterio.errors import NotGeoreferencedWarning
from rasterio.windows import Window

from pipeline.core.config import InferConfig
from pipeline.core.io import atomic_write, temp_prefix
from pipeline.core.progress import progress
from pipeline.geo import GeoError
from pipeline.geo.tiling import TileGrid, blend_window, check_rgb, open_raster, pad_to, read_rgb

PredictFn = Callable[[np.ndarray], np.ndarray]
GDAL_CACHE_MB = 64  # GDAL block cache while writing a scene mask
OUTPUT_DRIVERS = {".tif": "GTiff", ".tiff": "GTiff", ".png": "PNG"}  # a scene mask's suffix -> its format
TAG_PREFIX = "BUILDSEG_"  # GeoTIFF metadata keys of what made a mask (:class:`MaskTags`)


@dataclass(frozen=True)
class MaskTags:
    """What made a mask, stored in its GeoTIFF metadata so that later stages use the same settings.

    ``make footprints MASK=`` takes ``min_area`` (pixels, the run's tuned minimum component area) from
    here unless told otherwise: ``predict_scene`` does not filter components (they cross its strips).
    """

    command: str  # e.g. "make predict-scene"
    run: str  # the run's name
    run_dir: str
    threshold: float
    min_area: int
    tta: str
    classes: int
    scene: str  # the input scene's file name

    def to_tags(self) -> dict[str, str]:
        return {f"{TAG_PREFIX}{k.upper()}": str(v) for k, v in self.__dict__.items()}

    @classmethod
    def read(cls, path: str | Path) -> MaskTags | None:
        """The tags of the raster at ``path``, or None when it was not written by buildseg (or is older)."""
        with open_raster(Path(path)) as src:
            tags = src.tags()
        values = {k: tags.get(f"{TAG_PREFIX}{k.upper()}") for k in cls.__dataclass_fields__}
        if any(v is None for v in values.values()):
            return None
        types = {"threshold": float, "min_area": int, "classes": int}
        try:
            return cls(**{k: types.get(k, str)(v) for k, v in values.items()})
        except ValueError:  # edited by hand into something else: treat as untagged
            return None


def check_output(dst_path: str | Path, inputs: Sequence[str | Path] = ()) -> Path:
    """``dst_path`` if a scene mask can be written there: a known suffix, and none of ``inputs`` (an output
    must never overwrite the scene it is made from). Checked before any model is loaded."""
    dst_path = Path(dst_path)
    if dst_path.suffix.lower() not in OUTPUT_DRIVERS:
        raise GeoError(f"{dst_path}: output must be .tif/.tiff (GeoTIFF) or .png; change the file name")
    for src in inputs:
        if same_file(dst_path, src):
            raise GeoError(
                f"{dst_path} is the input scene {src}: writing the mask there would destroy the scene; "
                "choose another output name"
            )
    return dst_path


def same_file(a: str | Path, b: str | Path) -> bool:
    """True when ``a`` and ``b`` name one file (links and relative paths included)."""
    a, b = Path(a), Path(b)
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def written_by(path: str | Path) -> str:
    """Who wrote an existing raster: ``make predict-scene (run x)`` from its tags, else "not buildseg"."""
    try:
        tags = MaskTags.read(path)
    except (GeoError, OSError):
        tags = None
    return f"{tags.command} (run {tags.run})" if tags else "not written by buildseg"


@dataclass(frozen=True)
class SceneStats:
    """What :func:`predict_scene` did; ``accumulator_rows`` x ``width`` is all the float state it held."""

    height: int
    width: int
    n_tiles: int
    n_batches: int
    accumulator_rows: int  # rows of the float64 sum and weight buffers (<= tile, not the scene height)
    flushed_rows: tuple[int, ...]  # rows written per flush, in order; they sum to height
    foreground: int = 0  # pixels written non-zero (buildings; multi-class: any class but 0)
    crs: str | None = None  # the mask's CRS as "EPSG:n" (or WKT), None without one

    @property
    def fraction(self) -> float:
        """Share of the scene's pixels written non-zero."""
        return self.foreground / max(self.height * self.width, 1)


def _predict(predict_fn: PredictFn, batch: np.ndarray, classes: int = 1) -> np.ndarray:
    out = np.asarray(predict_fn(batch))
    if classes == 1 and out.shape != batch.shape[:3]:
        raise ValueError(
            f"predict_fn returned shape {out.shape} for tiles {batch.shape}; it must return probabilities "
            f"[B, H, W] = {batch.shape[:3]} (one channel, same tile size, sigmoid already applied)"
        )
    if classes > 1 and out.shape != (*batch.shape[:3], classes):
        raise ValueError(
            f"predict_fn returned shape {out.shape} for tiles {batch.shape}; with classes={classes} it must "
            f"return probabilities [B, H, W, K] = {(*batch.shape[:3], classes)} (softmax applied, K last)"
        )
    return out.astype(np.float32, copy=False)


def _dst_profile(dst_path: Path, src: rasterio.DatasetReader) -> dict:
    driver = OUTPUT_DRIVERS[check_output(dst_path).suffix.lower()]
    profile: dict = {"height": src.height, "width": src.width, "count": 1, "dtype": "uint8", "driver": driver}
    if driver == "GTiff":
        profile.update(compress="deflate", tiled=True, blockxsize=256, blockysize=256)
    # PNG is a copy-only format: rasterio buffers the uint8 mask in memory.
    # Carry georeferencing only when the input has it: a plain JPEG/PNG has no CRS and an identity transform.
    if src.crs is not None or not src.transform.is_identity:
        profile.update(crs=src.crs, transform=src.transform)
    return profile


@contextlib.contextmanager
def _open_output(
    path: str | Path | None,
    src: rasterio.DatasetReader,
    resampling: str = "nearest",
    tags: dict | None = None,
    cog: bool = True,
) -> Iterator[rasterio.io.DatasetWriter | None]:
    """A uint8 band to write row strips into; on success ``path`` is written atomically (None: no output).

    GeoTIFFs come out Cloud-Optimised (tiled 256x256, deflate, overviews with ``resampling``), so QGIS
    and web viewers open large scenes fast. COG is a copy-only format: the strips go into a tiled,
    compressed GeoTIFF in a temporary file first, which GDAL then copies with overviews; ``cog=False``
    keeps that tiled GeoTIFF as it is (a file read once by the program, no viewer to serve).
    """
    if not path:
        yield None
        return
    profile = _dst_profile(Path(path), src)
    with atomic_write(path) as f:
        if profile["driver"] != "GTiff":
            with rasterio.open(f, "w", **profile) as dst:
                yield dst
            return
        # The strips go to a temporary file beside the output (named so a later run removes it if this
        # one is killed), not to memory: memory stays flat in the scene's height. GDAL's block cache
        # is capped for the same reason (its default is 5% of RAM).
        strips, cog_path = (temp_beside(Path(path)) for _ in range(2))
        try:
            with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB):
                with rasterio.open(strips, "w", **{**profile, "driver": "GTiff"}) as dst:
                    if tags:
                        dst.update_tags(**tags)
                    yield dst
                if cog:
                    with rasterio.open(strips) as tiled, progress(None, f"write {Path(path).name} as COG"):
                        rasterio.shutil.copy(
                            tiled,
                            cog_path,
                            driver="COG",
                            compress="deflate",
                            blocksize=256,
                            overview_resampling=resampling,
                            bigtiff="IF_SAFER",
                        )
            with open(cog_path if cog else strips, "rb") as c:
                shutil.copyfileobj(c, f, 1 << 20)
        finally:
            strips.unlink(missing_ok=True)
            cog_path.unlink(missing_ok=True)


def temp_beside(path: Path) -> Path:
    """An empty temporary file beside ``path``, named so a later run removes it if this one is killed."""
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(tmp)


class _StripBlender:
    """The weighted sum and weight of the rows a strip of tiles covers: float64 [rows, W] (x K).

    After a tile row is added, the rows above the next tile row receive no more contributions:
    :meth:`flush` returns their blended probabilities and shifts both buffers up, so the next tile row
    starts at buffer row 0 again (``rows = min(tile, H)`` suffice).
    """

    def __init__(self, rows: int, width: int, tile: int, window: str, classes: int):
        self.weight = blend_window(tile, window).astype(np.float64)  # float32 values: exact products
        self.acc = np.zeros((rows, width) + ((classes,) if classes > 1 else ()), dtype=np.float64)
        self.wsum = np.zeros((rows, width), dtype=np.float64)
        # Multi-class sums are [rows, W, K]: a trailing axis for the weights to broadcast over.
        self.k_axis = (slice(None), slice(None)) + ((None,) if classes > 1 else ())

    def add(self, col: int, probs: np.ndarray) -> None:
        """Add one tile's probabilities [tile, tile] (x K) at column ``col`` of the strip."""
        th, tw = self.wsum.shape[0], min(self.weight.shape[1], self.wsum.shape[1] - col)
        w = self.weight[:th, :tw]
        self.acc[:, col : col + tw] += probs[:th, :tw] * w[self.k_axis]
        self.wsum[:, col : col + tw] += w

    def flush(self, done: int) -> np.ndarray:
        """The blended probabilities float32 [done, W] (x K) of the first ``done`` rows; then shift."""
        probs = (self.acc[:done] / self.wsum[:done][self.k_axis]).astype(np.float32)
        keep = self.wsum.shape[0] - done
        for buf in (self.acc, self.wsum):
            buf[:keep] = buf[done:]
            buf[keep:] = 0
        return probs


def _check_args(foreground: int, batch_size: int, classes: int, probs_path: str | Path | None) -> None:
    if foreground not in (1, 255):
        raise ValueError(f"foreground must be 1 or 255, got {foreground}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 1 <= classes <= 256:
        raise ValueError(f"classes must be 1 (binary) or 2..256 (uint8 class ids), got {classes}")
    if probs_path is not None and (classes > 1 or Path(probs_path).suffix.lower() not in (".tif", ".tiff")):
        raise GeoError(f"{probs_path}: probabilities are written for binary runs only, as a .tif GeoTIFF")


def predict_scene(
    src_path: str | Path,
    dst_path: str | Path,
    predict_fn: PredictFn,
    tile: int = InferConfig.tile_size,
    overlap: int = InferConfig.overlap,
    batch_size: int = InferConfig.batch_size,
    threshold: float = InferConfig.threshold,
    window: str = "cosine",
    foreground: int = 1,
    classes: int = 1,
    colors: Sequence[tuple[int, int, int]] | None = None,
    probs_path: str | Path | None = None,
    tags: dict[str, str] | None = None,
    desc: str = "",
    probs_cog: bool = True,
) -> SceneStats:
    """Sliding-window prediction of a large scene into a uint8 mask (or class-id) raster.

    Args:
        src_path: scene raster (GeoTIFF, or plain JPEG/PNG), >= 3 uint8 bands.
        dst_path: ``.tif`` (Cloud-Optimised GeoTIFF: the input's CRS and transform, deflate, 256x256
            tiles, overviews) or ``.png``.
        predict_fn: uint8 tiles [B, tile, tile, 3] -> float32 probabilities [B, tile, tile] (binary),
            or [B, tile, tile, K] with ``classes = K > 1`` (softmax over the last axis).
        tile, overlap: the :class:`TileGrid`; ``batch_size`` tiles per ``predict_fn`` call (within one
            tile row, so a narrow scene may give smaller batches).
        threshold: a pixel is foreground when its blended probability > threshold (as in
            :func:`pipeline.metrics.postprocess.binarize`). ``min_area`` is not applied here: components
            cross strip boundaries, so filter the finished mask if needed.
        window: blending weights, see :func:`pipeline.geo.tiling.blend_window`.
        foreground: binary only: value written for buildings (1, or 255 for viewing).
        classes: K > 1: each class's probability is blended, then the argmax is written as uint8 class
            ids (``threshold`` and ``foreground`` are not used); 1: binary.
        colors: multi-class only, optional: RGB of each class id, written as the raster's colour table.
        probs_path: binary only, optional ``.tif``: the blended probabilities as uint8 ``round(p * 255)``
            (a COG like the mask, averaged overviews), e.g. for :mod:`pipeline.infer.footprints` attributes;
            ``probs_cog=False``: a plain tiled GeoTIFF, for a file read once and deleted.
        tags: GeoTIFF metadata of both outputs (:meth:`MaskTags.to_tags`); ``desc``: the progress lines'
            prefix (default ``predict <scene name>``).

    Memory: one strip of tile rows of RGB ([tile, W, 3] uint8), one batch of tiles and predictions,
    and the :class:`_StripBlender` buffers of ``min(tile, H)`` x W. The GeoTIFF's strips go to a
    temporary file, which is copied as a COG and written atomically; PNG buffers the mask.
    """
    # Here, not at the top: metrics imports torch (1 GB of RSS), which make footprints (MaskTags) never needs.
    from pipeline.metrics.postprocess import binarize

    src_path, dst_path = Path(src_path), Path(dst_path)
    _check_args(foreground, batch_size, classes, probs_path)
    check_output(dst_path, [src_path])
    with open_raster(src_path) as src:
        check_rgb(src, src_path)
        grid = TileGrid(src.height, src.width, tile, overlap)
        blender = _StripBlender(min(tile, src.height), src.width, tile, window, classes)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with (
                _open_output(dst_path, src, tags=tags) as dst,
                _open_output(probs_path, src, "average", tags, probs_cog) as pdst,
            ):
                if classes > 1 and colors:
                    dst.write_colormap(1, {i: (*map(int, c), 255) for i, c in enumerate(colors)})

                def to_mask(probs: np.ndarray) -> np.ndarray:
                    if classes > 1:
                        return probs.argmax(-1).astype(np.uint8)
                    return binarize(probs, threshold) * np.uint8(foreground)

                with progress(len(grid), desc or f"predict {src_path.name}", unit="window") as bar:
                    predict = lambda b: _predict(predict_fn, b, classes)  # noqa: E731
                    n_batches, flushed, fg = _write_strips(
                        src, grid, predict, blender, to_mask, (dst, pdst), batch_size, bar
                    )
        crs = None if src.crs is None else src.crs.to_string()  # "EPSG:32631", or WKT without a code
    return SceneStats(src.height, src.width, len(grid), n_batches, blender.wsum.shape[0], flushed, fg, crs)


def _write_strips(
    src: rasterio.DatasetReader,
    grid: TileGrid,
    predict: PredictFn,
    blender: _StripBlender,
    to_mask: Callable[[np.ndarray], np.ndarray],
    outputs: tuple[Any, Any],
    batch_size: int,
    bar: Any,
) -> tuple[int, tuple[int, ...], int]:
    """Every tile row of ``grid``: predict its tiles in batches, blend them, write the rows no later tile
    reaches to the mask (and probabilities). Returns (batches, rows written per flush, non-zero pixels)."""
    height, width, tile = src.height, src.width, grid.tile
    rows, cols = grid.row_offsets, grid.col_offsets
    th, tw = min(tile, height), min(tile, width)
    dst, pdst = outputs
    n_batches, flushed, fg = 0, [], 0
    for k, r in enumerate(rows):
        strip = read_rgb(src, Window(0, r, width, th))
        for b in range(0, len(cols), batch_size):
            batch_cols = cols[b : b + batch_size]
            batch = np.stack([pad_to(strip[:, c : c + tw], tile) for c in batch_cols])
            for c, p in zip(batch_cols, predict(batch)):
                blender.add(c, p)
            n_batches += 1
            bar.update(len(batch_cols))  # per batch: a wide scene's tile row takes minutes on CPU
        done = (rows[k + 1] if k + 1 < len(rows) else height) - r
        probs = blender.flush(done)
        mask = to_mask(probs)
        fg += int(np.count_nonzero(mask))
        dst.write(mask[None], window=Window(0, r, width, done))
        if pdst is not None:  # the OOF files' uint8 scale: round(p * 255)
            pdst.write(np.rint(probs * 255).astype(np.uint8), 1, window=Window(0, r, width, done))
        flushed.append(done)
    return n_batches, tuple(flushed), fg
