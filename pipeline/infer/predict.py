"""Predict one class-id PNG per test image with a trained run, and score them when ground truth exists.

    python -m pipeline.infer.predict [--run runs/<run>] [--data DIR] [--out DIR] [--tta d4] [--figure N]

The multi-class counterpart of ``pipeline.infer.submit`` (which writes the binary competition's RLE CSV);
it also works for binary runs. Reads ``runs/<run>/manifest.yaml`` and the run's data section (layout,
colormap), predicts the layout's test split (competition: ``test_a/``; VOC: ``val.txt``;
cityscapes: ``images/val/``) at each image's native size, averages probabilities over TTA views and
folds, and writes ``<out>/<stem>.png`` atomically: a palette PNG whose pixel values are the class ids
(argmax; binary: the manifest's threshold and minimum component area) and whose palette is the run's
class colours, so it opens coloured in any viewer and reads back as ids.

When the test split has masks, ONE confusion matrix over all pixels of all images (the layout's
``ignore_index`` pixels excluded) gives pixel accuracy, mean pixel accuracy, IoU and Dice per class,
mean IoU and frequency-weighted IoU (binary: also the competition's mean per-image Dice); they are
printed and written to ``<out>/metrics.json``. ``--figure N`` writes ``<out>/figure.png``: image |
overlay | prediction (| truth) for the first N images, with a class legend.

Default ``--out``: ``predictions/<run>-<tta>/``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.core.config import ConfigError, DataConfig, InferConfig
from pipeline.core.device import pick_device
from pipeline.core.errors import cli
from pipeline.core.io import atomic_write_text, save_figure
from pipeline.core.tta import TTA_SETS
from pipeline.data import DataError
from pipeline.data.dataset import Split
from pipeline.data.images import image_size, read_image
from pipeline.data.labels import label_png_path, write_label_png
from pipeline.data.layouts import Source, layout, read_source
from pipeline.infer.ensemble import MAX_IMAGES, iter_predictions, load_ensemble
from pipeline.metrics import postprocess
from pipeline.metrics.pixel import confusion_matrix, dice_per_image, format_report, metrics_report
from pipeline.runs.manifest import Manifest, latest_run, load_manifest, run_data_config

if TYPE_CHECKING:
    from matplotlib.figure import Figure

Color = tuple[int, int, int]


@dataclass
class PredictResult:
    """What :func:`predict_to_dir` did: ``n`` PNGs in ``out_dir``; ``metrics`` when truth exists."""

    out_dir: Path
    n: int
    seconds: float
    metrics: dict[str, Any] | None = None
    metrics_path: Path | None = None
    figure_path: Path | None = None


def size_groups(sizes: Sequence[tuple[int, int]], batch_size: int) -> list[tuple[list[int], int]]:
    """Batches of same-size images: [(indices, batch size)], every index once, in first-seen order.

    Images that share their size with another one are batched together (``batch_size``); the
    remaining one-of-a-kind sizes go through one pass at batch size 1 (a VOC val set has hundreds
    of sizes: one loader per size would start hundreds of worker pools).
    """
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, s in enumerate(sizes):
        by_size.setdefault(tuple(s), []).append(i)
    groups = [(idx, batch_size) for idx in by_size.values() if len(idx) > 1]
    singles = [idx[0] for idx in by_size.values() if len(idx) == 1]
    if singles:
        groups.append((singles, 1))
    return groups


def predict_labels(
    models: Sequence[Any],
    split: Split,
    classes: int,
    tta: str,
    device: Any,
    threshold: float = InferConfig.threshold,
    min_area: int = InferConfig.min_area,
    batch_size: int = InferConfig.batch_size,
    num_workers: int = DataConfig.num_workers,
    max_images: int = MAX_IMAGES,
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (index in ``split``, class ids uint8 [H, W]) for every image, at its native size.

    Multi-class: argmax of the ensemble's mean softmax. Binary (``classes == 1``): probability >
    ``threshold``, then components smaller than ``min_area`` removed. Order: by size group.
    """
    sizes = [image_size(p) for p in split.image_paths]
    for idx, bs in size_groups(sizes, batch_size):
        sub = split.subset(idx)
        pos = 0
        for _, out in iter_predictions(
            models,
            sub,
            tta,
            device,
            bs,
            num_workers,
            classes,
            threshold if classes == 1 else None,
            max_images,
        ):
            ids = out if classes == 1 else out.argmax(1)
            for m in ids:
                if classes == 1 and min_area > 1:
                    m = postprocess.remove_small_components(m, min_area)
                yield idx[pos], np.asarray(m, dtype=np.uint8)
                pos += 1


