"""``fold<k>/metrics.csv``: one row per epoch, written by training, read by tuning, reports and notebooks.

Columns ``epoch``, ``train_loss``, ``val_loss``, the validation metrics, ``lr`` and ``seconds``. The
column a run selects its best epoch on is named by what it holds (:data:`MONITORS`).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipeline.core.config import Config
from pipeline.core.io import atomic_write
from pipeline.runs import TRAIN_HINT, RunError


def write_metrics(fold_dir: Path, history: list[dict[str, float]]) -> pd.DataFrame:
    """Write ``fold_dir/metrics.csv`` atomically; returns the table."""
    df = pd.DataFrame(history)
    with atomic_write(fold_dir / "metrics.csv", "w") as f:
        df.to_csv(f, index=False)
    return df


REQUIRED = ("epoch", "train_loss", "val_loss")


def read_metrics(fold_dir: str | Path) -> pd.DataFrame:
    """Read ``fold_dir/metrics.csv``; a file without the columns every epoch writes is an error."""
    path = Path(fold_dir) / "metrics.csv"
    if not path.is_file():
        raise RunError(f"{path} not found: fold {Path(fold_dir).name} has not run an epoch; {TRAIN_HINT}")
    df = pd.read_csv(path)
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise RunError(f"{path} lacks columns {missing}; it has {list(df.columns)}")
    return df


def best_scores(run_dir: str | Path, monitor: str) -> dict[int, float]:
    """Best validation score per fold, from each ``fold<k>/metrics.csv``'s ``monitor`` column."""
    out = {}
    for f in sorted(Path(run_dir).glob("fold*/metrics.csv")):
        df = read_metrics(f.parent)
        if monitor in df.columns and len(df):
            out[int(f.parent.name.removeprefix("fold"))] = float(df[monitor].max())
    return out


# ----------------------------------------------------------------------------- validation

# The validation metric that picks the best epoch (and early-stops), by task. Each name is the
# metrics.csv column that holds exactly that metric: a binary run selects on the competition's
# mean per-image Dice, a multi-class run on mIoU (one confusion matrix over all pixels).
MONITORS: dict[bool, str] = {True: "val_dice", False: "val_miou"}


def monitor_key(cfg: Config) -> str:
    """The metrics.csv column the run selects its best epoch on (``val_dice`` or ``val_miou``)."""
    return MONITORS[cfg.model.classes == 1]
