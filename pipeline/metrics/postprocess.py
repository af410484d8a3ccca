"""Post-processing: threshold, drop small connected components, and search both on OOF predictions.

One rule everywhere: a pixel is a building when ``p > threshold`` with the comparison made in
float32. uint8 probabilities ``q`` (0..255) mean ``float32(q) / 255``; they are compared through a
256-entry lookup built from that same float32 expression, so uint8 and float32 inputs that hold the
same values always give the same mask.

:func:`search_threshold` picks the (threshold, min_area) pair that maximises the competition score,
mean per-image Dice with empty/empty = 1. It never re-labels per min_area: connected components are
computed once per (threshold, image) and every min_area is derived from the component areas.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import cv2
import numpy as np
import pandas as pd

from pipeline.core.config import InferConfig
from pipeline.metrics.pixel import dice_from_counts

__all__ = [
    "GridCounts",
    "SearchResult",
    "best_of",
    "binarize",
    "first_grid",
    "mean_dice_at",
    "remove_small_components",
    "search_extending",
    "search_threshold",
    "UNTUNED",
]

_DEFAULTS = InferConfig()
_CHUNK = 32  # images per vectorised step: bounds the temporary bool masks to 32 x H x W bytes


def _check_connectivity(connectivity: int) -> None:
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")


def remove_small_components(mask: np.ndarray, min_area: int, connectivity: int = 8) -> np.ndarray:
    """Drop connected components with fewer than ``min_area`` pixels.

    Args:
        mask: [H, W] bool or integer (non-zero = foreground).
        min_area: components of area >= ``min_area`` are kept; <= 1 keeps everything.
        connectivity: 8 (diagonal neighbours connect) or 4.

    Returns:
        uint8 [H, W] of 0/1.
    """
    if mask.ndim != 2:
        raise ValueError(f"remove_small_components expects a mask [H, W], got shape {mask.shape}")
    _check_connectivity(connectivity)
    binary = (mask != 0).view(np.uint8)
    if min_area <= 1:
        return binary.copy()
    n, labels, stats, _ = cv2.connectedComponentsWithStats(
        binary, connectivity=connectivity, ltype=cv2.CV_32S
    )
    keep = stats[:, cv2.CC_STAT_AREA] >= min_area
    keep[0] = False  # label 0 is the background
    return keep.view(np.uint8)[labels]


def _uint8_cutoff(threshold: float) -> int:
    """Smallest q in 0..256 with ``float32(q) / 255 > float32(threshold)``; q >= cutoff is foreground."""
    lut = np.arange(256, dtype=np.float32) / np.float32(255) > np.float32(threshold)
    return int(np.argmax(lut)) if lut.any() else 256


def _above(probs: np.ndarray, threshold: float) -> np.ndarray:
    """``probs > threshold`` as bool, for uint8 (0..255 scaled) or float probabilities."""
    if probs.dtype == np.uint8:
        return probs >= _uint8_cutoff(threshold)
    if probs.dtype.kind != "f":
        raise TypeError(
            f"probabilities must be uint8 (0..255) or float in [0, 1], got {probs.dtype}; "
            "convert with (p * 255).round().astype(np.uint8) or p.astype(np.float32)"
        )
    # A numpy float32 scalar (not a Python float) so float16 input is compared in float32 too.
    return probs > np.float32(threshold)


def binarize(
    probs: np.ndarray, threshold: float = 0.5, min_area: int = 0, connectivity: int = 8
) -> np.ndarray:
    """Threshold probabilities [H, W] (float in [0, 1] or uint8 0..255) and drop components < ``min_area``.

    Returns:
        uint8 [H, W] of 0/1.
    """
    if probs.ndim != 2:
        raise ValueError(f"binarize expects probabilities [H, W], got shape {probs.shape}")
    return remove_small_components(_above(probs, threshold), min_area, connectivity)


@dataclass(frozen=True, eq=False)
class SearchResult:
    """The best (threshold, min_area) and the whole grid: ``table`` has columns threshold, min_area, dice."""

    threshold: float
    min_area: int
    dice: float
    table: pd.DataFrame


def _small_component_losses(
    pred: np.ndarray, truth_idx: np.ndarray, min_areas: np.ndarray, connectivity: int
) -> tuple[np.ndarray, np.ndarray]:
    """Pixels and true positives removed by each min_area, from one labelling.

    Args:
        pred: uint8 [H, W] 0/1 mask at one threshold.
        truth_idx: flat indices of the truth's foreground pixels.
        min_areas: int64 [M].

    Returns:
        (removed_area, removed_inter), each int64 [M].
    """
    # Labels only, then areas by bincount over the foreground pixels: about 2x faster than
    # connectedComponentsWithStats, which also computes bounding boxes and centroids we do not use.
    n, labels = cv2.connectedComponents(pred, connectivity=connectivity, ltype=cv2.CV_32S)
    flat = labels.ravel()
    areas = np.bincount(flat[np.flatnonzero(pred)], minlength=n)[1:]
    zeros = np.zeros(len(min_areas), dtype=np.int64)
    small = areas < min_areas.max()
    if not small.any():  # only large components: no min_area in the grid removes anything
        return zeros, zeros
    inter = np.bincount(flat[truth_idx], minlength=n)[1:]  # label 0 (background) collects the misses
    # removed[m] = sum over components with area < m: sort the small ones by area, then cumulative sums.
    order = np.argsort(areas[small], kind="stable")
    sorted_areas = areas[small][order]
    cum_area = np.concatenate(([0], np.cumsum(sorted_areas, dtype=np.int64)))
    cum_inter = np.concatenate(([0], np.cumsum(inter[small][order], dtype=np.int64)))
    k = np.searchsorted(sorted_areas, min_areas, side="left")  # number of components with area < m
    return cum_area[k], cum_inter[k]


def _count_image(
    probs: np.ndarray, truth: np.ndarray, thresholds: list[float], min_areas: np.ndarray, connectivity: int
) -> tuple[np.ndarray, np.ndarray]:
    """|P & T| and |P|, int64 [T, M] each, of one image [H, W] for every (threshold, min_area)."""
    inter = np.zeros((len(thresholds), len(min_areas)), dtype=np.int64)
    pred_sum = np.zeros_like(inter)
    need_cc = bool((min_areas > 1).any())
    truth_idx = np.flatnonzero(truth) if need_cc else None
    for i, th in enumerate(thresholds):
        above = _above(probs, th)
        pred_sum[i] = np.count_nonzero(above)
        inter[i] = np.count_nonzero(above & truth)
        if need_cc and pred_sum[i, 0]:  # an empty prediction has no components to remove
            lost_area, lost_inter = _small_component_losses(
                above.view(np.uint8), truth_idx, min_areas, connectivity
            )
            pred_sum[i] -= lost_area
            inter[i] -= lost_inter
    return inter, pred_sum


def _count_chunk(
    probs: np.ndarray,
    truth: np.ndarray,
    thresholds: list[float],
    min_areas: np.ndarray,
    connectivity: int,
    pool: ThreadPoolExecutor,
) -> tuple[np.ndarray, np.ndarray]:
    """|P & T| and |P| for every (threshold, min_area, image) of a chunk.

    One task per image: the compares, counts and connected components of an image all run in the
    pool's threads (numpy and OpenCV release the GIL), so every core works on every step.

    Args:
        probs: [n, H, W] uint8 or float probabilities; truth: bool [n, H, W].

    Returns:
        (inter, pred_sum), each int64 [T, M, n].
    """
    if probs.dtype == np.float16:  # upcast once per chunk (exact) instead of once per threshold compare
        probs = probs.astype(np.float32)
    counts = list(
        pool.map(
            lambda j: _count_image(probs[j], truth[j], thresholds, min_areas, connectivity), range(len(probs))
        )
    )
    shape = (len(thresholds), len(min_areas), 0)
    inter = np.stack([c[0] for c in counts], axis=-1) if counts else np.zeros(shape, dtype=np.int64)
    pred_sum = np.stack([c[1] for c in counts], axis=-1) if counts else np.zeros(shape, dtype=np.int64)
    return inter, pred_sum


class GridCounts:
    """Per-image counts for every (threshold, min_area) of a grid, accumulated chunk by chunk.

    Streaming: :meth:`add` takes any number of images at a time (a chunk of an OOF file), so tuning
    30k OOF tiles holds one chunk of masks plus int64 counts [T, M, N] (~17 MB at 30k), never every
    probability map. :meth:`dice` turns the counts into per-image Dice [T, M, N] (empty/empty = 1).
    """

    def __init__(
        self,
        thresholds: Sequence[float],
        min_areas: Sequence[int],
        connectivity: int = 8,
        workers: int | None = None,
    ):
        if not len(thresholds) or not len(min_areas):
            raise ValueError("thresholds and min_areas must each have at least one value")
        _check_connectivity(connectivity)
        self.thresholds = [float(t) for t in thresholds]
        self.min_areas = np.asarray(min_areas, dtype=np.int64)
        self.connectivity = connectivity
        self._inter: list[np.ndarray] = []
        self._pred: list[np.ndarray] = []
        self._truth: list[np.ndarray] = []
        self._pool = ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1))

    def add(self, probs: np.ndarray, truths: np.ndarray, first: int = 0) -> None:
        """Count images ``probs`` [n, H, W] (uint8 or float in [0, 1]) against ``truths`` [n, H, W]
        (non-zero = building); ``first`` is the index of ``probs[0]`` in the whole set, for messages."""
        if probs.shape != truths.shape or probs.ndim != 3:
            raise ValueError(
                f"probs and truths must both be [N, H, W] with the same shape; got {probs.shape} and "
                f"{truths.shape} (are the OOF probabilities and masks for the same tiles, in the same order?)"
            )
        for start in range(0, len(probs), _CHUNK):
            p = probs[start : start + _CHUNK]
            if p.dtype.kind == "f" and (p.min() < 0 or p.max() > 1):
                lo, hi = first + start, first + start + len(p)
                raise ValueError(
                    f"probs[{lo}:{hi}] has values outside [0, 1] ({p.min():.3g}..{p.max():.3g}); "
                    "these look like logits: apply a sigmoid first"
                )
            t = np.asarray(truths[start : start + _CHUNK]) != 0
            self._truth.append(np.count_nonzero(t, axis=(1, 2)))
            inter, pred = _count_chunk(p, t, self.thresholds, self.min_areas, self.connectivity, self._pool)
            self._inter.append(inter)
            self._pred.append(pred)

    def __len__(self) -> int:
        return sum(len(t) for t in self._truth)

    def dice(self) -> np.ndarray:
        """Per-image Dice float64 [T, M, N] (the rule of :func:`pipeline.metrics.pixel.dice_per_image`)."""
        if not self._truth:
            raise ValueError("no image was counted")
        inter, pred = np.concatenate(self._inter, axis=2), np.concatenate(self._pred, axis=2)
        return dice_from_counts(inter, pred + np.concatenate(self._truth))

    def close(self) -> None:
        self._pool.shutdown()

    def __enter__(self) -> GridCounts:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def best_of(thresholds: Sequence[float], min_areas: Sequence[int], mean_dice: np.ndarray) -> SearchResult:
    """The best cell of a grid's mean Dice [T, M]; ties go to the first in grid order."""
    table = pd.DataFrame(
        {
            "threshold": np.repeat([float(t) for t in thresholds], len(min_areas)),
            "min_area": np.tile(np.asarray(min_areas, dtype=np.int64), len(thresholds)),
            "dice": np.asarray(mean_dice, dtype=np.float64).ravel(),
        }
    )
    best = int(np.argmax(table["dice"].to_numpy()))  # first maximum in grid order
    row = table.iloc[best]
    return SearchResult(float(row["threshold"]), int(row["min_area"]), float(row["dice"]), table)


