"""``fold<k>/oof.npz``: a fold's out-of-fold predictions, written and read in chunks.

``names`` str [N]; binary runs: ``probs`` uint8 [N, H, W] (``round(p * 255)``); multi-class runs:
``labels`` uint8 [N, H, W] (class ids). A plain ``np.savez_compressed`` layout, streamed.

The OOF pass writes it through :func:`resumable_oof_writer`: finished chunks of tiles go to
``oof.npz.parts/`` as they come, so a killed pass (22 minutes for a fold of 90 tiles with D4 on a CPU)
resumes after its last chunk; the parts become ``oof.npz`` (:func:`oof_writer`) and are removed.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.io import atomic_write, atomic_write_text
from pipeline.data import DataError
from pipeline.data.layouts import Source
from pipeline.runs import RunError

OOF_KEYS = {True: "probs", False: "labels"}  # oof.npz array by task (binary?): probabilities, class ids


def oof_files(run_dir: str | Path) -> dict[int, Path]:
    """fold -> ``fold<k>/oof.npz`` of a run, for the folds that finished (the file is written last)."""
    run_dir = Path(run_dir)
    found = (f for f in run_dir.glob("fold*/oof.npz") if f.parent.name.removeprefix("fold").isdigit())
    return dict(sorted((int(f.parent.name.removeprefix("fold")), f) for f in found))


def oof_names(path: str | Path) -> list[str]:
    """The tile names of an ``oof.npz``, without reading its maps."""
    path = Path(path)
    try:
        with np.load(path) as z:
            if "names" not in z:
                raise RunError(
                    f"{path} must hold an array 'names'; it has {list(z.keys())}; retrain this fold"
                )
            return [str(n) for n in z["names"]]
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise RunError(f"{path} is not a readable OOF file ({e}); retrain this fold") from None


def oof_stamp(path: str | Path) -> str | None:
    """The ``stamp`` an ``oof.npz`` was written with (None: none, or not a readable file)."""
    try:
        with np.load(path) as z:
            return str(z["stamp"]) if "stamp" in z else None
    except (OSError, ValueError, zipfile.BadZipFile):
        return None


@contextlib.contextmanager
def oof_writer(
    path: str | Path, names: Sequence[str], key: str, stamp: str | None = None
) -> Iterator[Callable[[Sequence[int], Any], None]]:
    """Write an ``oof.npz`` (``names`` and ``key``: uint8 [N, H, W]) batch by batch, atomically.

    Yields ``write(indices, arrays)``; the arrays (uint8 [B, H, W], in dataset order) are streamed into
    the compressed zip as they arrive, so a fold's OOF maps are never held whole (6k tiles x 512 x 512
    = 1.5 GB at the competition's size). ``np.load`` reads the file like any ``np.savez_compressed``.
    ``stamp`` (optional) is kept as a member ``stamp``: what the maps come from (:func:`oof_stamp`).
    """
    path, n = Path(path), len(names)
    done, member = 0, None
    with atomic_write(path, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as zf:
        with zf.open("names.npy", "w", force_zip64=True) as m:
            np.lib.format.write_array(m, np.array([str(x) for x in names]))
        if stamp is not None:
            with zf.open("stamp.npy", "w") as m:
                np.lib.format.write_array(m, np.array(stamp))

        def write(indices: Sequence[int], arrays: Any) -> None:
            nonlocal done, member
            if list(indices) != list(range(done, done + len(arrays))):
                raise ValueError(f"{path}: OOF batches must come in dataset order, got {list(indices)[:4]}")
            arrays = np.ascontiguousarray(arrays, dtype=np.uint8)
            if member is None:
                member = zf.open(f"{key}.npy", "w", force_zip64=True)
                header = {"descr": "|u1", "fortran_order": False, "shape": (n, *arrays.shape[1:])}
                np.lib.format.write_array_header_1_0(member, header)
            member.write(arrays.tobytes())
            done += len(arrays)

        try:
            yield write
        finally:
            if member is not None:
                member.close()
        if done != n:
            raise ValueError(f"{path}: {done} OOF maps written for {n} tiles")


class OofParts:
    """The finished chunks of an OOF pass in ``<oof.npz>.parts/``: ``done`` tiles so far, in dataset
    order; :meth:`write` buffers maps and saves every ``chunk`` tiles as ``<start>-<end>.npy``."""

    def __init__(self, folder: Path, n: int, chunk: int):
        self.folder, self.n, self.chunk = folder, n, chunk
        self.done = 0  # tiles saved
        for f in sorted(folder.glob("*.npy")):  # contiguous from 0; anything after a gap is redone
            start, _, end = f.stem.partition("-")
            if start.isdigit() and end.isdigit() and int(start) == self.done and self.done < int(end) <= n:
                self.done = int(end)
            else:
                f.unlink()
        self.buffer: list[np.ndarray] = []

    @property
    def buffered(self) -> int:
        return sum(len(a) for a in self.buffer)

    def write(self, indices: Sequence[int], arrays: Any) -> None:
        """Maps uint8 [B, H, W] of dataset ``indices``, which must continue where the pass stands."""
        at = self.done + self.buffered
        if list(indices) != list(range(at, at + len(arrays))):
            raise ValueError(
                f"{self.folder}: OOF batches must come in dataset order from {at}, got {list(indices)[:4]}"
            )
        self.buffer.append(np.ascontiguousarray(arrays, dtype=np.uint8))
        if self.buffered >= self.chunk:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        arr = np.concatenate(self.buffer)
        with atomic_write(self.folder / f"{self.done:08d}-{self.done + len(arr):08d}.npy", "wb") as f:
            np.save(f, arr)
        self.done += len(arr)
        self.buffer = []

    def parts(self) -> Iterator[tuple[int, np.ndarray]]:
        for f in sorted(self.folder.glob("*.npy")):
            yield int(f.stem.partition("-")[0]), np.load(f)


@contextlib.contextmanager
def resumable_oof_writer(
    path: str | Path, names: Sequence[str], key: str, stamp: str, chunk: int = 64
) -> Iterator[OofParts]:
    """Write ``path`` (an ``oof.npz``, as :func:`oof_writer`) from chunks that survive a kill.

    Yields :class:`OofParts`: ``parts.done`` tiles are already saved (skip them), ``parts.write(indices,
    arrays)`` takes the rest in dataset order. ``stamp`` names what the maps come from (the checkpoint's
    hash, the TTA set, the precision): parts of another stamp, or of other names, are thrown away. A
    failure inside the block saves the complete maps buffered so far and keeps the parts; at the end
    they are streamed into ``path`` and removed.
    """
    path = Path(path)
    folder = path.with_name(path.name + ".parts")
    meta = {"stamp": stamp, "key": key, "names": [str(x) for x in names]}
    meta_path = folder / "meta.json"
    if folder.is_dir() and (not meta_path.is_file() or json.loads(meta_path.read_text()) != meta):
        shutil.rmtree(folder)  # another checkpoint, TTA set or split: nothing there can be reused
    if not folder.is_dir():
        folder.mkdir(parents=True)
        atomic_write_text(meta_path, json.dumps(meta))
    parts = OofParts(folder, len(names), chunk)
    try:
        yield parts
    except BaseException:
        with contextlib.suppress(Exception):  # keep what is complete; the error that stopped us is raised
            parts.flush()
        raise
    parts.flush()
    if parts.done != len(names):
        raise ValueError(f"{path}: {parts.done} OOF maps written for {len(names)} tiles")
    with oof_writer(path, names, key, stamp) as write:
        for start, arr in parts.parts():
            write(range(start, start + len(arr)), arr)
    shutil.rmtree(folder)


def oof_chunks(path: str | Path, key: str, chunk: int = 64) -> Iterator[tuple[list[str], np.ndarray]]:
    """Stream an ``oof.npz`` member ``key`` (``probs`` or ``labels``, uint8 [N, H, W]) in chunks of
    ``chunk`` images: yields (names [n], array [n, H, W]).

    The member is read straight out of the (compressed) zip, ``chunk`` rows at a time, so tuning a
    30k-tile run never holds a whole fold's maps (6k x 512 x 512 = 1.5 GB) in memory.
    """
    path = Path(path)
    with np.load(path) as z:
        if "names" not in z or key not in z:
            raise RunError(f"{path} must hold arrays 'names' and '{key}'; it has {list(z.keys())}; retrain")
        names = [str(n) for n in z["names"]]
    with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as f:
        version = np.lib.format.read_magic(f)
        fmt = np.lib.format
        read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        if fortran or len(shape) != 3 or shape[0] != len(names):
            raise RunError(f"{path}: '{key}' is {shape} (fortran={fortran}) for {len(names)} names; retrain")
        row = int(np.prod(shape[1:])) * dtype.itemsize
        for start in range(0, shape[0], chunk):
            n = min(chunk, shape[0] - start)
            buf = f.read(n * row)
            if len(buf) != n * row:
                raise RunError(f"{path}: '{key}' ends early (truncated file); retrain this fold")
            yield names[start : start + n], np.frombuffer(buf, dtype=dtype).reshape(n, *shape[1:])


def oof_truths(source: Source, names: Sequence[str], maps: np.ndarray, path: Path, check_size: bool) -> Any:
    """The truth masks [n, H, W] of an OOF chunk's tiles ``names``, from the data being tuned on.

    Raises DataError naming ``path`` when a tile is not in that data or (``check_size``: binary maps;
    multi-class ones may be crops) the maps [n, H, W] are not the masks' size: the data is not the run's.
    """
    truths = source.train.select(names, f"OOF tiles of {path}: is DATA the run's data?").masks
    if check_size and np.shape(truths)[1:] != maps.shape[1:]:
        raise DataError(
            f"{path}: the OOF maps are {maps.shape[1]}x{maps.shape[2]} but the masks of "
            f"{source.train.image_paths[0].parent} are {np.shape(truths)[1]}x{np.shape(truths)[2]}; "
            "is DATA the data the run was trained on? (make tune RUN=... DATA=<its data>)"
        )
    return truths
