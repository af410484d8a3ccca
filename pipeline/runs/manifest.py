"""``manifest.yaml`` and ``threshold_search.csv``: what tuning leaves, read by every stage that predicts.

Checkpoints plus the inference settings, which are a :class:`pipeline.core.config.InferConfig` (one
definition of their names, types, defaults and valid ranges); editable by hand, and checked on load.

A blend (``make blend``, :mod:`pipeline.infer.blend`) has the same file with ``members`` in place of
``checkpoints``: each member is a run folder (relative to the blend's folder), its weight, its TTA set and
its checkpoints (relative to its folder). Every stage that predicts reads a blend like a run; the
checkpoints of all members, as paths relative to the blend's folder, are :attr:`Manifest.checkpoints`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
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
# A blend's manifest.yaml: members (run, weight, TTA, checkpoints) where a run's has checkpoints.
BLEND_KEYS = ("run", "data_root", "members", *INFER_KEYS, "classes", "oof")
MEMBER_KEYS = ("run", "weight", "tta", "checkpoints")
BLEND_FIX = "fix the value by hand or make the blend again (make blend RUNS=...)"


@dataclass(frozen=True)
class Member:
    """One run of a blend.

    ``run``: its folder, relative to the blend's folder (or absolute). ``weight``: >= 0; the members'
    probabilities are averaged with the weights normalised to sum 1. ``tta``: the TTA set its models
    predict with. ``checkpoints``: relative to its folder, as in its own manifest.
    """

    run: str
    weight: float
    tta: str
    checkpoints: tuple[str, ...]


@dataclass(frozen=True)
class Manifest:
    """What an ensemble is made of: ``manifest.yaml`` of ``run_dir``.

    ``checkpoints``: paths relative to ``run_dir`` (or absolute). ``infer``: the settings every stage
    that predicts uses (TTA set, OOF-tuned threshold and minimum component area, batch and forward
    sizes, scene windows). ``classes``: 1 for buildings. ``data_root``: the data the run was tuned on.
    ``oof``: what tuning measured (``oof_dice``, ``oof_dice@0.5``, per fold), empty for a hand-made one.
    ``members``: a blend's runs (empty for a run); ``checkpoints`` is then derived from them: every
    member's checkpoints, relative to ``run_dir``.
    """

    run_dir: Path
    checkpoints: tuple[str, ...]
    infer: InferConfig = field(default_factory=InferConfig)
    classes: int = 1
    data_root: str = ""
    oof: dict[str, Any] = field(default_factory=dict)
    members: tuple[Member, ...] = ()

    def __post_init__(self) -> None:
        if self.members:  # one source: a blend's checkpoints are its members'
            ckpts = tuple(str(Path(m.run) / c) for m in self.members for c in m.checkpoints)
            object.__setattr__(self, "checkpoints", ckpts)

    @property
    def name(self) -> str:
        return self.run_dir.name

    @property
    def is_blend(self) -> bool:
        return bool(self.members)

    def member_dir(self, member: Member) -> Path:
        """The folder of a blend's member run (``runs/a``, not ``runs/ab/../a``)."""
        return Path(os.path.normpath(self.run_dir / member.run))


