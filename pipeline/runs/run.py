"""A finished run as the notebooks and ``make report`` read it: config, folds, metrics, manifest, and its
out-of-fold predictions, streamed.

Every file is read by the module that owns it (:mod:`.manifest`, :mod:`.history`, :mod:`.oof`,
:func:`pipeline.data.folds.load_folds`). The OOF maps are never concatenated: :meth:`Run.oof_chunks`
yields them a chunk at a time (7.9 GB at 30k tiles of 512 px would not fit a report's memory).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.core.config import Config, ConfigError, load_config
from pipeline.data.folds import FoldsError, load_folds
from pipeline.runs import TRAIN_HINT, RunError
from pipeline.runs.history import read_metrics
from pipeline.runs.manifest import Manifest, load_manifest, read_search
from pipeline.runs.oof import OOF_KEYS, oof_chunks, oof_files, oof_names


@dataclass
class Run:
    """A finished training run, as written by ``make train``.

    Attributes:
        path: the run folder. config: its resolved config (``config.yaml``).
        folds: folds.csv (columns ``name``, ``fold``). metrics: fold -> metrics.csv frame.
        oof: fold -> ``fold<k>/oof.npz``. oof_names: str [N], every OOF tile sorted by name;
            oof_folds: int [N], the fold that held each out.
        threshold_search: columns ``threshold``, ``min_area``, ``dice`` (None for multi-class runs).
        manifest: the run's :class:`pipeline.runs.manifest.Manifest`.
    """

    path: Path
    config: Config
    folds: pd.DataFrame
    metrics: dict[int, pd.DataFrame]
    oof: dict[int, Path]
    oof_names: np.ndarray
    oof_folds: np.ndarray
    threshold_search: pd.DataFrame | None
    manifest: Manifest

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def threshold(self) -> float:
        return self.manifest.infer.threshold

    @property
    def min_area(self) -> int:
        return self.manifest.infer.min_area

    @property
    def oof_dice(self) -> float | None:
        """The OOF Dice at the tuned threshold as recorded by tuning (None for multi-class runs)."""
        value = self.manifest.oof.get("oof_dice")
        return None if value is None else float(value)

    def oof_chunks(self, chunk: int = 64) -> Iterator[tuple[int, list[str], np.ndarray]]:
        """(fold, names [n], uint8 maps [n, H, W]) over every fold's OOF file, ``chunk`` tiles at a time:
        probabilities ``round(p * 255)`` (binary) or class ids (multi-class)."""
        key = OOF_KEYS[self.manifest.classes == 1]
        for fold, path in self.oof.items():
            for names, arrays in oof_chunks(path, key, chunk):
                yield fold, names, arrays


def _need(path: Path, what: str) -> Path:
    if not path.is_file():
        raise RunError(f"{path} not found ({what}); {TRAIN_HINT}")
    return path


def load_run(run_dir: str | Path) -> Run:
    """Read a run folder with checks that name the file at fault.

    Folds are the ``fold<k>/`` folders that hold ``metrics.csv``; each must also hold ``oof.npz``
    (a fold without it has not finished). OOF tiles are checked against folds.csv: a tile predicted
    by the model of another fold than its own would be a leak, and is an error.
    """
    path = Path(run_dir)
    if not path.is_dir():
        raise RunError(f"run folder {path} not found; {TRAIN_HINT}")
    try:
        config = load_config(_need(path / "config.yaml", "the resolved config"))
        manifest = load_manifest(_need(path / "manifest.yaml", "written after the last fold"))
        folds = load_folds(_need(path / "folds.csv", "the fold of every tile"), fix="retrain the run")
        search = read_search(path)
    except (ConfigError, FoldsError) as e:
        raise RunError(str(e)) from None
    if search is None and manifest.classes == 1:
        _need(path / "threshold_search.csv", "the OOF threshold / min-area search")
    fold_of = dict(zip(folds["name"], folds["fold"]))
    fold_dirs = sorted(
        int(d.name.removeprefix("fold"))
        for d in path.glob("fold*")
        if d.is_dir() and d.name.removeprefix("fold").isdigit() and (d / "metrics.csv").is_file()
    )
    if not fold_dirs:
        raise RunError(f"{path} has no fold<k>/metrics.csv; {TRAIN_HINT}")
    files = oof_files(path)
    metrics, names, fold_ids = {}, [], []
    for k in fold_dirs:
        metrics[k] = read_metrics(path / f"fold{k}")
        last = f"fold {k} has not finished: its OOF file is last"
        oof = files.get(k) or _need(path / f"fold{k}/oof.npz", last)
        n = oof_names(oof)
        wrong = [x for x in n if fold_of.get(x) != k]
        if wrong:
            where = ", ".join(f"{x} (fold {fold_of.get(x, 'none')})" for x in wrong[:5])
            raise RunError(
                f"{oof}: {len(wrong)} tiles are not in fold {k} of folds.csv: {where}. The OOF file and "
                "folds.csv disagree (folds re-made after training?); retrain the run"
            )
        names += n
        fold_ids += [k] * len(n)
    if len(set(names)) != len(names):
        raise RunError(f"{path}: some tiles appear in more than one fold's oof.npz; retrain the run")
    order = np.argsort(np.asarray(names), kind="stable")
    return Run(
        path=path,
        config=config,
        folds=folds,
        metrics=metrics,
        oof={k: files[k] for k in fold_dirs},
        oof_names=np.asarray(names)[order],
        oof_folds=np.asarray(fold_ids, dtype=np.int64)[order],
        threshold_search=search,
        manifest=manifest,
    )
