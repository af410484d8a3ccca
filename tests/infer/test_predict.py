"""pipeline.infer.predict: class-id palette PNGs, size batching, the class figure, and the CLI on a tiny
3-class run (its metrics.json checked against a confusion matrix computed here from the PNGs)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from voc_data import draw_scene, make_voc, multi_cfg, voc_cfg

from pipeline.core.config import ConfigError, DataConfig
from pipeline.data.layouts import read_source
from pipeline.infer import predict, score, submit
from pipeline.runs.manifest import load_manifest, run_data_config
from pipeline.train import trainer


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory) -> Path:
    return make_voc(tmp_path_factory.mktemp("voc") / "VOC")


# ----------------------------------------------------------------------------- pieces


def test_size_groups_batch_same_sizes_and_pool_the_rest():
    sizes = [(64, 64), (60, 72), (64, 64), (48, 80), (64, 64)]
    groups = predict.size_groups(sizes, batch_size=8)
    assert groups == [([0, 2, 4], 8), ([1, 3], 1)]
    assert sorted(i for idx, _ in groups for i in idx) == list(range(5))


def test_class_prediction_figure_panels_and_legend():
    rng = np.random.default_rng(0)
    img, truth = draw_scene(rng, 48, 64)
    pred = np.where(truth == 255, 0, truth).astype(np.uint8)
    fig = predict.class_prediction_figure(
        [img, img],
        [pred, pred * 0],
        [truth, truth],
        [(0, 0, 0), (0, 255, 0), (255, 255, 0)],
        ["bg", "roof", "pool"],
        names=["a", "b"],
    )
    assert len(fig.axes) == 8
    assert [ax.get_title() for ax in fig.axes[:4]] == ["a", "overlay", "prediction", "truth"]
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["bg", "roof", "pool", "ignored"]
    overlay = fig.axes[1].images[0].get_array()
    assert (overlay[pred == 0] == img[pred == 0]).all()  # background is not tinted
    assert not (overlay[pred == 1] == img[pred == 1]).all()
    with pytest.raises(ValueError, match="2 images but 1 predictions"):
        predict.class_prediction_figure([img, img], [pred], None, [(0, 0, 0)] * 3, ["a", "b", "c"])


# ----------------------------------------------------------------------------- the stage


def _expected_metrics(pred_dir: Path, voc_root: Path) -> dict:
    """The promised metrics, recomputed here from the written PNGs and the truth masks (void 255 excluded),
    from the definitions: one confusion matrix over all pixels of all images."""
    test = read_source(voc_cfg(voc_root), with_train=False).test
    cm = np.zeros((3, 3), np.int64)
    for i, name in enumerate(test.names):
        with Image.open(pred_dir / f"{Path(name).stem}.png") as im:
            pred = np.asarray(im).astype(np.int64)
        truth = np.asarray(test.masks[i]).astype(np.int64)
        keep = truth != 255
        np.add.at(cm, (truth[keep], pred[keep]), 1)
    tp, truth_px, pred_px = np.diag(cm), cm.sum(1), cm.sum(0)

    def ratio(num: float, den: float) -> float | None:
        return float(num / den) if den else None

    iou = [ratio(tp[c], truth_px[c] + pred_px[c] - tp[c]) for c in range(3)]
    dice = [ratio(2 * tp[c], truth_px[c] + pred_px[c]) for c in range(3)]
    acc = [ratio(tp[c], truth_px[c]) for c in range(3)]

    def mean(values: list[float | None]) -> float:
        return float(np.mean([v for v in values if v is not None]))

    return {
        "n": len(test),
        "confusion_matrix": cm.tolist(),
        "pixel_accuracy": tp.sum() / cm.sum(),
        "mean_pixel_accuracy": mean(acc),
        "mean_iou": mean(iou),
        "fw_iou": sum(truth_px[c] / cm.sum() * iou[c] for c in range(3) if truth_px[c]),
        "mean_dice": mean(dice),
        "iou": iou,
        "dice": dice,
        "accuracy": acc,
        "truth_pixels": truth_px.tolist(),
        "pred_pixels": pred_px.tolist(),
    }


def test_predict_cli_writes_pngs_metrics_and_figure(voc_root, tmp_path, capsys):
    run_dir = trainer.run(multi_cfg(voc_root, tmp_path, "model.arch=FPN", "infer.tta=flip"), folds=[0])
    out = tmp_path / "pred"
    assert predict.main(["--run", str(run_dir), "--out", str(out), "--figure", "2", "--workers", "0"]) == 0
    printed = capsys.readouterr().out
    assert "mean IoU" in printed and "roof" in printed and "figure.png" in printed
    assert (out / "figure.png").stat().st_size > 0
    truth_dir = voc_root / "SegmentationClass"  # the data's own label PNGs: never an output
    before = {p: p.read_bytes() for p in truth_dir.iterdir()}
    assert predict.main(["--run", str(run_dir), "--out", str(truth_dir), "--workers", "0"]) == 2
    assert "would overwrite the data's own files" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in truth_dir.iterdir()} == before
    # metrics.json holds what it promises, for the PNGs it wrote.
    written = json.loads((out / "metrics.json").read_text())
    expected = _expected_metrics(out, voc_root)
    assert written["n"] == expected["n"] == 4 and written["tta"] == "flip" and written["ignore_index"] == 255
    assert written["confusion_matrix"] == expected["confusion_matrix"]
    for key in ("pixel_accuracy", "mean_pixel_accuracy", "mean_iou", "fw_iou", "mean_dice"):
        assert written[key] == pytest.approx(expected[key]), key
    assert [c["name"] for c in written["per_class"]] == ["background", "roof", "pool"]
    for key in ("iou", "dice", "accuracy", "truth_pixels", "pred_pixels"):
        assert [c[key] for c in written["per_class"]] == pytest.approx(expected[key]), key
    # The same PNGs scored by pipeline.infer.score give the same numbers (it rewrites metrics.json).
    assert score.main(["--pred-dir", str(out), "--data", str(voc_root), "--colormap", "colormap.json"]) == 0
    rescored = json.loads((out / "metrics.json").read_text())
    same = [k for k in rescored if k != "pred_dir"]
    assert {k: rescored[k] for k in same} == {k: written[k] for k in same}
    # A binary RLE submission is refused for a multi-class run, pointing at predict.
    manifest = load_manifest(run_dir)
    with pytest.raises(ConfigError, match="make predict"):
        submit.make_submission(manifest, run_data_config(manifest.run_dir), tmp_path)


def test_predict_refuses_data_with_other_classes(voc_root, tmp_path):
    run_dir = trainer.run(multi_cfg(voc_root, tmp_path, "model.arch=FPN"), folds=[0])
    data = DataConfig(root=str(voc_root), layout="voc")  # 21 VOC classes, the run predicts 3
    with pytest.raises(ConfigError, match="predicts 3 classes .* has 21"):
        predict.predict_to_dir(load_manifest(run_dir), data, tmp_path / "p", num_workers=0)
