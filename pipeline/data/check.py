"""Check a competition data folder before training or submitting: every problem at once, each with a fix.

``python -m pipeline.data.check DATA`` lists every problem of the folder (errors and warnings), each
with its file (and CSV row) and how to fix it, then ``N errors, M warnings``; it exits 1 on errors.
``require_clean(cfg.data)`` runs the same check at the start of train and submit.

What is checked:

* CSV files (``train_mask.csv``, ``test_a_samplesubmit.csv``, ``test_a_mask.csv``): every problem
  of :func:`pipeline.data.maskcsv.scan_csv`, the scanner every reader of the format uses (empty file,
  encoding, BOM, CRLF, a header row, comma instead of TAB, rows without a TAB or with extra columns,
  a trailing TAB, empty and duplicate names), NaN literals (``nan``/``None``) in the mask column,
  and every rule of the RLE codec (:func:`pipeline.data.rle.parse`) against the size of the tile the
  row names (:func:`pipeline.data.maskcsv.rle_problem`).
* Folders: listed images that are missing (with a hint when the name differs only in case,
  extension or Unicode normalisation), images that are not listed (warning), non-ASCII file names
  (warning).
* Images (:mod:`pipeline.data.images`, every tile decoded fully once): unreadable files, truncated
  JPEGs (no end-of-image marker, or any decoder warning such as data cut short before the marker),
  tiles of another size than the first (or ``data.image_size``; non-square sets are fine), and
  modes that ``read_image`` converts (grayscale, palette, RGBA, 16-bit: warning).

Only layouts whose registry entry is ``checkable`` are checked (:func:`pipeline.data.layouts.layout`).
"""

from __future__ import annotations

import argparse
import sys
import unicodedata
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.core.config import DataConfig
from pipeline.core.errors import cli
from pipeline.core.progress import phase, progress
from pipeline.data import DataError
from pipeline.data.images import inspect_image, list_images
from pipeline.data.layouts import layout

# The scanner and the RLE check live with the format; pipeline.infer.validate imports them from there too.
from pipeline.data.maskcsv import CsvRow, CsvScan, Problem, rle_problem, scan_csv

# A size no mask runs past: with no tile of a known size, only the RLE syntax of a row is checked.
NO_SIZE = (1 << 16, 1 << 16)


@dataclass
class Report:
    """Everything found in one data folder. ``ok`` when there are no errors (warnings are allowed)."""

    root: Path
    errors: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    summary: list[str] = field(default_factory=list)  # what was checked, one line per file set

    @property
    def ok(self) -> bool:
        return not self.errors

    def error(self, where: str, what: str, fix: str, code: str) -> None:
        self.errors.append(Problem(where, what, fix, code))

    def warn(self, where: str, what: str, fix: str, code: str) -> None:
        self.warnings.append(Problem(where, what, fix, code))

    def format(self, max_per_code: int | None = None) -> str:
        """A readable list (errors first), ending with the line ``N errors, M warnings``.

        ``max_per_code`` shows at most that many problems of each kind and counts the rest, so a
        folder where every tile has the same problem gives a short message (the CLI shows all).
        """
        lines = [f"Checked {self.root}"] + [f"  {s}" for s in self.summary]
        for label, items in (("ERROR", self.errors), ("WARNING", self.warnings)):
            shown: Counter[str] = Counter()
            for p in items:
                shown[p.code] += 1
                if max_per_code is None or shown[p.code] <= max_per_code:
                    lines.append(f"{label:<7} {p.where}: {p.what}")
                    lines.append(f"{'':<7}   fix: {p.fix}")
            if max_per_code is not None:
                for code, n in shown.items():
                    if n > max_per_code:
                        lines.append(
                            f"{label:<7} ... and {n - max_per_code} more {code} problems "
                            f"(python -m pipeline.data.check {self.root} lists all)"
                        )
        lines.append(f"{len(self.errors)} errors, {len(self.warnings)} warnings")
        return "\n".join(lines)


