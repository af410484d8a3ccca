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
