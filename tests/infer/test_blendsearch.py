"""pipeline.infer.blendsearch: the weight grid, the streamed per-tile Dice of every blend against the Dice of
its blended probabilities, threshold tuning as make tune's, and the parts the nested estimate holds out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fake_runs import oof_run, tile_data

from pipeline.core.config import DataConfig
from pipeline.data.layouts import read_source
from pipeline.infer.blend import read_runs
from pipeline.infer.blendsearch import (
    Cells,
    blend_probs,
    blend_sum,
    choose,
    grid_steps,
    held_out_parts,
    score_weights,
    tune_blend,
    weight_grid,
)
from pipeline.metrics import postprocess

N, S = 6, 16
NAMES = [f"t{i}.jpg" for i in range(N)]


@pytest.fixture
def random_runs(tmp_path: Path):
    """Two runs with random OOF maps over six tiles of random rectangles (one tile empty), two folds."""
    rng = np.random.default_rng(3)
    masks = np.zeros((N, S, S), np.uint8)
    for i in range(1, N):
        y, x = rng.integers(0, 8, 2)
        masks[i, y : y + rng.integers(2, 9), x : x + rng.integers(2, 9)] = 1
    data = tile_data(tmp_path / "data", masks, NAMES)
    folds = [0, 1, 0, 1, 0, 1]
    maps = [
        np.clip(masks * rng.integers(90, 256, masks.shape) + rng.integers(0, 140, masks.shape), 0, 255)
        for _ in range(2)
    ]
    runs = [
        oof_run(tmp_path / "runs" / k, data, NAMES, folds, m.astype(np.uint8)) for k, m in zip("ab", maps)
    ]
    source = read_source(DataConfig(root=str(data)), with_test=False)
    return read_runs(runs), source, masks


def test_weight_grid_lists_the_simplex_first_run_first():
    assert weight_grid(3, 2).tolist() == [[2, 0, 0], [1, 1, 0], [1, 0, 1], [0, 2, 0], [0, 1, 1], [0, 0, 2]]
    assert weight_grid(1, 1).tolist() == [[1]]
    assert [grid_steps(n) for n in (1, 2, 3, 4, 5)] == [1, 10, 10, 6, 4]  # 1, 11, 66, 84, 70 candidates
    assert len(weight_grid(4, grid_steps(4))) == 84


def test_streamed_dice_of_every_blend_is_the_dice_of_its_blended_probabilities(random_runs):
    """score_weights counts on the uint16 blend sums; the reference thresholds the float32 probabilities
    with postprocess's own rule, tile by tile, at thresholds that fall on blend levels and between."""
    runs, source, _ = random_runs
    thresholds = [0.2, 0.3, 0.5, 0.6, 0.7]  # 0.3 and 0.6 are exact levels of a 0.1 grid over /255
    candidates = weight_grid(2, 10)
    dice, folds = score_weights(runs, source, candidates, 10, thresholds)
    assert dice.shape == (11, 5, N) and folds.tolist() == [0, 0, 0, 1, 1, 1]
    order = [*runs[0].names[0], *runs[0].names[1]]
    maps = [np.stack([_map(r, n) for n in order]) for r in runs]
    truths = np.asarray(source.train.select(order).masks)
    for c, k in enumerate(candidates):
        probs = blend_probs(maps, k, 10)
        for j, t in enumerate(thresholds):
            want = [postprocess.mean_dice_at(probs[i : i + 1], truths[i : i + 1], t) for i in range(N)]
            np.testing.assert_allclose(dice[c, j], want, rtol=0, atol=1e-6)


def _map(run, name: str) -> np.ndarray:
    from pipeline.runs.oof import oof_chunks

    for path in run.oof.values():
        for names, arr in oof_chunks(path, "probs"):
            if name in names:
                return arr[names.index(name)]
    raise KeyError(name)


