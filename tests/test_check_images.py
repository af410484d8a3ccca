"""pipeline.check_images: one tile inspected, each problem named by code with its fix."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.check_images import inspect_image, jpeg_has_eoi


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
