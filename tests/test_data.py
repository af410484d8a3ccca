"""Data layer: competition layout, decoded-once masks, Dataset, augmentation seeding, nearest-only masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline import data as data_mod
from pipeline import rle
from pipeline.config import AugConfig, DataConfig
from pipeline.data import IMAGE, MASK, NAME, DataError, SegDataset, build_transforms, read_mask_csv
from pipeline.layouts import read_source


def _collect(ds: SegDataset, workers: int) -> list[tuple[np.ndarray, np.ndarray]]:
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=workers, shuffle=False)
    out = []
    for b in loader:
        out += list(zip(b[IMAGE].numpy(), b[MASK].numpy()))
    return out


def test_source_reads_train_and_test_with_truth(demo_root):
    src = read_source(DataConfig(root=str(demo_root)))
    assert len(src.train) == 24 and len(src.test) == 8
    assert src.train.masks.shape == (24, 64, 64) and src.train.masks.dtype == np.uint8
    csv = read_mask_csv(demo_root / "train_mask.csv")
    for i in (0, 5, 23):
        np.testing.assert_array_equal(src.train.masks[i], rle.decode(csv["rle"][i], (64, 64)))
    sample = read_mask_csv(demo_root / "test_a_samplesubmit.csv", require_rle=False)
    assert src.test.names == sample["name"].tolist()  # submission order
    assert src.test.masks is not None  # ground truth found


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


def test_augmentation_is_the_same_with_any_number_of_workers(demo_root):
    train = read_source(DataConfig(root=str(demo_root)), with_test=False).train.subset(range(9))
    ds = SegDataset(train, build_transforms(AugConfig(), True), seed=3)
    ds.set_epoch(2)
    a, b = _collect(ds, 0), _collect(ds, 2)
    for (ia, ma), (ib, mb) in zip(a, b):
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(ma, mb)
    ds.set_epoch(3)
    c = _collect(ds, 0)
    assert any(not np.array_equal(x[0], y[0]) for x, y in zip(a, c))  # a new epoch draws new augmentations


def test_augmented_masks_keep_their_values(demo_root):
    """Geometric transforms use nearest-neighbour on masks: no value other than 0/1 appears."""
    train = read_source(DataConfig(root=str(demo_root)), with_test=False).train
    strong = AugConfig(shift_scale_rotate_p=1.0, rotate_limit=45, scale_limit=0.5)
    ds = SegDataset(train, build_transforms(strong, True), seed=0)
    for i in range(len(train)):
        item = ds[i]
        assert set(np.unique(item[MASK].numpy())) <= {0, 1}
        assert item[IMAGE].dtype == torch.uint8 and item[IMAGE].shape == (3, 64, 64)
        assert item[NAME] == train.names[i]


def test_missing_images_are_reported_all_at_once(tmp_path, demo_root):
    root = tmp_path / "d"
    (root / "train").mkdir(parents=True)
    csv = read_mask_csv(demo_root / "train_mask.csv")
    for n in csv["name"][:3]:
        (root / "train" / n).write_bytes((demo_root / "train" / n).read_bytes())
    (root / "train_mask.csv").write_text((demo_root / "train_mask.csv").read_text())
    with pytest.raises(DataError, match=r"21 image\(s\) listed in .* are missing") as e:
        read_source(DataConfig(root=str(root)), with_test=False)
    assert csv["name"][3] in str(e.value) and "..." in str(e.value)


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


def test_grayscale_and_rgba_are_converted(tmp_path):
    from PIL import Image

    Image.fromarray(np.full((8, 8), 7, np.uint8)).save(tmp_path / "g.png")
    Image.fromarray(np.full((8, 8, 4), 9, np.uint8)).save(tmp_path / "a.png")
    with pytest.warns(UserWarning, match="converted"):
        g = data_mod.read_image(tmp_path / "g.png")
    with pytest.warns(UserWarning, match="converted"):
        a = data_mod.read_image(tmp_path / "a.png")
    assert g.shape == a.shape == (8, 8, 3) and g.dtype == np.uint8 and (g == 7).all() and (a == 9).all()


def test_persistent_workers_see_the_new_epoch(demo_root):
    """Workers started once per fold still draw each epoch's augmentations (the epoch is in shared memory)."""
    train = read_source(DataConfig(root=str(demo_root)), with_test=False).train.subset(range(6))
    ds = SegDataset(train, build_transforms(AugConfig(), True), seed=5)
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2, persistent_workers=True)
    seen = {}
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        seen[epoch] = [b[IMAGE].numpy() for b in loader]
    ref = SegDataset(train, build_transforms(AugConfig(), True), seed=5)
    for epoch in (0, 1):
        ref.set_epoch(epoch)
        expected = [b[IMAGE].numpy() for b in torch.utils.data.DataLoader(ref, batch_size=3)]
        for a, b in zip(seen[epoch], expected):
            np.testing.assert_array_equal(a, b)
    assert not np.array_equal(seen[0][0], seen[1][0])


