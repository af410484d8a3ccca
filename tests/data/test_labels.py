"""pipeline.data.labels: class-id PNGs round-trip with their palette; where predictions go."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipeline.data.labels import colorize, label_png_path, write_label_png


def test_label_png_path_keeps_folders_and_replaces_the_suffix(tmp_path):
    assert label_png_path(tmp_path, "a.jpg") == tmp_path / "a.png"
    assert label_png_path(tmp_path, "aachen/x.jpg") == tmp_path / "aachen" / "x.png"


def test_label_png_round_trip_keeps_ids_and_palette(tmp_path):
    ids = np.array([[0, 1, 2], [2, 1, 0]], np.uint8)
    path = write_label_png(tmp_path / "sub" / "x.png", ids, [(0, 0, 0), (200, 40, 40), (40, 40, 200)])
    with Image.open(path) as im:
        assert im.mode == "P"
        np.testing.assert_array_equal(np.asarray(im), ids)
        assert im.getpalette()[:9] == [0, 0, 0, 200, 40, 40, 40, 40, 200]
        np.testing.assert_array_equal(np.asarray(im.convert("RGB"))[0, 1], [200, 40, 40])
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["x.png"]  # no temporary file left


def test_colorize_maps_ids_and_ignore() -> None:
    colors = [(0, 0, 0), (10, 20, 30), (200, 100, 0)]
    mask = np.array([[0, 1], [2, 255]], dtype=np.uint8)
    out = colorize(mask, colors, ignore_index=255, ignore_color=(1, 2, 3))
    assert out.shape == (2, 2, 3) and out.dtype == np.uint8
    assert out.reshape(-1, 3).tolist() == [[0, 0, 0], [10, 20, 30], [200, 100, 0], [1, 2, 3]]


def test_colorize_refuses_ids_without_colour() -> None:
    with pytest.raises(ValueError, match=r"class ids \[3\] have no colour"):
        colorize(np.array([[0, 3]]), [(0, 0, 0), (1, 1, 1)])
    with pytest.raises(ValueError, match="255"):
        colorize(np.array([[255]]), [(0, 0, 0)], ignore_index=None)
