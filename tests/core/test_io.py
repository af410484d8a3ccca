"""pipeline.core.io: writes that survive kills and full disks, checkpoints that never run code."""

from __future__ import annotations

import errno
import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from pipeline.core import io as pio
from pipeline.core.config import Config, to_dict
from pipeline.core.io import (
    CheckpointError,
    atomic_write,
    atomic_write_bytes,
    load_checkpoint,
    save_checkpoint,
)

ROOT = Path(__file__).resolve().parents[2]
OLD = b"previous version\n"


def leftovers(folder: Path, target: Path) -> list[str]:
    """Files in ``folder`` other than ``target`` (temporary files of atomic_write would show up here)."""
    return sorted(p.name for p in folder.iterdir() if p != target)


# ----------------------------------------------------------------------------- (a) SIGKILL mid-write

CHILD = """
import sys
from pipeline.core.io import atomic_write

with atomic_write(sys.argv[1], "wb") as f:
    f.write(b"x" * (8 << 20))  # the first 8 MiB of a large file
    f.flush()
    print("ready", flush=True)  # tell the parent the write is under way ...
    sys.stdin.read()  # ... and block until killed (stdin never closes before the kill)
    f.write(b"never written")
"""


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")
def test_sigkill_mid_write_keeps_the_previous_file(tmp_path: Path) -> None:
    target = tmp_path / "model.pt"
    target.write_bytes(OLD)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(target)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=ROOT,
    )
    try:
        line = child.stdout.readline()  # blocks until the child has written its first chunk
        assert line == b"ready\n", f"child failed before writing: {child.stderr.read().decode()}"
        temps = leftovers(tmp_path, target)
        # The write really is in flight: a temp file beside the target holds the first chunk.
        assert len(temps) == 1 and (tmp_path / temps[0]).stat().st_size == 8 << 20
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdin.close()
        child.stdout.close()
        child.stderr.close()
    assert target.read_bytes() == OLD  # the previous version, whole
    # A kill cannot clean up: only the hidden temp file remains, never a partial target ...
    assert all(n.startswith(".model.pt.") and n.endswith(".tmp") for n in leftovers(tmp_path, target))
    # ... which the next run, tune or submit removes: its writer is gone (issue 12).
    assert pio.remove_stale_temps(tmp_path) == [tmp_path / temps[0]]
    assert leftovers(tmp_path, target) == []


def test_only_temps_of_gone_writers_are_removed(tmp_path: Path) -> None:
    import time

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    names = {
        "dead writer": f".last.pt.{int(gone.stdout)}@{pio.HOST}.a1b2c3d4.tmp",
        "live writer": f".best.pt.{os.getpid()}@{pio.HOST}.a1b2c3d4.tmp",
        "other host, new": f".last.pt.{int(gone.stdout)}@elsewhere.a1b2c3d4.tmp",
        "other host, 2 days": f".oof.npz.{int(gone.stdout)}@elsewhere.a1b2c3d4.tmp",
        "old naming, new": ".manifest.yaml.k3j9x0qa.tmp",
        "old naming, 2 days": ".folds.csv.k3j9x0qa.tmp",
        "not ours": ".notes.tmp",
    }
    (tmp_path / "fold0").mkdir()
    for what, name in names.items():
        p = tmp_path / "fold0" / name
        p.write_bytes(b"x")
        if "2 days" in what:
            os.utime(p, (time.time() - 2 * 86400,) * 2)
    removed = {p.name for p in pio.remove_stale_temps(tmp_path)}
    assert removed == {names[k] for k in ("dead writer", "other host, 2 days", "old naming, 2 days")}


def test_check_writable_names_the_folder(tmp_path: Path, monkeypatch) -> None:
    pio.check_writable(tmp_path / "new" / "subs")  # made if missing, probe removed
    assert list((tmp_path / "new" / "subs").iterdir()) == []
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space")))
    with pytest.raises(OSError, match="cannot write there") as e:
        pio.check_writable(tmp_path / "subs")
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "subs")
    assert list((tmp_path / "subs").iterdir()) == []


# ----------------------------------------------------------------------------- (b) disk full


