"""The blended out-of-fold predictions of several runs: weights, thresholds and the nested estimate.

What :mod:`pipeline.infer.blend` (``make blend``) chooses with, on the OOF maps of runs that hold out the
same tiles (:class:`RunOOF`), streamed from every run at once a chunk at a time:

* :func:`score_weights`: per-tile Dice float32 [C, T, N] of every weight vector of :func:`weight_grid` at
  every threshold (no component filter), in one pass; :func:`choose` picks on any subset of tiles;
* :class:`Cells` + :func:`tune_blend`: threshold and min-area of a blend as ``make tune`` chooses them
  (:func:`pipeline.metrics.postprocess.search_extending` over ``GridCounts`` passes);
* :func:`held_out_parts`: the parts the nested estimate holds out (folds, or parts of a single fold).

Blended probabilities: ``p = sum_r k_r * q_r / (255 * G)`` for uint8 OOF maps ``q_r`` and weights
``k_r / G`` (integers ``k_r`` summing to ``G``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.config import DataConfig
from pipeline.core.errors import BuildsegError
from pipeline.core.progress import progress
from pipeline.data import DataError
from pipeline.data.folds import group_csv_of, make_folds, read_groups
from pipeline.data.layouts import Source
from pipeline.data.masks import release_pages
from pipeline.metrics import postprocess
from pipeline.metrics.pixel import dice_from_counts
from pipeline.runs.manifest import Manifest
from pipeline.runs.oof import OOF_KEYS, oof_chunks, oof_truths

MAX_CANDIDATES = 100  # weight vectors scored: float32 [100, 9, 30k] per-tile Dice is 108 MB
FINEST = 10  # weight steps of 0.1 where the candidates fit
NESTED_PARTS = 5  # held-out parts of a single OOF fold
CHUNK = 32  # tiles per streamed chunk of every run


class BlendError(BuildsegError, ValueError):
    """Runs that cannot be blended; the message names the run and the fix."""


@dataclass(frozen=True)
class RunOOF:
    """A run to blend: its folder, manifest, folds hash, OOF files and their tiles by fold, tile size."""

    path: Path
    manifest: Manifest
    folds_hash: str
    oof: dict[int, Path]
    names: dict[int, list[str]]
    shape: tuple[int, int]


def weight_grid(n_runs: int, steps: int) -> np.ndarray:
    """Every vector of ``n_runs`` non-negative integers summing to ``steps`` (weights ``k / steps``),
    int64 [C, n_runs], the first run's share falling first."""

    def grid(n: int, total: int) -> Iterator[tuple[int, ...]]:
        if n == 1:
            yield (total,)
            return
        for k in range(total, -1, -1):
            for rest in grid(n - 1, total - k):
                yield (k, *rest)

    return np.array(list(grid(n_runs, steps)), dtype=np.int64)


def grid_steps(n_runs: int) -> int:
    """The finest step count up to :data:`FINEST` whose grid has at most :data:`MAX_CANDIDATES` vectors
    (1 for a single run: its weight is 1)."""
    if n_runs == 1:
        return 1
    return next(
        (g for g in range(FINEST, 1, -1) if math.comb(g + n_runs - 1, n_runs - 1) <= MAX_CANDIDATES), 1
    )


def blend_sum(arrays: Sequence[np.ndarray], numerators: Sequence[int]) -> np.ndarray:
    """``sum_r k_r * q_r`` of uint8 maps [n, H, W] as uint16 (at most 255 * steps, steps <= 257)."""
    out = None
    for a, k in zip(arrays, numerators):
        if k:
            term = a.astype(np.uint16)
            term *= np.uint16(k)
            out = term if out is None else np.add(out, term, out=out)
    return out if out is not None else np.zeros(arrays[0].shape, np.uint16)


