"""File output that never loses work, and checkpoint loading that never runs code.

Every file the pipeline writes (checkpoints, manifests, OOF probabilities, submissions, folds) goes
through :func:`atomic_write`: the data is written to a temporary file in the same folder, flushed
and fsync'ed, then renamed over the target. A kill or a full disk during the write leaves the
previous file intact and no partial file behind.

Checkpoints are loaded with ``torch.load(weights_only=True)``: only tensors and plain containers
are accepted, so a crafted file cannot execute code when it is opened.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import yaml


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and what to do."""


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on success rename it over ``path``, on error remove it.

    >>> with atomic_write("out.csv", "w") as f:  # doctest: +SKIP
    ...     f.write("a\\tb\\n")
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_write(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_write(path, "w") as f:
        f.write(text)


def save_yaml(path: str | Path, data: Any) -> None:
    """Write plain data as YAML, atomically."""
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))


def load_yaml(path: str | Path) -> Any:
    """Read YAML with ``safe_load`` only (no Python object tags)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({e}); fix or delete the file") from None


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """``torch.save`` ``state`` (tensors, state dicts and plain data only) atomically to ``path``."""
    import torch

    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str | Path, map_location: str | Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely: ``weights_only=True``; truncated or foreign files give a clear error."""
    import pickle
    import zipfile

    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found; train first (make train) or fix the path")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"checkpoint {path} was refused: it contains objects other than tensors and plain data "
            f"({str(e).splitlines()[0]}). buildseg never unpickles arbitrary objects; only load "
            "checkpoints written by buildseg, or re-save the state dict from a trusted session."
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt ({type(e).__name__}: {str(e).splitlines()[0]}); "
            "delete it and resume from the previous one (last.pt) or retrain this fold"
        ) from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(
            f"checkpoint {path} is not a buildseg checkpoint (expected keys 'model' and 'config')"
        )
    return state
