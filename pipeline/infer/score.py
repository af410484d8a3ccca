"""Score predictions against ground truth: the competition Dice, and every confusion-matrix metric.

    python -m pipeline.infer.score SUBMISSION [--truth DATA/test_a_mask.csv]      # binary RLE (make score)
    python -m pipeline.infer.score --pred-dir DIR --data DIR [--layout voc] [--colormap JSON]  # PNGs
    python -m pipeline.infer.score --footprints buildings.gpkg --truth truth.gpkg|truth_mask.tif  # polygons

Binary: the competition score is the mean per-image Dice (empty/empty = 1); one confusion matrix over
all pixels of all tiles adds pixel accuracy, mean pixel accuracy, IoU and Dice per class, mean IoU and
frequency-weighted IoU. Writes ``<submission>.score.json``. Beside Dice, per-building precision, recall
and F1 (buildings matched one to one at IoU >= 0.5, by size; :mod:`pipeline.metrics.buildings`), for tiles and
for footprint files (``make score FOOTPRINTS=... TRUTH=...``, ``<footprints>.score.json``).

Class-id PNGs (what ``python -m pipeline.infer.predict`` writes, ``<stem>.png`` per test image, palette or
grey values = class ids): one confusion matrix over all images of the layout's test split (VOC:
``val.txt``; cityscapes: ``labels/val``), ignoring the layout's ``ignore_index`` pixels; writes
``<pred-dir>/metrics.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.config import ConfigError, DataConfig
from pipeline.core.errors import cli
from pipeline.core.io import atomic_write_text
from pipeline.data import DataError, rle
from pipeline.data.dataset import Split
from pipeline.data.labels import label_png_path, read_label_png
from pipeline.data.layouts import BUILDING_CLASSES, Colormap, read_source
from pipeline.data.masks import read_mask_csv
from pipeline.infer.validate import tile_shape
from pipeline.metrics import buildings
from pipeline.metrics.pixel import (
    confusion_matrix,
    dice_per_image,
    format_report,
    iou_per_image,
    metrics_report,
)
from pipeline.runs.folder import latest_submission, read_submission_record

CHUNK = 64  # tiles per confusion-matrix update: bounded memory on 2,500 512x512 tiles


# ----------------------------------------------------------------------------- binary RLE submission


def binary_confusion(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Confusion matrix [2, 2] int64 of 0/1 masks [N, H, W] (rows = truth), ``CHUNK`` tiles at a time.

    Counting the four cells directly avoids the int64 copies of a general bincount: 2,500 tiles of
    512x512 stay within a few hundred MB.
    """
    if pred.shape != truth.shape:
        raise ValueError(f"binary_confusion: pred {pred.shape} and truth {truth.shape} differ")
    cm = np.zeros((2, 2), dtype=np.int64)
    for i in range(0, len(pred), CHUNK):
        p, t = pred[i : i + CHUNK] != 0, truth[i : i + CHUNK] != 0
        tp, fp, fn = np.count_nonzero(p & t), np.count_nonzero(p & ~t), np.count_nonzero(~p & t)
        cm += np.array([[p.size - tp - fp - fn, fp], [fn, tp]], dtype=np.int64)
    return cm


def score_submission(sub_path: str | Path, truth_path: str | Path, shape: tuple[int, int]) -> dict[str, Any]:
    """Mean per-image Dice and IoU of ``sub_path`` against ``truth_path`` (both name<TAB>rle), plus the
    confusion-matrix metrics of all pixels under ``"metrics"`` (see :func:`metrics_report`).

    Every truth tile must be in the submission (a missing tile would silently inflate the score).
    """
    sub = read_mask_csv(sub_path, require_rle=False)
    truth = read_mask_csv(truth_path)
    pred_of = dict(zip(sub["name"], sub["rle"]))
    missing = [n for n in truth["name"] if n not in pred_of]
    if missing:
        raise DataError(
            f"{sub_path} lacks {len(missing)} tiles of {truth_path} ({', '.join(missing[:5])}); "
            "a submission must list every test tile"
        )
    names = truth["name"].tolist()
    t = rle.decode_many(truth["rle"].tolist(), shape, source=str(truth_path), names=names)
    p = rle.decode_many([pred_of[n] for n in names], shape, source=str(sub_path), names=names)
    dice = dice_per_image(p, t)
    iou = iou_per_image(p, t)
    return {
        "submission": str(sub_path),
        "truth": str(truth_path),
        "n": len(names),
        "dice": float(dice.mean()),
        "iou": float(iou.mean()),
        "metrics": metrics_report(binary_confusion(p, t), BUILDING_CLASSES),
        "buildings": buildings.score_masks(p, t),
        "dice_per_tile": {n: round(float(d), 6) for n, d in zip(names, dice)},
    }


def write_score(result: dict[str, Any], sub_path: str | Path) -> Path:
    out = Path(f"{sub_path}.score.json")
    atomic_write_text(out, json.dumps(result, indent=1))
    return out


# ----------------------------------------------------------------------------- class-id PNGs


