"""Tune post-processing on the out-of-fold predictions and write the run's ensemble manifest.

    python -m pipeline.train.tune --run runs/<run> [--data DIR] [infer.thresholds=[0.4,0.5] ...]   # make tune

Training ends with this step; running it alone re-tunes a finished run without retraining (a new
threshold grid, a moved data folder). Binary runs: the threshold x minimum-component-area grid of
``infer.thresholds`` x ``infer.min_areas`` is searched on every fold's ``oof.npz`` at once, the table
goes to ``threshold_search.csv``, the best pair to ``manifest.yaml`` *and* into every ``best.pt``, so
a single checkpoint is self-sufficient. Multi-class runs: OOF mIoU and pixel accuracy (argmax needs
no threshold).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.config import Config, ConfigError, load_config
from pipeline.core.errors import BuildsegError, cli
from pipeline.core.io import CheckpointError, remove_stale_temps, transaction
from pipeline.core.progress import phase, progress
from pipeline.data import DataError
from pipeline.data.dataset import build_transforms
from pipeline.data.layouts import Source, read_source
from pipeline.data.masks import release_pages
from pipeline.metrics import postprocess
from pipeline.metrics.pixel import confusion_matrix, mean_iou, pixel_accuracy
from pipeline.runs.checkpoint import check_run_config, read_best, set_postprocessing
from pipeline.runs.folder import run_lock
from pipeline.runs.history import best_scores, monitor_key
from pipeline.runs.manifest import Manifest, latest_run, write_manifest, write_search
from pipeline.runs.oof import OOF_KEYS, oof_chunks, oof_files, oof_names, oof_truths


class TuneError(BuildsegError, RuntimeError):
    """Nothing to tune on; the message says what to run first."""


def iter_oof(run_dir: Path, source: Source, binary: bool) -> Iterator[tuple[int, np.ndarray, Any]]:
    """(fold, OOF chunk uint8 [n, H, W], truth masks [n, H, W]) over every fold file, streamed.

    One chunk of OOF maps and masks at a time: memory does not grow with the number of tiles.
    """
    files = oof_files(run_dir)
    if not files:
        raise TuneError(f"no out-of-fold files in {run_dir}; train at least one fold (make train)")
    total = sum(len(oof_names(p)) for p in files.values())
    with progress(total, f"tune {run_dir.name}: a pass over the OOF maps", unit="tile") as bar:
        for fold, path in files.items():
            for names, arr in oof_chunks(path, OOF_KEYS[binary]):
                try:
                    truths = oof_truths(source, names, arr, path, check_size=binary)
                except DataError as e:
                    raise TuneError(str(e)) from None
                yield fold, arr, truths
                release_pages(source.train.masks)  # a scan of every mask must not keep them resident
                bar.update(len(names))


def _counter(run_dir: Path, source: Source, folds: list[int]) -> postprocess.Counter:
    """One streamed pass over the run's OOF files per call, counting every grid asked for at once;
    ``folds`` is filled with the fold of each tile on the first pass."""

    def count(grids: list[tuple[list[float], list[int]]]) -> list[np.ndarray]:
        tallies = [postprocess.GridCounts(t, a) for t, a in grids]
        try:
            n = 0
            for fold, probs, truths in iter_oof(run_dir, source, binary=True):
                truths = np.asarray(truths)  # once per chunk, not once per grid
                for tally in tallies:
                    tally.add(probs, truths, first=n)
                n += len(probs)
                if len(folds) < n:
                    folds.extend([fold] * len(probs))
            return [tally.dice() for tally in tallies]
        finally:
            for tally in tallies:
                tally.close()

    return count


def tune_binary(cfg: Config, source: Source, run_dir: Path) -> dict[str, Any]:
    """Search threshold and min component area on every fold's OOF file; the table is in ``search``.

    The grid is ``infer.thresholds`` x ``infer.min_areas``, widened where its best value sits at an edge
    (:func:`pipeline.metrics.postprocess.search_extending`, one more streamed pass each time). The first
    pass also counts (0.5, 0), so Dice at the untuned rule comes from the same pass.
    """
    folds: list[int] = []
    tile_area = int(np.prod(source.train.masks[0].shape))
    counter, infer = _counter(run_dir, source, folds), cfg.infer
    result, cells, notes = postprocess.search_extending(
        counter, infer.thresholds, infer.min_areas, tile_area, postprocess.UNTUNED
    )
    folds_arr = np.asarray(folds)
    at_half, tuned = cells[0.5, 0], cells[result.threshold, result.min_area]
    rows = {
        int(k): {
            "n": int((folds_arr == k).sum()),
            "dice@0.5": float(at_half[folds_arr == k].mean()),
            "dice@tuned": float(tuned[folds_arr == k].mean()),
        }
        for k in sorted(set(folds))
    }
    return {
        "threshold": float(result.threshold),
        "min_area": int(result.min_area),
        "oof_dice": float(result.dice),
        "oof_dice@0.5": float(at_half.mean()),
        "per_fold": rows,
        "n_oof": len(folds),
        "widened": notes,
        "search": result.table,  # written with the manifest, in one transaction
    }


def tune_multiclass(cfg: Config, source: Source, run_dir: Path) -> dict[str, Any]:
    """mIoU and pixel accuracy of the OOF class ids from one confusion matrix.

    With ``data.crop_size`` the OOF predictions are of the validation view (pad + centre crop), so each
    truth goes through the same transform first; images may differ in size (VOC).
    """
    ignore = cfg.loss.ignore_index if cfg.loss.ignore_index is not None else 0
    view = build_transforms(cfg.aug, False, cfg.data.crop_size, ignore)
    k = cfg.model.classes
    cm = np.zeros((k, k), dtype=np.int64)
    n = 0
    for _, preds, truths in iter_oof(run_dir, source, binary=False):
        for i, pred in enumerate(preds):
            truth = np.asarray(truths[i])
            if view is not None:
                truth = view(image=np.zeros((*truth.shape, 3), np.uint8), mask=truth)["mask"]
            cm += confusion_matrix(pred, truth, k, ignore_index=cfg.loss.ignore_index)
        n += len(preds)
    return {
        "threshold": None,
        "min_area": None,
        "oof_miou": float(mean_iou(cm)),
        "oof_pixel_accuracy": float(pixel_accuracy(cm)),
        "per_fold": {},
        "n_oof": n,
    }


def check_members(run_dir: Path, ckpts: Sequence[str]) -> None:
    """Raise unless every checkpoint was trained with the run's config (:func:`check_run_config`): a fold
    of another config must not join the ensemble unnoticed."""
    for c in ckpts:
        try:
            check_run_config(run_dir / c, read_best(run_dir / c))
        except CheckpointError as e:
            raise TuneError(str(e)) from None


def publish(cfg: Config, run_dir: Path, tuned: dict[str, Any]) -> Path:
    """Write the ensemble description ``make submit`` reads (editable by hand) and the tuned values into
    every listed ``best.pt``. Only checkpoints of the run's config are listed (:func:`check_members`)."""
    ckpts = sorted(str(p.relative_to(run_dir)) for p in run_dir.glob("fold*/best.pt"))
    check_members(run_dir, ckpts)
    threshold = tuned["threshold"] if tuned["threshold"] is not None else cfg.infer.threshold
    min_area = tuned["min_area"] if tuned["min_area"] is not None else cfg.infer.min_area
    manifest = Manifest(
        run_dir=run_dir,
        checkpoints=tuple(ckpts),
        infer=dataclasses.replace(cfg.infer, threshold=threshold, min_area=min_area),
        classes=cfg.model.classes,
        data_root=cfg.data.root,
        oof={k: v for k, v in tuned.items() if k not in ("threshold", "min_area", "search")},
    )
    with transaction(run_dir):  # the search table, the manifest and every best.pt change together, or none
        if tuned.get("search") is not None:  # binary runs
            write_search(run_dir, tuned["search"])
        path = write_manifest(manifest)
        for c in ckpts:
            set_postprocessing(run_dir / c, threshold, min_area)
    return path


