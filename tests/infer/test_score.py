"""pipeline.infer.score: the binary RLE submission against its truth (known answers), and class-id PNGs
against a layout's test split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from voc_data import make_voc, voc_cfg

from pipeline.data import DataError, rle
from pipeline.data.layouts import read_source
from pipeline.infer import predict, score
from pipeline.metrics.pixel import confusion_matrix


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory) -> Path:
    return make_voc(tmp_path_factory.mktemp("voc") / "VOC")


# ----------------------------------------------------------------------------- binary RLE submission


def _csv(path: Path, masks: dict[str, np.ndarray]) -> Path:
    path.write_text("".join(f"{name}\t{rle.encode(m)}\n" for name, m in masks.items()))
    return path


def _known_pair(tmp_path: Path) -> tuple[Path, Path]:
    """Three 4x4 tiles with hand-computed scores.

    a: truth a 2x2 block, prediction the top two rows -> |P&T| 4, |P| 8, |T| 4: Dice 2/3, IoU 1/2.
    b: both empty -> 1, 1.    c: one true pixel, nothing predicted -> 0, 0.
    """
    a_truth, a_pred = np.zeros((4, 4), np.uint8), np.zeros((4, 4), np.uint8)
    a_truth[:2, :2] = 1
    a_pred[:2] = 1
    c_truth = np.zeros((4, 4), np.uint8)
    c_truth[3, 3] = 1
    empty = np.zeros((4, 4), np.uint8)
    truth = _csv(tmp_path / "truth.csv", {"a.jpg": a_truth, "b.jpg": empty, "c.jpg": c_truth})
    sub = _csv(tmp_path / "sub.csv", {"c.jpg": empty, "a.jpg": a_pred, "b.jpg": empty})  # any row order
    return sub, truth


def test_score_submission_known_answer(tmp_path):
    sub, truth = _known_pair(tmp_path)
    r = score.score_submission(sub, truth, (4, 4))
    assert r["n"] == 3
    assert r["dice_per_tile"] == {"a.jpg": round(2 / 3, 6), "b.jpg": 1.0, "c.jpg": 0.0}
    assert r["dice"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert r["iou"] == pytest.approx((1 / 2 + 1 + 0) / 3)
    # All 48 pixels: TP 4, FP 4 (a's second row half), FN 1 (c), TN 39.
    m = r["metrics"]
    assert m["confusion_matrix"] == [[39, 4], [1, 4]]
    assert m["pixel_accuracy"] == pytest.approx(43 / 48)
    assert m["per_class"][1]["dice"] == pytest.approx(2 * 4 / (8 + 5))
    assert [c["name"] for c in m["per_class"]] == ["background", "building"]


def test_score_submission_refuses_a_missing_tile(tmp_path):
    _, truth = _known_pair(tmp_path)
    partial = _csv(tmp_path / "partial.csv", {"a.jpg": np.zeros((4, 4), np.uint8)})
    with pytest.raises(DataError, match="lacks 2 tiles"):
        score.score_submission(partial, truth, (4, 4))


def test_score_cli_writes_the_score_next_to_the_submission(tmp_path, capsys):
    sub, truth = _known_pair(tmp_path)
    assert score.main([str(sub), "--truth", str(truth), "--size", "4"]) == 0
    written = json.loads(Path(f"{sub}.score.json").read_text())
    assert written["dice"] == pytest.approx(5 / 9) and written["n"] == 3
    printed = capsys.readouterr().out
    assert "competition Dice 0.5556" in printed and "mean IoU" in printed


def test_score_submission_counts_buildings(tmp_path, capsys):
    """Per building, IoU >= 0.5: a's 8-px prediction holds its 4-px truth (IoU 0.5, a match); c is missed."""
    sub, truth = _known_pair(tmp_path)
    b = score.score_submission(sub, truth, (4, 4))["buildings"]
    assert (b["tp"], b["fp"], b["fn"]) == (1, 0, 1) and b["f1"] == pytest.approx(2 / 3)
    assert b["by_size"]["small"]["tp"] == 1 and b["unit"] == "px"
    assert score.main([str(sub), "--truth", str(truth), "--size", "4"]) == 0
    assert "F1 0.6667  (TP 1, FP 0, FN 1)" in capsys.readouterr().out
    assert json.loads(Path(f"{sub}.score.json").read_text())["buildings"]["fn"] == 1


