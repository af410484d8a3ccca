"""pipeline.data.dataset: the competition layout read with its truth, SegDataset, augmentation seeded
the same with any number of workers, masks that keep their values, foreground fractions. (The
decoded-once mask cache: test_masks.py.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.core.config import AugConfig, DataConfig
from pipeline.data import DataError, dataset, rle
from pipeline.data.dataset import IMAGE, MASK, NAME, SegDataset, build_transforms
from pipeline.data.layouts import read_source
from pipeline.data.masks import read_mask_csv


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


# ----------------------------------------------------------------------------- image modes


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
    split = dataset.Split(list("abcd"), [Path(n) for n in "abcd"], masks)
    np.testing.assert_array_equal(split.foreground_fraction(), [3 / 4, 0.0, 3 / 4, 1.0])
    np.testing.assert_array_equal(split.foreground_fraction(255), [3 / 4, 0.0, 2 / 3, 0.0])
    assert masks.reads == 8
    with pytest.raises(DataError, match="no masks"):
        dataset.Split(["a"], [Path("a")], None).foreground_fraction()


def test_foreground_fraction_of_the_competition_masks_is_the_building_fraction(demo_root):
    train = read_source(DataConfig(root=str(demo_root)), with_test=False).train
    expected = np.asarray(train.masks).reshape(len(train), -1).mean(axis=1)
    assert (train.foreground_fraction() == expected).all()  # bit for bit: the folds depend on it
