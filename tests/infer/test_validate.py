"""pipeline.infer.validate: one broken submission per case, each problem named with its row and a fix.

The sample lists a.jpg..e.jpg; a clean submission lists the same names in the same order, with valid
RLE for 16x16 tiles (an empty field for an empty mask).
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.infer.validate import _longest_increasing, main, validate_submission

SHAPE = (16, 16)
NAMES = ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg"]
MASKS = ["1 3", "", "10 2 40 5", "", "250 7"]  # 250 + 7 - 1 = 256: the last pixel of a 16x16 tile


def rows(pairs: list[tuple[str, str]]) -> bytes:
    return "".join(f"{n}\t{r}\n" for n, r in pairs).encode()


CLEAN = list(zip(NAMES, MASKS))


def swap(i: int, j: int) -> list[tuple[str, str]]:
    out = list(CLEAN)
    out[i], out[j] = out[j], out[i]
    return out


def with_mask(i: int, value: str) -> list[tuple[str, str]]:
    return [(n, value if k == i else r) for k, (n, r) in enumerate(CLEAN)]


@dataclass(frozen=True)
class Case:
    """A submission's bytes and the fragments that must appear in one problem (each problem one string)."""

    id: str
    data: bytes
    expect: tuple[str, ...]
    n_problems: int = 1


# fmt: off
CASES = [
    Case("missing", rows(CLEAN[:3] + CLEAN[4:]),
         ("d.jpg (sample row 4) is missing", "add the row d.jpg<TAB>")),
    Case("extra", rows([*CLEAN, ("z.jpg", "")]), ("row 6: z.jpg is not in the sample", "delete the row")),
    Case("duplicate", rows([*CLEAN[:3], CLEAN[1], *CLEAN[3:]]),
         ("row 4: duplicate name b.jpg (first at row 2, the same mask)", "keep one of rows 2 and 4")),
    Case("out-of-order-swap", rows(swap(1, 2)), ("row 2: c.jpg is out of order (it is row 3 of the sample)",
                                                 "sample's order")),
    # One row moved to the end is one problem, not one per row it jumped over.
    Case("out-of-order-moved", rows(CLEAN[1:] + CLEAN[:1]),
         ("row 5: a.jpg is out of order", "sample's order")),
    Case("header", rows([("name", "rle"), *CLEAN]), ("row 1", "header row", "delete this row")),
    Case("comma", rows(CLEAN).replace(b"\t", b","), ("comma-separated (all 5 rows)", "sep='\\t'")),
    Case("comma-one-row", rows(CLEAN).replace(b"c.jpg\t", b"c.jpg,"), ("row 3", "comma instead of a TAB")),
    *[
        Case(f"nan-{v}", rows(with_mask(1, v)), (f"row 2 (b.jpg): mask is the literal '{v}'", "empty field"))
        for v in ("nan", "NaN", "None")
    ],
    Case("bom", codecs.BOM_UTF8 + rows(CLEAN), ("row 1", "byte-order mark", "without BOM")),
    Case("crlf", rows(CLEAN).replace(b"\n", b"\r\n"), ("5 of 5 lines end with CRLF", "LF line ends")),
    Case("blank-line", rows(CLEAN[:2]) + b"\n" + rows(CLEAN[2:]), ("blank lines (rows 3)", "delete")),
    Case("no-tab", rows(CLEAN).replace(b"b.jpg\t\n", b"b.jpg\n"), ("row 2", "no TAB", "nothing after")),
    Case("extra-column", rows(with_mask(0, "1 3\t0.93")), ("row 1", "3 TAB-separated fields")),
    Case("empty-file", b"", ("is empty",)),
    Case("rle-odd", rows(with_mask(0, "1 2 3")), ("row 1 (a.jpg): malformed RLE: odd number of tokens",
                                                  "pipeline.data.rle.encode")),
    Case("rle-not-integer", rows(with_mask(0, "1 2.5")), ("row 1 (a.jpg)", "'2.5' is not an integer")),
    Case("rle-start-0", rows(with_mask(0, "0 3")), ("row 1 (a.jpg)", "start 0 < 1")),
    Case("rle-zero-length", rows(with_mask(0, "3 0")), ("row 1 (a.jpg)", "length 0 must be > 0")),
    Case("rle-past-end", rows(with_mask(4, "250 8")), ("row 5 (e.jpg)", "past the end of a 16x16 image",
                                                       "this 16x16 tile")),
    Case("rle-unsorted", rows(with_mask(2, "40 5 10 2")), ("row 3 (c.jpg)", "unsorted")),
    Case("rle-overlapping", rows(with_mask(2, "10 5 12 2")), ("row 3 (c.jpg)", "overlapping")),
    # Several problems at once: all reported.
    Case("several", rows([("name", "rle"), CLEAN[1], CLEAN[0], ("c.jpg", "nan"), CLEAN[4]]),
         ("header row",), n_problems=4),
]
# fmt: on


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_case(case: Case, tmp_path: Path) -> None:
    sample = tmp_path / "sample.csv"
    sample.write_bytes(rows([(n, "") for n in NAMES]))
    sub = tmp_path / "sub.csv"
    sub.write_bytes(case.data)
    problems = validate_submission(sub, sample, SHAPE)
    assert len(problems) == case.n_problems, "\n".join(problems)
    assert any(all(f in p for f in case.expect) for p in problems), "\n".join(problems)
    assert all(p.startswith(str(sub)) for p in problems), "every problem names the file"