def write_manifest(manifest: Manifest) -> Path:
    """Write ``run_dir/manifest.yaml`` atomically, every key of :data:`KEYS` (a blend: :data:`BLEND_KEYS`);
    returns its path."""
    infer = to_dict(manifest.infer)
    if manifest.members:
        members = [{**dataclasses.asdict(m), "checkpoints": list(m.checkpoints)} for m in manifest.members]
        what: dict[str, Any] = {"members": members}
    else:
        what = {"checkpoints": list(manifest.checkpoints)}
    data = {
        "run": manifest.name,
        "data_root": manifest.data_root,
        **what,
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
    keys = BLEND_KEYS if "members" in data else KEYS
    unknown = [str(k) for k in data if k not in keys]
    if unknown:
        close = difflib.get_close_matches(unknown[0], keys, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"{path}: unknown key '{unknown[0]}'{hint}; valid keys: {', '.join(keys)}; {FIX}")
    missing = [k for k in keys if k not in data and k not in OPTIONAL]
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
    members = _read_members(path, data["members"]) if "members" in data else ()
    fix = BLEND_FIX if members else FIX
    ckpts = data.get("checkpoints") or []
    if not members and (not ckpts or not isinstance(ckpts, list)):
        raise ConfigError(f"{path}: 'checkpoints' is empty; list at least one fold*/best.pt")
    try:
        infer = from_dict(InferConfig, {k: data[k] for k in INFER_KEYS}, "manifest")
        classes = int(data["classes"])
    except (ConfigError, TypeError, ValueError) as e:
        raise ConfigError(f"{path}: {e}; {fix}") from None
    problems = infer_problems(infer, "") + ([f"classes must be >= 1, not {classes}"] if classes < 1 else [])
    if problems:
        raise ConfigError(f"{path}: " + "; ".join(problems) + f"; {fix}")
    oof = data.get("oof") or {}
    if not isinstance(oof, dict):
        raise ConfigError(f"{path}: 'oof' must be a mapping of tuning results; {fix}")
    root = str(data.get("data_root") or "")
    return Manifest(path.parent, tuple(str(c) for c in ckpts), infer, classes, root, oof, members)


def _read_members(path: Path, raw: Any) -> tuple[Member, ...]:
    """A blend's ``members``, each checked: keys, a finite weight >= 0 (not all 0), a TTA set, checkpoints,
    and the run folder still there (a run deleted after the blend was made is named, with the fix)."""
    if not isinstance(raw, list) or not raw:
        raise ConfigError(
            f"{path}: 'members' must list the blend's runs ({', '.join(MEMBER_KEYS)}); {BLEND_FIX}"
        )
    members = []
    for i, m in enumerate(raw):
        where = f"{path}: members[{i}]"
        if not isinstance(m, dict) or set(m) != set(MEMBER_KEYS):
            got = sorted(m) if isinstance(m, dict) else type(m).__name__
            raise ConfigError(f"{where} must have the keys {', '.join(MEMBER_KEYS)}, not {got}; {BLEND_FIX}")
        try:
            weight = float(m["weight"])
        except (TypeError, ValueError):
            weight = math.nan
        if not math.isfinite(weight) or weight < 0:
            raise ConfigError(f"{where}.weight must be a number >= 0, not {m['weight']!r}; {BLEND_FIX}")
        problems = infer_problems(dataclasses.replace(InferConfig(), tta=str(m["tta"])), f"members[{i}].")
        if problems:
            raise ConfigError(f"{path}: {problems[0]}; {BLEND_FIX}")
        ckpts = m["checkpoints"]
        if not ckpts or not isinstance(ckpts, list):
            raise ConfigError(f"{where}.checkpoints is empty; list the run's fold*/best.pt; {BLEND_FIX}")
        folder = Path(os.path.normpath(path.parent / str(m["run"])))
        if not folder.is_dir():
            raise ConfigError(
                f"{where}: run {m['run']} ({folder}) not found: it was deleted or moved after the blend was "
                "made; restore it, or make the blend again without it (make blend RUNS=...)"
            )
        members.append(Member(str(m["run"]), weight, str(m["tta"]), tuple(str(c) for c in ckpts)))
    if not sum(m.weight for m in members) > 0:
        raise ConfigError(f"{path}: every member's weight is 0; give one run a weight > 0; {BLEND_FIX}")
    return tuple(members)


def check_tile(manifest: Manifest, shape: tuple[int, int]) -> None:
    """Refuse settings that cannot be right for tiles of ``shape`` (H, W): a ``min_area`` of at least the
    tile's pixel count removes every building of every tile, an all-empty submission that validates."""
    h, w = shape
    if manifest.classes == 1 and manifest.infer.min_area >= h * w:
        raise ConfigError(
            f"{manifest.run_dir / 'manifest.yaml'}: min_area {manifest.infer.min_area} is at least the "
            f"{h}x{w} tile's {h * w} pixels, so every building of every tile would be removed; {FIX}"
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
    blend takes its first run's data section; another folder without ``config.yaml`` (a hand-made
    ensemble) gets the default layout. The root is then ``root``, else the manifest's ``data_root``.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file() and (run_dir / "manifest.yaml").is_file():
        manifest = load_manifest(run_dir)
        if manifest.members:  # a blend: its first run's data section, pointed at the blend's data
            return run_data_config(manifest.member_dir(manifest.members[0]), root or manifest.data_root)
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
