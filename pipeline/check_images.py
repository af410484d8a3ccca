"""Inspect one tile for ``pipeline.check_data``: unreadable, truncated, odd mode, misleading extension.

Every tile is decoded fully, once. JPEGs go through libjpeg-turbo (``simplejpeg``) with its warnings
raised as errors: scan data cut short but still ending in an end-of-image marker makes libjpeg only
warn and fill the rest grey, which PIL decodes without a word, and the tile would be trained on.
Cost, one core: 0.76 s for 1,000 generated 512x512 tiles (0.49 s at the 1/8-scale decode used
before), so about 23 s for 30k tiles, extrapolated; 0.37 s for the 448 real tiles. The tile's size
is returned, not judged: the expected size is the data set's (``check_data``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from pipeline.data import HIGH_BIT_MODES
from pipeline.maskcsv import Problem

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
    """"" if the whole image ``path`` (opened as ``im``) decodes cleanly, else what the decoder said.

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