class _FullDisk(io.RawIOBase):
    """A file object whose write stores half the data, then fails like a full disk."""

    def __init__(self, f):
        self.f = f

    def write(self, data) -> int:
        self.f.write(bytes(data)[: len(data) // 2])
        self.f.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.f.close()


def _full_on_write(monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.fdopen
    monkeypatch.setattr(pio.os, "fdopen", lambda fd, mode: _FullDisk(real(fd, mode)))


def _full_on_fsync(monkeypatch: pytest.MonkeyPatch) -> None:
    # Buffered data often only fails when it reaches the disk: at flush/fsync, after every write "worked".
    def fsync(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pio.os, "fsync", fsync)


@pytest.mark.parametrize("fail", [_full_on_write, _full_on_fsync], ids=["write", "fsync"])
@pytest.mark.parametrize("existed", [True, False], ids=["target-existed", "new-target"])
def test_disk_full_leaves_target_unchanged_and_no_temp_file(tmp_path, monkeypatch, fail, existed) -> None:
    target = tmp_path / "sub.csv"
    if existed:
        target.write_bytes(OLD)
    fail(monkeypatch)
    with pytest.raises(OSError) as e:
        atomic_write_bytes(target, b"a.jpg\t1 3\n" * 10_000)
    assert e.value.errno == errno.ENOSPC  # the real error reaches the caller...
    assert e.value.filename == str(target)  # ...naming the file it was writing (the OS names none)
    monkeypatch.undo()
    assert (target.read_bytes() == OLD) if existed else not target.exists()
    assert leftovers(tmp_path, target) == []


def test_exception_inside_the_block_keeps_the_previous_file(tmp_path: Path) -> None:
    target = tmp_path / "folds.csv"
    target.write_bytes(OLD)
    with pytest.raises(KeyboardInterrupt), atomic_write(target, "w") as f:
        f.write("half a file")
        raise KeyboardInterrupt  # Ctrl-C while writing
    assert target.read_bytes() == OLD and leftovers(tmp_path, target) == []


def test_successful_write_replaces_the_file(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b.txt"  # parent folders are created
    with atomic_write(target, "w") as f:
        f.write("new")
    assert target.read_text() == "new" and leftovers(target.parent, target) == []


# ----------------------------------------------------------------------------- checkpoints


def _state() -> dict:
    return {
        "model": {"conv.weight": torch.randn(4, 3, 3, 3), "conv.bias": torch.zeros(4)},
        "config": to_dict(Config()),
        "epoch": 7,
        "fold": 1,
        "threshold": 0.45,
        "history": [{"dice": 0.8}, {"dice": 0.85}],
    }


class _Payload:
    """Pickles as a call: under full unpickling, loading it calls ``func(*args)``."""

    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _crafted(tmp_path: Path, how: str) -> tuple[Path, Path]:
    """A checkpoint with buildseg's keys whose loading would create ``marker`` if objects were unpickled."""
    marker = tmp_path / f"pwned-{how}"
    if how == "os.system":
        payload = _Payload(os.system, (f"touch {marker}",))
    else:
        payload = _Payload(open, (str(marker), "w"))
    path = tmp_path / f"crafted-{how}.pt"
    torch.save({**_state(), "model": {"w": payload}}, path)
    return path, marker


@pytest.mark.parametrize("how", ["os.system", "open"])
def test_crafted_checkpoint_is_refused_and_runs_nothing(tmp_path: Path, how: str) -> None:
    path, marker = _crafted(tmp_path, how)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert "was refused" in msg and str(path) in msg and "nothing in it was run" in msg
    assert ("system" if how == "os.system" else "open") in msg  # names the blocked object
    assert "weights_only` set to `False`" not in msg  # never passes on torch's advice to load unsafely
    assert not marker.exists()


@pytest.mark.parametrize("how", ["os.system", "open"])
def test_the_crafted_payload_is_live(tmp_path: Path, how: str) -> None:
    # Guards the test above: full unpickling of the same file does run the payload, so a
    # load_checkpoint that unpickled it would fail that test rather than pass by accident.
    path, marker = _crafted(tmp_path, how)
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("keep", [0.0, 0.01, 0.1, 0.5, 0.9, 0.999], ids=lambda k: f"keep{k:g}")
@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-format"])
def test_truncated_checkpoint_says_so(tmp_path: Path, keep: float, legacy: bool) -> None:
    buf = io.BytesIO()
    torch.save(_state(), buf, _use_new_zipfile_serialization=not legacy)
    data = buf.getvalue()
    path = tmp_path / "last.pt"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert "truncated or corrupt" in msg and str(path) in msg and "resume from the previous one" not in msg
    assert "delete it and run the same make train again: the fold restarts from its first epoch" in msg
    # One clear error, not a chained unpickling traceback.
    assert e.value.__cause__ is None and (e.value.__context__ is None or e.value.__suppress_context__)


@pytest.mark.parametrize("protocol", [0, 4, 5])
def test_a_crafted_raw_pickle_of_any_protocol_is_refused_not_called_corrupt(
    tmp_path: Path, protocol: int
) -> None:
    """Protocols 0, 4 and 5 use opcodes the safe loader does not know: torch says "Unsupported operand",
    which used to be reported as a truncated file."""
    import pickle

    marker = tmp_path / "pwned"
    path = tmp_path / "best.pt"
    path.write_bytes(
        pickle.dumps({**_state(), "model": {"w": _Payload(os.system, (f"touch {marker}",))}}, protocol)
    )
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert "was refused" in msg and "nothing in it was run" in msg and "corrupt" not in msg
    assert "weights_only" not in msg and not marker.exists()


@pytest.mark.parametrize(
    "data", [b"hello, this is not a checkpoint\n", bytes(range(256)) * 8], ids=["text", "binary-garbage"]
)
def test_garbage_is_corrupt_not_refused(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "best.pt"
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path)


def test_valid_checkpoint_round_trips(tmp_path: Path) -> None:
    state = _state()
    path = tmp_path / "fold1" / "best.pt"
    save_checkpoint(path, state)
    loaded = load_checkpoint(path)
    assert loaded.keys() == state.keys()
    for k, v in state["model"].items():
        assert torch.equal(loaded["model"][k], v)
    del loaded["model"], state["model"]
    assert loaded == state
    assert leftovers(path.parent, path) == []


@pytest.mark.parametrize(
    ("obj", "found"),
    [({"state_dict": {"w": torch.zeros(2)}}, "state_dict"), (torch.zeros(3), "Tensor"), ([1, 2], "list")],
    ids=["foreign-dict", "tensor", "list"],
)
def test_torch_file_that_is_not_a_buildseg_checkpoint(tmp_path: Path, obj: object, found: str) -> None:
    path = tmp_path / "other.pt"
    torch.save(obj, path)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert "not a buildseg checkpoint" in msg and "'model' and 'config'" in msg and found in msg


def test_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_device_is_not_called_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "best.pt"
    save_checkpoint(path, _state())
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path, map_location="cuda")
    assert "map_location='cpu'" in str(e.value) and "corrupt" not in str(e.value)


def test_save_figure_writes_a_png_atomically(tmp_path: Path) -> None:
    path = pio.save_figure(_figure(), tmp_path / "sub" / "d.png")
    with Image.open(path) as im:
        assert im.format == "PNG"
    assert [p.name for p in path.parent.iterdir()] == ["d.png"]


def _figure():
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2, 2))
    fig.subplots().plot([0, 1], [1, 0])
    return fig


# ----------------------------------------------------------------------------- transactions

_KILLED_TRANSACTION = """
import os, sys
from pathlib import Path
from pipeline.core import io as pio
folder, when = Path(sys.argv[1]), sys.argv[2]
if when == "committing":  # killed after the journal is written, between two renames
    real = os.replace
    def replace(a, b):
        real(a, b)
        os._exit(9)
    pio.os.replace = replace
with pio.transaction(folder):
    for name in ("a.txt", "b.txt", "c.txt"):
        pio.atomic_write_text(folder / name, "new")
    if when == "writing":
        os._exit(9)  # killed before the commit
"""


@pytest.mark.parametrize("when, expected", [("writing", "old"), ("committing", "new")])
def test_a_killed_transaction_leaves_all_old_or_all_new_files(
    tmp_path: Path, when: str, expected: str
) -> None:
    for name in ("a.txt", "b.txt", "c.txt"):
        (tmp_path / name).write_text("old")
    done = subprocess.run([sys.executable, "-c", _KILLED_TRANSACTION, str(tmp_path), when], cwd=ROOT)
    assert done.returncode == 9
    pio.remove_stale_temps(tmp_path)  # what the next stage reading the folder does
    assert [(tmp_path / n).read_text() for n in ("a.txt", "b.txt", "c.txt")] == [expected] * 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt", "c.txt"]  # no temp, no journal


def test_an_error_inside_a_transaction_replaces_nothing(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt), pio.transaction(tmp_path):
        pio.atomic_write_text(tmp_path / "a.txt", "new")
        pio.atomic_write_text(tmp_path / "b.txt", "new")
        raise KeyboardInterrupt  # Ctrl-C before the commit
    assert (
        sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"] and (tmp_path / "a.txt").read_text() == "old"
    )
    with pio.transaction(tmp_path):
        pio.atomic_write_text(tmp_path / "a.txt", "new")
        assert (tmp_path / "a.txt").read_text() == "old"  # nothing moves until the commit
    assert (tmp_path / "a.txt").read_text() == "new"
