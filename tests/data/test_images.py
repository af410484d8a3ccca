"""pipeline.data.images: one tile inspected, each problem named by code with its fix."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data import images
from pipeline.data.images import inspect_image, jpeg_has_eoi


def _jpeg(path: Path, size: tuple[int, int] = (40, 30)) -> Path:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path, quality=90)
    return path


def test_clean_tile_has_its_size_and_no_problem(tmp_path):
    check = inspect_image(_jpeg(tmp_path / "t.jpg"), "train/t.jpg")
    assert (check.size, check.errors, check.warnings) == ((40, 30), [], [])


def test_cut_jpeg_is_an_error_even_when_it_decodes(tmp_path):
    path = _jpeg(tmp_path / "t.jpg")
    path.write_bytes(path.read_bytes()[:-2])  # only the end-of-image marker is gone
    assert not jpeg_has_eoi(path)
    check = inspect_image(path, "train/t.jpg")
    assert [p.code for p in check.errors] == ["truncated-image"]
    assert "FFD9" in check.errors[0].what and check.errors[0].where == "train/t.jpg"


def test_unreadable_file_has_no_size(tmp_path):
    path = tmp_path / "t.jpg"
    path.write_bytes(b"not an image at all")
    check = inspect_image(path, "train/t.jpg")
    assert check.size is None and [p.code for p in check.errors] == ["unreadable-image"]


def test_grayscale_png_named_jpg_gives_two_warnings(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(buf, format="PNG")
    path = tmp_path / "t.jpg"
    path.write_bytes(buf.getvalue())
    check = inspect_image(path, "train/t.jpg")
    assert check.errors == []
    assert sorted(p.code for p in check.warnings) == ["format-mismatch", "image-mode"]


def test_jpeg_cut_short_but_ending_in_eoi_is_an_error(tmp_path):
    """Scan data cut short, then an end-of-image marker: PIL decodes it (grey fill) without a word;
    the decoder's warning must be an error (issue 12)."""
    path = _jpeg(tmp_path / "t.jpg", (64, 64))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] + b"\xff\xd9")
    assert jpeg_has_eoi(path)
    Image.open(path).load()  # PIL: no error
    check = inspect_image(path, "train/t.jpg")
    assert [p.code for p in check.errors] == ["truncated-image"]
    assert "premature end of data segment" in check.errors[0].what


def test_every_clean_jpeg_kind_passes(tmp_path):
    """The full decode accepts what the pipeline reads: progressive, grayscale (a warning), CMYK."""
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 255, (24, 40, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "p.jpg", progressive=True)
    Image.fromarray(rgb[..., 0]).save(tmp_path / "g.jpg")
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "c.jpg")
    for name in ("p.jpg", "g.jpg", "c.jpg"):
        check = inspect_image(tmp_path / name, name)
        assert check.size == (24, 40) and check.errors == [], name


def test_grayscale_and_rgba_are_converted(tmp_path):
    from PIL import Image

    Image.fromarray(np.full((8, 8), 7, np.uint8)).save(tmp_path / "g.png")
    Image.fromarray(np.full((8, 8, 4), 9, np.uint8)).save(tmp_path / "a.png")
    with pytest.warns(UserWarning, match="converted"):
        g = images.read_image(tmp_path / "g.png")
    with pytest.warns(UserWarning, match="converted"):
        a = images.read_image(tmp_path / "a.png")
    assert g.shape == a.shape == (8, 8, 3) and g.dtype == np.uint8 and (g == 7).all() and (a == 9).all()


def _mode_image(mode: str, value: int):
    from PIL import Image

    if mode in images.HIGH_BIT_MODES:
        return Image.new(mode, (5, 4), float(value) if mode == "F" else value)
    return Image.new(mode, (5, 4))


def test_every_mode_check_data_accepts_is_converted_by_read_image(tmp_path):
    """check_data warns and moves on for each mode of MODE_NAMES: read_image must convert every one,
    and high-bit modes the way the warning says (divided by 257 when any value is above 255)."""
    from PIL import Image

    from pipeline.data.images import MODE_NAMES

    assert set(images.HIGH_BIT_MODES) <= set(MODE_NAMES)
    written = []
    for mode in MODE_NAMES:
        path = tmp_path / f"{mode.replace(';', '_')}.tif"
        try:
            _mode_image(mode, 257 * 100).save(path)
        except (OSError, ValueError, KeyError):
            continue  # PIL cannot write this mode (HSV, I;16N): no exporter produces it either
        written.append(mode)
        with Image.open(path) as im:
            stored = im.mode  # TIFF stores RGBX as RGB, I;16L as I;16
        if stored == "RGB":
            rgb = images.read_image(path)
        else:
            with pytest.warns(UserWarning, match="converted"):
                rgb = images.read_image(path)
        assert rgb.shape == (4, 5, 3) and rgb.dtype == np.uint8, mode
        if mode in images.HIGH_BIT_MODES:
            assert (rgb == 100).all(), f"{mode}: {np.unique(rgb)}"
    assert {"I", "I;16", "I;16B", "F", "L", "P", "RGBA", "CMYK"} <= set(written)
