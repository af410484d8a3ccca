"""Class-id label PNGs, one writer and one reader: an 8-bit palette PNG whose pixel value is the class id.

``make predict`` writes one per test image (:func:`write_label_png`, at :func:`label_png_path`),
``make score`` and the multi-class layouts read them (:func:`read_label_png`, checked against the
layout's :class:`pipeline.data.layouts.Colormap`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from pipeline.core.io import atomic_write
from pipeline.data import DataError

IGNORE_COLOR = (255, 255, 255)  # how colorize draws the ignore value (VOC's void borders)

if TYPE_CHECKING:  # layouts reads label PNGs through this module
    from pipeline.data.layouts import Color, Colormap


class LabelPngs(Sequence):
    """Lazy masks: ``masks[i]`` reads ``paths[i]`` (8-bit PNG, mode P or L) -> uint8 [H, W] class ids.

    The PNG values go through ``colormap.lut``; a value the colormap does not allow is a
    :class:`DataError` naming the file. No resizing. Picklable (DataLoader workers).
    """

    def __init__(self, paths: Sequence[Path], colormap: Colormap):
        self.paths = list(paths)
        self.colormap = colormap

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return read_label_png(self.paths[i], self.colormap)


def read_label_png(path: str | Path, colormap: Colormap) -> np.ndarray:
    """One label PNG -> uint8 [H, W] class ids (and ``ignore_index``), checked against ``colormap``."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            mode = im.mode
            if mode not in ("P", "L"):
                raise DataError(
                    f"{path}: mask is a {mode} image; masks must be 8-bit PNGs whose pixel values (mode L) "
                    "or palette indices (mode P, as VOC's SegmentationClass) are class ids. Convert colour "
                    "masks to ids first"
                )
            values = np.asarray(im)
    except FileNotFoundError:
        raise DataError(f"mask {path} not found") from None
    except (OSError, SyntaxError) as e:
        raise DataError(f"{path} is not a readable PNG ({e}); re-export or remove it") from None
    ids = colormap.lut[values]
    if (ids < 0).any():
        bad = np.unique(values[ids < 0]).tolist()
        raise DataError(
            f"{path}: pixel values {bad[:10]} are not class ids of {colormap.source or 'the colormap'} "
            f"(allowed: {_allowed(colormap)}); fix the mask, or list the values in the colormap JSON "
            "(with train_id to remap or void them)"
        )
    return ids.astype(np.uint8)


def _allowed(colormap: Colormap) -> str:
    values = np.flatnonzero(colormap.lut >= 0).tolist()
    k = len(colormap.names)
    if values[:k] == list(range(k)) and values[k:] in ([], [colormap.ignore_index]):
        return f"0..{k - 1}" + (f" and ignore {colormap.ignore_index}" if values[k:] else "")
    return ", ".join(map(str, values[:20])) + (" ..." if len(values) > 20 else "")


# ----------------------------------------------------------------------------- pieces


def label_png_path(pred_dir: str | Path, name: str) -> Path:
    """Where the prediction of test image ``name`` goes: ``<pred_dir>/<stem>.png`` (a name with
    folders, e.g. cityscapes' ``aachen/x.png``, keeps them). ``pipeline.infer.score`` reads them back here."""
    return Path(pred_dir) / Path(name).with_suffix(".png")


def palette_bytes(colors: Sequence[Color]) -> list[int]:
    """A PIL palette (768 ints): class ``c`` -> ``colors[c]``, unused entries black."""
    flat = [int(v) for c in colors for v in c]
    return flat + [0] * (768 - len(flat))


def write_label_png(path: str | Path, ids: np.ndarray, colors: Sequence[Color]) -> Path:
    """Write class ids uint8 [H, W] as a palette PNG (pixel value = class id), atomically."""
    ids = np.asarray(ids)
    if ids.ndim != 2 or ids.dtype != np.uint8:
        raise ValueError(f"write_label_png expects uint8 class ids [H, W], got {ids.dtype} {ids.shape}")
    im = Image.fromarray(ids, mode="P")
    im.putpalette(palette_bytes(colors))
    with atomic_write(path, "wb") as f:
        im.save(f, format="PNG")
    return Path(path)


def colorize(
    mask: np.ndarray,
    colors: Sequence[Color],
    ignore_index: int | None = 255,
    ignore_color: Color = IGNORE_COLOR,
) -> np.ndarray:
    """Class ids [H, W] -> RGB uint8 [H, W, 3]: ``colors[id]``, and ``ignore_color`` for ``ignore_index``.

    An id with no colour (>= len(colors), other than ``ignore_index``) is an error: drawing it as
    black would hide a label bug.
    """
    m = np.asarray(mask)
    if m.ndim != 2 or not np.issubdtype(m.dtype, np.integer):
        raise ValueError(f"colorize expects integer class ids [H, W], got {m.dtype} {m.shape}")
    if len(colors) > 255:
        raise ValueError(f"at most 255 colours (uint8 class ids), got {len(colors)}")
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[: len(colors)] = np.asarray(colors, dtype=np.uint8).reshape(-1, 3)
    known = np.zeros(256, dtype=bool)
    known[: len(colors)] = True
    if ignore_index is not None:
        lut[ignore_index] = ignore_color
        known[ignore_index] = True
    if m.size and (m.min() < 0 or m.max() > 255 or not known[m.astype(np.uint8)].all()):
        ids = sorted(set(np.unique(m).tolist()) - set(np.flatnonzero(known).tolist()))
        raise ValueError(
            f"class ids {ids[:10]} have no colour ({len(colors)} colours, ignore_index={ignore_index}); "
            "check the colormap or the masks"
        )
    return lut[m.astype(np.uint8)]