TUNERS = {True: tune_binary, False: tune_multiclass}


def tune_run(cfg: Config, source: Source, run_dir: Path) -> dict[str, Any]:
    """Tune ``run_dir`` on ``source``'s training masks and write its manifest; returns the results
    (with ``best``: the best validation score per fold, for :func:`format_table`)."""
    tuned = TUNERS[cfg.model.classes == 1](cfg, source, run_dir)
    publish(cfg, run_dir, tuned)
    return {**tuned, "best": best_scores(run_dir, monitor_key(cfg)), "monitor": monitor_key(cfg)}


def format_table(tuned: dict[str, Any]) -> str:
    """The table ``make train`` and ``make tune`` end with: per fold and overall OOF scores."""
    best = tuned.get("best", {})
    if "oof_miou" in tuned:
        return (
            "fold  best val mIoU\n"
            + "\n".join(f"{k:>4}  {v:13.4f}" for k, v in sorted(best.items()))
            + f"\nout-of-fold ({tuned['n_oof']} images): mIoU {tuned['oof_miou']:.4f}, "
            f"pixel accuracy {tuned['oof_pixel_accuracy']:.4f}"
        )
    lines = ["fold      n   val_dice(best)  oof_dice@0.5  oof_dice@tuned"]
    for fold, row in sorted(tuned.get("per_fold", {}).items()):
        b = f"{best[fold]:14.4f}" if fold in best else f"{'-':>14}"
        lines.append(f"{fold:>4} {row['n']:>6} {b}  {row['dice@0.5']:12.4f}  {row['dice@tuned']:14.4f}")
    lines.append(
        f" all {tuned['n_oof']:>6} {'':>14}  {tuned['oof_dice@0.5']:12.4f}  {tuned['oof_dice']:14.4f}"
    )
    lines.append(f"threshold {tuned['threshold']:.2f}, min_area {tuned['min_area']}")
    lines += [f"note: {n}" for n in tuned.get("widened", [])]
    return "\n".join(lines)


@cli
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.train.tune", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default="", help="a run folder (default: the newest run in runs/)")
    p.add_argument("--data", default="", help="data folder (default: the run's data.root)")
    p.add_argument("overrides", nargs="*", help="infer.key=value, e.g. infer.thresholds=[0.4,0.5,0.6]")
    a = p.parse_args(argv)
    run_dir = Path(a.run) if a.run else latest_run()
    not_infer = [o for o in a.overrides if not o.startswith("infer.")]
    if not_infer:
        raise ConfigError(f"make tune changes only infer.* settings, not {not_infer}; retrain for those")
    if not (run_dir / "config.yaml").is_file():
        raise TuneError(f"{run_dir / 'config.yaml'} not found: {run_dir} is not a trained run (make train)")
    cfg = load_config(run_dir / "config.yaml", [*a.overrides, *([f"data.root={a.data}"] if a.data else [])])
    with run_lock(run_dir), phase(f"tune {run_dir.name}"):  # not while a make train of this run writes it
        remove_stale_temps(run_dir)
        tuned = tune_run(cfg, read_source(cfg.data, with_test=False), run_dir)
    print(format_table(tuned))
    print(f"manifest: {run_dir / 'manifest.yaml'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
