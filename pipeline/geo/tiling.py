"""Large scenes <-> tiles: the tile grid, split/merge with blending, and cutting scenes into tiles.

Two layers (the memory-bounded sliding-window prediction of a whole scene built on them is
:mod:`pipeline.geo.scene`):

* :class:`TileGrid` and the pure functions :func:`split`, :func:`merge`, :func:`blend_window`:
  in-memory arrays, ``merge(split(x)) == x`` exactly for any size and overlap.
* :func:`make_tiles`: cut Inria-style scenes (``images/*.tif`` + ``gt/*.tif``, gt 255 = building)
  into the competition layout (``train/*.jpg``, ``train_mask.csv``) plus ``manifest.csv``
  (``name,group`` with group = scene, so folds can be grouped by scene).

The grid: tiles of ``tile`` x ``tile`` every ``stride = tile - overlap`` pixels; the last tile of a row
or column is moved back to end exactly on the border (it overlaps its neighbour more), so a scene
at least one tile large needs no padding. A scene smaller than a tile along an axis gets a single
tile on that axis, reflect-padded at the bottom/right to ``tile``; the padding is cropped away again
in :func:`merge` / :func:`pipeline.geo.scene.predict_scene` (and stays in the JPEG/mask of
:func:`make_tiles`, where reflected pixels are labelled consistently with the reflected image).

Blending is exact for identical predictions: tile values (float32) times float32 weights are exact in
float64, the float64 weighted mean of n copies of p is within a few float64 ulps of p, and rounding
to float32 returns p. So an identity-like ``predict_fn`` reproduces the thresholded input bit for bit
whatever the tile size, overlap and window.

CLI::

    python -m pipeline.geo.tiling make-tiles --images DIR --gt DIR --out DIR [--tile 512 --overlap 0]
"""

from __future__ import annotations

import argparse
import errno
import io
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import rasterio
from PIL import Image
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
from rasterio.windows import Window

from pipeline.core.errors import cli
from pipeline.core.io import atomic_write_bytes, atomic_write_text
from pipeline.core.progress import progress
from pipeline.data import rle
from pipeline.geo import GeoError

__all__ = [
    "BLEND_WINDOWS",
    "TileGrid",
    "TileWindow",
    "TilesSummary",
    "blend_window",
    "main",
    "make_tiles",
    "merge",
    "split",
]

SCENE_SUFFIXES = (".tif", ".tiff", ".jpg", ".jpeg", ".png")


# ----------------------------------------------------------------------------- grid


class TileWindow(NamedTuple):
    """A tile's place in the scene: offsets and the valid extent (``h``/``w`` < tile only when padded)."""

    row_off: int
    col_off: int
    h: int
    w: int


def _offsets(size: int, tile: int, stride: int) -> tuple[int, ...]:
    """Tile starts along one axis: every ``stride``, the last one aligned to the border."""
    if size <= tile:
        return (0,)
    starts = list(range(0, size - tile, stride))
    starts.append(size - tile)
    return tuple(starts)


@dataclass(frozen=True)
class TileGrid:
    """Tiles of ``tile`` x ``tile`` with ``overlap`` pixels shared between neighbours, covering a
    ``height`` x ``width`` scene. ``windows`` are in row-major order.
    """

    height: int
    width: int
    tile: int
    overlap: int = 0

    def __post_init__(self) -> None:
        if self.height < 1 or self.width < 1:
            raise GeoError(f"scene size must be positive, got {self.height}x{self.width}")
        if self.tile < 1:
            raise GeoError(f"tile must be >= 1, got {self.tile}")
        if not 0 <= self.overlap < self.tile:
            raise GeoError(
                f"overlap must be in [0, tile) = [0, {self.tile}), got {self.overlap}; "
                f"e.g. overlap={self.tile // 4} for a stride of 3/4 tile"
            )

    @property
    def stride(self) -> int:
        return self.tile - self.overlap

    @property
    def row_offsets(self) -> tuple[int, ...]:
        return _offsets(self.height, self.tile, self.stride)

    @property
    def col_offsets(self) -> tuple[int, ...]:
        return _offsets(self.width, self.tile, self.stride)

    @property
    def windows(self) -> list[TileWindow]:
        h, w = min(self.tile, self.height), min(self.tile, self.width)
        return [TileWindow(r, c, h, w) for r in self.row_offsets for c in self.col_offsets]

    def __len__(self) -> int:
        return len(self.row_offsets) * len(self.col_offsets)