def test_subset_of_cached_masks_stays_on_disk(demo_root):
    train = read_source(DataConfig(root=str(demo_root)), with_test=False).train
    sub = train.subset([3, 0, 7])
    assert not isinstance(sub.masks, np.ndarray)  # a lazy view, not a RAM copy of the memmap
    assert sub.masks.shape == (3, 64, 64)
    np.testing.assert_array_equal(np.asarray(sub.masks), np.asarray(train.masks)[[3, 0, 7]])
    np.testing.assert_array_equal(sub.subset([2]).masks[0], train.masks[7])


# ----------------------------------------------------------------------------- image modes


def _mode_image(mode: str, value: int):
    from PIL import Image

    if mode in data_mod.HIGH_BIT_MODES:
        return Image.new(mode, (5, 4), float(value) if mode == "F" else value)
    return Image.new(mode, (5, 4))


def test_every_mode_check_data_accepts_is_converted_by_read_image(tmp_path):
    """check_data warns and moves on for each mode of MODE_NAMES: read_image must convert every one,
    and high-bit modes the way the warning says (divided by 257 when any value is above 255)."""
    from PIL import Image

    from pipeline.check_images import MODE_NAMES

    assert set(data_mod.HIGH_BIT_MODES) <= set(MODE_NAMES)
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
            rgb = data_mod.read_image(path)
        else:
            with pytest.warns(UserWarning, match="converted"):
                rgb = data_mod.read_image(path)
        assert rgb.shape == (4, 5, 3) and rgb.dtype == np.uint8, mode
        if mode in data_mod.HIGH_BIT_MODES:
            assert (rgb == 100).all(), f"{mode}: {np.unique(rgb)}"
    assert {"I", "I;16", "I;16B", "F", "L", "P", "RGBA", "CMYK"} <= set(written)


# ----------------------------------------------------------------------------- building fraction


class _NoStack:
    """Masks that can only be read one at a time: stacking them (np.asarray) fails the test."""

    def __init__(self, masks):
        self.masks, self.reads = masks, 0

    def __len__(self):
        return len(self.masks)

    def __getitem__(self, i):
        self.reads += 1
        return self.masks[i]

    def __array__(self, *a, **k):
        raise AssertionError("the masks were stacked")


def test_foreground_fraction_known_answer_one_mask_at_a_time():
    from pathlib import Path

    masks = _NoStack(
        [
            np.array([[0, 1], [1, 1]], np.uint8),
            np.zeros((2, 2), np.uint8),
            np.array([[0, 1], [2, 255]], np.uint8),
            np.full((2, 2), 255, np.uint8),
        ]
    )
    split = data_mod.Split(list("abcd"), [Path(n) for n in "abcd"], masks)
    np.testing.assert_array_equal(split.foreground_fraction(), [3 / 4, 0.0, 3 / 4, 1.0])
    np.testing.assert_array_equal(split.foreground_fraction(255), [3 / 4, 0.0, 2 / 3, 0.0])
    assert masks.reads == 8
    with pytest.raises(DataError, match="no masks"):
        data_mod.Split(["a"], [Path("a")], None).foreground_fraction()


def test_foreground_fraction_of_the_competition_masks_is_the_building_fraction(demo_root):
    train = read_source(DataConfig(root=str(demo_root)), with_test=False).train
    expected = np.asarray(train.masks).reshape(len(train), -1).mean(axis=1)
    assert (train.foreground_fraction() == expected).all()  # bit for bit: the folds depend on it


def test_mask_cache_is_written_chunk_by_chunk_and_reports_every_bad_row(monkeypatch, tmp_path):
    monkeypatch.setattr(data_mod, "DECODE_CHUNK", 3)
    monkeypatch.setenv("BUILDSEG_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    masks = (rng.random((7, 6, 5)) > 0.6).astype(np.uint8)
    rles = [rle.encode(m) for m in masks]
    cached = data_mod.decode_masks(rles, (6, 5), "t.csv", [f"t{i}" for i in range(7)])
    np.testing.assert_array_equal(np.asarray(cached), masks)
    data_mod.release_pages(cached)  # drops resident pages only: the masks read back the same
    np.testing.assert_array_equal(np.asarray(cached), masks)
    bad = list(rles)
    bad[1], bad[5] = "1 2 3", "0 4"  # one malformed row in each of two chunks
    with pytest.raises(rle.RLEError) as e:
        data_mod.decode_masks(bad, (6, 5), "t.csv", [f"t{i}" for i in range(7)])
    assert "t1" in str(e.value) and "t5" in str(e.value)
    assert not list((tmp_path / "cache").glob(".*.tmp")), "a failed decode left its temp file"
