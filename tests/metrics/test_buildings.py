"""pipeline.metrics.buildings: per-building matching at IoU >= 0.5, with hand-made cases of known TP/FP/FN."""

from __future__ import annotations

import numpy as np
import pytest
import shapely

from pipeline.metrics import buildings


def _mask(*boxes: tuple[int, int, int, int], shape: tuple[int, int] = (12, 16)) -> np.ndarray:
    """uint8 [H, W] with each (row0, row1, col0, col1) box (ends excluded) set to 1."""
    m = np.zeros(shape, np.uint8)
    for r0, r1, c0, c1 in boxes:
        m[r0:r1, c0:c1] = 1
    return m


def _counts(pred: np.ndarray, truth: np.ndarray) -> tuple[int, int, int]:
    r = buildings.score_masks(pred[None], truth[None])
    return r["tp"], r["fp"], r["fn"]


# Each case: truth boxes, prediction boxes, expected (TP, FP, FN), and why.
CASES = {
    "identical": ([(1, 5, 1, 11)], [(1, 5, 1, 11)], (1, 0, 0)),
    # truth 4x10 = 40 px; halves of 4x4 = 16 px each (a 2-px gap): IoU 0.4 and 0.4 -> neither matches
    "split building": ([(1, 5, 1, 11)], [(1, 5, 1, 5), (1, 5, 7, 11)], (0, 2, 1)),
    # truth 40 px; left part 4x6 = 24 px (IoU 0.6) matches, the 4x3 right part is a false positive
    "split building, one part large": ([(1, 5, 1, 11)], [(1, 5, 1, 7), (1, 5, 8, 11)], (1, 1, 0)),
    # two 4x4 truths with a 1-px gap, one 4x9 prediction over both: IoU 16/36 each -> 1 FP, 2 FN
    "two merged buildings": ([(1, 5, 1, 5), (1, 5, 6, 10)], [(1, 5, 1, 10)], (0, 1, 2)),
    # truth 4x8 = 32 and 4x2 = 8; prediction 4x11 = 44 over both: IoU 32/44 with the large one
    "merged, one dominates": ([(1, 5, 1, 9), (1, 5, 10, 12)], [(1, 5, 1, 12)], (1, 0, 1)),
    "empty tile": ([], [], (0, 0, 0)),
    "nothing predicted": ([(1, 3, 1, 3), (6, 9, 6, 9)], [], (0, 0, 2)),
    "building on an empty tile": ([], [(2, 4, 2, 4)], (0, 1, 0)),
    # truth 2x4 = 8 px, prediction 2x2 inside it = 4 px: IoU exactly 0.5 counts (>=)
    "IoU exactly 0.5": ([(1, 3, 1, 5)], [(1, 3, 1, 3)], (1, 0, 0)),
    # 2x5 = 10 truth, 2x2 = 4 prediction inside: IoU 0.4
    "too small": ([(1, 3, 1, 6)], [(1, 3, 1, 3)], (0, 1, 1)),
}


@pytest.mark.parametrize("case", CASES)
def test_known_counts(case: str) -> None:
    truth, pred, expected = CASES[case]
    assert _counts(_mask(*pred), _mask(*truth)) == expected


def test_diagonal_pixels_are_one_building() -> None:
    """8-connectivity, as the component filter: pixels touching at a corner are one building."""
    truth = np.zeros((6, 6), np.uint8)
    truth[1, 1] = truth[2, 2] = truth[3, 3] = 1
    assert buildings.label_components(truth)[0] == 1
    pred = truth.copy()
    pred[3, 3] = 0  # 2 of 3 pixels: IoU 2/3
    assert _counts(pred, truth) == (1, 0, 0)