# How far the search may widen a grid whose best value sits at its edge. Thresholds: probabilities are
# uint8 (1/255 steps), so the range stops a little inside (0, 1). Areas double until a cap (the tile's area).
THRESHOLD_RANGE = (0.01, 0.99)
MAX_WIDENINGS = 3  # streamed passes over the OOF files after the first; each widens every edge still hit


def widen_thresholds(grid: Sequence[float], best: float) -> list[float]:
    """New thresholds past the edge of ``grid`` where ``best`` sits, at the grid's own step, up to as
    many as the grid has and inside :data:`THRESHOLD_RANGE`; none when ``best`` is inside the grid."""
    values = sorted({float(t) for t in grid})
    lo, hi = THRESHOLD_RANGE
    step = min(np.diff(values)) if len(values) > 1 else 0.05
    if best <= values[0] and values[0] - step >= lo - 1e-9:
        new = [round(values[0] - k * step, 6) for k in range(1, len(values) + 1)]
        return sorted(t for t in new if t >= lo - 1e-9)
    if best >= values[-1] and values[-1] + step <= hi + 1e-9:
        new = [round(values[-1] + k * step, 6) for k in range(1, len(values) + 1)]
        return sorted(t for t in new if t <= hi + 1e-9)
    return []


def widen_min_areas(grid: Sequence[int], best: int, max_area: int) -> list[int]:
    """Larger minimum areas (doubling, below ``max_area``) when ``best`` is the largest of ``grid`` and
    not 0; none otherwise (0, removing nothing, is the lower end of the range)."""
    top = max(int(a) for a in grid)
    if best < top or top <= 0:
        return []
    return [a for a in (top * 2, top * 4, top * 8) if a < max_area]


