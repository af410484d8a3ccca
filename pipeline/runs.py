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

import contextlib
import json
import os
import sys
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.config import ConfigError, DataConfig, InferConfig, config_changes, from_dict, infer_problems
from pipeline.errors import BuildsegError
from pipeline.io import HOST, atomic_write, load_yaml, pid_alive

# Keys of manifest.yaml that are InferConfig fields (the OOF search grids stay in the run's config).
MANIFEST_INFER_KEYS = ("tta", "threshold", "min_area", "batch_size", "max_images", "tile_size", "overlap")
OOF_KEYS = {True: "probs", False: "labels"}  # oof.npz array by task (binary?): probabilities, class ids
_TRAIN_HINT = "run `make train` first (or RUN=runs/<run> to pick another run)"


class RunError(BuildsegError, ValueError):
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


@contextlib.contextmanager
def oof_writer(
    path: str | Path, names: Sequence[str], key: str
) -> Iterator[Callable[[Sequence[int], Any], None]]:
    """Write an ``oof.npz`` (``names`` and ``key``: uint8 [N, H, W]) batch by batch, atomically.

    Yields ``write(indices, arrays)``; the arrays (uint8 [B, H, W], in dataset order) are streamed into
    the compressed zip as they arrive, so a fold's OOF maps are never held whole (6k tiles x 512 x 512
    = 1.5 GB at the competition's size). ``np.load`` reads the file like any ``np.savez_compressed``.
    """
    path, n = Path(path), len(names)
    done, member = 0, None
    with atomic_write(path, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as zf:
        with zf.open("names.npy", "w", force_zip64=True) as m:
            np.lib.format.write_array(m, np.array([str(x) for x in names]))

        def write(indices: Sequence[int], arrays: Any) -> None:
            nonlocal done, member
            if list(indices) != list(range(done, done + len(arrays))):
                raise ValueError(f"{path}: OOF batches must come in dataset order, got {list(indices)[:4]}")
            arrays = np.ascontiguousarray(arrays, dtype=np.uint8)
            if member is None:
                member = zf.open(f"{key}.npy", "w", force_zip64=True)
                header = {"descr": "|u1", "fortran_order": False, "shape": (n, *arrays.shape[1:])}
                np.lib.format.write_array_header_1_0(member, header)
            member.write(arrays.tobytes())
            done += len(arrays)

        try:
            yield write
        finally:
            if member is not None:
                member.close()
        if done != n:
            raise ValueError(f"{path}: {done} OOF maps written for {n} tiles")


def oof_chunks(path: str | Path, key: str, chunk: int = 64) -> Iterator[tuple[list[str], np.ndarray]]:
    """Stream an ``oof.npz`` member ``key`` (``probs`` or ``labels``, uint8 [N, H, W]) in chunks of
    ``chunk`` images: yields (names [n], array [n, H, W]).

    The member is read straight out of the (compressed) zip, ``chunk`` rows at a time, so tuning a
    30k-tile run never holds a whole fold's maps (6k x 512 x 512 = 1.5 GB) in memory.
    """
    path = Path(path)
    with np.load(path) as z:
        if "names" not in z or key not in z:
            raise RunError(f"{path} must hold arrays 'names' and '{key}'; it has {list(z.keys())}; retrain")
        names = [str(n) for n in z["names"]]
    with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as f:
        version = np.lib.format.read_magic(f)
        fmt = np.lib.format
        read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        if fortran or len(shape) != 3 or shape[0] != len(names):
            raise RunError(f"{path}: '{key}' is {shape} (fortran={fortran}) for {len(names)} names; retrain")
        row = int(np.prod(shape[1:])) * dtype.itemsize
        for start in range(0, shape[0], chunk):
            n = min(chunk, shape[0] - start)
            buf = f.read(n * row)
            if len(buf) != n * row:
                raise RunError(f"{path}: '{key}' ends early (truncated file); retrain this fold")
            yield names[start : start + n], np.frombuffer(buf, dtype=dtype).reshape(n, *shape[1:])


# ----------------------------------------------------------------------------- who owns a run folder


def _proc_start(pid: int) -> str:
    """The kernel's start time of process ``pid`` ("" if unknown): a reused PID has another."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _owner_alive(owner: dict[str, Any]) -> bool:
    if owner.get("host") != HOST:
        return True  # another machine's process cannot be checked from here: assume it runs
    pid = int(owner.get("pid", -1))
    start = str(owner.get("start", ""))
    return pid > 0 and pid_alive(pid) and (not start or _proc_start(pid) in ("", start))


@contextlib.contextmanager
def run_lock(run_dir: str | Path) -> Iterator[Path]:
    """Own ``run_dir`` while training or tuning it; ``runs/.<run>.lock`` (beside the folder) names the owner.

    A second ``make train`` (or ``make tune``) of the same run while the owner lives is refused with a
    message naming its PID and host: two runs writing one folder would mix checkpoints, configs and
    tables. A lock whose process is gone (kill -9, a crash, a reboot) is taken over with a note. The
    lock is removed on exit, also on Ctrl-C or SIGTERM. Yields the lock file's path.
    """
    run_dir = Path(run_dir)
    lock = run_dir.parent / f".{run_dir.name}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    me = {
        "pid": os.getpid(),
        "host": HOST,
        "start": _proc_start(os.getpid()),
        "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(sys.argv),
    }
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            _take_over_if_dead(lock, run_dir)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    else:
        raise RunError(f"{lock}: could not take the lock of {run_dir} (another process took it first)")
    try:
        yield lock
    finally:
        with contextlib.suppress(OSError, ValueError):
            held = json.loads(lock.read_text())
            if (held.get("pid"), held.get("host")) == (me["pid"], me["host"]):
                lock.unlink()


def _take_over_if_dead(lock: Path, run_dir: Path) -> None:
    """Remove ``lock`` if its owner is gone; raise :class:`RunError` naming the owner while it lives."""
    try:
        owner = json.loads(lock.read_text() or "{}")
    except FileNotFoundError:
        return  # released meanwhile
    except (OSError, ValueError):
        owner = {}
    if not owner and time.time() - lock.stat().st_mtime < 10:
        owner = {"host": "?", "pid": "?", "since": "just now"}  # being written by its owner right now
    if owner and _owner_alive(owner):
        where = "this machine" if owner.get("host") == HOST else f"machine {owner.get('host')}"
        raise RunError(
            f"{run_dir} is in use by process {owner.get('pid')} on {where} (since {owner.get('since')}: "
            f"{owner.get('command', '?')}). Wait for it to finish, or train under another name (name=...). "
            f"If that process is no longer running, delete {lock}"
        )
    if owner:
        print(f"note: taking over {run_dir} from process {owner.get('pid')}, which is gone", file=sys.stderr)
    lock.unlink(missing_ok=True)


def prepare_run_dir(
    run_dir: str | Path, config: dict[str, Any], resume: bool = True, force: bool = False
) -> Path | None:
    """Keep a run folder one run: its config, folds and checkpoints always belong together.

    Call while owning the folder (:func:`run_lock`), before anything is written to it. Nothing is
    ever deleted or mixed. If ``run_dir`` holds a run:

    * ``force``: it is moved aside to ``<run>.old-<time>/`` (returned), and the new run starts afresh;
    * ``resume=False`` (``--no-resume``, ``RESUME=0``): refused, naming ``name=`` and ``--force``;
    * resuming: the config must be the run's ``config.yaml`` except the inference-only settings
      (:data:`pipeline.config.RESUME_FREE`), else refused with the differences (this also keeps
      ``FOLDS=1`` with another config from joining the folds of the first).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or not any(run_dir.iterdir()):
        return None
    fresh = "train under another name (name=...), or pass --force (make train FORCE=1) to move the old run "
    fresh += f"to {run_dir.name}.old-<time>/ and start afresh"
    if force:
        aside = run_dir.with_name(f"{run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        run_dir.rename(aside)
        print(f"note: moved the previous run {run_dir} to {aside}; starting afresh", file=sys.stderr)
        return aside
    if not resume:
        raise RunError(
            f"{run_dir} already holds a run; a fresh start (--no-resume, RESUME=0) would overwrite its "
            f"checkpoints and mix them with its config and folds. To start afresh, {fresh}"
        )
    saved = run_dir / "config.yaml"
    old = load_yaml(saved) if saved.is_file() else {}
    changes = config_changes(old if isinstance(old, dict) else {}, config)
    if changes:
        shown = "; ".join(changes[:8]) + (f"; ... ({len(changes)} in all)" if len(changes) > 8 else "")
        raise RunError(
            f"{run_dir} holds a run made with another config ({shown}); its folds and checkpoints must not "
            f"be mixed with this one. Resume with the run's own config ({saved}), or {fresh}"
        )
    return None


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