def test_scores_and_conventions() -> None:
    """Counts add up over tiles; P, R and F1 from them; nothing at all scores 1."""
    truths = np.stack([_mask((1, 5, 1, 11)), _mask((1, 5, 1, 5), (1, 5, 6, 10)), _mask()])
    preds = np.stack([_mask((1, 5, 1, 5), (1, 5, 7, 11)), _mask((1, 5, 1, 10)), _mask()])
    r = buildings.score_masks(preds, truths)
    assert (r["tp"], r["fp"], r["fn"]) == (0, 3, 3)
    assert (r["precision"], r["recall"], r["f1"]) == (0.0, 0.0, 0.0)
    r = buildings.score_masks(truths, truths)
    assert (r["tp"], r["fp"], r["fn"], r["f1"]) == (3, 0, 0, 1.0)
    # TP 2, FP 1, FN 1: P = R = 2/3, F1 = 4 / 6
    preds = np.stack([_mask((1, 5, 1, 7), (1, 5, 8, 11)), _mask((1, 5, 1, 9), (1, 5, 10, 12)), _mask()])
    truths = np.stack([_mask((1, 5, 1, 11)), _mask((1, 5, 1, 9), (1, 5, 10, 12)), _mask((6, 9, 6, 9))])
    r = buildings.score_masks(preds, truths)
    assert (r["tp"], r["fp"], r["fn"]) == (3, 1, 1)
    assert r["precision"] == pytest.approx(3 / 4) and r["recall"] == pytest.approx(3 / 4)
    assert r["f1"] == pytest.approx(6 / 8)
    empty = buildings.score_masks(np.zeros((2, 4, 4), np.uint8), np.zeros((2, 4, 4), np.uint8))
    assert (empty["precision"], empty["recall"], empty["f1"]) == (1.0, 1.0, 1.0)


def test_size_classes() -> None:
    """TP and FN count in the true building's class, FP in its own; edges are COCO's 32² and 96² px."""
    truth = np.zeros((200, 200), np.uint8)
    pred = np.zeros_like(truth)
    truth[0:10, 0:10] = 1  # 100 px: small, found
    pred[0:10, 0:10] = 1
    truth[20:52, 0:32] = 1  # exactly 32² = 1024 px: medium, missed
    truth[60:160, 60:160] = 1  # 10,000 px: large, found by a 96x96 (medium-sized) prediction: IoU 0.92
    pred[62:158, 62:158] = 1
    pred[180:190, 180:190] = 1  # small false positive
    r = buildings.score_masks(pred[None], truth[None])
    by = {k: (v["tp"], v["fp"], v["fn"]) for k, v in r["by_size"].items()}
    assert by == {"small": (1, 1, 0), "medium": (0, 0, 1), "large": (1, 0, 0)}
    assert r["by_size"]["medium"]["min"] == 1024 and r["by_size"]["large"]["max"] is None
    text = buildings.format_report(r)
    assert "F1 0.6667" in text and "medium" in text and ">= 1024 px" in text


def test_match_pairs_is_one_to_one_on_ties() -> None:
    """Two truths each at IoU exactly 0.5 with one prediction (possible with polygons): one match."""
    pred = [shapely.box(0, 0, 2, 1)]
    truth = [shapely.box(0, 0, 1, 1), shapely.box(1, 0, 2, 1)]
    m = buildings.match_polygons(pred, truth)
    assert m.pred.tolist() == [0] and m.truth.tolist() == [0] and m.iou.tolist() == [0.5]
    assert m.truth_matched.tolist() == [True, False]


def test_polygons_known_answer() -> None:
    """Polygons in metres: the split and merged cases, and the size classes in m²."""
    truth = [shapely.box(0, 0, 10, 4), shapely.box(20, 0, 24, 4), shapely.box(25, 0, 29, 4)]
    pred = [shapely.box(0, 0, 4, 4), shapely.box(6, 0, 10, 4), shapely.box(20, 0, 29, 4)]
    r = buildings.score_polygons(pred, truth)
    assert (r["tp"], r["fp"], r["fn"]) == (0, 3, 3) and r["unit"] == "m2"
    r = buildings.score_polygons(truth, truth)
    assert (r["tp"], r["fp"], r["fn"], r["f1"]) == (3, 0, 0, 1.0)
    assert r["by_size"]["small"]["tp"] == 3  # 40 and 16 m² < 100 m²
    r = buildings.score_polygons([], truth)
    assert (r["tp"], r["fp"], r["fn"], r["precision"], r["recall"]) == (0, 0, 3, 1.0, 0.0)


def test_bad_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match=r"\[N, H, W\]"):
        buildings.score_masks(np.zeros((4, 4)), np.zeros((4, 4)))
    with pytest.raises(ValueError, match="one shape"):
        buildings.match_masks(np.zeros((4, 4)), np.zeros((4, 5)))