class _Checker:
    """Checks one data folder into ``report``; images are inspected once even when two CSVs list them."""

    def __init__(self, root: Path, size: int, report: Report):
        # (H, W) every tile must have: data.image_size (square), else that of the first tile read.
        self.root, self.report = root, report
        self.shape: tuple[int, int] | None = (size, size) if size else None
        self.sizes: dict[Path, tuple[int, int] | None] = {}  # (H, W) per inspected image; None: unreadable
        self.folder_names: dict[str, list[str]] = {}  # checked folder -> image file names

    # ---- files

    def folder(self, dir_name: str) -> list[str] | None:
        folder = self.root / dir_name
        if not folder.is_dir():
            return None
        names = list_images(folder)
        self.folder_names[dir_name] = names
        return names

    def csv(self, csv_name: str, with_rle: bool) -> CsvScan | None:
        path = self.root / csv_name
        if not path.is_file():
            return None
        scan = scan_csv(path, csv_name, with_rle=with_rle)
        self.report.errors += scan.errors
        self.report.warnings += scan.warnings
        return scan

    # ---- images

    def image(self, dir_name: str, name: str) -> tuple[int, int] | None:
        """(H, W) of ``dir_name/name`` (None if unreadable), reporting its problems the first time."""
        path = self.root / dir_name / name
        if path not in self.sizes:
            self.sizes[path] = self._inspect(path, f"{dir_name}/{name}")
        return self.sizes[path]

    def _inspect(self, path: Path, where: str) -> tuple[int, int] | None:
        check = inspect_image(path, where)
        self.report.errors += check.errors
        if check.size is not None:
            h, w = check.size
            self.shape = self.shape or (h, w)
            eh, ew = self.shape
            if (h, w) != self.shape:
                self.report.error(
                    where,
                    f"tile is {h}x{w} (HxW) but {eh}x{ew} is expected",
                    f"re-export the tile at {eh}x{ew}: every tile of a data set must have one size"
                    + (" (data.image_size / --size sets it; 0 takes the first tile's)" if eh == ew else ""),
                    "wrong-size",
                )
        self.report.warnings += check.warnings
        return check.size

    # ---- listed images

    def listed(self, csv_name: str, rows: list[CsvRow], dir_name: str, present: list[str] | None) -> None:
        """Report listed images that do not exist, and inspect the ones that do."""
        folder = f"{dir_name}/"
        if present is None:
            self.report.error(
                folder,
                f"folder not found, but {csv_name} lists {len(rows)} tiles",
                f"restore the folder, or point --{'test' if 'test' in dir_name else 'train'}-dir / the data "
                "config at the folder with the tiles",
                "missing-folder",
            )
            return
        have = set(present)
        missing = [r for r in rows if r.name not in have]
        if missing and len(missing) == len(rows) and len(rows) > 3:
            # Nothing matches: the wrong folder, not N separate problems.
            self.report.error(
                folder,
                f"none of the {len(rows)} images listed in {csv_name} exist here "
                f"(e.g. {rows[0].name}); the folder has {len(present)} images",
                "check the data folder and --train-dir/--test-dir, or restore the images",
                "missing-image",
            )
        else:
            hints = _NameHints(present)
            for r in missing:
                self.report.error(
                    f"{csv_name}, row {r.row}",
                    f"lists {r.name} but {dir_name}/{r.name} does not exist",
                    hints.fix(r.name, r.row),
                    "missing-image",
                )
        with progress(len(rows), f"check {dir_name}/ (every tile decoded)", unit="tile") as bar:
            for r in rows:
                if r.name in have:
                    self.image(dir_name, r.name)
                bar.update(1)

    def unlisted(
        self, csv_name: str, rows: list[CsvRow], dir_name: str, present: list[str], why: str
    ) -> None:
        listed = {r.name for r in rows}
        for name in present:
            if name not in listed:
                self.report.warn(
                    f"{dir_name}/{name}",
                    f"is not listed in {csv_name}: {why}",
                    f"add a row for it to {csv_name}, or move the file out of {dir_name}/",
                    "unlisted-image",
                )

    def masks(self, csv_name: str, rows: list[CsvRow], dir_name: str) -> int:
        """Validate every mask against its tile's actual size (expected size if unreadable); count empties."""
        empty = 0
        with progress(len(rows), f"check {csv_name} (every mask checked)", unit="mask") as bar:
            for r in rows:
                # No tile of a known size (a missing folder, reported once): only the syntax can be checked.
                shape = self.sizes.get(self.root / dir_name / r.name) or self.shape or NO_SIZE
                problem = rle_problem(r.rle, shape)
                if problem:
                    what, fix, code = problem
                    self.report.error(f"{csv_name}, row {r.row} ({r.name})", what, fix, code)
                elif not r.rle:
                    empty += 1
                bar.update(1)
        return empty

    def non_ascii(self) -> None:
        for dir_name, names in self.folder_names.items():
            for name in names:
                if not name.isascii():
                    self.report.warn(
                        f"{dir_name}/{name}",
                        "file name is not ASCII; some zip tools, shells and graders mangle it",
                        "rename the file and its CSV rows to ASCII (e.g. a hash or index)",
                        "non-ascii-name",
                    )


