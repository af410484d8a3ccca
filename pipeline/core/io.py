"""File output that never loses work, and checkpoint loading that never runs code.

Every file the pipeline writes (checkpoints, manifests, OOF probabilities, submissions, folds) goes
through :func:`atomic_write`: the data is written to a temporary file in the same folder, flushed
and fsync'ed, then renamed over the target. A kill or a full disk during the write leaves the
previous file intact and no partial file behind.

Temp files are named ``.<target>.<pid>@<host>.<random>.tmp``: :func:`remove_stale_temps`, called when
a run, a tune or a submit starts, deletes those whose writer was killed (kill -9, power loss).

Checkpoints are loaded with ``torch.load(weights_only=True)``: only tensors and plain containers
are accepted, so a crafted file cannot execute code when it is opened.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import io
import json
import os
import re
import shutil
import signal
import socket
import stat
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import yaml

from pipeline.core.errors import BuildsegError

_UMASK = os.umask(0)
os.umask(_UMASK)  # read once at import: mkstemp creates 0600 files, we want what open() would give

HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname().split(".")[0])[:32] or "host"
# Our temp files: ".<target>.<pid>@<host>.<random>.tmp" beside the target, so a later run can tell the
# temp of a killed writer (its process is gone) from one being written right now.
_TEMP = re.compile(r"^\..+\.(?P<pid>\d+)@(?P<host>[A-Za-z0-9-]*)\.[^.]+\.tmp$")
# Names written before the pid was in them: ".<target>.<8 random chars>.tmp" (mkstemp) and
# ".<target>.<pid>.tmp" (the mask cache); removed once they are older than any write takes.
_OLD_TEMP = re.compile(r"^\..+\.(?:[a-z0-9_]{8}|\d+)\.tmp$")
STALE_AFTER_S = 24 * 3600  # a temp file this old, of another host or the old naming, is abandoned


class CheckpointError(BuildsegError, RuntimeError):
    """A checkpoint that cannot be used; the message names the file and what to do."""


def temp_prefix(path: Path) -> str:
    """The start of a temp file's name for writing ``path`` (see :func:`remove_stale_temps`)."""
    return f".{path.name}.{os.getpid()}@{HOST}."


def pid_alive(pid: int) -> bool:
    """True if process ``pid`` exists on this machine and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Delete the temp files of killed writes under ``folder`` (recursively); returns what was removed.

    A kill -9 during :func:`atomic_write` (or the mask cache's decode) leaves its hidden temp file, up
    to a checkpoint's size each. One is stale when its writer's process is gone (same host), or it is
    older than a day (another host, or a name from before the pid was recorded). Files of live writers
    and anything not named like our temps are left alone. Called when a run, a tune or a submit starts.
    """
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for journal in folder.rglob(".commit.*.json"):  # a transaction killed while committing: complete it
        m = re.match(r"^\.commit\.(?P<pid>\d+)@(?P<host>[A-Za-z0-9-]*)\.json$", journal.name)
        if m and m["host"] == HOST and not pid_alive(int(m["pid"])):
            with contextlib.suppress(FileNotFoundError, ValueError):
                _commit(journal)
    now = time.time()
    for p in folder.rglob(".*.tmp"):
        m = _TEMP.match(p.name)
        try:
            old = now - p.stat().st_mtime > STALE_AFTER_S
        except FileNotFoundError:  # its writer just renamed it
            continue
        if m:
            stale = not pid_alive(int(m["pid"])) if m["host"] == HOST else old
        else:
            stale = bool(_OLD_TEMP.match(p.name)) and old
        if stale:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed.append(p)
    return removed


