"""pipeline.runs.oof: OOF files written and read in chunks, nothing left behind on a failure."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.runs import oof


def test_oof_writer_streams_what_np_load_reads_and_chunks_read_back(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    probs = rng.integers(0, 256, (7, 5, 6), dtype=np.uint8)
    names = [f"t{i}.jpg" for i in range(7)]
    with oof.oof_writer(tmp_path / "oof.npz", names, "probs") as write:
        write([0, 1, 2], probs[:3])
        write([3, 4, 5, 6], probs[3:])
    with np.load(tmp_path / "oof.npz") as z:
        assert list(z["names"]) == names
        np.testing.assert_array_equal(z["probs"], probs)
    chunks = list(oof.oof_chunks(tmp_path / "oof.npz", "probs", chunk=3))
    assert [n for n, _ in chunks] == [names[:3], names[3:6], names[6:]]
    np.testing.assert_array_equal(np.concatenate([a for _, a in chunks]), probs)


def test_oof_writer_leaves_nothing_when_short_or_out_of_order(tmp_path: Path) -> None:
    probs = np.zeros((4, 2, 2), np.uint8)
    short = pytest.raises(ValueError, match="2 OOF maps written for 4 tiles")
    with short, oof.oof_writer(tmp_path / "oof.npz", list("abcd"), "probs") as write:
        write([0, 1], probs[:2])
    shuffled = pytest.raises(ValueError, match="dataset order")
    with shuffled, oof.oof_writer(tmp_path / "oof.npz", list("abcd"), "probs") as write:
        write([1, 0], probs[:2])
    assert list(tmp_path.iterdir()) == []


def test_oof_chunks_of_a_savez_compressed_file(tmp_path: Path) -> None:
    """Files written by np.savez_compressed (earlier runs) stream the same way."""
    probs = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    np.savez_compressed(tmp_path / "oof.npz", names=np.array(["a", "b"]), probs=probs)
    ((names, arr),) = list(oof.oof_chunks(tmp_path / "oof.npz", "probs"))
    assert names == ["a", "b"] and np.array_equal(arr, probs)