class _NameHints:
    """Why a listed name may be missing: a different case, extension or Unicode normalisation."""

    def __init__(self, present: Iterable[str]):
        present = list(present)
        self.by_nfc = {unicodedata.normalize("NFC", n): n for n in present}
        self.by_fold = {n.casefold(): n for n in present}
        self.by_stem: dict[str, str] = {}
        for n in present:
            self.by_stem.setdefault(Path(n).stem.casefold(), n)

    def fix(self, name: str, row: int) -> str:
        base = f"restore the file, or delete row {row}"
        if "/" in name or "\\" in name:
            return f"names must be bare file names without folders; write {Path(name).name}"
        alt = self.by_nfc.get(unicodedata.normalize("NFC", name))
        if alt is not None:
            return (
                f"the folder has {alt!r}, which differs only in Unicode normalisation (NFC/NFD, e.g. "
                "copied via macOS); rename the file or the CSV name to the same bytes"
            )
        alt = self.by_fold.get(name.casefold())
        if alt is not None:
            return (
                f"the folder has {alt}: names are case-sensitive; fix the name in the CSV or rename the file"
            )
        alt = self.by_stem.get(Path(name).stem.casefold())
        if alt is not None:
            return f"the folder has {alt}: fix the extension in the CSV, or {base}"
        return base


# ----------------------------------------------------------------------------- the check


def check_dataset(
    root: str | Path, data_cfg: DataConfig | None = None, *, train: bool = True, test: bool = True
) -> Report:
    """Check a competition data folder and return every problem found (nothing is raised).

    Args:
        root: the data folder (overrides ``data_cfg.root``).
        data_cfg: file and folder names and ``image_size``; defaults to :class:`DataConfig`'s.
        train: check ``train_dir`` + ``mask_csv`` (both required).
        test: check ``test_dir`` + ``sample_csv`` (+ ``test_mask_csv`` if present); all optional.
    """
    cfg = data_cfg or DataConfig()
    root = Path(root)
    report = Report(root)
    if not root.is_dir():
        report.error(
            str(root),
            "data folder not found",
            "pass the folder that holds train/ and train_mask.csv (make demo writes data/demo)",
            "missing-folder",
        )
        return report
    try:
        checkable = layout(cfg.layout).checkable
    except DataError as e:
        report.error(str(root), str(e), "set data.layout to one of the listed layouts", "layout")
        return report
    if not checkable:
        report.warn(
            str(root),
            f"layout {cfg.layout!r} is not checked (only the competition layout is)",
            "nothing to do; check the folder by hand",
            "layout",
        )
        return report
    c = _Checker(root, cfg.image_size, report)
    with phase(f"check_data {root}"):  # CSV scans and folder listings between the bars
        if train:
            _check_train(c, cfg)
        if test:
            _check_test(c, cfg)
        c.non_ascii()
    return report


def _check_train(c: _Checker, cfg: DataConfig) -> None:
    present = c.folder(cfg.train_dir)
    scan = c.csv(cfg.mask_csv, with_rle=True)
    if scan is None:
        n = f" ({len(present)} images in {cfg.train_dir}/)" if present else ""
        c.report.error(
            cfg.mask_csv,
            f"not found{n}",
            "write the labels as name<TAB>rle, one row per tile, no header (or pass --mask-csv)",
            "missing-csv",
        )
        if present is None:
            c.report.error(
                f"{cfg.train_dir}/", "folder not found", "restore it or pass --train-dir", "missing-folder"
            )
        return
    c.listed(cfg.mask_csv, scan.rows, cfg.train_dir, present)
    empty = c.masks(cfg.mask_csv, scan.rows, cfg.train_dir)
    if present is not None and scan.rows:  # with no readable rows the CSV's own error says it all
        c.unlisted(cfg.mask_csv, scan.rows, cfg.train_dir, present, "it is not used for training")
    c.report.summary.append(
        f"{cfg.mask_csv}: {len(scan.rows)} rows ({empty} empty masks); "
        f"{cfg.train_dir}/: {len(present or [])} images"
    )


