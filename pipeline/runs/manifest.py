"""``manifest.yaml`` and ``threshold_search.csv``: what tuning leaves, read by every stage that predicts.

Checkpoints plus the inference settings, which are a :class:`pipeline.core.config.InferConfig` (one
definition of their names, types, defaults and valid ranges); editable by hand, and checked on load.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.core.config import ConfigError, DataConfig, InferConfig, from_dict, infer_problems, to_dict
from pipeline.core.io import atomic_write, load_yaml, save_yaml

# The keys of manifest.yaml, in the order they are written. The inference settings are InferConfig fields
# (the OOF search grids stay in the run's config); ``run`` and ``oof`` are records, not settings.
INFER_KEYS = ("tta", "threshold", "min_area", "batch_size", "max_images", "tile_size", "overlap")
KEYS = ("run", "data_root", "checkpoints", *INFER_KEYS, "classes", "oof")
OPTIONAL = ("run", "data_root", "oof")
FIX = "fix the value by hand or re-run make tune"


@dataclass(frozen=True)
class Manifest:
    """What an ensemble is made of: ``manifest.yaml`` of ``run_dir``.

    ``checkpoints``: paths relative to ``run_dir`` (or absolute). ``infer``: the settings every stage
    that predicts uses (TTA set, OOF-tuned threshold and minimum component area, batch and forward
    sizes, scene windows). ``classes``: 1 for buildings. ``data_root``: the data the run was tuned on.
    ``oof``: what tuning measured (``oof_dice``, ``oof_dice@0.5``, per fold), empty for a hand-made one.
    """

    run_dir: Path
    checkpoints: tuple[str, ...]
    infer: InferConfig = field(default_factory=InferConfig)
    classes: int = 1
    data_root: str = ""
    oof: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.run_dir.name


def write_manifest(manifest: Manifest) -> Path:
    """Write ``run_dir/manifest.yaml`` atomically, every key of :data:`KEYS`; returns its path."""
    infer = to_dict(manifest.infer)
    data = {
        "run": manifest.name,
        "data_root": manifest.data_root,
        "checkpoints": list(manifest.checkpoints),
        **{k: infer[k] for k in INFER_KEYS},
        "classes": manifest.classes,
        "oof": manifest.oof,
    }
    path = manifest.run_dir / "manifest.yaml"
    save_yaml(path, data)
    return path


def _read_mapping(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path} not found; train first (make train) or pass RUN=runs/<run>")
    try:
        data = load_yaml(path) or {}
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys ({', '.join(KEYS)})")
    unknown = [str(k) for k in data if k not in KEYS]
    if unknown:
        close = difflib.get_close_matches(unknown[0], KEYS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"{path}: unknown key '{unknown[0]}'{hint}; valid keys: {', '.join(KEYS)}; {FIX}")
    missing = [k for k in KEYS if k not in data and k not in OPTIONAL]
    if missing:
        also = f" (and {', '.join(missing[1:])})" if missing[1:] else ""
        example = to_dict(InferConfig()).get(missing[0], "...")
        raise ConfigError(
            f"{path}: key '{missing[0]}' is missing{also}: the run's value cannot be guessed; "
            f"add e.g. '{missing[0]}: {example}' or re-run make tune"
        )
    return data


def load_manifest(path: str | Path) -> Manifest:
    """Read ``manifest.yaml`` (or a run folder holding one). Every key of :data:`KEYS` but the optional
    ones must be there and no other: a missing ``threshold`` must not quietly become 0.5, a misspelt
    ``min_aera`` must not be ignored. A value out of range is an error naming the key and the range,
    never a silently wrong submission."""
    path = Path(path)
    if path.is_dir():
        path = path / "manifest.yaml"
    data = _read_mapping(path)
    ckpts = data.get("checkpoints") or []
    if not ckpts or not isinstance(ckpts, list):
        raise ConfigError(f"{path}: 'checkpoints' is empty; list at least one fold*/best.pt")
    try:
        infer = from_dict(InferConfig, {k: data[k] for k in INFER_KEYS}, "manifest")
        classes = int(data["classes"])
    except (ConfigError, TypeError, ValueError) as e:
        raise ConfigError(f"{path}: {e}; {FIX}") from None
    problems = infer_problems(infer, "") + ([f"classes must be >= 1, not {classes}"] if classes < 1 else [])
    if problems:
        raise ConfigError(f"{path}: " + "; ".join(problems) + f"; {FIX}")
    oof = data.get("oof") or {}
    if not isinstance(oof, dict):
        raise ConfigError(f"{path}: 'oof' must be a mapping of tuning results; {FIX}")
    return Manifest(
        path.parent, tuple(str(c) for c in ckpts), infer, classes, str(data.get("data_root") or ""), oof
    )


SEARCH = "threshold_search.csv"
SEARCH_COLUMNS = ("threshold", "min_area", "dice")


def write_search(run_dir: str | Path, table: pd.DataFrame) -> Path:
    """``threshold_search.csv``: the OOF Dice of every (threshold, min_area) of the grid, atomically."""
    path = Path(run_dir) / SEARCH
    with atomic_write(path, "w") as f:
        table[list(SEARCH_COLUMNS)].to_csv(f, index=False)
    return path


def read_search(run_dir: str | Path) -> pd.DataFrame | None:
    """The search table of a run, or None when it has none (multi-class runs, not tuned yet)."""
    path = Path(run_dir) / SEARCH
    if not path.is_file():
        return None
    df = pd.read_csv(path)
    if not set(SEARCH_COLUMNS) <= set(df.columns):
        raise ConfigError(
            f"{path} needs columns {', '.join(SEARCH_COLUMNS)}; it has {list(df.columns)}; re-run make tune"
        )
    return df


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
        root = load_manifest(run_dir).data_root
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