def blend_probs(arrays: Sequence[np.ndarray], numerators: Sequence[int], steps: int) -> np.ndarray:
    """The blended probabilities [n, H, W]: ``blend_sum / (255 * steps)`` as float32, or a run's own uint8
    maps when it has all the weight: what ``make tune`` counts, and 4x less to compare. (Division is
    correctly rounded: float32 ``k * q / (255 * k)`` is ``float32(q) / 255``, the value uint8 ``q`` means.)"""
    alone = [a for a, k in zip(arrays, numerators) if k]
    if len(alone) == 1:
        return alone[0]
    return blend_sum(arrays, numerators).astype(np.float32) / np.float32(255 * steps)


def _read(
    runs: list[RunOOF], source: Source
) -> Iterator[tuple[int, list[str], list[np.ndarray], np.ndarray]]:
    """(fold, names [n], uint8 OOF maps [n, H, W] of every run, truths bool [n, H, W]), streamed."""
    for fold in runs[0].oof:
        streams = [oof_chunks(r.oof[fold], OOF_KEYS[True], CHUNK) for r in runs]
        for parts in zip(*streams):
            names = parts[0][0]
            try:
                truths = oof_truths(source, names, parts[0][1], runs[0].oof[fold], check_size=True)
            except DataError as e:
                raise BlendError(str(e)) from None
            truth = np.asarray(truths) != 0  # a copy: the pages can go
            release_pages(source.train.masks)  # a scan of every mask must not keep them resident
            yield fold, names, [a for _, a in parts], truth


def _chunks(
    runs: list[RunOOF], source: Source
) -> Iterator[tuple[int, list[str], list[np.ndarray], np.ndarray]]:
    """:func:`_read`'s chunks, the next one read in a thread while this one is counted (zlib, file reads
    and mask copies release the GIL: reading overlaps counting)."""
    total = sum(len(v) for v in runs[0].names.values())
    chunks = _read(runs, source)
    with progress(total, f"blend {len(runs)} runs", unit="tile") as bar, ThreadPoolExecutor(1) as reader:
        ahead = reader.submit(next, chunks, None)
        while (chunk := ahead.result()) is not None:
            ahead = reader.submit(next, chunks, None)
            yield chunk
            bar.update(len(chunk[1]))


def _cutoffs(steps: int, thresholds: Sequence[float]) -> list[int]:
    """Per threshold, the smallest blend sum that is foreground: the rule of
    :func:`pipeline.metrics.postprocess.binarize`, read off a ramp of every level."""
    ramp = (np.arange(255 * steps + 1, dtype=np.float32) / np.float32(255 * steps))[None]
    out = []
    for t in thresholds:
        fg = postprocess.binarize(ramp, t)[0]
        out.append(int(np.argmax(fg)) if fg.any() else 255 * steps + 1)
    return out


