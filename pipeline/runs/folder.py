"""The run folder itself: one owner at a time, one config, and the newest run or submission.

What ``make train`` (and ``make tune``) leave::

    runs/<run>/config.yaml  folds.csv  threshold_search.csv  manifest.yaml
    runs/<run>/fold<k>/config.yaml  last.pt  best.pt  metrics.csv  curve.png  oof.npz

``runs/.<run>.lock`` names the process that owns a run while ``make train`` or ``make tune`` writes
it (:func:`run_lock`); :func:`prepare_run_dir` keeps a folder one run (a resume must use its config).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.core.config import (
    config_changes,
)
from pipeline.core.io import HOST, atomic_write_text, load_yaml, pid_alive
from pipeline.runs import RunError


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


def record_path(csv: str | Path) -> Path:
    """Where a submission's record lives: ``<csv>.json`` beside it."""
    return Path(f"{csv}.json")


def write_submission_record(csv: str | Path, record: dict[str, Any]) -> Path:
    """What a submission was made from (run, data, post-processing), written by ``make submit`` beside it:
    ``make score`` scores it against its own data's truth, ``make runs`` lists it under its run."""
    path = record_path(csv)
    atomic_write_text(path, json.dumps(record, indent=1))
    return path


def read_submission_record(csv: str | Path) -> dict[str, Any] | None:
    """The record of :func:`write_submission_record`, or None for a submission without one."""
    path = record_path(csv)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RunError(
            f"{path} is not readable JSON ({e}); delete it, or write the submission again"
        ) from None
    if not isinstance(record, dict):
        raise RunError(f"{path} must hold a JSON object; delete it, or write the submission again")
    return record


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
    * resuming: the config must be the run's ``config.yaml`` except the inference settings and how the
      model is computed (:data:`pipeline.core.config.RESUME_FREE`; a change of precision, layout or
      compile is said in a note), else refused with the differences (this also keeps ``FOLDS=1`` with
      another config from joining the folds of the first).
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
    old = old if isinstance(old, dict) else {}
    changes = config_changes(old, config)
    computed = [c for c in config_changes(old, config, ignore=("infer",)) if c not in changes]
    if computed and not changes:
        print(
            f"note: resuming {run_dir} with {'; '.join(computed)}: how the model is computed may change on a "
            "resume (its weights, optimiser state and folds carry over)",
            file=sys.stderr,
        )
    if changes:
        shown = "; ".join(changes[:8]) + (f"; ... ({len(changes)} in all)" if len(changes) > 8 else "")
        raise RunError(
            f"{run_dir} holds a run made with another config ({shown}); its folds and checkpoints must not "
            f"be mixed with this one. Resume with the run's own config ({saved}), or {fresh}"
        )
    return None