def test_a_run_with_all_the_weight_is_counted_on_its_own_uint8_maps():
    """What make tune counts; the float32 blend it stands for holds exactly the values uint8 q means."""
    q = np.arange(256, dtype=np.uint8).reshape(1, 16, 16)
    zero = np.zeros_like(q)
    for steps in (1, 7, 10):
        assert blend_probs([zero, q], (0, steps), steps) is q
        as_float = blend_sum([zero, q], (0, steps)).astype(np.float32) / np.float32(255 * steps)
        np.testing.assert_array_equal(as_float, q.astype(np.float32) / np.float32(255))
    mixed = blend_probs([q, zero], (3, 7), 10)
    assert mixed.dtype == np.float32 and mixed.max() == np.float32(3 * 255) / np.float32(2550)


def test_blend_is_tuned_as_make_tune_tunes_its_probabilities(random_runs):
    """The threshold/min-area of a blend through Cells equals search_extending over GridCounts of the same
    blended probabilities held in memory; per-tile cells are reused, not recounted, for other subsets."""
    runs, source, masks = random_runs
    order = [*runs[0].names[0], *runs[0].names[1]]
    maps = [np.stack([_map(r, n) for n in order]) for r in runs]
    truths = np.asarray(source.train.select(order).masks)
    probs = blend_probs(maps, (3, 7), 10)

    def in_memory(grids):
        out = []
        for t, a in grids:
            with postprocess.GridCounts(t, a) as counts:
                counts.add(probs, truths)
                out.append(counts.dice())
        return out

    want, _, _ = postprocess.search_extending(in_memory, [0.4, 0.5], [0, 8], S * S, [(0.5, 0)])
    cells = Cells(runs, source, 10)
    infer = type("Infer", (), {"thresholds": (0.4, 0.5), "min_areas": (0, 8)})
    got, _ = tune_blend(cells, (3, 7), np.ones(N, bool), infer, S * S)
    assert (got.threshold, got.min_area) == (want.threshold, want.min_area)
    assert got.dice == pytest.approx(want.dice, abs=1e-12)
    counted = dict(cells.cells[(3, 7)])
    tune_blend(cells, (3, 7), np.arange(N) < 3, infer, S * S)
    assert all(cells.cells[(3, 7)][k] is v for k, v in counted.items())


def test_choose_takes_the_best_threshold_of_each_blend_on_the_tiles_given():
    dice = np.array([[[1.0, 0.0], [0.2, 0.2]], [[0.6, 0.6], [0.0, 0.9]]], np.float32)  # [C=2, T=2, N=2]
    assert choose(dice, np.array([True, True])) == 1  # 0.6 / 0.45 beats 0.5 / 0.2
    assert choose(dice, np.array([True, False])) == 0  # 1.0 beats 0.6
    assert choose(np.zeros((3, 2, 2), np.float32), np.array([True, True])) == 0  # ties: the first


def test_a_single_fold_is_held_out_in_parts_by_scene_group(tmp_path):
    """One OOF fold: make_folds parts of it; a scene group is never split between two parts."""
    names = [f"g{i // 2}_{i}.jpg" for i in range(12)]
    masks = np.zeros((12, S, S), np.uint8)
    masks[::3, :4, :4] = 1
    data = tile_data(tmp_path / "data", masks, names)
    pd.DataFrame({"name": names, "group": [n.split("_")[0] for n in names]}).to_csv(
        data / "manifest.csv", index=False
    )
    cfg = DataConfig(root=str(data))
    source = read_source(cfg, with_test=False)
    parts, how = held_out_parts(np.zeros(12, np.int64), names, source, cfg, seed=0)
    assert how == "5 parts of fold 0 (scene groups)" and sorted(set(parts.tolist())) == [0, 1, 2, 3, 4]
    for g in range(6):
        assert parts[2 * g] == parts[2 * g + 1]
    two = np.array([0, 1] * 6)
    assert held_out_parts(two, names, source, cfg, seed=0) == (two, "folds")
    one, how = held_out_parts(
        np.zeros(1, np.int64), names[:1], source, DataConfig(root=str(data), group_csv=""), 0
    )
    assert one is None and how.startswith("not computed")
