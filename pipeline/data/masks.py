"""Masks decoded once: the competition CSV read into a memory-mapped uint8 cache every worker shares.

The cache (``$BUILDSEG_CACHE``, default ``.cache/masks``) is stored [N, W, H], each mask column-major
as the RLE paints it, and read as an [N, H, W] view; its key is the CSV's content hash, so an edited
CSV is decoded again. It is written chunk by chunk (temp file + rename) and scans drop the pages they
have read (:func:`release_pages`), so no pass over 30k masks holds them all.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap as mmap_mod
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.core.io import temp_prefix
from pipeline.data import DataError, rle
from pipeline.data.maskcsv import scan_csv

# Modes of more than 8 bits per pixel: read_image scales them to 8 bits (divided by 257 when any
# value is above 255), every other mode is converted by PIL (check_data warns about both).
DECODE_CHUNK = 256  # masks decoded (and scanned) per step: bounds the memory of a pass over all masks


# ----------------------------------------------------------------------------- files


def read_mask_csv(path: str | Path, require_rle: bool = True) -> pd.DataFrame:
    """Read a competition CSV (``name<TAB>rle``, no header) into a frame with str columns name, rle.

    The file is read by :func:`pipeline.data.maskcsv.scan_csv`: its errors (a comma-separated file, a
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
    :func:`pipeline.data.rle.decode_many` writes without a transposed copy); the returned
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