def class_prediction_figure(
    images: Sequence[np.ndarray],
    preds: Sequence[np.ndarray],
    truths: Sequence[np.ndarray] | None,
    colors: Sequence[Color],
    class_names: Sequence[str],
    names: Sequence[str] | None = None,
    ignore_index: int | None = 255,
    alpha: float = 0.5,
) -> Figure:
    """One row per image: image | overlay | prediction | truth (when given), coloured by class, with a
    legend of the classes that appear.

    Args:
        images: N uint8 [H, W, 3]. preds: N class ids [H, W]. truths: N class ids [H, W] or None
            (``ignore_index`` pixels drawn white). colors/class_names: K, indexed by class id.
        alpha: opacity of the class colours in the overlay (class 0, the background, is not tinted).
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    from pipeline.data.labels import colorize

    n = len(images)
    if len(preds) != n or (truths is not None and len(truths) != n):
        raise ValueError(f"{n} images but {len(preds)} predictions / {len(truths or [])} truths")
    cols = 3 if truths is None else 4
    fig = Figure(figsize=(2.6 * cols, 2.6 * max(n, 1) + 0.4), layout="constrained")
    axes = fig.subplots(max(n, 1), cols, squeeze=False)
    present: set[int] = set()
    for i in range(n):
        img, pred = np.asarray(images[i]), np.asarray(preds[i])
        if img.shape[:2] != pred.shape:
            raise ValueError(f"image {i} is {img.shape[:2]} but its prediction is {pred.shape}")
        rgb = colorize(pred, colors, ignore_index)
        tint = (pred != 0)[..., None]
        over = np.where(tint, np.rint((1 - alpha) * img + alpha * rgb), img).astype(np.uint8)
        panels = [
            (img, str(names[i]) if names is not None else f"image {i}"),
            (over, "overlay"),
            (rgb, "prediction"),
        ]
        present |= set(np.unique(pred).tolist())
        if truths is not None:
            truth = np.asarray(truths[i])
            panels.append((colorize(truth, colors, ignore_index), "truth"))
            present |= set(np.unique(truth).tolist())
        for ax, (arr, title) in zip(axes[i], panels):
            ax.imshow(arr, interpolation="nearest")
            ax.set_title(title, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    handles = [
        Patch(color=np.asarray(colors[c]) / 255, label=str(class_names[c]))
        for c in sorted(present)
        if c < len(class_names)
    ]
    if ignore_index is not None and ignore_index in present:
        handles.append(Patch(facecolor="white", edgecolor="black", label="ignored"))
    if handles:
        fig.legend(
            handles=handles, loc="outside upper center", ncols=min(len(handles), 6), fontsize=8, frameon=False
        )
    return fig


def _classes_of(source: Source, classes: int, data: DataConfig) -> tuple[list[str], list[Color]]:
    """The run's class names and colours; the layout must have as many classes as the model predicts."""
    k = max(2, classes)
    if source.num_classes != k:
        raise ConfigError(
            f"the run predicts {k} classes (model.classes={classes}) but layout {data.layout!r} at "
            f"{data.root} has {source.num_classes} ({', '.join(source.class_names[:5])}, ...); use the data "
            "(and colormap) the run was trained on"
        )
    colors = list(source.colors) or [(0, 0, 0), (255, 255, 255)]
    return list(source.class_names), colors


def _write_figure(
    path: Path,
    test: Split,
    shown: dict[int, np.ndarray],
    colors: Sequence[Color],
    names: list[str],
    ignore: int | None,
) -> Path:
    """The first predictions beside their images (and truth): ``figure.png``."""
    order = sorted(shown)
    fig = class_prediction_figure(
        [read_image(test.image_paths[i]) for i in order],
        [shown[i] for i in order],
        [np.asarray(test.masks[i]) for i in order] if test.masks is not None else None,
        colors,
        names,
        [test.names[i] for i in order],
        ignore,
    )
    return save_figure(fig, path)


# ----------------------------------------------------------------------------- the stage


