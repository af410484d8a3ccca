"""Run folders: the manifest that makes an ensemble, a finished run's files, the newest run and submission.

What ``make train`` (and ``make tune``) leave::

    runs/<run>/config.yaml  folds.csv  threshold_search.csv  manifest.yaml
    runs/<run>/fold<k>/config.yaml  last.pt  best.pt  metrics.csv  curve.png
    runs/<run>/fold<k>/oof.npz      names str [N]; binary: probs uint8 [N, H, W] (round(p * 255));
                                    multi-class: labels uint8 [N, H, W] (class ids)

:class:`Manifest` is what ``make submit``/``make predict``/``make predict-scene`` read: checkpoints plus
the inference settings, which are an :class:`pipeline.config.InferConfig` (one definition of their
names, types, defaults and valid ranges). :class:`Run` is what the notebooks and ``make report`` read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.config import ConfigError, DataConfig, InferConfig, from_dict, infer_problems
from pipeline.io import load_yaml

# Keys of manifest.yaml that are InferConfig fields (the OOF search grids stay in the run's config).
MANIFEST_INFER_KEYS = ("tta", "threshold", "min_area", "batch_size", "tile_size", "overlap")
OOF_KEYS = {True: "probs", False: "labels"}  # oof.npz array by task (binary?): probabilities, class ids
_TRAIN_HINT = "run `make train` first (or RUN=runs/<run> to pick another run)"


class RunError(ValueError):
    """A run folder that cannot be read; the message names the file and the command that writes it."""


# ----------------------------------------------------------------------------- the manifest


@dataclass(frozen=True)
class Manifest:
    """What an ensemble is made of. Paths in ``checkpoints`` are relative to ``run_dir`` (or absolute)."""

    run_dir: Path
    checkpoints: tuple[str, ...]
    infer: InferConfig = field(default_factory=InferConfig)
    classes: int = 1
    data_root: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.run_dir.name


def load_manifest(path: str | Path) -> Manifest:
    """Read ``manifest.yaml`` (or a run folder holding one); a hand edit out of range is an error naming
    the key and the range, never a silently wrong submission."""
    path = Path(path)
    if path.is_dir():
        path = path / "manifest.yaml"
    if not path.is_file():
        raise ConfigError(f"{path} not found; train first (make train) or pass RUN=runs/<run>")
    try:
        data = load_yaml(path) or {}
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys (checkpoints:, tta:, threshold:, ...)")
    ckpts = data.get("checkpoints") or []
    if not ckpts or not isinstance(ckpts, list):
        raise ConfigError(f"{path}: 'checkpoints' is empty; list at least one fold*/best.pt")
    try:
        infer = from_dict(InferConfig, {k: data[k] for k in MANIFEST_INFER_KEYS if k in data}, "manifest")
        classes = int(data.get("classes", 1))
    except (ConfigError, TypeError, ValueError) as e:
        raise ConfigError(f"{path}: {e}; fix the value by hand or re-run make tune") from None
    problems = infer_problems(infer, "")
    if problems:
        raise ConfigError(f"{path}: " + "; ".join(problems) + "; fix the value by hand or re-run make tune")
    known = {"checkpoints", "classes", "data_root", *MANIFEST_INFER_KEYS}
    return Manifest(
        run_dir=path.parent,
        checkpoints=tuple(str(c) for c in ckpts),
        infer=infer,
        classes=classes,
        data_root=str(data.get("data_root") or ""),
        extra={k: v for k, v in data.items() if k not in known},
    )


def run_data_config(run_dir: str | Path, root: str | Path = "") -> DataConfig:
    """The data section a run was trained with (file names, layout, colormap), pointed at ``root`` if given.

    The data may live elsewhere than where the run was trained (another machine, a mounted copy). A
    run folder without ``config.yaml`` (a hand-made ensemble) gets the default layout; the root is then
    ``root``, else the manifest's ``data_root``.
    """
    run_dir = Path(run_dir)
    if (run_dir / "config.yaml").is_file():
        config = load_yaml(run_dir / "config.yaml") or {}
        data = dict(config.get("data") or {})
    else:
        data = {}
    if not root and (run_dir / "manifest.yaml").is_file():
        root = (load_yaml(run_dir / "manifest.yaml") or {}).get("data_root") or ""
    if root:
        data["root"] = str(root)
    if not data.get("root"):
        raise ConfigError(f"no data folder for {run_dir}: pass --data DIR (DATA=...)")
    return from_dict(DataConfig, data, "data")


def latest_run(runs_dir: str | Path = "runs") -> Path:
    """The run folder whose manifest was written last (what ``make submit`` uses without RUN=)."""
    manifests = sorted(Path(runs_dir).glob("*/manifest.yaml"), key=lambda p: p.stat().st_mtime)
    if not manifests:
        raise ConfigError(f"no trained run in {runs_dir}/ (no */manifest.yaml); run make train first")
    return manifests[-1].parent


def latest_submission(path: str | Path = "", folder: str | Path = "submissions") -> Path:
    """``path`` if given, else the newest ``*.csv`` in ``folder`` (what ``make submit`` last wrote)."""
    if path:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"submission {p} not found")
        return p
    found = sorted(Path(folder).glob("*.csv"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no submission (*.csv) in {folder}/; run `make submit` first")
    return found[-1]


# ----------------------------------------------------------------------------- a finished run


@dataclass
class Run:
    """A finished training run, as written by ``make train``.

    Attributes:
        path: the run folder. config: the resolved config (plain dict of ``config.yaml``).
        folds: folds.csv (columns ``name``, ``fold``). metrics: fold -> metrics.csv frame.
        oof_names: str [N], every OOF tile sorted by name. oof_folds: int [N], the fold that held it out.
        oof_probs: uint8 [N, H, W], ``round(p * 255)`` of the fold model that did not see the tile
            (class ids for multi-class runs).
        threshold_search: columns ``threshold``, ``min_area``, ``dice`` (None for multi-class runs).
        manifest: manifest.yaml as a dict.
    """

    path: Path
    config: dict[str, Any]
    folds: pd.DataFrame
    metrics: dict[int, pd.DataFrame]
    oof_names: np.ndarray
    oof_folds: np.ndarray
    oof_probs: np.ndarray
    threshold_search: pd.DataFrame | None
    manifest: dict[str, Any]

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def threshold(self) -> float:
        return float(self.manifest.get("threshold", 0.5))

    @property
    def min_area(self) -> int:
        return int(self.manifest.get("min_area", 0) or 0)

    @property
    def oof_dice(self) -> float | None:
        """The OOF Dice at the tuned threshold as recorded by tuning (top level or under ``oof:``)."""
        value = self.manifest.get("oof_dice", (self.manifest.get("oof") or {}).get("oof_dice"))
        return None if value is None else float(value)


_METRIC_COLUMNS = ("epoch", "train_loss", "val_loss")


def _need(path: Path, what: str) -> Path:
    if not path.is_file():
        raise RunError(f"{path} not found ({what}); {_TRAIN_HINT}")
    return path


def _read_fold_oof(oof: Path, k: int, fold_of: dict[str, int]) -> tuple[list[str], np.ndarray]:
    with np.load(oof) as z:
        key = OOF_KEYS[True] if OOF_KEYS[True] in z else OOF_KEYS[False]
        if "names" not in z or key not in z:
            raise RunError(
                f"{oof} must hold arrays 'names' and 'probs' (or 'labels'); it has {list(z.keys())}"
            )
        n, p = [str(x) for x in z["names"]], z[key]
    if len(n) != len(p):
        raise RunError(f"{oof}: {len(n)} names but {len(p)} probability maps")
    wrong = [x for x in n if fold_of.get(x) != k]
    if wrong:
        where = ", ".join(f"{x} (fold {fold_of.get(x, 'none')})" for x in wrong[:5])
        raise RunError(
            f"{oof}: {len(wrong)} tiles are not in fold {k} of folds.csv: {where}. The OOF file and "
            "folds.csv disagree (folds re-made after training?); retrain the run"
        )
    return n, p


def load_run(run_dir: str | Path) -> Run:
    """Read a run folder (see the module docstring) with checks that name the file at fault.

    Folds are the ``fold<k>/`` folders that hold ``metrics.csv``; each must also hold ``oof.npz``
    (a fold without it has not finished). OOF tiles are checked against folds.csv: a tile predicted
    by the model of another fold than its own would be a leak, and is an error.
    """
    path = Path(run_dir)
    if not path.is_dir():
        raise RunError(f"run folder {path} not found; {_TRAIN_HINT}")
    config = load_yaml(_need(path / "config.yaml", "the resolved config")) or {}
    manifest = load_yaml(_need(path / "manifest.yaml", "written after the last fold")) or {}
    folds = pd.read_csv(_need(path / "folds.csv", "the fold of every tile"), dtype={"name": str})
    if not {"name", "fold"} <= set(folds.columns):
        raise RunError(f"{path / 'folds.csv'} needs columns name,fold; got {list(folds.columns)}")
    fold_of = dict(zip(folds["name"], folds["fold"].astype(int)))
    fold_dirs = sorted(
        (int(d.name.removeprefix("fold")), d)
        for d in path.glob("fold*")
        if d.is_dir() and d.name.removeprefix("fold").isdigit() and (d / "metrics.csv").is_file()
    )
    if not fold_dirs:
        raise RunError(f"{path} has no fold<k>/metrics.csv; {_TRAIN_HINT}")

    metrics, names, fold_ids, probs = {}, [], [], []
    for k, d in fold_dirs:
        df = pd.read_csv(d / "metrics.csv")
        missing = [c for c in _METRIC_COLUMNS if c not in df.columns]
        if missing:
            raise RunError(f"{d / 'metrics.csv'} lacks columns {missing}; it has {list(df.columns)}")
        metrics[k] = df
        oof = _need(d / "oof.npz", f"fold {k} has not finished: validation probabilities are written last")
        n, p = _read_fold_oof(oof, k, fold_of)
        names += n
        fold_ids += [k] * len(n)
        probs.append(p)
    if len(set(names)) != len(names):
        raise RunError(f"{path}: some tiles appear in more than one fold's oof.npz; retrain the run")

    search = None
    if (path / "threshold_search.csv").is_file():
        search = pd.read_csv(path / "threshold_search.csv")
    elif int(manifest.get("classes", 1)) == 1:
        _need(path / "threshold_search.csv", "the OOF threshold / min-area search")
    order = np.argsort(np.asarray(names), kind="stable")
    return Run(
        path=path,
        config=config,
        folds=folds,
        metrics=metrics,
        oof_names=np.asarray(names)[order],
        oof_folds=np.asarray(fold_ids, dtype=np.int64)[order],
        oof_probs=np.concatenate(probs)[order],
        threshold_search=search,
        manifest=manifest,
    )