Counter = Callable[[list[tuple[list[float], list[int]]]], list[np.ndarray]]


UNTUNED = ((0.5, 0),)  # the rule before tuning: counted beside every search for the @0.5 figures


def first_grid(
    thresholds: Sequence[float], min_areas: Sequence[int], extra: Sequence[tuple[float, int]] = ()
) -> tuple[list[float], list[int]]:
    """The grid of :func:`search_extending`'s first pass: the starting grid with the ``extra`` cells'
    values added (a pass counted beforehand on it is all the first pass needs)."""
    return (
        sorted({*(float(t) for t in thresholds), *(float(t) for t, _ in extra)}),
        sorted({*(int(a) for a in min_areas), *(int(a) for _, a in extra)}),
    )


def search_extending(
    count: Counter,
    thresholds: Sequence[float],
    min_areas: Sequence[int],
    max_area: int,
    extra: Sequence[tuple[float, int]] = (),
) -> tuple[SearchResult, dict[tuple[float, int], np.ndarray], list[str]]:
    """The best (threshold, min_area) of a grid that widens where its best value sits at an edge.

    Args:
        count: one streamed pass over the predictions: for each (thresholds, min_areas) grid given,
            the per-image Dice float64 [T, M, N] (e.g. :meth:`GridCounts.dice` of a pass over OOF files).
        thresholds, min_areas: the starting grid (``infer.thresholds`` x ``infer.min_areas``).
        max_area: widened min-areas stay below it (a tile's pixel count: a larger one removes everything).
        extra: cells counted in the first pass as well (e.g. (0.5, 0), the untuned rule).

    Returns:
        (result over the final grid, per-image Dice [N] of every counted cell, notes saying what was
        widened and why). While the best threshold is the lowest or highest of the grid, or the best
        min-area the largest, the grid is widened (:func:`widen_thresholds`, :func:`widen_min_areas`) and
        the new cells counted in one more pass, at most :data:`MAX_WIDENINGS` times: an optimum at the
        edge of a grid is usually past it.
    """
    thr, areas = sorted({float(t) for t in thresholds}), sorted({int(a) for a in min_areas})
    first_t, first_a = first_grid(thresholds, min_areas, extra)
    cells = _cells(first_t, first_a, count([(first_t, first_a)])[0])
    notes: list[str] = []
    for passes in range(MAX_WIDENINGS + 1):
        result = best_of(thr, areas, np.array([[cells[t, a].mean() for a in areas] for t in thr]))
        new_t = widen_thresholds(thr, result.threshold)
        new_a = widen_min_areas(areas, result.min_area, max_area)
        if passes == MAX_WIDENINGS or not (new_t or new_a):
            break
        if new_t:
            notes.append(
                f"the best threshold {result.threshold:g} was at the edge of the grid "
                f"{thr[0]:g}..{thr[-1]:g}: searched {min(new_t):g}..{max(new_t):g} too"
            )
        if new_a:
            notes.append(
                f"the best min_area {result.min_area} was the largest of the grid: "
                f"searched {', '.join(map(str, new_a))} too"
            )
        grids = [(new_t, areas + new_a)] if new_t else []
        grids += [(thr, new_a)] if new_a else []
        for (gt, ga), dice in zip(grids, count(grids)):
            cells |= _cells(gt, ga, dice)
        thr, areas = sorted({*thr, *new_t}), sorted({*areas, *new_a})
    return result, cells, notes


