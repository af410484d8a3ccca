"""The data layer: the competition layout, decoded-once masks, and a torch Dataset.

Layout (competition)::

    <root>/train/*.jpg                  RGB tiles, 512x512
    <root>/train_mask.csv               TAB-separated, no header: name<TAB>rle (empty = no building)
    <root>/test_a/*.jpg
    <root>/test_a_samplesubmit.csv      name<TAB> for every test tile, in submission order
    <root>/test_a_mask.csv              optional ground truth for test_a, same format as train_mask.csv

Masks are decoded once per data set into a uint8 memmap cache (stored [N, W, H], each mask
column-major as the RLE paints it, and read as an [N, H, W] view) shared by every DataLoader worker
and epoch; the cache key is the CSV's content hash, so an edited CSV is decoded again. Masks are
only ever resized with nearest-neighbour (see ``build_transforms``).

Images travel as uint8 [3, H, W] tensors: normalisation happens on the device inside the model
(``pipeline.model.registry.SegModel``), which makes host-to-device copies 4x smaller than float32.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.core.config import AugConfig, DataConfig
from pipeline.data import DataError
from pipeline.data.images import check_listed_images, image_size, list_images, read_image
from pipeline.data.masks import DECODE_CHUNK, _on_disk, _Take, decode_masks, read_mask_csv, release_pages

# Batch keys: one spelling everywhere.
IMAGE, MASK, NAME, INDEX = "image", "mask", "name", "index"


# ----------------------------------------------------------------------------- splits


@dataclass
class Split:
    """One split of a data set: names, image files and (if known) masks.

    ``masks`` is indexable by position and yields uint8 [H, W] arrays of class ids (binary: 0/1;
    255 may mean ignore in multi-class layouts); an ``np.ndarray`` [N, H, W] for the competition.
    """

    names: list[str]
    image_paths: list[Path]
    masks: Sequence[np.ndarray] | np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.names)

    def subset(self, idx: Sequence[int]) -> Split:
        idx = list(idx)
        masks = None
        if self.masks is not None:
            # Fancy indexing would copy a memmap's masks into RAM (GBs for a large tiled scene set):
            # keep memmaps and lazy sequences as an index view instead.
            in_ram = isinstance(self.masks, np.ndarray) and not _on_disk(self.masks)
            masks = self.masks[np.asarray(idx, dtype=np.int64)] if in_ram else _Take(self.masks, idx)
        return Split([self.names[i] for i in idx], [self.image_paths[i] for i in idx], masks)

    def select(self, names: Sequence[str], hint: str = "") -> Split:
        """The tiles ``names``, in that order; all names missing from this split are named in one error."""
        index = {n: i for i, n in enumerate(self.names)}
        missing = [n for n in names if n not in index]
        if missing:
            raise DataError(
                f"{len(missing)} tiles are not in this data set ({', '.join(missing[:5])})"
                + (f"; {hint}" if hint else "")
            )
        return self.subset([index[n] for n in names])

    def foreground_fraction(self, ignore_index: int | None = None) -> np.ndarray:
        """Fraction of the labelled pixels that are not background (class 0) per tile, float [N].

        Binary masks (0/1) give the building fraction, which folds are stratified by. Pixels equal
        to ``ignore_index`` count in neither numerator nor denominator; a tile without a labelled
        pixel gives 0. Masks are read one at a time (a memmap of 30k tiles is never stacked).
        """
        if self.masks is None:
            raise DataError("this split has no masks")
        out = np.zeros(len(self))
        for i in range(len(self)):
            m = np.asarray(self.masks[i])
            labelled, foreground = m.size, np.count_nonzero(m)
            if ignore_index is not None:
                ignored = np.count_nonzero(m == ignore_index)
                labelled -= ignored
                foreground -= ignored if ignore_index != 0 else 0
            out[i] = foreground / labelled if labelled else 0.0
            if i % DECODE_CHUNK == DECODE_CHUNK - 1:
                release_pages(self.masks)
        release_pages(self.masks)
        return out


def load_labelled(root: Path, image_dir: str, csv_name: str) -> Split:
    """A labelled split of the competition layout: images in ``root/image_dir``, RLE in ``root/csv_name``."""
    csv_path = root / csv_name
    df = read_mask_csv(csv_path)
    names = df["name"].tolist()
    folder = root / image_dir
    check_listed_images(folder, names, csv_path)
    if not names:
        raise DataError(f"{csv_path} lists no tiles")
    shape = image_size(folder / names[0])
    masks = decode_masks(df["rle"].tolist(), shape, source=str(csv_path), names=names)
    return Split(names, [folder / n for n in names], masks)


def load_unlabelled(root: Path, image_dir: str, sample_csv: str) -> Split:
    """The test split in submission order, from the sample submission (or the folder if it is absent)."""
    csv_path = root / sample_csv
    folder = root / image_dir
    if csv_path.is_file():
        names = read_mask_csv(csv_path, require_rle=False)["name"].tolist()
        check_listed_images(folder, names, csv_path)
    else:
        names = list_images(folder)
        if not names:
            raise DataError(f"no {sample_csv} and no images in {folder}/: nothing to predict")
    return Split(names, [folder / n for n in names], None)


def load_pseudo_labels(data: DataConfig, ignore_index: int | None) -> Split:
    """The test tiles of ``data.pseudo_labels`` (``pipeline.infer.pseudo``'s .npz: ``names`` str [N],
    ``masks`` uint8 [N, H, W]: 1 building, 0 background, 255 uncertain), checked before any training. The
    images come from the test folder as the sample submission lists it; the test truth CSV is never read."""
    path, fix = Path(data.pseudo_labels), "remake it (make pseudo RUN=runs/<run>) or unset data.pseudo_labels"
    try:
        with np.load(path) as z:
            names, masks = [str(n) for n in z["names"]], z["masks"]
    except (OSError, KeyError, TypeError, ValueError) as e:  # missing, not an .npz, wrong arrays
        raise DataError(f"pseudo labels {path} cannot be read ({e}); {fix}") from None
    test = load_unlabelled(Path(data.root), data.test_dir, data.sample_csv)
    tiles = test.select(names, f"not test images of {data.root}, yet named in pseudo labels {path}; {fix}")
    want = sorted({(len(names), *image_size(p)) for p in tiles.image_paths})  # [(N, H, W)]: one tile size
    fits = [masks.shape] == want and masks.dtype == np.uint8
    bad = sorted(set(np.unique(masks).tolist()) - {0, 1, 255})
    for broken, what in (
        (len(set(names)) < len(names), "name some tiles twice"),
        (not fits, f"are {masks.dtype} {masks.shape}, not uint8 {want} (one mask per tile, its size)"),
        (bool(bad), f"hold mask values {bad[:5]}; allowed: 0 background, 1 building, 255 uncertain"),
        (ignore_index != 255, f"mark uncertain pixels 255: set loss.ignore_index=255 (not {ignore_index})"),
    ):
        if broken:
            raise DataError(f"pseudo labels {path} {what}; {fix}")
    return Split(tiles.names, tiles.image_paths, masks)


# ----------------------------------------------------------------------------- torch Dataset


def _sample_seed(base: int, epoch: int, index: int) -> int:
    """A seed per (run seed, epoch, sample): augmentation is identical whatever the number of workers."""
    return zlib.crc32(f"{base}:{epoch}:{index}".encode()) & 0x7FFFFFFF


class SegDataset(torch.utils.data.Dataset):
    """Images (and masks) with albumentations applied to both together.

    Items are dicts: ``IMAGE`` uint8 [3, H, W], ``MASK`` uint8 [H, W] (absent without masks),
    ``NAME`` str, ``INDEX`` int. Augmentation is seeded per sample from ``(seed, epoch, index)``,
    so runs are reproducible with any number of DataLoader workers; call :meth:`set_epoch` before
    each epoch. The epoch lives in shared memory, so persistent workers (started once per fold,
    not once per epoch) see the new value.
    """

    def __init__(self, split: Split, transform: Any = None, seed: int = 0):
        self.split = split
        self.transform = transform
        self.seed = seed
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    def set_epoch(self, epoch: int) -> None:
        self._epoch[0] = epoch

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> dict[str, Any]:
        image = read_image(self.split.image_paths[i])
        # np.array copies: the memmap is read-only and shared by all workers.
        mask = None if self.split.masks is None else np.array(self.split.masks[i], dtype=np.uint8)
        if mask is not None and mask.shape != image.shape[:2]:
            raise DataError(
                f"{self.split.image_paths[i]}: image is {image.shape[0]}x{image.shape[1]} but its mask is "
                f"{mask.shape[0]}x{mask.shape[1]}; masks must match their tiles"
            )
        if self.transform is not None:
            self.transform.set_random_seed(_sample_seed(self.seed, self.epoch, i))
            shape = image.shape[:2]
            out = self.transform(image=image, mask=mask) if mask is not None else self.transform(image=image)
            image, mask = out["image"], out.get("mask")
            if image.shape[:2] != shape and image.shape[:2] == shape[::-1]:
                # A D4 view that swaps the axes of a non-square tile (640x480): transposed back, it is
                # one of the four views that keep the shape, so a batch keeps one size.
                image = image.transpose(1, 0, 2)
                mask = None if mask is None else mask.T
        item: dict[str, Any] = {
            IMAGE: torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
            NAME: self.split.names[i],
            INDEX: i,
        }
        if mask is not None:
            item[MASK] = torch.from_numpy(np.ascontiguousarray(mask))
        return item


def build_transforms(aug: AugConfig, train: bool, crop_size: int = 0, ignore_index: int = 0) -> Any:
    """Albumentations pipeline applied to image and mask together; None when there is nothing to do.

    Geometric transforms use nearest-neighbour for masks (albumentations' default for masks, and
    ``mask_interpolation`` set explicitly so a class id can never be blended into a new one).
    ``crop_size`` > 0 pads (mask with ``ignore_index``) and crops to a fixed size, for data sets
    whose images differ in size (VOC); validation then uses a centre crop.
    """
    import cv2

    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import albumentations as A

    ops: list[Any] = []
    if crop_size:
        ops.append(
            A.PadIfNeeded(
                crop_size, crop_size, border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=ignore_index
            )
        )
        ops.append(A.RandomCrop(crop_size, crop_size) if train else A.CenterCrop(crop_size, crop_size))
    if train:
        if aug.d4:
            ops.append(A.D4(p=1.0))
        if aug.shift_scale_rotate_p > 0:
            ops.append(
                A.Affine(
                    translate_percent=(-aug.shift_limit, aug.shift_limit),
                    scale=(1 - aug.scale_limit, 1 + aug.scale_limit),
                    rotate=(-aug.rotate_limit, aug.rotate_limit),
                    interpolation=cv2.INTER_LINEAR,
                    mask_interpolation=cv2.INTER_NEAREST,
                    border_mode=cv2.BORDER_REFLECT_101,
                    p=aug.shift_scale_rotate_p,
                )
            )
        if aug.color_p > 0:
            ops.append(
                A.OneOf(
                    [
                        A.RandomBrightnessContrast(aug.brightness_limit, aug.contrast_limit, p=1.0),
                        A.HueSaturationValue(aug.hue_shift_limit, aug.sat_shift_limit, 10, p=1.0),
                    ],
                    p=aug.color_p,
                )
            )
    if not ops:
        return None
    return A.Compose(ops)
