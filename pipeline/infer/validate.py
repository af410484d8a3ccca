"""Validate a submission CSV before uploading it: every problem, each with its row.

``python -m pipeline.infer.validate SUBMISSION [--sample test_a_samplesubmit.csv] [--size 512|HxW]`` prints
every problem and exits 1, or prints ``OK: N rows, K empty masks``. Without ``--size`` the tile size
is measured on the test tiles the sample lists (``test_a/`` beside it, or ``--images``), as
``make submit`` does: a mask that runs past the end of a smaller tile must not pass.

A valid submission is TAB-separated, has no header and two columns ``name<TAB>rle``; it lists
exactly the sample submission's names, in the sample's order, each once; every RLE is valid for
the tile size (an empty field is an empty mask). Unlike ``check_data``, which only warns about a
BOM, CRLF line ends or blank lines in the training CSVs, a submission is held to the exact format:
the grader's reader is not ours.
"""

from __future__ import annotations

import argparse
import sys
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.config import ConfigError, DataConfig
from pipeline.core.errors import cli
from pipeline.data.images import image_size
from pipeline.data.maskcsv import CsvRow, Problem, rle_problem, scan_csv
from pipeline.runs.folder import latest_submission

ORDER_FIX = (
    "write the rows in the sample's order (pandas: sub.set_index('name').loc[sample['name']].reset_index())"
)


@dataclass(frozen=True)
class SubmissionCheck:
    """The outcome of :func:`check_submission`: every problem, and the rows that could be read."""

    problems: list[str]
    rows: list[CsvRow]

    @property
    def empty_masks(self) -> int:
        return sum(1 for r in self.rows if not r.rle)


def validate_submission(
    sub_path: str | Path, sample_path: str | Path | None = None, shape: tuple[int, int] = (512, 512)
) -> list[str]:
    """Every problem of the submission ``sub_path`` (empty list: valid), each naming its row.

    Args:
        sub_path: the submission CSV (``name<TAB>rle``, no header).
        sample_path: the sample submission whose names and order the submission must match;
            None checks the format and RLE only.
        shape: (H, W) of every tile, for the RLE check.
    """
    return check_submission(sub_path, sample_path, shape).problems


def check_submission(
    sub_path: str | Path, sample_path: str | Path | None = None, shape: tuple[int, int] = (512, 512)
) -> SubmissionCheck:
    """:func:`validate_submission` plus the rows read (for the CLI's summary)."""
    sub_path = Path(sub_path)
    label = str(sub_path)
    if not sub_path.is_file():
        return SubmissionCheck(
            [f"{label}: not found; write the submission first (python -m pipeline.infer.submit)"], []
        )
    scan = scan_csv(sub_path, label, with_rle=True)
    # In a submission every deviation from the format counts: warnings of the scan are problems too.
    problems = [str(p) for p in sorted(scan.errors + scan.warnings, key=_row_key)]
    for r in scan.rows:
        bad = rle_problem(r.rle, shape)
        if bad:
            what, fix, _ = bad
            problems.append(f"{label}, row {r.row} ({r.name}): {what}. Fix: {fix}")
    if sample_path is not None and scan.rows:  # no rows read: the format problem says it all
        problems += _check_names(label, scan.rows, Path(sample_path))
    return SubmissionCheck(problems, scan.rows)


def _row_key(p: Problem) -> int:
    # "file, row N" sorts by N; file-level problems (no row) come first.
    _, _, row = p.where.rpartition(", row ")
    return int(row) if row.isdigit() else 0