def score_weights(
    runs: list[RunOOF], source: Source, candidates: np.ndarray, steps: int, thresholds: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Per-tile Dice float32 [C, T, N] of every weight vector at every threshold (no component filter),
    and the fold of every tile int64 [N], in one streamed pass over every run's OOF files."""
    cut = _cutoffs(steps, thresholds)
    parts, folds = [], []

    def count(s: np.ndarray, truth: np.ndarray) -> tuple[list[int], list[int]]:
        on_truth = s[truth]
        return [np.count_nonzero(on_truth >= c) for c in cut], [np.count_nonzero(s >= c) for c in cut]

    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        for fold, names, arrays, truths in _chunks(runs, source):
            out = np.empty((len(candidates), len(cut), len(names)), np.float32)
            truth_px = np.count_nonzero(truths, axis=(1, 2))[:, None]
            for c, k in enumerate(candidates):
                s = blend_sum(arrays, k)
                counts = list(pool.map(count, s, truths))
                inter = np.array([x for x, _ in counts], np.int64)  # [n, T]
                pred = np.array([y for _, y in counts], np.int64)
                out[c] = dice_from_counts(inter, pred + truth_px).T
            parts.append(out)
            folds += [fold] * len(names)
    return np.concatenate(parts, axis=2), np.asarray(folds, dtype=np.int64)


def choose(dice: np.ndarray, tiles: np.ndarray) -> int:
    """The candidate whose best threshold has the highest mean Dice over ``tiles`` (bool [N]); ties: the
    first. ``dice``: float32 [C, T, N] from :func:`score_weights`."""
    mean = dice[:, :, tiles].mean(axis=2, dtype=np.float64)
    return int(np.argmax(mean.max(axis=1)))


class Cells:
    """Per-tile Dice float64 [N] of (threshold, min-area) cells of blends, counted on demand with
    :class:`pipeline.metrics.postprocess.GridCounts` in streamed passes (several blends share a pass)."""

    def __init__(self, runs: list[RunOOF], source: Source, steps: int) -> None:
        self.runs, self.source, self.steps = runs, source, steps
        self.cells: dict[tuple[int, ...], dict[tuple[float, int], np.ndarray]] = {}

    def count(self, requests: dict[tuple[int, ...], list[tuple[list[float], list[int]]]]) -> None:
        """One pass over the OOF files counting, for each weight vector, every grid asked for."""
        tallies = {
            (w, i): postprocess.GridCounts(t, a)
            for w, grids in requests.items()
            for i, (t, a) in enumerate(grids)
        }
        try:
            n = 0
            for _, names, arrays, truths in _chunks(self.runs, self.source):
                for w, grids in requests.items():
                    probs = blend_probs(arrays, w, self.steps)
                    for i in range(len(grids)):
                        tallies[w, i].add(probs, truths, first=n)
                n += len(names)
            for (w, i), tally in tallies.items():
                dice = tally.dice()
                t, a = requests[w][i]
                cells = self.cells.setdefault(w, {})
                cells.update(
                    {(float(x), int(y)): dice[j, m] for j, x in enumerate(t) for m, y in enumerate(a)}
                )
        finally:
            for tally in tallies.values():
                tally.close()

    def counter(self, weights: tuple[int, ...], tiles: np.ndarray) -> postprocess.Counter:
        """A ``count`` for :func:`pipeline.metrics.postprocess.search_extending`: the Dice of the blend
        ``weights`` on ``tiles`` (bool [N]), passing over the files only for cells not counted yet."""

        def count(grids: list[tuple[list[float], list[int]]]) -> list[np.ndarray]:
            have = self.cells.get(weights, {})
            todo = [(t, a) for t, a in grids if any((float(x), int(y)) not in have for x in t for y in a)]
            if todo:
                self.count({weights: todo})
            cells = self.cells[weights]
            return [np.array([[cells[float(x), int(y)][tiles] for y in a] for x in t]) for t, a in grids]

        return count


def held_out_parts(
    folds: np.ndarray, names: list[str], source: Source, data: DataConfig, seed: int
) -> tuple[np.ndarray | None, str]:
    """The part each tile is held out in for the nested Dice, int64 [N] (None: fewer than 2), and how."""
    if len(set(folds.tolist())) > 1:
        return folds, "folds"
    group_csv = group_csv_of(Path(data.root), data.group_csv)
    groups = read_groups(group_csv, names) if group_csv is not None else None
    units = len(set(groups)) if groups is not None else len(names)
    parts = min(NESTED_PARTS, units)
    if parts < 2:
        return None, f"not computed: one fold of {units} {'groups' if groups else 'tiles'}"
    fractions = source.train.select(names).foreground_fraction()
    split = make_folds(names, fractions, parts, seed, groups)
    part_of = dict(zip(split["name"], split["fold"]))
    by = "scene groups" if groups is not None else "tiles"
    return np.array([part_of[n] for n in names], np.int64), f"{parts} parts of fold {folds[0]} ({by})"


def tune_blend(
    cells: Cells, weights: tuple[int, ...], tiles: np.ndarray, infer: Any, tile_area: int
) -> tuple[postprocess.SearchResult, list[str]]:
    """Threshold and min-area of the blend ``weights`` on ``tiles`` (bool [N]), as ``make tune`` chooses
    them: the grid of ``infer``, widened at an edge, (0.5, 0) counted too."""
    counter = cells.counter(weights, tiles)
    result, _, notes = postprocess.search_extending(
        counter, infer.thresholds, infer.min_areas, tile_area, postprocess.UNTUNED
    )
    return result, notes
