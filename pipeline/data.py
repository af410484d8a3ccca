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
(``pipeline.models.SegModel``), which makes host-to-device copies 4x smaller than float32.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap as mmap_mod
import os
import tempfile
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image

from pipeline import rle
from pipeline.config import AugConfig, DataConfig
from pipeline.errors import BuildsegError
from pipeline.io import temp_prefix
from pipeline.maskcsv import IMAGE_SUFFIXES, scan_csv

# Batch keys: one spelling everywhere.
IMAGE, MASK, NAME, INDEX = "image", "mask", "name", "index"

# Modes of more than 8 bits per pixel: read_image scales them to 8 bits (divided by 257 when any
# value is above 255), every other mode is converted by PIL (check_data warns about both).
DECODE_CHUNK = 256  # masks decoded (and scanned) per step: bounds the memory of a pass over all masks
HIGH_BIT_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")


class DataError(BuildsegError, ValueError):
    """Input data that cannot be used; the message names the file/row and how to fix it."""


# ----------------------------------------------------------------------------- files


def read_mask_csv(path: str | Path, require_rle: bool = True) -> pd.DataFrame:
    """Read a competition CSV (``name<TAB>rle``, no header) into a frame with str columns name, rle.

    The file is read by :func:`pipeline.maskcsv.scan_csv`: its errors (a comma-separated file, a
    header row, duplicate or empty names, a missing TAB, extra columns, ...) raise one DataError
    naming every row; its warnings (BOM, CRLF, blank lines, a trailing TAB) are tolerated, as
    ``check_data`` reports them. ``require_rle=False`` reads a sample submission (bare names allowed).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} not found: expected a TAB-separated name<TAB>rle file (no header)")
    scan = scan_csv(path, with_rle=require_rle)
    if scan.errors:
        raise DataError(scan.error_text())
    return pd.DataFrame(
        {
            "name": pd.Series([r.name for r in scan.rows], dtype=object),
            "rle": pd.Series([r.rle for r in scan.rows], dtype=object),
        }
    )


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
            "Restore the files or remove their rows (python -m pipeline.check_data DATA lists every problem)"
        )
    if unlisted:
        warnings.warn(
            f"{len(unlisted)} image(s) in {folder}/ are not listed in {csv_path} and are ignored: "
            + ", ".join(unlisted[:5]),
            stacklevel=2,
        )


# ----------------------------------------------------------------------------- masks, decoded once


def cache_dir() -> Path:
    """Decoded-mask cache: $BUILDSEG_CACHE or ./.cache/buildseg (the data folder may be read-only)."""
    return Path(os.environ.get("BUILDSEG_CACHE", ".cache/buildseg"))


def decode_masks(
    rles: Sequence[str], shape: tuple[int, int], source: str, names: Sequence[str] | None = None
) -> np.ndarray:
    """Decode a column of RLE strings once into a read-only uint8 memmap (cached by content); returns
    an [N, H, W] view of it.

    The memmap is shared by DataLoader workers through the page cache, so N masks cost their size
    once, not once per worker; a 17k-tile Inria split (4.5 GB of masks) never needs to fit in RAM.
    The file holds [N, W, H] (each mask column-major, the RLE's pixel order, which
    :func:`pipeline.rle.decode_many` writes without a transposed copy); the returned
    ``.transpose(0, 2, 1)`` makes ``masks[i]`` an F-contiguous [H, W] view.
    """
    h = hashlib.sha1(f"{shape}".encode())
    for r in rles:
        h.update(r.encode())
        h.update(b"\n")
    n = len(rles)
    # "-fw": the [N, W, H] layout (caches of the former [N, H, W] layout are not read as this one).
    path = cache_dir() / f"masks-{h.hexdigest()[:16]}-{n}x{shape[0]}x{shape[1]}-fw.u8"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        try:
            _write_decoded(tmp, rles, shape, source, names)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return np.load(path, mmap_mode="r").transpose(0, 2, 1)


def _write_decoded(
    path: Path, rles: Sequence[str], shape: tuple[int, int], source: str, names: Sequence[str] | None
) -> None:
    """The cache file ([N, W, H] uint8 .npy), decoded and written ``DECODE_CHUNK`` masks at a time.

    Plain writes, not a writable memmap: the process's memory stays one chunk, whatever N (a 30k-tile
    memmap written in place puts all 7.5 GB of its pages in the resident set). Every malformed row of
    every chunk is reported in one error.
    """
    n = len(rles)
    buf = np.empty((min(DECODE_CHUNK, max(n, 1)), shape[1], shape[0]), dtype=np.uint8)
    problems: list[str] = []
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": "|u1", "fortran_order": False, "shape": (n, shape[1], shape[0])}
        )
        for lo in range(0, n, DECODE_CHUNK):
            hi = min(lo + DECODE_CHUNK, n)
            chunk_names = names[lo:hi] if names is not None else None
            try:
                out = buf[: hi - lo].transpose(0, 2, 1)
                rle.decode_many(
                    rles[lo:hi], shape, out=out, source=source, names=chunk_names, first_row=lo + 1
                )
            except rle.RLEError as e:
                problems.extend(str(e).splitlines()[1:] or [str(e)])
                continue
            f.write(buf[: hi - lo].tobytes())
        f.flush()
        os.fsync(f.fileno())
    if problems:
        raise rle.RLEError(f"{len(problems)} malformed RLE value(s) in {source}:\n" + "\n".join(problems))


def release_pages(masks: Any) -> None:
    """Drop the pages of a memory-mapped mask cache from this process's resident set.

    They stay in the kernel's page cache (the next read is a memory copy, not a disk read), but a scan
    over 30k masks (folds, tuning) no longer counts 7.5 GB of file pages as its own memory. Call it
    between chunks of a scan; a no-op for masks that are not memory-mapped.
    """
    seq = masks.seq if isinstance(masks, _Take) else masks
    mm = getattr(seq, "_mmap", None)
    if mm is not None and hasattr(mmap_mod, "MADV_DONTNEED"):
        with contextlib.suppress(OSError, ValueError):
            mm.madvise(mmap_mod.MADV_DONTNEED)


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


def _on_disk(a: np.ndarray) -> bool:
    while a is not None:
        if isinstance(a, np.memmap):
            return True
        a = a.base if isinstance(a.base, np.ndarray) else None
    return False


class _Take:
    """A lazy view ``seq[idx[i]]`` of masks (a memmap or a lazy sequence), read one mask at a time.

    ``np.asarray(view)`` stacks it (uint8 [N, H, W]) for the few callers that want every mask at once.
    """

    def __init__(self, seq: Sequence[np.ndarray], idx: list[int]):
        self.seq, self.idx = seq, idx

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.seq[self.idx[i]]

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *np.shape(self.seq[self.idx[0]])) if self.idx else (0,)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        if not self.idx:
            return np.zeros((0, 0, 0), dtype=dtype or np.uint8)
        return np.stack([np.asarray(self.seq[i]) for i in self.idx]).astype(dtype or np.uint8, copy=False)


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
    """The test tiles of ``data.pseudo_labels`` (``pipeline.pseudo``'s .npz: ``names`` str [N], ``masks``
    uint8 [N, H, W]: 1 building, 0 background, 255 uncertain), checked before any training. The images
    come from the test folder as the sample submission lists it; the test truth CSV is never read."""
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