def _check_test(c: _Checker, cfg: DataConfig) -> None:
    present = c.folder(cfg.test_dir)
    sample = c.csv(cfg.sample_csv, with_rle=False)
    truth = c.csv(cfg.test_mask_csv, with_rle=True)
    if present is None and sample is None and truth is None:
        c.report.summary.append(f"no {cfg.test_dir}/ and no {cfg.sample_csv}: no test set")
        return
    if sample is not None:
        c.listed(cfg.sample_csv, sample.rows, cfg.test_dir, present)
        if present is not None and sample.rows:
            c.unlisted(cfg.sample_csv, sample.rows, cfg.test_dir, present, "it will not be predicted")
    elif present is not None:
        c.report.warn(
            cfg.sample_csv,
            f"not found; the submission will list {cfg.test_dir}/ in sorted order",
            "copy the competition's sample submission here: it fixes the submission's row order",
            "missing-sample",
        )
    if truth is not None:
        c.listed(cfg.test_mask_csv, truth.rows, cfg.test_dir, present)
        c.masks(cfg.test_mask_csv, truth.rows, cfg.test_dir)
        if sample is not None:
            have = {r.name for r in truth.rows}
            lacking = [r.name for r in sample.rows if r.name not in have]
            if lacking:
                c.report.error(
                    cfg.test_mask_csv,
                    f"has no ground truth for {len(lacking)} of the {len(sample.rows)} tiles in "
                    f"{cfg.sample_csv} "
                    f"({', '.join(lacking[:5])}{', ...' if len(lacking) > 5 else ''})",
                    "add their rows (an empty mask is name<TAB>), or remove the file to score nothing",
                    "missing-truth",
                )
    n_sample = f"{len(sample.rows)} rows" if sample is not None else "absent"
    c.report.summary.append(
        f"{cfg.sample_csv}: {n_sample}; {cfg.test_dir}/: {len(present or [])} images"
        + (f"; {cfg.test_mask_csv}: {len(truth.rows)} rows" if truth is not None else "")
    )


def require_clean(data_cfg: DataConfig, *, train: bool = True, test: bool = True) -> Report:
    """Check ``data_cfg.root``; raise :class:`DataError` listing every error, print warnings to stderr.

    Called at the start of train (``test=False`` is enough) and submit (``train=False``).
    """
    report = check_dataset(data_cfg.root, data_cfg, train=train, test=test)
    if not report.ok:
        raise DataError(report.format(max_per_code=20))
    if report.warnings:
        print(report.format(max_per_code=20), file=sys.stderr)
    return report


@cli
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.data.check", description=__doc__.splitlines()[0])
    d = DataConfig()
    p.add_argument("data", help="the data folder")
    p.add_argument("--train-dir", default=d.train_dir)
    p.add_argument("--mask-csv", default=d.mask_csv)
    p.add_argument("--test-dir", default=d.test_dir)
    p.add_argument("--sample-csv", default=d.sample_csv)
    p.add_argument("--test-mask-csv", default=d.test_mask_csv, help="optional ground truth of the test tiles")
    p.add_argument(
        "--size",
        type=int,
        default=d.image_size,
        help="expected tile height and width (0: all tiles the size of the first)",
    )
    p.add_argument(
        "--max-per-kind", type=int, default=None, help="show at most this many problems of each kind"
    )
    args = p.parse_args(argv)
    cfg = DataConfig(
        root=args.data,
        train_dir=args.train_dir,
        mask_csv=args.mask_csv,
        test_dir=args.test_dir,
        sample_csv=args.sample_csv,
        test_mask_csv=args.test_mask_csv,
        image_size=args.size,
    )
    report = check_dataset(args.data, cfg)
    print(report.format(max_per_code=args.max_per_kind))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
