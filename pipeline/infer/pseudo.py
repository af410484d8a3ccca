"""Pseudo-labelling: a trained run labels the unlabelled test tiles, and a second run trains on them too.

    python -m pipeline.infer.pseudo --run runs/<run> [--folds 0,1] [--low 0.3 --high 0.7] [key=value ...]
    make pseudo RUN=runs/<run> [FOLDS=0] [ARGS="--low 0.2 train.epochs=20"]

A round is two steps:

1. :func:`make_pseudo_labels`: the run's fold ensemble (the manifest's checkpoints and TTA set) predicts
   the test tiles the sample submission lists, and the mean probability of each pixel becomes a label
   where the ensemble is confident (:func:`pseudo_targets`): ``p >= high`` -> 1 (building), ``p <= low``
   -> 0 (background), the uncertain band in between -> 255, which the loss ignores. The file,
   ``runs/<run>/pseudo/labels-<tta>-<low>-<high>.npz``, holds ``names`` str [N], ``masks`` uint8
   [N, H, W] and ``meta`` (a JSON string: teacher, checkpoints, low, high, tta, fractions kept).
2. :func:`pseudo_round`: a new run ``<run>-pseudo`` beside the teacher, made of the teacher's saved
   config plus ``data.pseudo_labels=<file>``, ``loss.ignore_index=255``, ``data.folds_csv=<the
   teacher's folds.csv>`` and the user's overrides, trained by :func:`pipeline.train.trainer.run`. The test
   tiles join every fold's *training* tiles (:func:`pipeline.train.engine.fold_data`), never a validation
   set, so the new run is validated on exactly the teacher's tiles, tunes its own threshold on its own
   OOF files, writes its own manifest and resumes like any run. The file's settings are in its name,
   hence in the new run's config: a rerun with other ``--low/--high/--tta`` is a config change that
   the run folder refuses to mix (train it under ``name=...``); a rerun with the same settings reuses
   the file while it is newer than the teacher's checkpoints, so a resumed run keeps its labels.

Why both tails. Labelling only confident buildings and leaving everything else unlabelled would
teach nothing about the background of the new tiles; calling everything below ``high`` background
would turn each building the teacher half-missed into a confident false negative. Keeping both
tails and ignoring the band trains on the pixels the teacher is sure of, in both classes, and leaves
the doubtful ones (mostly building edges) to the truly labelled tiles. The defaults ``LOW = 0.3`` and
``HIGH = 0.7`` bracket the OOF threshold grid (``infer.thresholds``, 0.3 to 0.7): whatever threshold
the teacher's tuning picked, a kept pixel's label is the teacher's own decision at that threshold.

The test truth (``test_a_mask.csv``) is never read: the tiles come from
:func:`pipeline.data.dataset.load_unlabelled` (the sample submission and the test folder), not from
``read_source``, which would attach the truth.

Honesty of the second run's OOF score. The labels come from the whole fold ensemble: the fold-k model
saw no fold-k validation tile, but the other folds' models trained on them, and what they learnt there
reaches the fold-k student through the test tiles' labels. The second run's OOF score can therefore
be slightly optimistic. It is strictly honest when the teacher's manifest holds only the model of the
fold the student validates on, i.e. teacher and student both trained with ``--folds k`` (as a
benchmark does); :func:`pseudo_round` prints a note otherwise.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.config import Config, ConfigError, DataConfig, load_config
from pipeline.core.device import pick_device
from pipeline.core.errors import cli
from pipeline.core.io import atomic_write
from pipeline.core.tta import TTA_SETS
from pipeline.data import DataError
from pipeline.data.dataset import load_pseudo_labels, load_unlabelled
from pipeline.data.layouts import layout
from pipeline.infer.ensemble import iter_predictions, load_ensemble
from pipeline.runs import RunError
from pipeline.runs.manifest import load_manifest, run_data_config
from pipeline.train import trainer

__all__ = [
    "HIGH", "IGNORE", "LOW", "check_band", "labels_path", "main", "make_pseudo_labels", "pseudo_round",
    "pseudo_targets", "read_meta", "student_config", "write_pseudo_labels",
]  # fmt: skip

LOW = 0.3  # p <= LOW: background. With HIGH, brackets the OOF threshold grid (module docstring)
HIGH = 0.7  # p >= HIGH: building
IGNORE = 255  # the uncertain band: the second run trains with loss.ignore_index=IGNORE


def check_band(low: float, high: float) -> None:
    """``0 <= low < high <= 1``, else a ConfigError naming the flags."""
    if not 0.0 <= low < high <= 1.0:  # also refuses NaN
        raise ConfigError(f"pseudo labels need 0 <= --low < --high <= 1; got low={low}, high={high}")


def pseudo_targets(probs: np.ndarray, low: float = LOW, high: float = HIGH) -> np.ndarray:
    """Confident pixels of both tails: float probabilities [..., H, W] -> uint8 of the same shape, 1 where
    ``p >= high``, 0 where ``p <= low``, :data:`IGNORE` in between (and where ``p`` is NaN)."""
    check_band(low, high)
    # In the probabilities' own precision: float32(0.3) is above the float 0.3, yet p = 0.3 is "<= low".
    kind = probs.dtype.type if np.issubdtype(probs.dtype, np.floating) else np.float64
    out = np.full(probs.shape, IGNORE, dtype=np.uint8)
    out[probs <= kind(low)] = 0
    out[probs >= kind(high)] = 1
    return out


def labels_path(run_dir: str | Path, low: float, high: float, tta: str) -> Path:
    """``<run>/pseudo/labels-<tta>-<low>-<high>.npz``: the settings are in the name, so the config of a
    second run trained on the file changes with them."""
    return Path(run_dir) / "pseudo" / f"labels-{tta}-{low:g}-{high:g}.npz"


def write_pseudo_labels(
    path: str | Path, names: Sequence[str], masks: np.ndarray, meta: dict[str, Any]
) -> Path:
    """Write a pseudo-label file atomically: ``names`` str [N], ``masks`` uint8 [N, H, W] (0/1/255),
    ``meta`` (a JSON string; read back with :func:`read_meta`). Returns ``path``."""
    with atomic_write(path, "wb") as f:
        np.savez_compressed(
            f, names=np.array([str(n) for n in names]), masks=masks, meta=np.array(json.dumps(meta))
        )
    return Path(path)


def read_meta(path: str | Path) -> dict[str, Any]:
    """The ``meta`` dict of a pseudo-label file ({} when unreadable: the file is then made again)."""
    try:
        with np.load(path) as z:
            return json.loads(str(z["meta"]))
    except (OSError, KeyError, TypeError, ValueError):
        return {}


def _teacher_folds(checkpoints: Sequence[str]) -> list[int | None]:
    """Fold of each checkpoint from its ``fold<k>/`` folder (None for a hand-made ensemble's other names)."""
    return [int(m.group(1)) if (m := re.search(r"fold(\d+)", c)) else None for c in checkpoints]


def _targets(batches: Iterator[tuple[list[str], np.ndarray]], n: int, low: float, high: float) -> np.ndarray:
    """uint8 [n, H, W] labels of :func:`pseudo_targets` from batches of (names, probabilities [B, H, W]).

    The probabilities of a batch are dropped once thresholded: only the uint8 labels are kept."""
    masks, done = None, 0
    for names, probs in batches:
        if masks is None:
            masks = np.empty((n, *probs.shape[1:]), dtype=np.uint8)
        masks[done : done + len(names)] = pseudo_targets(probs, low, high)
        done += len(names)
    if masks is None or done != n:
        raise RuntimeError(f"predicted {done} of {n} tiles")  # a bug, not an input problem
    return masks


def make_pseudo_labels(
    run_dir: str | Path,
    low: float = LOW,
    high: float = HIGH,
    tta: str | None = None,
    device: str = "auto",
    *,
    data: DataConfig | None = None,
    num_workers: int = DataConfig.num_workers,
) -> Path:
    """Predict the unlabelled test tiles with the run's ensemble, keep both confident tails, write the file.

    Args:
        run_dir: a trained binary run (its ``manifest.yaml`` names the checkpoints and the TTA set).
        low, high: the band ``(low, high)`` becomes :data:`IGNORE`; see :func:`pseudo_targets`.
        tta: a key of ``pipeline.core.tta.TTA_SETS``; None = the manifest's.
        data: where the test tiles are (default: the run's data section); only ``root``, ``test_dir``
            and ``sample_csv`` are read, never ``test_mask_csv``.
    Returns:
        the written file (:func:`labels_path`): ``names`` str [N] in sample-submission order, ``masks``
        uint8 [N, H, W] of 0/1/255, ``meta``. Prints a one-line summary.
    """
    check_band(low, high)
    run_dir = Path(run_dir)
    manifest = load_manifest(run_dir)
    if manifest.classes != 1:
        raise ConfigError(f"{run_dir}: pseudo labels are for binary runs (model.classes=1)")
    tta_name = tta or manifest.infer.tta
    if tta_name not in TTA_SETS:
        raise ConfigError(f"unknown TTA set {tta_name!r}; use one of {', '.join(TTA_SETS)}")
    data = data or run_data_config(run_dir)
    if not layout(data.layout).rle_masks:
        raise ConfigError(
            f"pseudo-labelling reads the competition layout's unlabelled test folder ({data.test_dir}/ and "
            f"{data.sample_csv}); data.layout={data.layout} has none"
        )
    tiles = load_unlabelled(Path(data.root), data.test_dir, data.sample_csv)  # never the test truth
    if not len(tiles):
        raise DataError(f"{Path(data.root) / data.sample_csv} lists no test tiles: nothing to pseudo-label")
    dev = pick_device(device)
    models, _ = load_ensemble(manifest, dev)
    batches = iter_predictions(
        models,
        tiles,
        tta_name,
        dev,
        manifest.infer.batch_size,
        num_workers,
        max_images=manifest.infer.max_images,
    )
    masks = _targets(batches, len(tiles), low, high)
    kept, building = int(np.count_nonzero(masks != IGNORE)), int(np.count_nonzero(masks == 1))
    meta = {
        "teacher": str(run_dir),
        "checkpoints": list(manifest.checkpoints),
        "teacher_folds": _teacher_folds(manifest.checkpoints),
        "low": low,
        "high": high,
        "tta": tta_name,
        "data_root": str(data.root),
        "tiles": len(tiles),
        "kept": kept / masks.size,  # fraction of the pixels that carry a label
        "building": building / kept if kept else 0.0,  # fraction of the labelled pixels that are building
    }
    out = write_pseudo_labels(labels_path(run_dir, low, high, tta_name), tiles.names, masks, meta)
    print(
        f"pseudo labels: {len(tiles)} tiles, {meta['kept']:.1%} of pixels kept, {meta['building']:.1%} "
        f"of them building (low {low:g}, high {high:g}, tta {tta_name}) -> {out}"
    )
    return out


def student_config(run_dir: Path, labels: Path, overrides: Sequence[str] = ()) -> Config:
    """The second run's config: the teacher's ``config.yaml``, named ``<run>-pseudo`` beside it, trained on
    ``labels`` too (255 ignored) and validated on the teacher's folds; then the user's ``overrides``."""
    for need in ("config.yaml", "folds.csv"):
        if not (run_dir / need).is_file():
            raise RunError(f"{run_dir / need} not found: pseudo-labelling needs a trained run (make train)")
    ours = {  # JSON-quoted: a path is a YAML string whatever characters it holds
        "name": f"{run_dir.name}-pseudo",
        "train.runs_dir": str(run_dir.parent),
        "data.pseudo_labels": str(labels),
        "data.folds_csv": str(run_dir / "folds.csv"),
        "loss.ignore_index": IGNORE,
    }
    return load_config(
        run_dir / "config.yaml", [*(f"{k}={json.dumps(v)}" for k, v in ours.items()), *overrides]
    )


def _reusable(labels: Path, run_dir: Path, data: DataConfig, checkpoints: Sequence[Path]) -> bool:
    """Whether ``labels`` were made by this teacher from this data, after its checkpoints were written:
    then a rerun (a resume of the second run) keeps the very labels it began with."""
    if not labels.is_file():
        return False
    meta = read_meta(labels)
    newest = max((c.stat().st_mtime for c in checkpoints if c.is_file()), default=float("inf"))
    return (meta.get("teacher"), meta.get("data_root")) == (str(run_dir), str(data.root)) and (
        labels.stat().st_mtime > newest
    )


def pseudo_round(
    run_dir: str | Path,
    folds: list[int] | None = None,
    low: float = LOW,
    high: float = HIGH,
    tta: str | None = None,
    overrides: Sequence[str] = (),
) -> Path:
    """Pseudo-label the test tiles with the run ``run_dir``, then train ``<run>-pseudo`` on them too.

    ``folds``: the folds of the second run to train (default all); ``overrides``: ``key=value`` on top of
    the teacher's config (``data.root=`` also moves where the test tiles are read). Returns the new run's
    folder. The labels file is checked (:func:`pipeline.data.dataset.load_pseudo_labels`) before the new run
    folder is touched.
    """
    run_dir = Path(run_dir)
    check_band(low, high)
    manifest = load_manifest(run_dir)
    labels = labels_path(run_dir, low, high, tta or manifest.infer.tta)
    cfg = student_config(run_dir, labels, overrides)
    if _reusable(labels, run_dir, cfg.data, [run_dir / c for c in manifest.checkpoints]):
        print(f"note: reusing {labels} (made from {cfg.data.root}, newer than the teacher's checkpoints)")
    else:
        make_pseudo_labels(
            run_dir, low, high, tta, cfg.train.device, data=cfg.data, num_workers=cfg.data.num_workers
        )
    load_pseudo_labels(cfg.data, cfg.loss.ignore_index)  # a bad file fails here, before the run folder
    teacher = {f for f in read_meta(labels).get("teacher_folds", []) if f is not None}
    if not (folds is not None and len(set(folds)) == 1 and teacher == set(folds)):
        print(
            f"note: the OOF score of {cfg.name} may be slightly optimistic: its pseudo labels come from "
            f"teacher folds {sorted(teacher)}, which trained on other folds' validation tiles "
            "(strictly honest: teacher and student both trained with the same single --folds k)"
        )
    return trainer.run(cfg, folds=folds)


@cli
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.infer.pseudo", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="the teacher: a trained run folder (runs/<run>)")
    p.add_argument(
        "--folds", type=trainer.fold_list, default=None, help="folds of the second run, e.g. 0 (default: all)"
    )
    p.add_argument("--low", type=float, default=LOW, help=f"p <= low is background (default {LOW})")
    p.add_argument("--high", type=float, default=HIGH, help=f"p >= high is building (default {HIGH})")
    p.add_argument("--tta", default=None, choices=list(TTA_SETS), help="default: the teacher manifest's")
    p.add_argument("overrides", nargs="*", help="key=value on the teacher's config, e.g. train.epochs=10")
    a = p.parse_intermixed_args(argv)  # make's ARGS may mix flags and key=value
    out = pseudo_round(Path(a.run), a.folds or None, a.low, a.high, a.tta, a.overrides)
    print(f"pseudo run: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