def score_label_dir(
    pred_dir: str | Path,
    truth: Split,
    class_names: Sequence[str],
    ignore_index: int | None = None,
) -> dict[str, Any]:
    """One confusion matrix of the PNGs in ``pred_dir`` against ``truth.masks``; :func:`metrics_report`
    plus ``n`` and ``pred_dir``.

    Args:
        truth: the test split; ``truth.masks[i]`` uint8 [H, W] class ids (``ignore_index`` not counted).
        class_names: K names; prediction values must be 0..K-1.
    """
    if truth.masks is None:
        raise DataError("the test split has no ground truth masks: nothing to score against")
    k = len(class_names)
    ids = Colormap.identity(class_names, [(0, 0, 0)] * k, None, f"the {k} classes of the run")
    paths = [label_png_path(pred_dir, n) for n in truth.names]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DataError(
            f"{len(missing)} of {len(paths)} predictions are missing ({', '.join(missing[:5])}); "
            "run python -m pipeline.infer.predict with the same data first"
        )
    cm = np.zeros((k, k), dtype=np.int64)
    for i, path in enumerate(paths):
        pred, true = read_label_png(path, ids), np.asarray(truth.masks[i])
        if pred.shape != true.shape:
            raise DataError(
                f"{path} is {pred.shape[0]}x{pred.shape[1]} but the truth of {truth.names[i]} is "
                f"{true.shape[0]}x{true.shape[1]}; predict at the images' native size"
            )
        cm += confusion_matrix(pred, true, k, ignore_index=ignore_index)
    return {"pred_dir": str(pred_dir), "n": len(paths), **metrics_report(cm, class_names)}


# ----------------------------------------------------------------------------- CLI


def _main_labels(a: argparse.Namespace) -> int:
    if not a.data:
        raise ConfigError("--pred-dir needs --data DIR (the data folder whose test split is the truth)")
    cfg = DataConfig(root=a.data, layout=a.layout, colormap_json=a.colormap)
    source = read_source(cfg, with_train=False)
    if source.test is None:
        raise DataError(
            f"{a.data} has no test split for layout {a.layout} (VOC: val.txt; cityscapes: images/val/)"
        )
    result = score_label_dir(a.pred_dir, source.test, source.class_names, source.ignore_index)
    out = Path(a.pred_dir) / "metrics.json"
    atomic_write_text(out, json.dumps(result, indent=1))
    print(format_report(result))
    print(f"({result['n']} images) -> {out}")
    return 0


def _main_footprints(a: argparse.Namespace) -> int:
    from pipeline.geo.vectorize import FootprintError
    from pipeline.infer.footprints import score_footprints

    if not a.truth or Path(a.truth).suffix.lower() == ".csv":
        raise ConfigError("--footprints needs --truth: true polygons (.gpkg, .geojson...) or a mask GeoTIFF")
    try:
        result = score_footprints(a.footprints, a.truth)
    except FootprintError as e:
        raise DataError(str(e)) from None
    for key, n in result["repaired"].items():
        if n:
            what = f"{n} invalid polygon{'s' if n > 1 else ''}"
            print(f"note: repaired {what} of {result[key]} with make_valid before scoring", file=sys.stderr)
    out = Path(f"{a.footprints}.score.json")
    atomic_write_text(out, json.dumps(result, indent=1))
    print(buildings.format_report(result["buildings"]))
    print(f"({result['n_pred']} predicted, {result['n_truth']} true buildings) -> {out}")
    return 0


def _truth_of(submission: str, truth: str) -> tuple[Path, Path, Path]:
    """(truth CSV, its tiles folder, where the score goes) for a submission.

    Without ``truth``, the truth of the data the submission was made for (its record, written by
    ``make submit``). With a ``truth`` of other data than that, the score is written beside the
    submission's own under another name: a score against another data set whose tile names happen to
    match never replaces the submission's score.
    """
    record = read_submission_record(submission)
    own = Path(record["data_root"]) / record["test_mask_csv"] if record else None
    if not truth:
        if own is None:
            raise ConfigError(
                f"{submission} has no record of the data it was made for ({submission}.json, written by make "
                "submit); name the truth: make score DATA=<data folder> (--truth DATA/test_a_mask.csv)"
            )
        if not own.is_file():
            raise DataError(
                f"{own} not found: the data {submission} was made for has no truth to score against"
            )
        truth = str(own)
    images = Path(truth).parent / (record["test_dir"] if record else DataConfig().test_dir)
    out = Path(f"{submission}.score.json")
    if own is not None and Path(truth).resolve() != own.resolve():
        out = Path(f"{submission}.vs-{Path(truth).resolve().parent.name}.score.json")
        print(f"note: {submission} was made for {own.parent}; its score against {truth} goes to {out}")
    return Path(truth), images, out


@cli
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.infer.score", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "submission", nargs="?", default="", help="binary: a submission CSV (default: the newest one)"
    )
    p.add_argument("--truth", default="", help="binary: truth CSV (default: the submission's own data's)")
    p.add_argument("--size", default="", help="binary: tile size, 512 or HxW (default: measured)")
    p.add_argument("--pred-dir", default="", help="class-id PNGs written by python -m pipeline.infer.predict")
    p.add_argument("--data", default="", help="with --pred-dir: the data folder holding the truth")
    p.add_argument("--layout", default="voc", help="with --pred-dir: voc, cityscapes or competition")
    p.add_argument("--colormap", default="", help="with --pred-dir: colormap JSON (cityscapes; voc optional)")
    p.add_argument("--footprints", default="", help="polygons of make footprints, scored against --truth")
    a = p.parse_args(argv)
    if a.pred_dir:
        return _main_labels(a)
    if a.footprints:
        return _main_footprints(a)
    a.submission = str(latest_submission(a.submission))
    truth, images, out = _truth_of(a.submission, a.truth)
    # The one rule validate uses: measured on a tile the truth lists (test_a/ beside it), never assumed.
    shape = tile_shape(a.size, truth, images)
    result = score_submission(a.submission, truth, shape)
    atomic_write_text(out, json.dumps(result, indent=1))
    print(format_report(result["metrics"]))
    print(
        f"competition Dice {result['dice']:.4f}  IoU {result['iou']:.4f}  "
        f"(means per tile, {result['n']} tiles)  -> {out}"
    )
    print(buildings.format_report(result["buildings"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