def pad_to(x: np.ndarray, tile: int) -> np.ndarray:
    """Reflect-pad ``x`` [h, w, ...] at the bottom/right to [tile, tile, ...]; no copy if already full."""
    ph, pw = tile - x.shape[0], tile - x.shape[1]
    if ph == 0 and pw == 0:
        return x
    pad = [(0, ph), (0, pw)] + [(0, 0)] * (x.ndim - 2)
    # reflect needs >= 2 pixels along an axis; a 1-pixel axis is repeated instead.
    mode = "reflect" if min(x.shape[0], x.shape[1]) > 1 else "edge"
    return np.pad(x, pad, mode=mode)


def split(image: np.ndarray, grid: TileGrid) -> np.ndarray:
    """Cut ``image`` [H, W, ...] into tiles [N, tile, tile, ...] in ``grid.windows`` order (copies)."""
    if image.shape[:2] != (grid.height, grid.width):
        raise ValueError(f"image is {image.shape[:2]} but the grid is for {(grid.height, grid.width)}")
    out = np.empty((len(grid), grid.tile, grid.tile, *image.shape[2:]), dtype=image.dtype)
    for i, (r, c, h, w) in enumerate(grid.windows):
        out[i] = pad_to(image[r : r + h, c : c + w], grid.tile)
    return out


# Blend windows by name: a 1-D profile float64 [tile], > 0 at every pixel; the 2-D window is its outer
# product with itself (see blend_window).


def _uniform(tile: int) -> np.ndarray:
    return np.ones(tile)


def _cosine(tile: int) -> np.ndarray:
    """Hann window sampled at pixel centres: sin^2 is > 0 at every pixel, 1 in the middle."""
    i = np.arange(tile, dtype=np.float64)
    return np.sin(np.pi * (i + 0.5) / tile) ** 2


def _gaussian(tile: int) -> np.ndarray:
    """sigma = tile / 8 as in nnU-Net: ~1e-7 at the corners, never 0 in float32."""
    i = np.arange(tile, dtype=np.float64)
    c = (tile - 1) / 2
    return np.exp(-((i - c) ** 2) / (2 * (tile / 8) ** 2))


BLEND_WINDOWS: dict[str, Callable[[int], np.ndarray]] = {
    "uniform": _uniform,
    "cosine": _cosine,
    "gaussian": _gaussian,
}


def blend_window(tile: int, kind: str = "cosine") -> np.ndarray:
    """Blending weights float32 [tile, tile], strictly positive, maximum 1 (at the centre).

    ``cosine`` and ``gaussian`` down-weight tile borders, where the model sees the least context;
    ``uniform`` is a plain average. Every weight is > 0, so every pixel covered by a tile has a
    positive total weight.
    """
    if kind not in BLEND_WINDOWS:
        raise ValueError(f"unknown blend window {kind!r}; use one of {', '.join(BLEND_WINDOWS)}")
    w1 = BLEND_WINDOWS[kind](tile)
    w = np.outer(w1, w1)
    w = (w / w.max()).astype(np.float32)
    assert (w > 0).all(), "blend window must be strictly positive"  # guards additions to BLEND_WINDOWS
    return w


def merge(
    tiles: np.ndarray, grid: TileGrid, window: str = "uniform", dtype: np.dtype | None = None
) -> np.ndarray:
    """Blend tiles [N, tile, tile, ...] back into a scene [H, W, ...] with ``blend_window(window)`` weights.

    Accumulates in float64 and casts to ``dtype`` (default: the tiles' dtype; integers are rounded),
    so ``merge(split(x), grid) == x`` exactly for uint8 and float32 ``x``.
    """
    if tiles.shape[:3] != (len(grid), grid.tile, grid.tile):
        raise ValueError(
            f"tiles have shape {tiles.shape} but the grid needs [{len(grid)}, {grid.tile}, {grid.tile}, ...]"
        )
    rest = tiles.shape[3:]
    weight = (
        blend_window(grid.tile, window).astype(np.float64).reshape(grid.tile, grid.tile, *([1] * len(rest)))
    )
    acc = np.zeros((grid.height, grid.width, *rest), dtype=np.float64)
    wsum = np.zeros((grid.height, grid.width, *([1] * len(rest))), dtype=np.float64)
    for t, (r, c, h, w) in zip(tiles, grid.windows):
        acc[r : r + h, c : c + w] += t[:h, :w] * weight[:h, :w]
        wsum[r : r + h, c : c + w] += weight[:h, :w]
    return _cast(acc / wsum, np.dtype(dtype or tiles.dtype))