def test_score_cli_footprints(tmp_path, capsys):
    """make score FOOTPRINTS= TRUTH=: polygons against a true mask GeoTIFF; bad input is one error line."""
    from synthetic_scenes import write_tif

    from pipeline.infer import footprints

    truth = np.zeros((40, 40), np.uint8)
    truth[2:10, 2:10] = truth[20:30, 20:30] = 1
    write_tif(tmp_path / "truth.tif", truth)
    pred = truth.copy()
    pred[20:30, 20:30] = 0  # one building missed
    write_tif(tmp_path / "pred.tif", pred)
    footprints.write_footprints(footprints.vectorize_raster(tmp_path / "pred.tif"), tmp_path / "b.gpkg")
    truth_arg = ["--truth", str(tmp_path / "truth.tif")]
    assert score.main(["--footprints", str(tmp_path / "b.gpkg"), *truth_arg]) == 0
    assert "F1 0.6667  (TP 1, FP 0, FN 1)" in capsys.readouterr().out
    assert json.loads((tmp_path / "b.gpkg.score.json").read_text())["n_truth"] == 2
    assert score.main(["--footprints", str(tmp_path / "b.gpkg")]) == 2  # the default --truth is a CSV
    (tmp_path / "bad.gpkg").write_text("no")
    assert score.main(["--footprints", str(tmp_path / "bad.gpkg"), *truth_arg]) == 2
    err = capsys.readouterr().err
    assert "--footprints needs --truth" in err and "bad.gpkg" in err and "Traceback" not in err


def test_binary_confusion_matches_the_general_matrix():
    rng = np.random.default_rng(0)
    p, t = rng.integers(0, 2, (70, 9, 11), dtype=np.uint8), rng.integers(0, 2, (70, 9, 11), dtype=np.uint8)
    np.testing.assert_array_equal(score.binary_confusion(p, t), confusion_matrix(p, t, 2))


# ----------------------------------------------------------------------------- class-id PNGs


def test_score_label_dir_against_truth(voc_root, tmp_path):
    source = read_source(voc_cfg(voc_root), with_train=False)
    colors = source.colors
    for i, name in enumerate(source.test.names):  # perfect except one image predicted all background
        truth = np.asarray(source.test.masks[i])
        pred = np.where(truth == 255, 0, truth).astype(np.uint8) if i else np.zeros_like(truth)
        predict.write_label_png(predict.label_png_path(tmp_path, name), pred, colors)
    r = score.score_label_dir(tmp_path, source.test, source.class_names, 255)
    t0 = np.asarray(source.test.masks[0])
    fg0 = int(((t0 == 1) | (t0 == 2)).sum())
    assert r["n"] == 4
    assert r["per_class"][0]["pred_pixels"] - r["per_class"][0]["truth_pixels"] == fg0
    assert 0 < r["mean_iou"] < 1 and r["per_class"][1]["accuracy"] < 1
    # the CLI: same numbers, written to <pred-dir>/metrics.json
    rc = score.main(
        [
            "--pred-dir",
            str(tmp_path),
            "--data",
            str(voc_root),
            "--layout",
            "voc",
            "--colormap",
            "colormap.json",
        ]
    )
    assert rc == 0
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["mean_iou"] == pytest.approx(r["mean_iou"])
    (tmp_path / "2007_000009.png").unlink()
    with pytest.raises(DataError, match="1 of 4 predictions are missing"):
        score.score_label_dir(tmp_path, source.test, source.class_names, 255)


def test_the_tile_size_is_measured_as_validate_measures_it_never_assumed(tmp_path, capsys):
    """A truth and a submission without their tiles used to be scored as 512 px tiles (Dice 1.0 for two
    empty rows) while validate refused: the one rule refuses both."""
    (tmp_path / "truth.csv").write_text("a.jpg\t\nb.jpg\t\n")
    (tmp_path / "sub.csv").write_text("a.jpg\t\nb.jpg\t\n")
    assert score.main([str(tmp_path / "sub.csv"), "--truth", str(tmp_path / "truth.csv")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot measure the tiles") and "--size 512" in err
    assert not (tmp_path / "sub.csv.score.json").exists()
    assert (
        score.main([str(tmp_path / "sub.csv"), "--truth", str(tmp_path / "truth.csv"), "--size", "8x6"]) == 0
    )


def test_a_submission_is_scored_against_the_data_it_was_made_for(tmp_path, capsys):
    """make score without DATA used to score against data/demo whatever the submission was made for,
    and overwrite its score when the tile names matched."""
    from pipeline.runs.folder import write_submission_record

    own, other = tmp_path / "own", tmp_path / "other"
    for root, rle_text in ((own, "1 4"), (other, "5 4")):
        (root / "test_a").mkdir(parents=True)
        (root / "test_a_mask.csv").write_text(f"a.png\t{rle_text}\n")
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / "test_a" / "a.png")
    sub = tmp_path / "sub.csv"
    sub.write_text("a.png\t1 4\n")
    assert score.main([str(sub)]) == 2
    assert "no record of the data it was made for" in capsys.readouterr().err
    write_submission_record(
        sub, {"data_root": str(own), "test_dir": "test_a", "test_mask_csv": "test_a_mask.csv"}
    )
    assert score.main([str(sub)]) == 0
    assert json.loads(Path(f"{sub}.score.json").read_text())["dice"] == 1.0
    assert score.main([str(sub), "--truth", str(other / "test_a_mask.csv")]) == 0
    assert "note: " in capsys.readouterr().out
    assert json.loads(Path(f"{sub}.score.json").read_text())["dice"] == 1.0  # its own score kept
    assert json.loads(Path(f"{sub}.vs-other.score.json").read_text())["dice"] == 0.0
