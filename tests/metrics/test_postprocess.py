"""Post-processing: component filtering, binarisation rule, and the threshold / min-area search."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.core.config import InferConfig
from pipeline.metrics.pixel import dice_per_image
from pipeline.metrics.postprocess import (
    GridCounts,
    binarize,
    mean_dice_at,
    remove_small_components,
    search_extending,
    search_threshold,
    widen_min_areas,
    widen_thresholds,
)


def _blob_image() -> np.ndarray:
    """Three components (8-connectivity): areas 4 (2x2), 5 (diagonal line), 9 (3x3)."""
    m = np.zeros((12, 12), dtype=np.uint8)
    m[0:2, 0:2] = 1
    for k in range(5):
        m[5 + k, k] = 1
    m[8:11, 8:11] = 1
    return m


@pytest.mark.parametrize(
    ("min_area", "kept"),
    [(0, 18), (1, 18), (4, 18), (5, 14), (6, 9), (9, 9), (10, 0)],
)
def test_components_below_at_above_min_area(min_area: int, kept: int) -> None:
    out = remove_small_components(_blob_image(), min_area)
    assert out.dtype == np.uint8
    assert set(np.unique(out)) <= {0, 1}
    assert int(out.sum()) == kept


def test_connectivity_4_splits_diagonals() -> None:
    m = _blob_image().astype(bool)
    # The diagonal line is 5 components of 1 pixel under 4-connectivity: min_area=2 removes it.
    assert int(remove_small_components(m, 2, connectivity=4).sum()) == 13
    assert int(remove_small_components(m, 2, connectivity=8).sum()) == 18
    with pytest.raises(ValueError, match="4 or 8"):
        remove_small_components(m, 2, connectivity=6)


def test_binarize_rule_is_strictly_greater() -> None:
    p = np.array([[0.2, 0.5, 0.5001, 0.9]], dtype=np.float32)
    assert binarize(p, 0.5).tolist() == [[0, 0, 1, 1]]
    q = np.array([[127, 128, 0, 255]], dtype=np.uint8)  # 127/255 < 0.5 < 128/255
    assert binarize(q, 0.5).tolist() == [[0, 1, 0, 1]]


def test_uint8_and_float_give_the_same_masks() -> None:
    rng = np.random.default_rng(0)
    q = rng.integers(0, 256, (64, 64), dtype=np.uint8)
    f32 = q.astype(np.float32) / np.float32(255)
    f16 = f32.astype(np.float16)
    # Thresholds that land exactly on k/255 are the risky ones for a uint8 shortcut.
    for t in (0.0, 0.3, 0.5, 0.6, 102 / 255, 153 / 255, 1.0):
        expected = binarize(f32, t, 3)
        assert np.array_equal(binarize(q, t, 3), expected), t
        assert np.array_equal(binarize(f16, t, 3), binarize(f16.astype(np.float32), t, 3)), t


def _known_case() -> tuple[np.ndarray, np.ndarray]:
    """Two images whose best (threshold, min_area) is known by construction.

    Image 0: a 10x10 building with probability 0.6; background 0.3; plus a 3x3 false-positive blob
    at 0.8. Every threshold in [0.3, 0.6) finds the building; the blob is removed only by a
    min_area in (9, 100]. Image 1: empty truth, empty prediction above 0.35.
    """
    probs = np.full((2, 32, 32), 0.3, dtype=np.float32)
    truth = np.zeros((2, 32, 32), dtype=np.uint8)
    probs[0, 5:15, 5:15] = 0.6
    truth[0, 5:15, 5:15] = 1
    probs[0, 25:28, 25:28] = 0.8
    probs[1, 0:2, 0:2] = 0.35  # a 4-pixel false positive only at thresholds < 0.35
    return probs, truth


def test_search_known_answer() -> None:
    probs, truth = _known_case()
    res = search_threshold(probs, truth, thresholds=(0.25, 0.3, 0.4, 0.7), min_areas=(0, 8, 16, 200))
    assert (res.threshold, res.min_area) == (0.3, 16)
    assert res.dice == pytest.approx(1.0)
    table = res.table.set_index(["threshold", "min_area"])["dice"]
    assert list(res.table.columns) == ["threshold", "min_area", "dice"]
    assert len(res.table) == 16
    # Blob kept (min_area 8 < 9): image 0 Dice = 200 / 209, image 1 = 1.
    assert table[(0.4, 8)] == pytest.approx((200 / 209 + 1) / 2)
    # min_area 200 also removes the building: image 0 gets 0.
    assert table[(0.4, 200)] == pytest.approx(0.5)
    # Threshold 0.7: only the blob survives -> Dice 0 for image 0.
    assert table[(0.7, 0)] == pytest.approx(0.5)
    # Threshold 0.25 predicts everything in image 0 (1024 px) and image 1; empty truth -> 0.
    assert table[(0.25, 0)] == pytest.approx(200 / 1124 / 2)


def test_search_matches_brute_force() -> None:
    """Every cell of the table equals binarize + Dice computed the slow way."""
    rng = np.random.default_rng(1)
    n = 6
    truth = np.zeros((n, 40, 40), dtype=np.uint8)
    for i in range(1, n):
        y, x = rng.integers(0, 30, 2)
        truth[i, y : y + 10, x : x + 8] = 1
    probs = np.clip(truth * 0.5 + rng.random((n, 40, 40)) * 0.6, 0, 1).astype(np.float32)
    thresholds, min_areas = (0.3, 0.5, 0.7), (0, 2, 5, 30)
    res = search_threshold(probs, truth, thresholds, min_areas, workers=2)
    for t in thresholds:
        for m in min_areas:
            pred = np.stack([binarize(p, t, m) for p in probs])
            expected = dice_per_image(pred, truth).mean()
            got = res.table.query("threshold == @t and min_area == @m")["dice"].item()
            assert got == pytest.approx(expected, abs=1e-12), (t, m)
            assert mean_dice_at(probs, truth, t, m) == pytest.approx(expected, abs=1e-12)


def test_search_uint8_float_agree() -> None:
    probs, truth = _known_case()
    q = np.round(probs * 255).astype(np.uint8)
    grid = dict(thresholds=(0.25, 0.3, 0.4, 0.7), min_areas=(0, 8, 16, 200))
    a = search_threshold(q, truth, **grid)
    b = search_threshold(q.astype(np.float32) / np.float32(255), truth, **grid)
    c = search_threshold((q.astype(np.float32) / np.float32(255)).astype(np.float16), truth, **grid)
    np.testing.assert_array_equal(a.table["dice"], b.table["dice"])
    assert (a.threshold, a.min_area) == (b.threshold, b.min_area) == (c.threshold, c.min_area)


def test_search_empty_empty_is_one() -> None:
    probs = np.zeros((3, 16, 16), dtype=np.uint8)
    truth = np.zeros((3, 16, 16), dtype=np.uint8)
    res = search_threshold(probs, truth)
    assert res.dice == 1.0
    assert (res.table["dice"] == 1.0).all()


def test_search_errors_say_how_to_fix() -> None:
    probs, truth = _known_case()
    with pytest.raises(ValueError, match="same tiles"):
        search_threshold(probs, truth[:1])
    with pytest.raises(ValueError, match="sigmoid"):
        search_threshold(probs * 4 - 2, truth)
    with pytest.raises(TypeError, match="uint8"):
        search_threshold(probs.astype(np.int32), truth)


def _edge_case_oof() -> tuple[np.ndarray, np.ndarray]:
    """Buildings at p ~ 0.2, background at p = 0.12: the best threshold is 0.15, below the default grid."""
    rng = np.random.default_rng(0)
    truths = np.zeros((6, 16, 16), np.uint8)
    truths[:, 4:12, 4:12] = 1
    probs = np.where(truths == 1, rng.uniform(0.17, 0.23, truths.shape), 0.12)
    return np.rint(probs * 255).astype(np.uint8), truths


def _counter(probs: np.ndarray, truths: np.ndarray, passes: list):
    def count(grids):
        passes.append(grids)
        out = []
        for t, a in grids:
            with GridCounts(t, a) as c:
                c.add(probs, truths)
                out.append(c.dice())
        return out

    return count


def test_a_best_threshold_below_the_grid_is_found_by_widening_it():
    probs, truths = _edge_case_oof()
    grid = InferConfig().thresholds  # 0.30 .. 0.70
    assert search_threshold(probs, truths, grid, (0,)).threshold == 0.3  # the fixed grid stops at its edge
    passes: list = []
    result, cells, notes = search_extending(_counter(probs, truths, passes), grid, (0,), 256)
    assert result.threshold == pytest.approx(0.15) and result.dice == 1.0
    assert len(passes) == 2 and "the best threshold 0.3 was at the edge of the grid 0.3..0.7" in notes[0]
    assert set(result.table["threshold"].round(2)) >= {0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.7}
    assert (0.15, 0) in {(round(t, 2), a) for t, a in cells}


def test_an_inside_optimum_needs_no_second_pass_and_the_largest_area_widens_upward():
    probs, truths = _edge_case_oof()
    passes: list = []
    result, _, notes = search_extending(_counter(probs, truths, passes), (0.1, 0.15, 0.2), (0,), 256)
    assert result.threshold == pytest.approx(0.15) and notes == [] and len(passes) == 1
    assert widen_min_areas((0, 16, 256), 256, 512 * 512) == [512, 1024, 2048]
    assert widen_min_areas((0, 16, 256), 16, 512 * 512) == [] and widen_min_areas((0,), 0, 100) == []
    assert widen_thresholds((0.3, 0.35), 0.35) == pytest.approx([0.4, 0.45])
    assert widen_thresholds((0.01, 0.05), 0.01) == []  # the bottom of the range
