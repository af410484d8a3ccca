"""pipeline.report.analysis: known answers for statistics, per-tile scoring, OOF evaluation, submissions."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fake_runs import H, W, png
from fake_runs import source as fake_source

from pipeline.data import rle
from pipeline.data.dataset import Split
from pipeline.metrics import pixel
from pipeline.report import analysis, figures
from pipeline.runs import RunError
from pipeline.runs.run import load_run


def test_per_tile_dice_known_values() -> None:
    pred = np.array([[[1, 1, 1, 1]], [[0, 0, 0, 0]], [[1, 0, 0, 0]], [[0, 0, 0, 0]]], dtype=np.uint8)
    truth = np.array([[[1, 1, 0, 0]], [[0, 0, 0, 0]], [[0, 0, 0, 0]], [[0, 1, 0, 0]]], dtype=np.uint8)
    # 2*2/(4+2); empty/empty = 1; FP only = 0; FN only = 0
    assert np.allclose(pixel.dice_per_image(pred, truth), [2 / 3, 1.0, 0.0, 0.0])


def test_channel_stats_known_answer_with_unequal_sizes(tmp_path: Path) -> None:
    a = np.zeros((2, 2, 3), dtype=np.uint8)
    a[..., 0] = 255  # R = 1 on 4 pixels
    a[..., 1] = 51  # G = 0.2 everywhere
    b = np.zeros((1, 2, 3), dtype=np.uint8)  # 2 pixels, all 0
    b[0, 1, 2] = 255  # B = 1 on one pixel
    stats = analysis.channel_stats([png(tmp_path / "a.png", a), png(tmp_path / "b.png", b)])
    assert list(stats.index) == ["R", "G", "B"]
    # R: 4 ones, 2 zeros -> mean 2/3, var 2/3 * 1/3; G: 4 x 0.2, 2 x 0 -> mean 0.8/6
    p = 2 / 3
    g = np.array([0.2] * 4 + [0.0] * 2)
    bb = np.array([0] * 5 + [1.0])
    assert np.allclose(stats["mean"], [p, g.mean(), bb.mean()])
    assert np.allclose(stats["std"], [np.sqrt(p * (1 - p)), g.std(), bb.std()])


def test_channel_stats_matches_numpy_on_random_images(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size=(h, 5, 3), dtype=np.uint8) for h in (3, 7, 1)]
    paths = [png(tmp_path / f"{i}.png", im) for i, im in enumerate(images)]
    pixels = np.concatenate([im.reshape(-1, 3) for im in images]) / 255.0
    stats = analysis.channel_stats(paths)
    assert np.allclose(stats["mean"], pixels.mean(0)) and np.allclose(stats["std"], pixels.std(0))


def test_pairwise_agreement_known_answer() -> None:
    a = np.array([[[1, 1], [1, 1]], [[0, 0], [0, 0]]], dtype=bool)
    b = np.array([[[1, 1], [0, 0]], [[0, 0], [0, 0]]], dtype=bool)
    c = np.zeros_like(a)
    df = analysis.pairwise_agreement({"a": a, "b": b, "c": c})
    assert list(df.index) == list(df.columns) == ["a", "b", "c"]
    # a-b: tile 1 2*2/(4+2), tile 2 empty/empty = 1; a-c and b-c: 0 and 1
    expected = np.array([[1, (2 / 3 + 1) / 2, 0.5], [(2 / 3 + 1) / 2, 1, 0.5], [0.5, 0.5, 1]])
    assert np.allclose(df.to_numpy(), expected)


def test_pairwise_agreement_needs_same_tiles() -> None:
    with pytest.raises(ValueError, match="same tiles"):
        analysis.pairwise_agreement({"a": np.zeros((2, 4, 4), bool), "b": np.zeros((3, 4, 4), bool)})


def test_fold_summary_counts() -> None:
    folds = pd.DataFrame({"name": ["a", "b", "c", "d", "e"], "fold": [0, 1, 0, 1, 1]})
    fractions = pd.Series({"a": 0.0, "b": 0.2, "c": 0.4, "d": 0.0, "e": 0.0})
    s = analysis.fold_summary(folds, fractions)
    assert s.index.tolist() == [0, 1]
    assert s["tiles"].tolist() == [2, 3] and s["empty"].tolist() == [1, 2]
    assert np.allclose(s["mean_fraction"], [0.2, 0.2 / 3])


def test_fold_summary_names_tiles_without_masks() -> None:
    with pytest.raises(ValueError, match="zz"):
        analysis.fold_summary(pd.DataFrame({"name": ["a", "zz"], "fold": [0, 1]}), {"a": 0.1})


def test_spread_sample_spans_the_range() -> None:
    values = np.array([0.5, 0.0, 0.9, 0.1, 0.3])
    idx = analysis.spread_sample(values, 3)
    assert values[idx].tolist() == [0.0, 0.3, 0.9]
    assert sorted(analysis.spread_sample(values, 10).tolist()) == [0, 1, 2, 3, 4]
    assert analysis.spread_sample(values, 0).size == 0


def test_mask_summary_counts_empty_and_full() -> None:
    masks = np.zeros((4, 2, 2), dtype=np.uint8)
    masks[1] = 1
    masks[2, 0, 0] = 1
    s = analysis.mask_summary(masks).iloc[0]
    assert (s["tiles"], s["empty"], s["full"]) == (4, 2, 1)
    assert s["mean_fraction"] == pytest.approx((1 + 0.25) / 4)


def test_rle_roundtrip_flags_non_canonical_rows(tmp_path: Path) -> None:
    m = np.zeros((4, 4), np.uint8)
    m[1:3, 1] = 1
    csv = tmp_path / "m.csv"
    # b: two touching runs, a valid mask whose canonical form is one run "1 4"
    csv.write_text(f"a.jpg\t{rle.encode(m)}\nb.jpg\t1 2 3 2\nc.jpg\t\n")
    assert analysis.rle_roundtrip_mismatches(csv, (4, 4)) == ["b.jpg"]


def test_evaluate_oof_scores_and_tables(small_run: tuple[Path, Split]) -> None:
    run_dir, train = small_run
    # the split lists tiles in another order than the run's sorted names: evaluation must align them
    order = [4, 2, 0, 3, 1]
    shuffled = train.subset(order)
    ev = analysis.evaluate_oof(load_run(run_dir), shuffled)
    assert ev.names.tolist() == [f"t{i}.png" for i in range(5)]
    assert ev.dice.tolist() == [1.0, 1.0, 1.0, 0.0, 1.0]
    assert [p.name for p in ev.image_paths] == ev.names.tolist()
    by_fold = ev.by_fold()
    assert by_fold.index.tolist() == ["0", "1", "all"]
    assert by_fold["tiles"].tolist() == [3, 2, 5] and by_fold["dice"].tolist() == [1.0, 0.5, 0.8]
    table = ev.table()
    assert table.iloc[0]["name"] == "t3.png" and table.iloc[0]["pred_fraction"] == 0.0
    # a threshold above every probability predicts nothing: only the empty tile scores
    assert analysis.evaluate_oof(load_run(run_dir), train, threshold=0.9).dice.tolist() == [
        1,
        0,
        0,
        0,
        0,
    ]
    fig = figures.worst_tiles_gallery(ev, 2)
    assert fig.axes[0].get_title().startswith("t3.png (fold 1)  Dice 0.000")


def test_building_scores_and_panels(small_run: tuple[Path, Split]) -> None:
    """Tiles 1, 2, 4 predict their one building exactly, tile 3 misses it, tile 0 is empty."""
    run_dir, train = small_run
    ev = analysis.evaluate_oof(load_run(run_dir), train)
    r = analysis.building_scores(ev)
    assert (r["tp"], r["fp"], r["fn"], r["recall"]) == (3, 0, 1, 0.75)
    panels = analysis.building_panels(ev, 2)
    assert [p.title for p in panels] == ["t3.png", "t0.png"]  # most errors first, then tile order
    assert panels[0].pred == [] and panels[0].truth_matched.tolist() == [False]
    assert panels[0].truth[0].area == 16 and panels[0].image.shape == (H, W, 3)


def test_evaluate_oof_names_tiles_missing_from_the_data(small_run: tuple[Path, Split]) -> None:
    run_dir, train = small_run
    with pytest.raises(RunError, match="t4.png"):
        analysis.evaluate_oof(load_run(run_dir), train.subset([0, 1, 2, 3]))


def test_fold_test_agreement(small_run: tuple[Path, Split], monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir, train = small_run
    run = load_run(run_dir)
    with pytest.raises(analysis.Unavailable, match="checkpoints"):
        analysis.fold_test_agreement(run, train.image_paths)
    run.manifest = dataclasses.replace(run.manifest, checkpoints=("fold0/best.pt", "fold1/best.pt"))
    for c in run.manifest.checkpoints:
        (run_dir / c).write_bytes(b"")
    import pipeline.infer.ensemble

    p = np.zeros((2, H, W), np.float32)
    p[:, :2] = 0.7
    q = p.copy()
    q[1] = 0.4  # below the manifest threshold 0.5 in tile 1: fold 1 predicts it empty
    calls = []

    def fake_predict_folds(manifest_path, image_paths, tta="none"):
        calls.append((Path(manifest_path).name, len(image_paths), tta))
        return {1: q, 0: p}

    monkeypatch.setattr(pipeline.infer.ensemble, "predict_folds", fake_predict_folds)
    df = analysis.fold_test_agreement(run, train.image_paths[:2])
    assert calls == [("manifest.yaml", 2, "none")]
    assert df.index.tolist() == ["fold 0", "fold 1"]
    assert df.loc["fold 0", "fold 1"] == pytest.approx(0.5)  # tile 0 identical, tile 1 all vs nothing


# ----------------------------------------------------------------------------- data and submissions


def test_data_overview(tmp_path: Path) -> None:
    df = analysis.data_overview(fake_source(tmp_path))
    assert df.index.tolist() == ["train", "test"]
    assert df.loc["train", ["tiles", "height", "width", "empty"]].tolist() == [3, H, W, 1]
    assert df.loc["train", "mean_fraction"] == pytest.approx((0 + 8 + 12) / 3 / 64)
    assert np.isnan(df.loc["test", "empty"])


def test_load_submission_checks_names_and_order(tmp_path: Path) -> None:
    test = fake_source(tmp_path).train  # three tiles with known masks
    masks = np.asarray(test.masks)
    rows = [f"{n}\t{rle.encode(m)}\n" for n, m in zip(test.names, masks)]
    good = tmp_path / "good.csv"
    good.write_text("".join(rows))
    assert np.array_equal(analysis.load_submission(good, test), masks)
    swapped = tmp_path / "swapped.csv"
    swapped.write_text("".join([rows[1], rows[0], rows[2]]))
    with pytest.raises(ValueError, match="row 1 is s1.png but the sample submission has s0.png"):
        analysis.load_submission(swapped, test)
    short = tmp_path / "short.csv"
    short.write_text("".join(rows[:2]))
    with pytest.raises(ValueError, match=r"1 missing \(s2.png\)"):
        analysis.load_submission(short, test)
    with pytest.raises(ValueError, match="no test split"):
        analysis.load_submission(good, None)