def _check_names(label: str, rows: list[CsvRow], sample_path: Path) -> list[str]:
    """Missing, extra and out-of-order names against the sample (duplicates are found by the scan)."""
    if not sample_path.is_file():
        return [f"{sample_path}: sample submission not found; pass --sample with the competition's file"]
    sample = scan_csv(sample_path, str(sample_path), with_rle=False)
    problems = [f"(sample) {p}" for p in sample.errors]
    expected = {r.name: r for r in sample.rows}
    present = {r.name for r in rows}
    known: list[CsvRow] = []
    for r in rows:
        if r.name in expected:
            known.append(r)
        else:
            problems.append(
                f"{label}, row {r.row}: {r.name} is not in the sample submission {sample_path}. "
                "Fix: delete the row, or correct the name"
            )
    for s in sample.rows:
        if s.name not in present:
            problems.append(
                f"{label}: {s.name} (sample row {s.row}) is missing. "
                f"Fix: add the row {s.name}<TAB>rle (an empty rle for no buildings) in the sample's order"
            )
    keep = _longest_increasing([expected[r.name].row for r in known])
    for i, r in enumerate(known):
        if i not in keep:
            problems.append(
                f"{label}, row {r.row}: {r.name} is out of order (it is row {expected[r.name].row} "
                f"of the sample). Fix: {ORDER_FIX}"
            )
    return problems


def _longest_increasing(seq: list[int]) -> set[int]:
    """Indices of one longest strictly increasing subsequence of ``seq`` (O(n log n)).

    Rows outside it are the fewest that must move to restore the sample's order: one moved row is
    reported as one problem, not as every row between its old and new place.
    """
    tails: list[int] = []  # tails[k]: smallest tail value of an increasing run of length k + 1
    tail_idx: list[int] = []
    prev = [-1] * len(seq)
    for i, v in enumerate(seq):
        k = bisect_left(tails, v)
        if k == len(tails):
            tails.append(v)
            tail_idx.append(i)
        else:
            tails[k] = v
            tail_idx[k] = i
        prev[i] = tail_idx[k - 1] if k else -1
    out: set[int] = set()
    i = tail_idx[-1] if tail_idx else -1
    while i >= 0:
        out.add(i)
        i = prev[i]
    return out


def tile_shape(size: str, sample: str | Path | None, images: str | Path | None) -> tuple[int, int]:
    """(H, W) for the RLE check: ``size`` (``512`` or ``HxW``) if given, else the size of the first tile
    the sample lists, in ``images`` (default: the ``test_a/`` beside the sample), as ``make submit``
    measures it. Never an assumed size: a mask running past the end of a smaller tile must fail."""
    if size:
        h, _, w = size.lower().partition("x")
        try:
            return int(h), int(w or h)
        except ValueError:
            raise ConfigError(f"--size {size!r}: give the tile size as 512 or HxW (e.g. 480x640)") from None
    if sample is None:
        raise ConfigError("without --sample, give the tile size: --size 512 (or HxW)")
    sample = Path(sample)
    folder = Path(images) if images else sample.parent / DataConfig().test_dir
    scan = scan_csv(sample, str(sample), with_rle=False) if sample.is_file() else None
    names = [r.name for r in scan.rows] if scan is not None else []
    first = next((folder / n for n in names if (folder / n).is_file()), None)
    if first is None:
        raise ConfigError(
            f"cannot measure the tiles: none of the tiles {sample} lists is in {folder}/; "
            "pass --images DIR (the test tiles) or --size 512"
        )
    return image_size(first)


@cli
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.infer.validate", description=__doc__.splitlines()[0])
    p.add_argument("submission", nargs="?", default="", help="the CSV (default: the newest in submissions/)")
    p.add_argument(
        "--sample",
        default=None,
        help="the sample submission (e.g. data/test_a_samplesubmit.csv); "
        "without it, names and row order are not checked",
    )
    p.add_argument("--size", default="", help="tile size, 512 or HxW (default: measured on the test tiles)")
    p.add_argument("--images", default="", help="the test tiles (default: test_a/ beside the sample)")
    args = p.parse_args(argv)
    shape = tile_shape(args.size, args.sample, args.images)
    if args.sample is None:
        print("note: no --sample given; names and row order are not checked", file=sys.stderr)
    result = check_submission(latest_submission(args.submission), args.sample, shape)
    if result.problems:
        print("\n".join(result.problems))
        print(f"{len(result.problems)} problems")
        return 1
    print(f"OK: {len(result.rows)} rows, {result.empty_masks} empty masks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