def _cast(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    return np.rint(x).astype(dtype) if dtype.kind in "iub" else x.astype(dtype)


# ----------------------------------------------------------------------------- raster I/O


def open_raster(path: Path) -> rasterio.DatasetReader:
    """Open a raster; JPEG/PNG without georeferencing are fine (the warning is expected, not a problem)."""
    if not Path(path).is_file():
        raise FileNotFoundError(errno.ENOENT, "not found", str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        try:
            return rasterio.open(path)
        except RasterioIOError as e:
            raise GeoError(
                f"{path} is not a readable raster ({e}); re-export it as GeoTIFF, PNG or JPEG"
            ) from None


def check_rgb(src: rasterio.DatasetReader, path: Path) -> None:
    if src.count < 3 or src.dtypes[0] != "uint8":
        raise GeoError(
            f"{path}: expected an 8-bit RGB image (>= 3 uint8 bands), got {src.count} band(s) of "
            f"{src.dtypes[0]}; convert it first, e.g. gdal_translate -ot Byte -scale -b 1 -b 2 -b 3"
        )


def read_rgb(src: rasterio.DatasetReader, window: Window) -> np.ndarray:
    """Bands 1-3 of ``window`` as uint8 [h, w, 3] (a 4th band, e.g. NIR or alpha, is ignored)."""
    return np.moveaxis(src.read((1, 2, 3), window=window), 0, -1)


def _read_gt(src: rasterio.DatasetReader, window: Window, path: Path) -> np.ndarray:
    """Band 1 of ``window`` as a 0/1 uint8 mask; accepts 0/1 and 0/255 (Inria) ground truth."""
    g = src.read(1, window=window)
    bad = (g != 0) & (g != 1) & (g != 255)
    if bad.any():
        values = np.unique(g[bad])[:5].tolist()
        raise GeoError(
            f"{path}: ground truth must be 0 = background and 255 (or 1) = building; found {values} "
            f"in rows {window.row_off}..{window.row_off + window.height}; binarise it first"
        )
    return (g != 0).view(np.uint8)


def _scenes(images_dir: Path, gt_dir: Path) -> list[tuple[Path, Path]]:
    """Pair ``images_dir/<scene>.*`` with ``gt_dir/<scene>.*`` by file stem; all problems in one error."""
    if not images_dir.is_dir():
        raise FileNotFoundError(f"images folder {images_dir} not found (Inria layout: <root>/images/*.tif)")
    if not gt_dir.is_dir():
        raise FileNotFoundError(f"ground-truth folder {gt_dir} not found (Inria layout: <root>/gt/*.tif)")

    def rasters(d: Path) -> list[Path]:
        return sorted(p for p in d.iterdir() if p.suffix.lower() in SCENE_SUFFIXES)

    images = rasters(images_dir)
    if not images:
        raise FileNotFoundError(f"no scenes ({', '.join(SCENE_SUFFIXES)}) in {images_dir}")
    gts = {p.stem: p for p in rasters(gt_dir)}
    missing = [p for p in images if p.stem not in gts]
    if missing:
        listed = "\n  ".join(f"{p} -> expected {gt_dir / p.name}" for p in missing[:20])
        raise FileNotFoundError(f"{len(missing)} scene(s) without ground truth (same file stem):\n  {listed}")
    return [(p, gts[p.stem]) for p in images]


def _jpeg_bytes(rgb: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


# ----------------------------------------------------------------------------- make tiles


@dataclass(frozen=True)
class TilesSummary:
    """What :func:`make_tiles` wrote: ``names`` in ``train_mask.csv`` order."""

    n_scenes: int
    names: tuple[str, ...]


def make_tiles(
    images_dir: str | Path,
    gt_dir: str | Path,
    out_dir: str | Path,
    tile: int = 512,
    overlap: int = 0,
    quality: int = 95,
    split_name: str = "train",
) -> TilesSummary:
    """Cut scenes and their building masks into the competition layout.

    Writes (all atomically):

    * ``out/<split_name>/<scene>_<row_off>_<col_off>.jpg``: RGB tiles [tile, tile, 3], JPEG ``quality``;
      ``row_off``/``col_off`` are the tile's pixel offsets in the scene.
    * ``out/<split_name>_mask.csv``: ``name<TAB>rle``, no header (RLE via :func:`pipeline.data.rle.encode`;
      empty tile = empty RLE).
    * ``out/manifest.csv``: ``name,group`` with group = scene (file stem), for grouped folds.

    Scenes are read one strip of tile rows at a time (rasterio windows), never whole.

    Args:
        images_dir: scenes ``*.tif``/``*.jpg``/``*.png`` (>= 3 uint8 bands; bands 1-3 are used).
        gt_dir: masks with the same file stems, 0 = background, 255 (or 1) = building.
    """
    images_dir, gt_dir, out_dir = Path(images_dir), Path(gt_dir), Path(out_dir)
    pairs = _scenes(images_dir, gt_dir)
    mask_lines: list[str] = []
    manifest = ["name,group"]
    names: list[str] = []
    bar = progress(len(pairs), "make-tiles", unit="scene")
    for img_path, gt_path in pairs:
        bar.update(1)
        scene = img_path.stem
        with open_raster(img_path) as src, open_raster(gt_path) as gt:
            check_rgb(src, img_path)
            if (src.height, src.width) != (gt.height, gt.width):
                raise GeoError(
                    f"scene {img_path} is {src.height}x{src.width} but its ground truth {gt_path} is "
                    f"{gt.height}x{gt.width}; they must be the same raster size"
                )
            grid = TileGrid(src.height, src.width, tile, overlap)
            for r in grid.row_offsets:
                h = min(tile, src.height)
                strip_window = Window(0, r, src.width, h)  # Window(col_off, row_off, width, height)
                rgb = read_rgb(src, strip_window)
                mask = _read_gt(gt, strip_window, gt_path)
                for c in grid.col_offsets:
                    w = min(tile, src.width)
                    name = f"{scene}_{r}_{c}.jpg"
                    tile_rgb = pad_to(rgb[:, c : c + w], tile)
                    tile_mask = pad_to(mask[:, c : c + w], tile)
                    atomic_write_bytes(
                        out_dir / split_name / name, _jpeg_bytes(np.ascontiguousarray(tile_rgb), quality)
                    )
                    mask_lines.append(f"{name}\t{rle.encode(tile_mask)}")
                    manifest.append(f"{name},{scene}")
                    names.append(name)
    bar.close()
    atomic_write_text(out_dir / f"{split_name}_mask.csv", "\n".join(mask_lines) + "\n")
    atomic_write_text(out_dir / "manifest.csv", "\n".join(manifest) + "\n")
    return TilesSummary(len(pairs), tuple(names))


# ----------------------------------------------------------------------------- CLI


@cli
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.geo.tiling", description=__doc__.split("\n\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    mt = sub.add_parser(
        "make-tiles", help="cut scenes + gt masks into train/*.jpg, train_mask.csv, manifest.csv"
    )
    mt.add_argument("--images", required=True, type=Path, help="folder of scenes (*.tif, *.jpg, *.png)")
    mt.add_argument("--gt", required=True, type=Path, help="folder of masks with the same file names")
    mt.add_argument("--out", required=True, type=Path, help="output folder (competition layout)")
    mt.add_argument("--tile", type=int, default=512)
    mt.add_argument("--overlap", type=int, default=0)
    mt.add_argument("--quality", type=int, default=95, help="JPEG quality")
    args = parser.parse_args(argv)
    summary = make_tiles(args.images, args.gt, args.out, args.tile, args.overlap, args.quality)
    print(f"{len(summary.names)} tiles from {summary.n_scenes} scene(s) -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