def predict_to_dir(
    manifest: Manifest,
    data: DataConfig,
    out_dir: str | Path | None = None,
    tta: str | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    num_workers: int = DataConfig.num_workers,
    figure: int = 0,
) -> PredictResult:
    """Predict the test split of ``data`` with the ensemble in ``manifest``: PNGs, then metrics.

    Returns a :class:`PredictResult`; ``metrics`` is :func:`pipeline.metrics.pixel.metrics_report` of the
    one confusion matrix (plus ``n``, ``run``, ``tta`` and, binary, ``competition_dice``).
    """
    t0 = time.time()
    source = read_source(data, with_train=False)
    test = source.test
    if test is None or not len(test):
        raise DataError(
            f"no test images in {data.root} for layout {data.layout!r} (VOC: "
            "ImageSets/Segmentation/val.txt; cityscapes: images/val/; competition: test_a/)"
        )
    dev = pick_device(device)
    models, cfg = load_ensemble(manifest, dev)
    classes = cfg.model.classes
    names, colors = _classes_of(source, classes, data)
    ignore = cfg.loss.ignore_index if cfg.loss.ignore_index is not None else source.ignore_index
    tta_name = tta or manifest.infer.tta
    out = Path(out_dir) if out_dir else Path("predictions") / f"{manifest.name}-{tta_name}"
    paths = [label_png_path(out, n) for n in test.names]
    clash = sorted(str(p) for p, n in Counter(paths).items() if n > 1)
    if clash:
        raise DataError(f"test images {clash[:5]} map to the same output PNG (same stem); rename them")
    inputs = {Path(p).resolve() for p in [*test.image_paths, *getattr(test.masks, "paths", [])]}
    overwritten = [str(p) for p in paths if p.resolve() in inputs]
    if overwritten:
        raise DataError(
            f"--out {out} would overwrite the data's own files ({', '.join(overwritten[:3])}); choose "
            "another folder (default: predictions/<run>-<tta>/)"
        )

    k = len(names)
    cm = np.zeros((k, k), dtype=np.int64)
    dice: list[float] = []
    shown: dict[int, np.ndarray] = {}
    inf = manifest.infer
    post = (inf.threshold, inf.min_area, batch_size or inf.batch_size, num_workers, inf.max_images)
    batches = predict_labels(models, test, classes, tta_name, dev, *post)
    for i, ids in batches:
        write_label_png(paths[i], ids, colors)
        if test.masks is not None:
            truth = np.asarray(test.masks[i])
            cm += confusion_matrix(ids, truth, k, ignore_index=ignore)
            if classes == 1:
                pred_b, truth_b = ids == 1, truth == 1
                if ignore is not None:
                    pred_b, truth_b = pred_b & (truth != ignore), truth_b & (truth != ignore)
                dice.append(float(dice_per_image(pred_b[None], truth_b[None])[0]))
        if i < figure:
            shown[i] = ids
    result = PredictResult(out, len(test), 0.0)
    if test.masks is not None:
        result.metrics = {
            "run": manifest.name,
            "data": str(data.root),
            "layout": data.layout,
            "tta": tta_name,
        }
        result.metrics |= {"n": len(test), "ignore_index": ignore, **metrics_report(cm, names)}
        if classes == 1:
            result.metrics["competition_dice"] = float(np.mean(dice))
        result.metrics_path = out / "metrics.json"
        atomic_write_text(result.metrics_path, json.dumps(result.metrics, indent=1))
    if shown:
        result.figure_path = _write_figure(out / "figure.png", test, shown, colors, names, ignore)
    result.seconds = time.time() - t0
    return result


@cli
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.infer.predict", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default="", help="run folder or manifest.yaml (default: the newest run in runs/)")
    p.add_argument("--data", default="", help="data folder (default: the run's data root)")
    p.add_argument("--out", default="", help="output folder (default: predictions/<run>-<tta>/)")
    p.add_argument("--tta", default=None, choices=list(TTA_SETS), help="override the manifest's TTA")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--workers", type=int, default=DataConfig.num_workers, help="-1: the cores")
    p.add_argument("--figure", type=int, default=0, help="write figure.png of the first N images (0: none)")
    a = p.parse_args(argv)
    manifest = load_manifest(a.run or latest_run())
    data = run_data_config(manifest.run_dir, a.data)
    if layout(data.layout).checkable:
        from pipeline.data.check import require_clean

        require_clean(data, train=False)
    result = predict_to_dir(manifest, data, a.out or None, a.tta, a.device, a.batch_size, a.workers, a.figure)
    if result.metrics is not None:
        print(format_report(result.metrics))
        if "competition_dice" in result.metrics:
            print(f"competition Dice (mean per image) {result.metrics['competition_dice']:.4f}")
    print(
        f"predictions: {result.n} PNGs in {result.out_dir}/ ({result.seconds:.1f}s)"
        + (f"; metrics: {result.metrics_path}" if result.metrics_path else "")
        + (f"; figure: {result.figure_path}" if result.figure_path else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
