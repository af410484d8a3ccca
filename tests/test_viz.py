"""pipeline.viz: exact pixel values of overlays, known answers for the statistics, figure structure,
and run-folder reading with its errors."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from PIL import Image

from pipeline import rle, viz
from pipeline.config import Config, DataConfig, save_config
from pipeline.data import Split
from pipeline.io import save_yaml
from pipeline.layouts import Source

# ----------------------------------------------------------------------------- arrays


def test_overlay_tints_only_masked_pixels_by_alpha() -> None:
    image = np.full((3, 4, 3), 100, dtype=np.uint8)
    image[..., 2] = 10
    mask = np.zeros((3, 4), dtype=np.uint8)
    mask[1, 2] = 1
    out = viz.overlay(image, mask, color=(255, 0, 0), alpha=0.4)
    # 0.6 * 100 + 0.4 * 255 = 162; 0.6 * 100 = 60; 0.6 * 10 = 6
    assert out[1, 2].tolist() == [162, 60, 6]
    untouched = np.ones((3, 4), dtype=bool)
    untouched[1, 2] = False
    assert np.array_equal(out[untouched], image[untouched])
    assert out.dtype == np.uint8 and np.array_equal(image[1, 2], [100, 100, 10]), "input must not change"
    assert np.array_equal(viz.overlay(image, mask, alpha=0.0), image)


def test_overlay_rejects_mismatched_mask() -> None:
    with pytest.raises(ValueError, match="does not match image"):
        viz.overlay(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 5), np.uint8))


def test_error_overlay_colours_exactly_tp_fp_fn() -> None:
    image = np.full((2, 2, 3), 50, dtype=np.uint8)
    pred = np.array([[1, 1], [0, 0]])
    truth = np.array([[1, 0], [1, 0]])
    out = viz.error_overlay(image, pred, truth, alpha=1.0)
    assert out[0, 0].tolist() == list(viz.TP_COLOR)
    assert out[0, 1].tolist() == list(viz.FP_COLOR)
    assert out[1, 0].tolist() == list(viz.FN_COLOR)
    assert out[1, 1].tolist() == [50, 50, 50]  # true negative: the image
    half = viz.error_overlay(image, pred, truth, alpha=0.5)
    assert half[0, 1].tolist() == [round(0.5 * 50 + 0.5 * c) for c in viz.FP_COLOR]


def test_error_colours_are_distinct() -> None:
    assert len({viz.TP_COLOR, viz.FP_COLOR, viz.FN_COLOR}) == 3


def test_colorize_maps_ids_and_ignore() -> None:
    colors = [(0, 0, 0), (10, 20, 30), (200, 100, 0)]
    mask = np.array([[0, 1], [2, 255]], dtype=np.uint8)
    out = viz.colorize(mask, colors, ignore_index=255, ignore_color=(1, 2, 3))
    assert out.shape == (2, 2, 3) and out.dtype == np.uint8
    assert out.reshape(-1, 3).tolist() == [[0, 0, 0], [10, 20, 30], [200, 100, 0], [1, 2, 3]]


def test_colorize_refuses_ids_without_colour() -> None:
    with pytest.raises(ValueError, match=r"class ids \[3\] have no colour"):
        viz.colorize(np.array([[0, 3]]), [(0, 0, 0), (1, 1, 1)])
    with pytest.raises(ValueError, match="255"):
        viz.colorize(np.array([[255]]), [(0, 0, 0)], ignore_index=None)


def test_per_tile_dice_known_values() -> None:
    pred = np.array([[[1, 1, 1, 1]], [[0, 0, 0, 0]], [[1, 0, 0, 0]], [[0, 0, 0, 0]]], dtype=np.uint8)
    truth = np.array([[[1, 1, 0, 0]], [[0, 0, 0, 0]], [[0, 0, 0, 0]], [[0, 1, 0, 0]]], dtype=np.uint8)
    # 2*2/(4+2); empty/empty = 1; FP only = 0; FN only = 0
    assert np.allclose(viz.per_tile_dice(pred, truth), [2 / 3, 1.0, 0.0, 0.0])


def _png(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array).save(path)  # PNG: lossless, so the statistics are exact
    return path


def test_channel_stats_known_answer_with_unequal_sizes(tmp_path: Path) -> None:
    a = np.zeros((2, 2, 3), dtype=np.uint8)
    a[..., 0] = 255  # R = 1 on 4 pixels
    a[..., 1] = 51  # G = 0.2 everywhere
    b = np.zeros((1, 2, 3), dtype=np.uint8)  # 2 pixels, all 0
    b[0, 1, 2] = 255  # B = 1 on one pixel
    stats = viz.channel_stats([_png(tmp_path / "a.png", a), _png(tmp_path / "b.png", b)])
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
    paths = [_png(tmp_path / f"{i}.png", im) for i, im in enumerate(images)]
    pixels = np.concatenate([im.reshape(-1, 3) for im in images]) / 255.0
    stats = viz.channel_stats(paths)
    assert np.allclose(stats["mean"], pixels.mean(0)) and np.allclose(stats["std"], pixels.std(0))


def test_pairwise_agreement_known_answer() -> None:
    a = np.array([[[1, 1], [1, 1]], [[0, 0], [0, 0]]], dtype=bool)
    b = np.array([[[1, 1], [0, 0]], [[0, 0], [0, 0]]], dtype=bool)
    c = np.zeros_like(a)
    df = viz.pairwise_agreement({"a": a, "b": b, "c": c})
    assert list(df.index) == list(df.columns) == ["a", "b", "c"]
    # a-b: tile 1 2*2/(4+2), tile 2 empty/empty = 1; a-c and b-c: 0 and 1
    expected = np.array([[1, (2 / 3 + 1) / 2, 0.5], [(2 / 3 + 1) / 2, 1, 0.5], [0.5, 0.5, 1]])
    assert np.allclose(df.to_numpy(), expected)


def test_pairwise_agreement_needs_same_tiles() -> None:
    with pytest.raises(ValueError, match="same tiles"):
        viz.pairwise_agreement({"a": np.zeros((2, 4, 4), bool), "b": np.zeros((3, 4, 4), bool)})


def test_fold_summary_counts() -> None:
    folds = pd.DataFrame({"name": ["a", "b", "c", "d", "e"], "fold": [0, 1, 0, 1, 1]})
    fractions = pd.Series({"a": 0.0, "b": 0.2, "c": 0.4, "d": 0.0, "e": 0.0})
    s = viz.fold_summary(folds, fractions)
    assert s.index.tolist() == [0, 1]
    assert s["tiles"].tolist() == [2, 3] and s["empty"].tolist() == [1, 2]
    assert np.allclose(s["mean_fraction"], [0.2, 0.2 / 3])


def test_fold_summary_names_tiles_without_masks() -> None:
    with pytest.raises(ValueError, match="zz"):
        viz.fold_summary(pd.DataFrame({"name": ["a", "zz"], "fold": [0, 1]}), {"a": 0.1})


def test_spread_sample_spans_the_range() -> None:
    values = np.array([0.5, 0.0, 0.9, 0.1, 0.3])
    idx = viz.spread_sample(values, 3)
    assert values[idx].tolist() == [0.0, 0.3, 0.9]
    assert sorted(viz.spread_sample(values, 10).tolist()) == [0, 1, 2, 3, 4]
    assert viz.spread_sample(values, 0).size == 0


def test_mask_summary_counts_empty_and_full() -> None:
    masks = np.zeros((4, 2, 2), dtype=np.uint8)
    masks[1] = 1
    masks[2, 0, 0] = 1
    s = viz.mask_summary(masks).iloc[0]
    assert (s["tiles"], s["empty"], s["full"]) == (4, 2, 1)
    assert s["mean_fraction"] == pytest.approx((1 + 0.25) / 4)


def test_rle_roundtrip_flags_non_canonical_rows(tmp_path: Path) -> None:
    m = np.zeros((4, 4), np.uint8)
    m[1:3, 1] = 1
    csv = tmp_path / "m.csv"
    # b: two touching runs, a valid mask whose canonical form is one run "1 4"
    csv.write_text(f"a.jpg\t{rle.encode(m)}\nb.jpg\t1 2 3 2\nc.jpg\t\n")
    assert viz.rle_roundtrip_mismatches(csv, (4, 4)) == ["b.jpg"]


# ----------------------------------------------------------------------------- figures


def _metrics(k: int, epochs: int = 4) -> pd.DataFrame:
    e = np.arange(1, epochs + 1)
    return pd.DataFrame(
        {
            "epoch": e,
            "train_loss": 1 / e,
            "val_loss": 1.2 / e,
            "val_dice": 0.5 + 0.1 * e - 0.01 * k,
            "val_iou": 0.4 + 0.1 * e,
            "lr": 1e-3,
            "seconds": 1.0,
        }
    )


def test_learning_curves_axes_and_lines() -> None:
    fig = viz.learning_curves({0: _metrics(0), 1: _metrics(1), 2: _metrics(2)})
    assert isinstance(fig, Figure)
    loss, dice = fig.axes
    assert len(loss.lines) == 6 and len(dice.lines) == 3  # train + val per fold; Dice per fold
    assert len(dice.collections) == 3  # best-epoch markers
    assert dice.lines[0].get_ydata()[-1] == pytest.approx(0.9)
    assert (
        loss.get_yscale() == "log"
    )  # positive losses: a log axis keeps early spikes from flattening the rest
    negative = _metrics(0).assign(train_loss=-1.0)
    assert viz.learning_curves({0: negative}).axes[0].get_yscale() == "linear"


def test_threshold_curve_one_line_per_min_area_and_star() -> None:
    df = pd.DataFrame(
        [(t, a, 0.8 + 0.1 * t - 0.001 * a) for t in (0.3, 0.5, 0.7) for a in (0, 16, 64)],
        columns=["threshold", "min_area", "dice"],
    )
    fig = viz.threshold_curve(df, 0.5, 16)
    (ax,) = fig.axes
    assert len(ax.lines) == 3
    widths = {line.get_label(): line.get_linewidth() for line in ax.lines}
    assert widths["min_area 16"] > widths["min_area 0"]
    (star,) = ax.collections
    assert star.get_offsets().tolist() == [[0.5, pytest.approx(0.8 + 0.05 - 0.016)]]
    assert "threshold 0.50, min_area 16, Dice 0.8340" in ax.get_title()
    assert len(viz.threshold_curve(df).axes[0].collections) == 0  # nothing chosen, nothing starred


def test_histograms() -> None:
    fig = viz.fraction_histogram(np.array([0.0, 0.0, 0.2, 0.5]))
    (ax,) = fig.axes
    assert len(ax.patches) == 40 and "2 empty" in ax.get_title()
    fig = viz.dice_histogram(np.array([0.2, 0.9, 1.0]))
    (ax,) = fig.axes
    assert len(ax.patches) == 20 and len(ax.lines) == 1  # the mean
    assert ax.lines[0].get_xdata()[0] == pytest.approx(0.7) and "1 below 0.5" in ax.get_title()


def test_example_grid_layout_binary_and_multiclass() -> None:
    images = np.zeros((3, 8, 8, 3), np.uint8)
    masks = np.zeros((3, 8, 8), np.uint8)
    masks[:, :4] = 1
    fig = viz.example_grid(images, masks, ["a", "b", "c"], tiles_per_row=2)
    assert len(fig.axes) == 2 * 6  # 2 rows of 2 tiles x 3 panels; the last trio is blank
    assert [ax.get_title() for ax in fig.axes[:3]] == ["a", "overlay", "mask (50.0%)"]
    assert not fig.axes[-1].axison
    masks[0, 0, 0] = 2
    fig = viz.example_grid(
        images, masks, ["a", "b", "c"], colors=[(0, 0, 0), (9, 9, 9), (7, 7, 7)], tiles_per_row=3
    )
    assert len(fig.axes) == 9 and fig.axes[2].get_title() == "classes"
    assert fig.axes[2].images[0].get_array()[0, 0].tolist() == [7, 7, 7]


def test_prediction_gallery_titles_and_panels() -> None:
    images = np.zeros((2, 8, 8, 3), np.uint8)
    preds = np.zeros((2, 8, 8), np.uint8)
    truths = np.ones((2, 8, 8), np.uint8)
    fig = viz.prediction_gallery(images, preds, truths, ["x.jpg", "y.jpg"], [0.0, 0.25])
    assert len(fig.axes) == 6
    assert fig.axes[3].get_title() == "y.jpg  Dice 0.250"
    # the error panel shows every pixel as a false negative (blended over black)
    assert fig.axes[1].images[0].get_array()[0, 0].tolist() == [round(0.55 * c) for c in viz.FN_COLOR]
    assert len(fig.legends) == 1


def test_fold_summary_plot_and_agreement_heatmap() -> None:
    s = pd.DataFrame({"tiles": [3, 4], "empty": [1, 0], "mean_fraction": [0.1, 0.2]}, index=[0, 1])
    fig = viz.fold_summary_plot(s)
    assert len(fig.axes) == 2 and len(fig.axes[0].patches) == 4 and len(fig.axes[1].patches) == 2
    agreement = pd.DataFrame(
        [[1.0, 0.9], [0.9, 1.0]], index=["fold 0", "fold 1"], columns=["fold 0", "fold 1"]
    )
    fig = viz.agreement_heatmap(agreement)
    assert len(fig.axes) == 2  # map + colour bar
    assert sorted(t.get_text() for t in fig.axes[0].texts) == ["0.900", "0.900", "1.000", "1.000"]


def test_save_figure_writes_a_png_atomically(tmp_path: Path) -> None:
    path = viz.save_figure(viz.dice_histogram([0.5]), tmp_path / "sub" / "d.png")
    with Image.open(path) as im:
        assert im.format == "PNG"
    assert [p.name for p in path.parent.iterdir()] == ["d.png"]


# ----------------------------------------------------------------------------- run folders

H = W = 8


def _masks(n: int) -> np.ndarray:
    m = np.zeros((n, H, W), np.uint8)
    for i in range(n):
        m[i, : i + 1, :4] = 1  # tile i: (i + 1) x 4 building
    m[0] = 0  # tile 0 empty
    return m


def _write_run(
    root: Path, names: list[str], folds: list[int], probs: np.ndarray, threshold: float = 0.5
) -> Path:
    """A run folder in make train's layout: OOF files in reverse order so load_run's sorting is tested."""
    root.mkdir(parents=True)
    save_config(Config(name=root.name, data=DataConfig(root=str(root / "data"))), root / "config.yaml")
    pd.DataFrame({"name": names, "fold": folds}).to_csv(root / "folds.csv", index=False)
    for k in sorted(set(folds)):
        d = root / f"fold{k}"
        d.mkdir()
        _metrics(k).to_csv(d / "metrics.csv", index=False)
        idx = [i for i, f in enumerate(folds) if f == k][::-1]
        np.savez_compressed(d / "oof.npz", names=np.array([names[i] for i in idx]), probs=probs[idx])
    pd.DataFrame({"threshold": [0.5], "min_area": [0], "dice": [0.9]}).to_csv(
        root / "threshold_search.csv", index=False
    )
    save_yaml(
        root / "manifest.yaml",
        {
            "run": root.name,
            "checkpoints": ["fold0/best.pt"],
            "threshold": threshold,
            "min_area": 0,
            "oof": {"oof_dice": 0.5},
        },
    )
    return root


@pytest.fixture
def small_run(tmp_path: Path) -> tuple[Path, Split]:
    names = [f"t{i}.png" for i in range(5)]
    truths = _masks(5)
    probs = (truths * 200).astype(np.uint8)
    probs[3] = 0  # tile 3 missed entirely -> Dice 0
    run = _write_run(tmp_path / "run", names, [0, 1, 0, 1, 0], probs)
    images = tmp_path / "images"
    images.mkdir()
    paths = [_png(images / n, np.zeros((H, W, 3), np.uint8)) for n in names]
    return run, Split(names, paths, truths)


def test_load_run_reads_and_sorts(small_run: tuple[Path, Split]) -> None:
    run = viz.load_run(small_run[0])
    assert run.name == "run" and sorted(run.metrics) == [0, 1]
    assert run.oof_names.tolist() == [f"t{i}.png" for i in range(5)]
    assert run.oof_folds.tolist() == [0, 1, 0, 1, 0]
    assert run.oof_probs.shape == (5, H, W) and run.oof_probs.dtype == np.uint8
    assert np.array_equal(run.oof_probs[2] > 0, _masks(5)[2] > 0), "probabilities must follow their names"
    assert (run.threshold, run.min_area, run.oof_dice) == (0.5, 0, 0.5)
    assert run.config["name"] == "run" and list(run.threshold_search.columns) == [
        "threshold",
        "min_area",
        "dice",
    ]
    assert viz.run_data_config(run, "elsewhere").root == "elsewhere"
    assert viz.run_data_config(small_run[0]).root.endswith("data")


@pytest.mark.parametrize(
    ("remove", "message"),
    [
        ("manifest.yaml", "manifest.yaml not found"),
        ("folds.csv", "folds.csv not found"),
        ("fold1/oof.npz", "fold 1 has not finished"),
        ("threshold_search.csv", "threshold_search.csv not found"),
    ],
)
def test_load_run_missing_file_says_train_first(
    small_run: tuple[Path, Split], remove: str, message: str
) -> None:
    (small_run[0] / remove).unlink()
    with pytest.raises(viz.RunError, match=message) as e:
        viz.load_run(small_run[0])
    assert "make train" in str(e.value)


def test_load_run_errors(tmp_path: Path, small_run: tuple[Path, Split]) -> None:
    with pytest.raises(viz.RunError, match="make train"):
        viz.load_run(tmp_path / "absent")
    run = small_run[0]
    folds = pd.read_csv(run / "folds.csv")
    folds.loc[folds["name"] == "t1.png", "fold"] = 0  # t1 predicted by fold 1 but now belongs to fold 0
    folds.to_csv(run / "folds.csv", index=False)
    with pytest.raises(viz.RunError, match=r"t1.png \(fold 0\)"):
        viz.load_run(run)
    pd.DataFrame({"epoch": [1]}).to_csv(run / "fold0" / "metrics.csv", index=False)
    with pytest.raises(viz.RunError, match="lacks columns"):
        viz.load_run(run)


def test_evaluate_oof_scores_and_tables(small_run: tuple[Path, Split]) -> None:
    run_dir, train = small_run
    # the split lists tiles in another order than the run's sorted names: evaluation must align them
    order = [4, 2, 0, 3, 1]
    shuffled = train.subset(order)
    ev = viz.evaluate_oof(viz.load_run(run_dir), shuffled)
    assert ev.names.tolist() == [f"t{i}.png" for i in range(5)]
    assert ev.dice.tolist() == [1.0, 1.0, 1.0, 0.0, 1.0]
    assert [p.name for p in ev.image_paths] == ev.names.tolist()
    by_fold = ev.by_fold()
    assert by_fold.index.tolist() == ["0", "1", "all"]
    assert by_fold["tiles"].tolist() == [3, 2, 5] and by_fold["dice"].tolist() == [1.0, 0.5, 0.8]
    table = ev.table()
    assert table.iloc[0]["name"] == "t3.png" and table.iloc[0]["pred_fraction"] == 0.0
    # a threshold above every probability predicts nothing: only the empty tile scores
    assert viz.evaluate_oof(viz.load_run(run_dir), train, threshold=0.9).dice.tolist() == [1, 0, 0, 0, 0]
    fig = viz.worst_tiles_gallery(ev, 2)
    assert fig.axes[0].get_title().startswith("t3.png (fold 1)  Dice 0.000")


def test_evaluate_oof_names_tiles_missing_from_the_data(small_run: tuple[Path, Split]) -> None:
    run_dir, train = small_run
    with pytest.raises(viz.RunError, match="t4.png"):
        viz.evaluate_oof(viz.load_run(run_dir), train.subset([0, 1, 2, 3]))


def test_fold_test_agreement(small_run: tuple[Path, Split], monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir, train = small_run
    run = viz.load_run(run_dir)
    with pytest.raises(viz.Unavailable, match="checkpoints"):
        viz.fold_test_agreement(run, train.image_paths)
    run.manifest["checkpoints"] = ["fold0/best.pt", "fold1/best.pt"]
    for c in run.manifest["checkpoints"]:
        (run_dir / c).write_bytes(b"")
    import pipeline.infer

    p = np.zeros((2, H, W), np.float32)
    p[:, :2] = 0.7
    q = p.copy()
    q[1] = 0.4  # below the manifest threshold 0.5 in tile 1: fold 1 predicts it empty
    calls = []

    def fake_predict_folds(manifest_path, image_paths, tta="none"):
        calls.append((Path(manifest_path).name, len(image_paths), tta))
        return {1: q, 0: p}

    monkeypatch.setattr(pipeline.infer, "predict_folds", fake_predict_folds)
    df = viz.fold_test_agreement(run, train.image_paths[:2])
    assert calls == [("manifest.yaml", 2, "none")]
    assert df.index.tolist() == ["fold 0", "fold 1"]
    assert df.loc["fold 0", "fold 1"] == pytest.approx(0.5)  # tile 0 identical, tile 1 all vs nothing


# ----------------------------------------------------------------------------- data and submissions


def _source(tmp_path: Path) -> Source:
    masks = _masks(4)
    folder = tmp_path / "imgs"
    folder.mkdir()
    names = [f"s{i}.png" for i in range(4)]
    paths = [_png(folder / n, np.full((H, W, 3), 9, np.uint8)) for n in names]
    train = Split(names[:3], paths[:3], masks[:3])
    test = Split(names[3:], paths[3:], None)
    return Source(train, test, ["background", "building"])


def test_data_overview(tmp_path: Path) -> None:
    df = viz.data_overview(_source(tmp_path))
    assert df.index.tolist() == ["train", "test"]
    assert df.loc["train", ["tiles", "height", "width", "empty"]].tolist() == [3, H, W, 1]
    assert df.loc["train", "mean_fraction"] == pytest.approx((0 + 8 + 12) / 3 / 64)
    assert np.isnan(df.loc["test", "empty"])


def test_load_submission_checks_names_and_order(tmp_path: Path) -> None:
    test = _source(tmp_path).train  # three tiles with known masks
    masks = np.asarray(test.masks)
    rows = [f"{n}\t{rle.encode(m)}\n" for n, m in zip(test.names, masks)]
    good = tmp_path / "good.csv"
    good.write_text("".join(rows))
    assert np.array_equal(viz.load_submission(good, test), masks)
    swapped = tmp_path / "swapped.csv"
    swapped.write_text("".join([rows[1], rows[0], rows[2]]))
    with pytest.raises(ValueError, match="row 1 is s1.png but the sample submission has s0.png"):
        viz.load_submission(swapped, test)
    short = tmp_path / "short.csv"
    short.write_text("".join(rows[:2]))
    with pytest.raises(ValueError, match=r"1 missing \(s2.png\)"):
        viz.load_submission(short, test)
    with pytest.raises(ValueError, match="no test split"):
        viz.load_submission(good, None)


def test_resolve_submission_newest_or_explicit(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="make submit"):
        viz.resolve_submission("", tmp_path)
    old, new = tmp_path / "old.csv", tmp_path / "new.csv"
    old.write_text("")
    new.write_text("")
    (tmp_path / "new.csv.score.json").write_text("{}")
    os.utime(old, (1_000, 1_000))
    assert viz.resolve_submission("", tmp_path) == new
    assert viz.resolve_submission(old, tmp_path) == old
    with pytest.raises(FileNotFoundError):
        viz.resolve_submission(tmp_path / "missing.csv")


def test_split_grid_draws_the_chosen_tiles(tmp_path: Path) -> None:
    source = _source(tmp_path)
    fig = viz.split_grid(source.train, [2, 0])
    assert [ax.get_title() for ax in fig.axes[::3]] == ["s2.png", "s0.png"]
    with pytest.raises(ValueError, match="this split has none"):
        viz.split_grid(source.test, [0])
