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


class Killed(Exception):
    pass


def _pass(path: Path, probs: np.ndarray, stamp: str, kill_after: int | None = None) -> list[int]:
    """One OOF pass in batches of 2 from where the parts stand; returns the indices it predicted."""
    names = [f"t{i}.jpg" for i in range(len(probs))]
    seen: list[int] = []
    with oof.resumable_oof_writer(path, names, "probs", stamp, chunk=3) as parts:
        for start in range(parts.done, len(probs), 2):
            if kill_after is not None and len(seen) >= kill_after:
                raise Killed
            idx = list(range(start, min(start + 2, len(probs))))
            parts.write(idx, probs[idx])
            seen += idx
    return seen


def test_a_killed_oof_pass_resumes_after_its_last_saved_chunk(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    probs = rng.integers(0, 256, (9, 4, 5), dtype=np.uint8)
    path = tmp_path / "fold0" / "oof.npz"
    with pytest.raises(Killed):
        _pass(path, probs, "best-a d4", kill_after=4)  # 4 tiles predicted, a chunk is 3
    assert not path.exists() and (tmp_path / "fold0" / "oof.npz.parts").is_dir()
    assert _pass(path, probs, "best-a d4") == [4, 5, 6, 7, 8]  # the 4 done tiles are not redone
    with np.load(path) as z:
        assert list(z["names"]) == [f"t{i}.jpg" for i in range(9)]
        np.testing.assert_array_equal(z["probs"], probs)
    assert sorted(p.name for p in (tmp_path / "fold0").iterdir()) == ["oof.npz"]


def test_parts_of_another_checkpoint_are_not_reused(tmp_path: Path) -> None:
    probs = np.ones((6, 2, 2), np.uint8)
    path = tmp_path / "oof.npz"
    with pytest.raises(Killed):
        _pass(path, probs, "best-a d4", kill_after=4)
    assert _pass(path, 2 * probs, "best-b d4") == list(range(6))  # retrained fold: start again
    with np.load(path) as z:
        np.testing.assert_array_equal(z["probs"], 2 * probs)


def test_the_stamp_travels_in_the_file(tmp_path: Path) -> None:
    probs = np.zeros((3, 2, 2), np.uint8)
    assert _pass(tmp_path / "oof.npz", probs, "sha1:ab d4 none") == [0, 1, 2]
    assert oof.oof_stamp(tmp_path / "oof.npz") == "sha1:ab d4 none"
    assert oof.oof_stamp(tmp_path / "missing.npz") is None
    assert oof.oof_names(tmp_path / "oof.npz") == ["t0.jpg", "t1.jpg", "t2.jpg"]
