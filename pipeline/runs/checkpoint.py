"""``fold<k>/best.pt`` and ``fold<k>/last.pt``: one typed definition each, one writer, one reader.

``best.pt`` is what inference needs: the weights of the best epoch, the run's config (the model is
rebuilt from it alone), the fold and the epoch's score, and the post-processing ``make tune`` chose
(threshold, minimum component area), so a single checkpoint is self-sufficient. ``last.pt`` is what
a resume needs: weights, optimiser, scaler, EMA and SWA states, the hash of the run's folds and the
loop's progress (``pipeline.train.engine.FoldProgress``, stored as its plain fields).

On disk both are ``torch.save`` dicts of tensors and plain data, written atomically and read with
``weights_only=True`` (:mod:`pipeline.core.io`): opening one never runs code. ``last.pt`` keeps the
progress fields at the top level, as every run written so far has them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from pipeline.core.config import config_changes
from pipeline.core.io import CheckpointError, load_checkpoint, load_yaml, save_checkpoint

StateDict = dict[str, Any]


@dataclass
class BestCheckpoint:
    """``best.pt``: the weights inference uses and everything needed to use them alone.

    ``config`` is the run's resolved config as a plain dict (:func:`pipeline.core.config.to_dict`);
    ``monitor`` the metrics.csv column ``score`` is of; ``threshold`` and ``min_area`` the config's
    defaults until ``make tune`` writes the OOF-tuned values.
    """

    model: StateDict
    config: dict[str, Any]
    fold: int
    epoch: int
    monitor: str
    score: float
    threshold: float
    min_area: int


@dataclass
class LastCheckpoint:
    """``last.pt``: a fold's whole training state, written every epoch and on Ctrl-C/SIGTERM.

    ``progress`` holds the loop's counters and history (the fields of
    ``pipeline.train.engine.FoldProgress``); ``scaler``, ``ema`` and ``swa`` are None when unused.
    """

    model: StateDict
    config: dict[str, Any]
    fold: int
    folds_hash: str
    optimizer: StateDict
    scaler: StateDict | None = None
    ema: StateDict | None = None
    swa: StateDict | None = None
    progress: dict[str, Any] = field(default_factory=dict)


Checkpoint = BestCheckpoint | LastCheckpoint


def write_checkpoint(path: str | Path, ckpt: Checkpoint) -> Path:
    """Write ``ckpt`` to ``path`` atomically (the previous file stays whole until the rename)."""
    state = {f.name: getattr(ckpt, f.name) for f in fields(ckpt) if f.name != "progress"}
    if isinstance(ckpt, LastCheckpoint):
        state.update(ckpt.progress)
    save_checkpoint(path, state)
    return Path(path)


def _read(path: Path, cls: type, map_location: Any) -> Any:
    state = load_checkpoint(path, map_location=map_location)
    names = [f.name for f in fields(cls) if f.name != "progress"]
    required = [f.name for f in fields(cls) if f.default is dataclasses.MISSING and f.name != "progress"]
    missing = [k for k in required if k not in state]
    if missing:
        fix = "re-run make tune" if missing == ["threshold", "min_area"] else "retrain this fold (make train)"
        raise CheckpointError(
            f"checkpoint {path} lacks {', '.join(missing)} (not a {path.name} of buildseg); {fix}"
        )
    kwargs = {k: state[k] for k in names if k in state}
    if cls is LastCheckpoint:
        kwargs["progress"] = {k: v for k, v in state.items() if k not in names}
    return cls(**kwargs)


def read_best(path: str | Path, map_location: Any = "cpu") -> BestCheckpoint:
    """Read a ``best.pt``; a missing, cut, crafted or foreign file is a :class:`CheckpointError`."""
    return _read(Path(path), BestCheckpoint, map_location)


def read_last(path: str | Path, map_location: Any = "cpu") -> LastCheckpoint:
    """Read a ``last.pt``; a missing, cut, crafted or foreign file is a :class:`CheckpointError`."""
    return _read(Path(path), LastCheckpoint, map_location)


def check_run_config(path: str | Path, ckpt: BestCheckpoint | LastCheckpoint) -> None:
    """Refuse a checkpoint whose config is not its run's: ``fold<k>/best.pt`` must have been trained with
    ``<run>/config.yaml`` (the fold and the inference settings aside). A best.pt of another architecture
    copied into a run folder would otherwise be ensembled, or a fold of another recipe averaged in,
    without a word. A checkpoint outside a run folder (no config.yaml two levels up) is not checked."""
    path = Path(path)
    saved = path.parent.parent / "config.yaml"
    if not saved.is_file():
        return
    changes = config_changes(load_yaml(saved) or {}, ckpt.config)
    if changes:
        raise CheckpointError(
            f"{path} was trained with another config than {saved} ({'; '.join(changes[:5])}); a run's folds "
            "share one config. Move that fold's folder out of the run and retrain it (make train FOLDS=k); "
            "to ensemble runs on purpose, blend them (make blend) or list their checkpoints in a "
            "manifest.yaml of their own"
        )


def set_postprocessing(path: str | Path, threshold: float, min_area: int) -> None:
    """Write the tuned threshold and minimum component area into a ``best.pt`` (``make tune``)."""
    ckpt = read_best(path)
    write_checkpoint(path, dataclasses.replace(ckpt, threshold=float(threshold), min_area=int(min_area)))