def check_writable(folder: str | Path) -> None:
    """Create ``folder`` if needed and write, fsync and delete a small probe file in it.

    Called before hours of work whose result lands in ``folder`` (a submission): a read-only or full
    disk fails here, in a second, with the OS error naming the folder (:func:`pipeline.core.errors.cli`).
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=temp_prefix(folder / "write-probe"), suffix=".tmp", dir=folder)
        try:
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:  # name the folder the user chose, whatever file the OS complained about
        raise OSError(e.errno, f"cannot write there ({e.strerror or e})", str(folder)) from None


def check_free_space(folder: str | Path, need: int, what: str) -> None:
    """Fail now, naming ``folder``, when its disk has less than ``need`` bytes free for ``what``: better
    than a full disk found after hours of predicting (the OS error of a full disk names no file)."""
    free = shutil.disk_usage(Path(folder)).free
    if free < need:
        raise OSError(
            errno.ENOSPC,
            f"{free / 1e6:.0f} MB free, {what} needs up to {need / 1e6:.0f} MB",
            str(folder),
        )


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on success rename it over ``path``, on error remove it.

    >>> with atomic_write("out.csv", "w") as f:  # doctest: +SKIP
    ...     f.write("a\\tb\\n")
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        try:  # keep the replaced file's mode, else the umask default (mkstemp's 0600 is too strict)
            os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode))
        except FileNotFoundError:
            os.chmod(tmp, 0o666 & ~_UMASK)
        staged = _STAGED.get()
        if staged is not None:  # inside a transaction: renamed with the others when it commits
            staged.append((Path(tmp), path))
            return
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and not e.filename:  # a full disk names no file: say which one failed
            raise OSError(e.errno, e.strerror or str(e), str(path)) from None
        raise


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # make a rename durable (best effort)
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


# The files staged by the transaction in progress (None outside one): (temp file, target) pairs.
_STAGED: contextvars.ContextVar[list[tuple[Path, Path]] | None] = contextvars.ContextVar(
    "staged", default=None
)
JOURNAL = ".commit.{pid}@{host}.json"


@contextlib.contextmanager
def transaction(folder: str | Path) -> Iterator[None]:
    """Several files of ``folder`` replaced as one: all of them, or none.

    Inside the block, :func:`atomic_write` (and every writer built on it) writes its temp file and defers
    the rename. On success the pairs are recorded in a journal (``.commit.<pid>@<host>.json``), every temp
    is renamed over its target, and the journal is removed; on an error nothing is renamed and the temps
    are removed. A kill before the journal is written leaves the old files (its temps are stale); a kill
    after it leaves a journal that :func:`remove_stale_temps` completes. Ctrl-C and SIGTERM are held back
    during the renames, so an interrupt never splits them.
    """
    folder = Path(folder)
    staged: list[tuple[Path, Path]] = []
    token = _STAGED.set(staged)
    try:
        yield
    except BaseException:
        for tmp, _ in staged:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        raise
    finally:
        _STAGED.reset(token)
    journal = folder / JOURNAL.format(pid=os.getpid(), host=HOST)
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        atomic_write_text(journal, json.dumps([[str(t), str(p)] for t, p in staged]))
        _commit(journal)
        if signal.sigpending() & {signal.SIGINT, signal.SIGTERM}:  # delivered when the mask is lifted
            print(
                f"note: {folder}: interrupted as its new files were put in place; all of them are",
                file=sys.stderr,
            )
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def _commit(journal: Path) -> None:
    """Rename every staged temp of ``journal`` still there over its target, then remove the journal."""
    for tmp, target in json.loads(journal.read_text()):
        with contextlib.suppress(FileNotFoundError):  # renamed before a kill
            os.replace(tmp, target)
    for folder in {Path(target).parent for _, target in json.loads(journal.read_text())}:
        _fsync_dir(folder)
    journal.unlink()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_write(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_write(path, "w") as f:
        f.write(text)


def save_figure(fig: Any, path: str | Path, dpi: int = 100) -> Path:
    """Write a matplotlib figure as PNG atomically (a reader never sees half a file); returns the path."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def save_yaml(path: str | Path, data: Any) -> None:
    """Write plain data as YAML, atomically."""
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))


