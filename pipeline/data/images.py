"""Image files: read as uint8 RGB, listed, and inspected strictly for ``make check-data``.

:func:`read_image` is the one reader of a tile. :func:`inspect_image` finds what would make a tile
unusable or misleading: unreadable, truncated, an odd mode, a misleading extension. Every tile is
decoded fully, once. JPEGs go through libjpeg-turbo (``simplejpeg``) with its warnings raised as
errors: scan data cut short but still ending in an end-of-image marker makes libjpeg only warn
and fill the rest grey, which PIL decodes without a word, and the tile would be trained on.
Cost, one core: 0.76 s for 1,000 generated 512x512 tiles (0.49 s at the 1/8-scale decode used
before), so about 23 s for 30k tiles, extrapolated; 0.37 s for the 448 real tiles. The tile's size
is returned, not judged: the expected size is the data set's (:mod:`pipeline.data.check`).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.data import DataError
from pipeline.data.maskcsv import IMAGE_SUFFIXES, Problem

HIGH_BIT_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")


def read_image(path: str | Path) -> np.ndarray:
    """Read an image as uint8 RGB [H, W, 3].

    Grayscale, palette, RGBA and 16-bit images are converted (with a warning): users' tiles come
    from many exporters, and refusing them would be worse than a one-line notice.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode == "RGB":
                return np.asarray(im)
            if mode in HIGH_BIT_MODES:
                arr = np.asarray(im).astype(np.float32)
                hi = max(float(arr.max()), 1.0)
                arr8 = (arr * (255.0 / (65535.0 if hi > 255 else 255.0))).clip(0, 255).astype(np.uint8)
                warnings.warn(f"{path}: {mode} image converted to 8-bit RGB", stacklevel=2)
                return np.repeat(arr8[..., None], 3, axis=2)
            warnings.warn(f"{path}: {mode} image converted to RGB", stacklevel=2)
            return np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise DataError(f"{path} not found") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path} is not a readable image ({e}); re-export or remove it") from None


def image_size(path: str | Path) -> tuple[int, int]:
    """(H, W) of an image from its header, without decoding the pixels."""
    try:
        with Image.open(path) as im:
            w, h = im.size
    except (OSError, SyntaxError) as e:
        raise DataError(f"{path} is not a readable image ({e}); re-export or remove it") from None
    return h, w


def list_images(folder: str | Path) -> list[str]:
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def check_listed_images(folder: Path, names: Sequence[str], csv_path: Path) -> None:
    """Every listed image must exist; report all missing (and unlisted) files at once."""
    present = set(list_images(folder))
    missing = [n for n in names if n not in present]
    unlisted = sorted(present - set(names))
    if missing:
        shown = ", ".join(missing[:10]) + (f", ... ({len(missing)} in all)" if len(missing) > 10 else "")
        extra = f"; {len(unlisted)} images in the folder are not listed" if unlisted else ""
        raise DataError(
            f"{len(missing)} image(s) listed in {csv_path} are missing from {folder}/: {shown}{extra}. "
            "Restore the files or remove their rows (python -m pipeline.data.check DATA lists every problem)"
        )
    if unlisted:
        warnings.warn(
            f"{len(unlisted)} image(s) in {folder}/ are not listed in {csv_path} and are ignored: "
            + ", ".join(unlisted[:5]),
            stacklevel=2,
        )


# Every non-RGB mode that read_image converts, named for the warning.
MODE_NAMES = {
    "1": "1-bit black and white",
    "L": "grayscale",
    "LA": "grayscale + alpha",
    "P": "palette",
    "PA": "palette + alpha",
    "RGBA": "RGBA (the alpha channel is dropped)",
    "RGBX": "RGBX",
    "CMYK": "CMYK",
    "YCbCr": "YCbCr",
    "LAB": "Lab",
    "HSV": "HSV",
    "I": "32-bit integer",
    "I;16": "16-bit",
    "I;16L": "16-bit",
    "I;16B": "16-bit",
    "I;16N": "16-bit",
    "F": "32-bit float",
}

# The format each file extension promises (a mismatch works with PIL but not with every tool).
SUFFIX_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".tif": "TIFF", ".tiff": "TIFF"}


@dataclass
class ImageCheck:
    """What :func:`inspect_image` found: ``size`` (H, W), None if unreadable, and the problems."""

    size: tuple[int, int] | None
    errors: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)


def jpeg_has_eoi(path: Path) -> bool:
    """True if the file ends with the JPEG end-of-image marker FFD9 (padding NULs allowed).

    A JPEG cut by a few bytes can still decode without an error (seen on small tiles: the last
    entropy-coded bytes were already buffered), so the decoder alone may miss it; the marker does not.
    """
    with open(path, "rb") as f:
        f.seek(0, 2)
        f.seek(max(0, f.tell() - 64))
        tail = f.read()
    return tail.rstrip(b"\x00").endswith(b"\xff\xd9")


def decode_problem(path: Path, im: Image.Image) -> str:
    """ "" if the whole image ``path`` (opened as ``im``) decodes cleanly, else what the decoder said.

    JPEG: libjpeg-turbo with warnings as errors ("Corrupt JPEG data: premature end of data segment"
    is a warning to libjpeg, which fills the missing blocks grey). Other formats: PIL's full decode.
    """
    try:
        if im.format == "JPEG":
            import simplejpeg

            simplejpeg.decode_jpeg(path.read_bytes(), strict=True)
        else:
            im.load()
    except Exception as e:  # the decoders' error types vary by format; all mean damaged data
        return f"the decoder reports: {type(e).__name__}: {e}"
    return ""


def inspect_image(path: Path, where: str) -> ImageCheck:
    """Open and decode ``path``; problems are named ``where`` (e.g. ``train/t0.jpg``)."""
    remove = "re-export the tile, or delete it and its CSV row"
    try:
        im = Image.open(path)
    except Exception as e:  # PIL raises many types for a bad header; any of them means unreadable
        what = f"is not a readable image ({type(e).__name__}: {e})"
        return ImageCheck(None, [Problem(where, what, remove, "unreadable-image")])
    with im:
        fmt, mode = im.format, im.mode
        w, h = im.size
        damage = ""
        if fmt == "JPEG" and not jpeg_has_eoi(path):
            damage = "no end-of-image marker FFD9: the file was cut short"
        failed = decode_problem(path, im)
        if failed:
            damage = f"{damage}; {failed}" if damage else failed
    check = ImageCheck((h, w))
    if damage:
        check.errors.append(
            Problem(
                where,
                f"{fmt or 'image'} is truncated or corrupt ({damage})",
                "copy or re-export the tile again (a partial download or copy is the usual cause), "
                "or delete it and its CSV row",
                "truncated-image",
            )
        )
    if mode != "RGB":
        if mode in HIGH_BIT_MODES:
            fix = "scale it to 8 bits yourself (read_image divides by 257 if any value > 255); save RGB"
        else:
            fix = "nothing if that is right; to be explicit, save RGB (PIL: im.convert('RGB').save(...))"
        desc = MODE_NAMES.get(mode, mode)
        what = f"is a {desc} image (mode {mode}); it will be converted to 8-bit RGB when read"
        check.warnings.append(Problem(where, what, fix, "image-mode"))
    expected = SUFFIX_FORMATS.get(path.suffix.lower())
    if fmt and expected and fmt != expected:
        check.warnings.append(
            Problem(
                where,
                f"contains {fmt} data but its name ends in {path.suffix}",
                f"rename it or re-encode it as {expected}; some tools trust the extension",
                "format-mismatch",
            )
        )
    return check
