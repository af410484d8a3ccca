"""Turn a trained run into a validated submission CSV.

    python -m pipeline.infer.submit [--run runs/<run>] [--data DIR] [--tta none|flip|d4] [--out submissions/]

Reads ``runs/<run>/manifest.yaml`` (checkpoints, TTA set, threshold, minimum component area; a
blend's runs with their weights and TTA sets, see ``make blend``),
predicts the test tiles in the order of the sample submission, averages probabilities over TTA and
folds, thresholds, removes small components, RLE-encodes, writes
``submissions/<run>-<tta>-<timestamp>.csv`` atomically, validates it, and scores it when ground
truth (``test_a_mask.csv``) exists.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.config import ConfigError, DataConfig, InferConfig
from pipeline.core.device import pick_device
from pipeline.core.errors import cli
from pipeline.core.io import atomic_write, check_free_space, check_writable, remove_stale_temps
from pipeline.core.progress import phase, progress
from pipeline.core.tta import TTA_SETS
from pipeline.data import DataError, rle
from pipeline.data.images import image_size
from pipeline.data.layouts import read_source
from pipeline.infer.ensemble import MAX_IMAGES, iter_predictions, load_ensemble, with_tta
from pipeline.infer.score import score_submission, write_score
from pipeline.infer.validate import validate_submission
from pipeline.metrics import postprocess
from pipeline.runs.folder import write_submission_record
from pipeline.runs.manifest import Manifest, check_tile, latest_run, load_manifest, run_data_config

# Room a submission may need per tile: the longest RLE row of the 448 real train masks is 57 KB (their mean
# is 13 KB), so 64 KB per tile bounds a submission of any real data set.
RLE_BYTES_PER_TILE = 64 * 1024


@dataclass
class SubmissionResult:
    path: Path
    rows: int
    empty: int
    seconds: float
    score: dict[str, Any] | None = None


def _encode(mask: np.ndarray, min_area: int) -> str:
    return rle.encode(postprocess.remove_small_components(mask, min_area))


def predict_and_encode(
    models: Sequence[Any],
    split: Any,
    tta: str,
    threshold: float,
    min_area: int,
    device: Any,
    batch_size: int = InferConfig.batch_size,
    num_workers: int = DataConfig.num_workers,
    max_images: int = MAX_IMAGES,
    amp: str | None = None,
) -> list[tuple[str, str]]:
    """(name, rle) for every tile of ``split`` in order: the hot path of ``make submit``.

    Post-processing and RLE encoding run in a thread pool while the next batch is on the device
    (cv2 and numpy release the GIL), so they overlap the forward passes instead of following them.
    ``amp``: None, each model in its own run's ``train.amp`` (the precision its OOF pass, and so its
    threshold, used), as every other caller of :func:`pipeline.infer.ensemble.predict_batch`; a
    precision for all models (benchmarks).
    """
    encoded: dict[str, Any] = {}
    with ThreadPoolExecutor(max_workers=2) as pool:
        batches = iter_predictions(
            models,
            split,
            tta,
            device,
            batch_size,
            num_workers,
            threshold=threshold,
            max_images=max_images,
            amp=amp,
        )
        # Open before the first batch: worker start-up and a first forward of minutes on a CPU are
        # covered by its heartbeat lines (pipeline.core.progress), as is the wait for the last encodes.
        with progress(len(split), f"submit ({tta} TTA)", unit="tile") as bar:
            for names, masks in batches:
                for n, m in zip(names, masks):
                    encoded[n] = pool.submit(_encode, m, min_area)
                bar.update(len(names))
            return [(n, encoded[n].result()) for n in split.names]


def tta_label(manifest: Manifest, tta: str) -> str:
    """The TTA part of a submission's name: ``per-run`` for a blend whose runs keep TTA sets of their own
    that differ from ``tta`` (see :class:`pipeline.infer.ensemble.BlendMember`), else ``tta``."""
    own = {m.tta for m in manifest.members if m.weight > 0}
    return "per-run" if manifest.members and tta == manifest.infer.tta and own != {tta} else tta


def _record(manifest: Manifest, data: DataConfig, tta: str, tiles: int) -> dict[str, Any]:
    """What a submission was made from: ``make score`` finds its own data's truth here."""
    return {
        "run": manifest.name,
        "run_dir": str(manifest.run_dir),
        "data_root": str(data.root),
        "test_dir": data.test_dir,
        "sample_csv": data.sample_csv,
        "test_mask_csv": data.test_mask_csv,
        "tta": tta,
        "threshold": manifest.infer.threshold,
        "min_area": manifest.infer.min_area,
        "tiles": tiles,
        "written": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def make_submission(
    manifest: Manifest,
    data: DataConfig,
    out_dir: str | Path = "submissions",
    tta: str | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    num_workers: int = DataConfig.num_workers,
) -> SubmissionResult:
    """Predict the test split of ``data`` with the ensemble in ``manifest`` and write the CSV.

    Post-processing and RLE encoding run in a thread pool while the next batch is on the device, so
    they do not serialise with the forward passes.
    """
    if manifest.classes != 1:
        raise ConfigError("RLE submissions are binary (classes=1); for multi-class runs use make predict")
    t0 = time.time()
    remove_stale_temps(out_dir)  # half-written submissions of killed runs
    check_writable(out_dir)  # a read-only or full disk fails now, not after predicting every tile
    source = read_source(data, with_train=False)
    if source.test is None or not len(source.test):
        raise DataError(f"no test tiles in {data.root}/{data.test_dir} (sample: {data.sample_csv})")
    shape = image_size(source.test.image_paths[0])  # check_data guarantees every tile has this size
    check_tile(manifest, shape)  # before any model is loaded: a min_area above the tile empties every mask
    check_free_space(
        out_dir, len(source.test) * RLE_BYTES_PER_TILE, f"a submission of {len(source.test)} tiles"
    )
    dev = pick_device(device)
    if tta:  # asked for: every run of a blend predicts with it, not only those of the blend's own set
        manifest = with_tta(manifest, tta)
    models, _ = load_ensemble(manifest, dev)
    tta_name = tta or manifest.infer.tta
    rows = predict_and_encode(
        models,
        source.test,
        tta_name,
        manifest.infer.threshold,
        manifest.infer.min_area,
        dev,
        batch_size or manifest.infer.batch_size,
        num_workers,
        manifest.infer.max_images,
    )
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path(out_dir) / f"{manifest.name}-{tta_label(manifest, tta_name)}-{stamp}.csv"
    with atomic_write(path, "w") as f:
        f.writelines(f"{n}\t{r}\n" for n, r in rows)
    result = SubmissionResult(path, len(rows), sum(1 for _, r in rows if not r), time.time() - t0)
    write_submission_record(path, _record(manifest, data, tta_name, len(rows)))

    sample = Path(data.root) / data.sample_csv
    problems = validate_submission(path, sample if sample.is_file() else None, shape)
    if problems:
        raise DataError(f"{path} failed validation:\n  " + "\n  ".join(problems))
    truth = Path(data.root) / data.test_mask_csv
    if truth.is_file():
        result.score = score_submission(path, truth, shape)
        write_score(result.score, path)
    return result


@cli
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.infer.submit", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default="", help="run folder or manifest.yaml (default: the newest run in runs/)")
    p.add_argument("--data", default="", help="data folder (default: the run's data_root)")
    p.add_argument("--tta", default=None, choices=list(TTA_SETS), help="override the manifest's TTA set")
    p.add_argument("--out", default="submissions")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--workers", type=int, default=DataConfig.num_workers, help="-1: the cores")
    a = p.parse_args(argv)
    manifest = load_manifest(a.run or latest_run())
    data = run_data_config(manifest.run_dir, a.data)
    check_writable(a.out)  # before the data check, which takes a while on 30k tiles
    from pipeline.data.check import require_clean

    with phase(f"submit {manifest.name}"):  # a line at least every minute in a log, whatever runs
        require_clean(data, train=False)
        result = make_submission(manifest, data, a.out, a.tta, a.device, a.batch_size, a.workers)
    print(
        f"submission: {result.path}  ({result.rows} tiles, {result.empty} empty masks, "
        f"{result.seconds:.1f}s) - validated OK"
    )
    if result.score:
        print(
            f"score: Dice {result.score['dice']:.4f}  IoU {result.score['iou']:.4f}"
            f"  -> {result.path}.score.json"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
