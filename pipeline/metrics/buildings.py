"""Per-building scores: predicted and true buildings matched one to one at IoU >= 0.5 (SpaceNet's rule).

Pixel Dice says how much building area is right; it does not say how many buildings were found. Here
a building is an object: an 8-connected component of a mask (competition tiles; the connectivity of the
component filter in :mod:`pipeline.metrics.postprocess`) or a polygon (scenes, see
:mod:`pipeline.infer.footprints`).
A prediction and a truth are a match (true positive) when their IoU is >= 0.5; every building is in at
most one match. Unmatched predictions are false positives, unmatched truths false negatives:

    precision = TP / (TP + FP)     recall = TP / (TP + FN)     F1 = 2 TP / (2 TP + FP + FN)

with 1.0 when the denominator is 0 (nothing to find and nothing found is right, as the competition's
empty/empty Dice is 1). A prediction that splits a building in two halves below IoU 0.5 scores two FP
and one FN; one prediction that merges two buildings scores one FP and two FN.

Sizes: a match and a false negative count in the size class of the true building, a false positive in
its own. Classes are COCO's edges, small < 32² px <= medium < 96² px <= large, for masks; for polygons
in m², small < 100 m² <= medium < 1,000 m² <= large (about the same sizes at 0.3 m pixels).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

IOU_THRESHOLD = 0.5
SIZE_NAMES = ("small", "medium", "large")
PIXEL_SIZE_BINS = (32.0**2, 96.0**2)  # px: COCO's small / medium / large
M2_SIZE_BINS = (100.0, 1000.0)  # m²
CONNECTIVITY = (
    8  # the component filter's (pipeline.metrics.postprocess): diagonal neighbours are one building
)


@dataclass(frozen=True)
class Matches:
    """One-to-one matches between ``n_pred`` predicted and ``n_truth`` true buildings.

    Attributes:
        pred, truth: int64 [M] indices of the matched buildings (pairs). iou: float64 [M].
        pred_area, truth_area: float64 [n_pred], [n_truth] (pixels or m²; they pick the size class).
    """

    pred: np.ndarray
    truth: np.ndarray
    iou: np.ndarray
    pred_area: np.ndarray
    truth_area: np.ndarray

    @property
    def pred_matched(self) -> np.ndarray:
        """bool [n_pred]: True for true positives."""
        out = np.zeros(len(self.pred_area), dtype=bool)
        out[self.pred] = True
        return out

    @property
    def truth_matched(self) -> np.ndarray:
        """bool [n_truth]: True for found buildings (False = false negative)."""
        out = np.zeros(len(self.truth_area), dtype=bool)
        out[self.truth] = True
        return out


def match_pairs(
    pred_idx: np.ndarray,
    truth_idx: np.ndarray,
    inter: np.ndarray,
    pred_area: np.ndarray,
    truth_area: np.ndarray,
    iou_threshold: float = IOU_THRESHOLD,
) -> Matches:
    """Match buildings one to one from the areas of their overlapping pairs.

    Args:
        pred_idx, truth_idx, inter: [P] the overlapping pairs and their intersection area.
        pred_area: [n_pred], truth_area: [n_truth] areas in the same unit as ``inter``.

    Pairs are taken in decreasing IoU (ties: lower prediction, then truth index first) while both are
    free. Buildings of one set never overlap each other, so above 0.5 a building has at most one
    partner and this is the same as SpaceNet's per-proposal rule; the order only settles exact ties.
    """
    pred_area = np.asarray(pred_area, dtype=np.float64)
    truth_area = np.asarray(truth_area, dtype=np.float64)
    pi, ti = np.asarray(pred_idx, dtype=np.int64), np.asarray(truth_idx, dtype=np.int64)
    inter = np.asarray(inter, dtype=np.float64)
    union = pred_area[pi] + truth_area[ti] - inter
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    keep = iou >= iou_threshold
    pi, ti, iou = pi[keep], ti[keep], iou[keep]
    order = np.lexsort((ti, pi, -iou))
    used_p, used_t = set(), set()
    chosen = []
    for k in order:
        if pi[k] not in used_p and ti[k] not in used_t:
            used_p.add(pi[k])
            used_t.add(ti[k])
            chosen.append(k)
    chosen = np.asarray(chosen, dtype=np.int64)
    return Matches(pi[chosen], ti[chosen], iou[chosen], pred_area, truth_area)


# ----------------------------------------------------------------------------- counts and scores


def _size_class(area: np.ndarray, bins: Sequence[float]) -> np.ndarray:
    """int [n] in 0..2: small (< bins[0]), medium, large (>= bins[1])."""
    return np.searchsorted(np.asarray(bins, dtype=np.float64), area, side="right")


@dataclass(frozen=True)
class BuildingCounts:
    """TP, FP and FN per size class (int64 [3]: small, medium, large); add them up over tiles."""

    tp: np.ndarray
    fp: np.ndarray
    fn: np.ndarray

    @classmethod
    def zeros(cls) -> BuildingCounts:
        z = np.zeros(len(SIZE_NAMES), dtype=np.int64)
        return cls(z, z.copy(), z.copy())

    @classmethod
    def from_matches(cls, m: Matches, bins: Sequence[float]) -> BuildingCounts:
        n = len(SIZE_NAMES)
        truth_cls, pred_cls = _size_class(m.truth_area, bins), _size_class(m.pred_area, bins)
        tp = np.bincount(truth_cls[m.truth], minlength=n)
        fn = np.bincount(truth_cls[~m.truth_matched], minlength=n)
        fp = np.bincount(pred_cls[~m.pred_matched], minlength=n)
        return cls(tp.astype(np.int64), fp.astype(np.int64), fn.astype(np.int64))

    def __add__(self, other: BuildingCounts) -> BuildingCounts:
        return BuildingCounts(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn)

    def report(
        self, bins: Sequence[float], unit: str, iou_threshold: float = IOU_THRESHOLD
    ) -> dict[str, Any]:
        """Plain data for JSON: totals and precision/recall/F1, overall and ``by_size``."""
        edges = [0.0, *bins, None]
        by_size = {
            name: {"min": edges[i], "max": edges[i + 1], **_prf(self.tp[i], self.fp[i], self.fn[i])}
            for i, name in enumerate(SIZE_NAMES)
        }
        total = _prf(self.tp.sum(), self.fp.sum(), self.fn.sum())
        return {"iou_threshold": iou_threshold, "unit": unit, **total, "by_size": by_size}


def _prf(tp: Any, fp: Any, fn: Any) -> dict[str, Any]:
    tp, fp, fn = int(tp), int(fp), int(fn)
    return {
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "precision": tp / (tp + fp) if tp + fp else 1.0,
        "recall": tp / (tp + fn) if tp + fn else 1.0,
        "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0,
    }


def format_report(report: dict[str, Any]) -> str:
    """Two to five lines: the overall scores, then one line per size class that has buildings."""

    def line(name: str, r: dict[str, Any]) -> str:
        return (
            f"{name:<10} P {r['precision']:.4f}  R {r['recall']:.4f}  F1 {r['f1']:.4f}  "
            f"(TP {r['tp']}, FP {r['fp']}, FN {r['fn']})"
        )

    unit = report["unit"]
    out = [f"buildings matched one to one at IoU >= {report['iou_threshold']:g}:", line("all", report)]
    for name, r in report["by_size"].items():
        if r["tp"] + r["fp"] + r["fn"]:
            hi = f"< {r['max']:g} {unit}" if r["max"] is not None else ""
            lo = f">= {r['min']:g} {unit}" if r["min"] else ""
            out.append(line(name, r) + f"  [{' '.join(s for s in (lo, hi) if s)}]")
    return "\n".join(out)


# ----------------------------------------------------------------------------- masks (tiles)


def label_components(mask: np.ndarray) -> tuple[int, np.ndarray]:
    """The buildings of a mask [H, W] (non-zero = building): (count n, int32 labels [H, W] in 0..n).

    Labels follow raster order of each building's first pixel (OpenCV's), 0 = background.
    """
    n, labels = cv2.connectedComponents(
        (mask != 0).view(np.uint8), connectivity=CONNECTIVITY, ltype=cv2.CV_32S
    )
    return n - 1, labels


def match_masks(pred: np.ndarray, truth: np.ndarray, iou_threshold: float = IOU_THRESHOLD) -> Matches:
    """Match the components of two masks [H, W]; indices are component label - 1, areas in pixels."""
    if pred.shape != truth.shape or pred.ndim != 2:
        raise ValueError(
            f"match_masks expects two masks [H, W] of one shape, got {pred.shape} and {truth.shape}"
        )
    n_p, lp = label_components(pred)
    n_t, lt = label_components(truth)
    pred_area = np.bincount(lp.ravel(), minlength=n_p + 1)[1:]
    truth_area = np.bincount(lt.ravel(), minlength=n_t + 1)[1:]
    both = np.flatnonzero((lp != 0) & (lt != 0))
    # Overlapping pairs from the pixels both cover: one int64 key per pixel, counted once.
    keys, inter = np.unique(
        lp.ravel()[both].astype(np.int64) * (n_t + 1) + lt.ravel()[both], return_counts=True
    )
    return match_pairs(
        keys // (n_t + 1) - 1, keys % (n_t + 1) - 1, inter, pred_area, truth_area, iou_threshold
    )


def score_masks(
    preds: np.ndarray,
    truths: np.ndarray,
    iou_threshold: float = IOU_THRESHOLD,
    bins: Sequence[float] = PIXEL_SIZE_BINS,
) -> dict[str, Any]:
    """Per-building scores of masks [N, H, W] against truths [N, H, W], counts summed over the tiles.

    Buildings are matched within each tile (a building cut by a tile border is two buildings, as the
    competition's tiles have it). Returns :meth:`BuildingCounts.report` in pixels.
    """
    if preds.shape != truths.shape or preds.ndim != 3:
        raise ValueError(f"score_masks expects [N, H, W] of one shape, got {preds.shape} and {truths.shape}")
    total = BuildingCounts.zeros()
    for p, t in zip(preds, truths):
        total = total + BuildingCounts.from_matches(match_masks(p, t, iou_threshold), bins)
    return total.report(bins, "px", iou_threshold)


# ----------------------------------------------------------------------------- polygons (scenes)


def match_polygons(
    pred: Sequence[Any], truth: Sequence[Any], iou_threshold: float = IOU_THRESHOLD
) -> Matches:
    """Match shapely (multi)polygons in one projected CRS; areas in its units (m² for metres)."""
    import shapely

    pred_g = np.asarray(pred, dtype=object)
    truth_g = np.asarray(truth, dtype=object)
    pred_area, truth_area = shapely.area(pred_g).astype(np.float64), shapely.area(truth_g).astype(np.float64)
    if not len(pred_g) or not len(truth_g):
        empty = np.zeros(0, dtype=np.int64)
        return match_pairs(empty, empty, np.zeros(0), pred_area, truth_area, iou_threshold)
    pi, ti = shapely.STRtree(truth_g).query(pred_g, predicate="intersects")
    inter = shapely.area(shapely.intersection(pred_g[pi], truth_g[ti]))
    return match_pairs(pi, ti, inter, pred_area, truth_area, iou_threshold)


def score_polygons(
    pred: Sequence[Any],
    truth: Sequence[Any],
    iou_threshold: float = IOU_THRESHOLD,
    bins: Sequence[float] = M2_SIZE_BINS,
    unit: str = "m2",
) -> dict[str, Any]:
    """Per-building scores of predicted against true polygons (one projected CRS, metres)."""
    m = match_polygons(pred, truth, iou_threshold)
    return BuildingCounts.from_matches(m, bins).report(bins, unit, iou_threshold)
