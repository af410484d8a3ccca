"""pipeline.data.masks: masks decoded once into a shared cache, streamed, every bad row named."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.core.config import DataConfig
from pipeline.data import DataError, masks, rle
from pipeline.data.layouts import read_source
from pipeline.data.masks import read_mask_csv


def test_masks_are_decoded_once(demo_root, monkeypatch, tmp_path):
    monkeypatch.setenv("BUILDSEG_CACHE", str(tmp_path / "cache"))
    calls = {"n": 0}
    real = rle.decode_many

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(rle, "decode_many", counting)
    first = read_source(DataConfig(root=str(demo_root)), with_test=False).train.masks
    second = read_source(DataConfig(root=str(demo_root)), with_test=False).train.masks
    assert calls["n"] == 1  # the second read maps the cached file
    np.testing.assert_array_equal(first, second)
    assert not second.flags.writeable  # shared read-only by every worker


@pytest.mark.parametrize(
    "content, message",
    [
        ("name,rle\na.jpg,1 2\n", "comma"),
        ("a.jpg\t1 2\na.jpg\t3 4\n", "duplicate name a.jpg"),
        ("ImageId\tEncodedPixels\na.jpg\t1 2\n", "header row"),
    ],
)
def test_bad_csv_names_the_row(tmp_path, content, message):
    p = tmp_path / "m.csv"
    p.write_text(content)
    with pytest.raises(DataError, match=message):
        read_mask_csv(p)


def test_subset_of_cached_masks_stays_on_disk(demo_root):
    train = read_source(DataConfig(root=str(demo_root)), with_test=False).train
    sub = train.subset([3, 0, 7])
    assert not isinstance(sub.masks, np.ndarray)  # a lazy view, not a RAM copy of the memmap
    assert sub.masks.shape == (3, 64, 64)
    np.testing.assert_array_equal(np.asarray(sub.masks), np.asarray(train.masks)[[3, 0, 7]])
    np.testing.assert_array_equal(sub.subset([2]).masks[0], train.masks[7])


def test_mask_cache_is_written_chunk_by_chunk_and_reports_every_bad_row(monkeypatch, tmp_path):
    monkeypatch.setattr(masks, "DECODE_CHUNK", 3)
    monkeypatch.setenv("BUILDSEG_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    truth = (rng.random((7, 6, 5)) > 0.6).astype(np.uint8)
    rles = [rle.encode(m) for m in truth]
    cached = masks.decode_masks(rles, (6, 5), "t.csv", [f"t{i}" for i in range(7)])
    np.testing.assert_array_equal(np.asarray(cached), truth)
    masks.release_pages(cached)  # drops resident pages only: the masks read back the same
    np.testing.assert_array_equal(np.asarray(cached), truth)
    bad = list(rles)
    bad[1], bad[5] = "1 2 3", "0 4"  # one malformed row in each of two chunks
    with pytest.raises(rle.RLEError) as e:
        masks.decode_masks(bad, (6, 5), "t.csv", [f"t{i}" for i in range(7)])
    assert "t1" in str(e.value) and "t5" in str(e.value)
    assert not list((tmp_path / "cache").glob(".*.tmp")), "a failed decode left its temp file"