def test_clean_submission(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sample = tmp_path / "sample.csv"
    sample.write_bytes(rows([(n, "") for n in NAMES]))
    sub = tmp_path / "sub.csv"
    sub.write_bytes(rows(CLEAN))
    assert validate_submission(sub, sample, SHAPE) == []
    assert main([str(sub), "--sample", str(sample), "--size", "16"]) == 0
    assert capsys.readouterr().out.strip() == "OK: 5 rows, 2 empty masks"


def test_without_sample_checks_format_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sub = tmp_path / "sub.csv"
    sub.write_bytes(rows(swap(0, 4)))  # order cannot be checked without the sample
    assert validate_submission(sub, None, SHAPE) == []
    assert main([str(sub), "--size", "16"]) == 0
    assert "names and row order are not checked" in capsys.readouterr().err


def test_cli_prints_every_problem_and_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sample = tmp_path / "sample.csv"
    sample.write_bytes(rows([(n, "") for n in NAMES]))
    sub = tmp_path / "sub.csv"
    sub.write_bytes(rows([CLEAN[0], ("b.jpg", "nan"), ("c.jpg", "1 2 3")]))
    assert main([str(sub), "--sample", str(sample), "--size", "16"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == "4 problems"
    assert sum("is missing" in line for line in out) == 2 and any("row 2 (b.jpg)" in line for line in out)


def test_missing_files(tmp_path: Path) -> None:
    assert "not found" in validate_submission(tmp_path / "nope.csv", None, SHAPE)[0]
    sub = tmp_path / "sub.csv"
    sub.write_bytes(rows(CLEAN))
    assert "sample submission not found" in validate_submission(sub, tmp_path / "nope.csv", SHAPE)[0]


def test_the_grader_shape_matters(tmp_path: Path) -> None:
    # A mask valid for 16x16 runs past an 8x8 tile: the RLE check uses the shape given.
    sub = tmp_path / "sub.csv"
    sub.write_bytes(rows(CLEAN))
    problems = validate_submission(sub, None, (8, 8))
    assert len(problems) == 1
    assert "row 5 (e.jpg)" in problems[0] and "past the end of a 8x8 image" in problems[0]


@pytest.mark.parametrize(
    ("seq", "length"),
    [([], 0), ([1], 1), ([1, 2, 3], 3), ([3, 2, 1], 1), ([2, 3, 1, 4, 5], 4), ([5, 1, 2, 3, 4], 4)],
)
def test_longest_increasing(seq: list[int], length: int) -> None:
    keep = sorted(_longest_increasing(seq))
    assert len(keep) == length
    assert all(seq[a] < seq[b] for a, b in zip(keep, keep[1:]))


def test_cli_takes_the_tile_size_from_the_test_images(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`make validate` passes no size: it must come from the test tiles, never an assumed 512 (issue 12)."""
    import numpy as np
    from PIL import Image

    (tmp_path / "test_a").mkdir()
    for n in NAMES:  # 8x12 (HxW) tiles: 96 pixels
        Image.fromarray(np.zeros((8, 12, 3), np.uint8)).save(tmp_path / "test_a" / n)
    sample = tmp_path / "test_a_samplesubmit.csv"
    sample.write_bytes(rows([(n, "") for n in NAMES]))
    sub = tmp_path / "sub.csv"
    sub.write_bytes(rows(with_mask(4, "90 7")))  # 90 + 7 - 1 = 96: the last pixel; valid at 8x12
    assert main([str(sub), "--sample", str(sample)]) == 0, capsys.readouterr().out
    sub.write_bytes(rows(with_mask(4, "90 8")))  # one pixel past the end of an 8x12 tile, fine at 512
    assert main([str(sub), "--sample", str(sample)]) == 1
    out = capsys.readouterr().out
    assert "row 5 (e.jpg)" in out and "8x12" in out
    # No sample and no size: there is no tile to measure, so no size is assumed.
    assert main([str(sub)]) == 2
    assert "--size" in capsys.readouterr().err