def _cells(
    thresholds: list[float], min_areas: list[int], dice: np.ndarray
) -> dict[tuple[float, int], np.ndarray]:
    return {(t, a): dice[i, j] for i, t in enumerate(thresholds) for j, a in enumerate(min_areas)}


def search_threshold(
    probs: np.ndarray,
    truths: np.ndarray,
    thresholds: Sequence[float] = _DEFAULTS.thresholds,
    min_areas: Sequence[int] = _DEFAULTS.min_areas,
    connectivity: int = 8,
    workers: int | None = None,
) -> SearchResult:
    """Grid-search threshold x min_area for the best mean per-image Dice (empty/empty = 1).

    Args:
        probs: [N, H, W] uint8 (0..255 meaning 0..1) or float16/float32 in [0, 1] (e.g. OOF probabilities).
        truths: [N, H, W] masks, non-zero = building.
        thresholds, min_areas: the grid; ties go to the first in grid order (lowest threshold, then
            lowest min_area).
        connectivity: 8 or 4, as in :func:`remove_small_components`.
        workers: threads for the connected-components step (OpenCV and numpy release the GIL);
            None = the number of CPUs, at most 8.

    Returns:
        :class:`SearchResult`; ``table`` has one row per (threshold, min_area) pair.

    Cost: per chunk of images and per threshold, one vectorised compare and three counts; then one
    connected-components call per (threshold, image) with a non-empty prediction. Every min_area
    comes from the component areas: removing components smaller than m lowers |P| by their area and
    |P & T| by their true positives. For data that does not fit in memory, feed :class:`GridCounts`
    chunk by chunk instead (``pipeline.train.tune`` does).
    """
    if probs.shape != truths.shape or probs.ndim != 3:
        raise ValueError(
            f"probs and truths must both be [N, H, W] with the same shape; got {probs.shape} and "
            f"{truths.shape} (are the OOF probabilities and masks for the same tiles, in the same order?)"
        )
    if len(probs) == 0:
        raise ValueError("search_threshold needs at least one image")
    with GridCounts(thresholds, min_areas, connectivity, workers) as counts:
        counts.add(probs, truths)
        return best_of(thresholds, min_areas, counts.dice().mean(axis=2))


def mean_dice_at(
    probs: np.ndarray, truths: np.ndarray, threshold: float, min_area: int = 0, connectivity: int = 8
) -> float:
    """Mean per-image Dice of probs [N, H, W] (uint8 or float, as in :func:`search_threshold`) against
    truths [N, H, W] at one (threshold, min_area): the same rule and counts as the search.
    """
    return search_threshold(probs, truths, (threshold,), (min_area,), connectivity).dice