def yaml_problem(e: yaml.YAMLError) -> str:
    """One line for a YAML error: what, and where (PyYAML's own text spans several indented lines)."""
    mark = getattr(e, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + (getattr(e, "problem", None) or str(e).splitlines()[0])


def load_yaml(path: str | Path) -> Any:
    """Read YAML with ``safe_load`` only (no Python object tags)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({yaml_problem(e)}); fix or delete the file") from None


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """``torch.save`` ``state`` (tensors, state dicts and plain data only) atomically to ``path``."""
    import torch

    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


_BUILDS_OBJECTS = {"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "NEWOBJ", "NEWOBJ_EX", "BUILD"}


def _object_pickle(path: Path) -> str | None:
    """The object-building opcodes of a well-formed pickle in ``path`` (a raw pickle, or a torch zip's
    ``data.pkl``), or None when no complete pickle is there. Parsed with ``pickletools.genops``, which
    never executes anything."""
    import pickletools
    import zipfile

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                member = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
                if member is None:
                    return None
                data = z.read(member)
        else:
            data = path.read_bytes()
        stream = io.BytesIO(data)
        while stream.tell() < len(data):  # a legacy torch file is several pickles in a row
            ops = {op.name for op, _, _ in pickletools.genops(stream)}
            if ops & _BUILDS_OBJECTS:
                return ", ".join(sorted(ops & _BUILDS_OBJECTS))
    except Exception:  # not (or no longer) a well-formed pickle: corruption, not a refusal
        return None
    return None


def _refusal(message: str, path: Path) -> str | None:
    """What a ``weights_only`` refusal names, or None when the bytes are not a pickle at all.

    torch raises ``UnpicklingError`` both for a blocked object (a crafted or foreign file: a refusal)
    and for bytes it cannot read ("Unsupported operand"), which is either corruption or a well-formed
    pickle using opcodes the safe loader does not allow (a crafted file of pickle protocol 0, 4 or 5):
    the two need different advice, so the bytes are parsed (never run) to tell them apart.
    """
    if "Unsupported operand" in message:
        ops = _object_pickle(path)
        return None if ops is None else f"pickle instructions that build objects ({ops})"
    blocked = re.search(r"GLOBAL (\S+)", message)
    if blocked:
        return f"blocked object {blocked.group(1)}"
    if "WeightsUnpickler error:" in message:
        lines = [x.strip() for x in message.split("WeightsUnpickler error:", 1)[1].splitlines() if x.strip()]
        if lines:
            return lines[0]
    return "an object that is not a tensor or plain data"


def load_checkpoint(path: str | Path, map_location: str | Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely: ``weights_only=True``; truncated or foreign files give a clear error.

    Raises :class:`CheckpointError` (never a raw unpickling traceback) when the file is missing,
    empty, truncated or corrupt, holds objects other than tensors and plain data (refused, nothing
    is executed), or is a torch file without buildseg's keys ``model`` and ``config``.
    """
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found; train first (make train) or fix the path")
    corrupt_fix = (
        "delete it and run the same make train again: the fold restarts from its first epoch"
        if path.name == "last.pt"
        else "delete it and retrain this fold (make train FOLDS=k resumes from its last.pt if that is whole)"
    )
    if path.stat().st_size == 0:
        # torch raises IndexError on an empty file; say what it means instead.
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): truncated or corrupt; {corrupt_fix}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        detail = _refusal(str(e), path)
        if detail is None:
            # Not a blocked object: the bytes are not a valid pickle (garbage, a cut legacy file).
            raise CheckpointError(
                f"checkpoint {path} is truncated or corrupt (not a readable torch file); {corrupt_fix}"
            ) from None
        raise CheckpointError(
            f"checkpoint {path} was refused: it contains objects other than tensors and plain data "
            f"({detail}). buildseg never unpickles arbitrary objects, so nothing in it was run; only load "
            "checkpoints written by buildseg, or re-save the state dict from a trusted session."
        ) from None
    except Exception as e:
        # Any other failure to parse the file means it is damaged: torch reports that as RuntimeError,
        # OSError, EOFError, KeyError or IndexError depending on where the bytes stop, and the user
        # needs one message, not the internal one. The exception is a device that cannot be used.
        first = str(e).splitlines()[0] if str(e) else ""
        if isinstance(e, RuntimeError) and ("CUDA" in first or "data location" in first):
            raise CheckpointError(
                f"checkpoint {path} cannot be loaded onto map_location={map_location!r} ({first}); "
                "load it with map_location='cpu' or on a machine with that device"
            ) from None
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt ({type(e).__name__}: {first}); {corrupt_fix}"
        ) from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        found = sorted(map(str, state))[:10] if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(
            f"checkpoint {path} is not a buildseg checkpoint (expected a dict with keys 'model' and "
            f"'config', found {found}); pass a checkpoint written by pipeline.train.trainer"
        )
    return state
