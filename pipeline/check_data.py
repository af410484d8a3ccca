"""Check a competition data folder before training or submitting: every problem at once, each with a fix.

``python -m pipeline.check_data DATA`` lists every problem of the folder (errors and warnings), each
with its file (and CSV row) and how to fix it, then ``N errors, M warnings``; it exits 1 on errors.
``require_clean(cfg.data)`` runs the same check at the start of train and submit.

What is checked:

* CSV files (``train_mask.csv``, ``test_a_samplesubmit.csv``, ``test_a_mask.csv``): empty file,
  encoding (UTF-8; a BOM warns), CRLF line ends (warning), a header row, comma instead of TAB, rows
  without a TAB or with extra columns, empty and duplicate names, NaN literals (``nan``/``None``) in
  the mask column, and every rule of the RLE codec (:func:`pipeline.rle.parse`) against the size of
  the tile the row names.
* Folders: listed images that are missing (with a hint when the name differs only in case,
  extension or Unicode normalisation), images that are not listed (warning), non-ASCII file names
  (warning).
* Images: unreadable files, truncated JPEGs (no end-of-image marker, or the decoder runs out of
  data), tiles of the wrong size, and modes that ``read_image`` converts (grayscale, palette, RGBA,
  16-bit: warning). JPEGs are decoded at 1/8 scale, which still reads every compressed byte (so a
  cut file fails) but skips most of the pixel work: 560 tiles take well under a second.
  Not detected: scan data cut short but still ending in FFD9 (not what a cut copy produces; libjpeg
  only warns and fills the rest grey, and PIL does not surface the warning).

The CSV scanner (:func:`scan_csv`) and the RLE check (:func:`rle_problem`) are shared with
``pipeline.validate``, which applies them to a submission.
"""

from __future__ import annotations

import argparse
import codecs
import sys
import unicodedata
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from pipeline import rle
from pipeline.config import DataConfig
from pipeline.data import IMAGE_SUFFIXES, DataError, list_images

# Strings that pandas/numpy/Python write for a missing value: a mask column containing them was
# written from a frame with NaN masks, and the competition's reader does not read them as empty.
NAN_LITERALS = frozenset({"nan", "none", "null", "na", "<na>"})

# What read_image does to each non-RGB mode, for the warning.
MODE_NAMES = {
    "1": "1-bit black and white",
    "L": "grayscale",
    "LA": "grayscale + alpha",
    "P": "palette",
    "PA": "palette + alpha",
    "RGBA": "RGBA (the alpha channel is dropped)",
    "RGBX": "RGBX",
    "CMYK": "CMYK",
    "YCbCr": "YCbCr",
    "LAB": "Lab",
    "HSV": "HSV",
    "I": "32-bit integer",
    "I;16": "16-bit",
    "I;16L": "16-bit",
    "I;16B": "16-bit",
    "I;16N": "16-bit",
    "F": "32-bit float",
}
HIGH_BIT_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")

# The format each file extension promises (a mismatch works with PIL but not with every tool).
SUFFIX_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".tif": "TIFF", ".tiff": "TIFF"}

RLE_FIX = (
    "re-encode the mask with pipeline.rle.encode(mask): 1-based, column-major 'start length' pairs, "
    "sorted and disjoint (an empty field for a tile without buildings)"
)


@dataclass(frozen=True)
class Problem:
    """One problem: ``where`` (a file, or ``file, row N``), ``what`` is wrong, how to ``fix`` it.

    ``code`` names the kind of problem (``missing-image``, ``bad-rle``, ...) for grouping and tests.
    """

    where: str
    what: str
    fix: str
    code: str = ""

    def __str__(self) -> str:
        return f"{self.where}: {self.what}. Fix: {self.fix}"


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
                            f"(python -m pipeline.check_data {self.root} lists all)"
                        )
        lines.append(f"{len(self.errors)} errors, {len(self.warnings)} warnings")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- CSV files


@dataclass(frozen=True)
class CsvRow:
    """A data row of a competition CSV: ``row`` is the 1-based line number in the file."""

    row: int
    name: str
    rle: str


@dataclass
class CsvScan:
    """The rows of a CSV that could be read, and the problems of its format."""

    rows: list[CsvRow] = field(default_factory=list)
    errors: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)


def _looks_like_header(name: str, value: str) -> bool:
    # Tile names end in an image suffix and masks start with a digit; "name<TAB>rle" or
    # "ImageId,EncodedPixels" do neither (the same rule as pipeline.data.read_mask_csv).
    return Path(name).suffix.lower() not in IMAGE_SUFFIXES and not value[:1].isdigit()


def _rows_text(rows: list[int], limit: int = 10) -> str:
    more = f", ... ({len(rows)} in all)" if len(rows) > limit else ""
    return ", ".join(map(str, rows[:limit])) + more


def scan_csv(path: Path, label: str, with_rle: bool = True) -> CsvScan:
    """Read a ``name<TAB>rle`` CSV line by line, collecting every format problem.

    Args:
        path: the file (must exist).
        label: how problems name the file (e.g. ``train_mask.csv`` relative to the data folder).
        with_rle: the second column is required (mask CSVs, submissions); False for a sample
            submission, whose rows may be bare names.

    Rows that can still be read (a comma-separated row is split at its first comma) are returned,
    so later checks (missing images, RLE) run on them too. The RLE values are not validated here:
    that needs the tile's size (see :func:`rle_problem`).
    """
    scan = CsvScan()
    raw = path.read_bytes()
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        scan.errors.append(Problem(label, "is UTF-16 encoded", "save it as UTF-8 (without BOM)", "encoding"))
        return scan
    if raw.startswith(codecs.BOM_UTF8):
        scan.warnings.append(
            Problem(
                f"{label}, row 1",
                "starts with a UTF-8 byte-order mark (BOM), which some readers make part of the first name",
                "save the file as UTF-8 without BOM (e.g. sed -i '1s/^\\xEF\\xBB\\xBF//' FILE)",
                "bom",
            )
        )
        raw = raw[len(codecs.BOM_UTF8) :]
    if not raw.strip():
        fix = "write one row per tile: name<TAB>rle (an empty rle for a tile without buildings)"
        if not with_rle:
            fix = "write one row per test tile, in submission order: name<TAB>"
        scan.errors.append(Problem(label, "is empty (no rows)", fix, "empty-csv"))
        return scan

    lines = raw.split(b"\n")
    if lines[-1] == b"":
        lines.pop()  # the final newline ends the last row; it does not start a new one
    crlf = sum(line.endswith(b"\r") for line in lines)
    if crlf:
        scan.warnings.append(
            Problem(
                label,
                f"{crlf} of {len(lines)} lines end with CRLF (Windows line ends)",
                "convert to LF line ends (dos2unix FILE, or sed -i 's/\\r$//' FILE)",
                "crlf",
            )
        )

    blank: list[int] = []
    comma_rows: list[int] = []
    first_data = True
    seen: dict[str, CsvRow] = {}
    for i, line in enumerate(lines, start=1):
        where = f"{label}, row {i}"
        try:
            text = line.removesuffix(b"\r").decode("utf-8")
        except UnicodeDecodeError as e:
            scan.errors.append(
                Problem(
                    where,
                    f"is not valid UTF-8 ({e.reason} at byte {e.start})",
                    "save the file as UTF-8",
                    "encoding",
                )
            )
            continue
        if not text.strip():
            blank.append(i)
            continue
        fields = text.split("\t")
        if len(fields) > 1:
            name, value = fields[0], fields[1]
        elif "," in text:
            name, value = text.split(",", 1)  # read on, so missing images and RLE are still checked
        else:
            name, value = text, ""
        if first_data:
            first_data = False
            if _looks_like_header(name.strip(), value.strip()):
                scan.errors.append(_header_problem(where, text))
                continue
        if len(fields) > 2:
            if any(f.strip() for f in fields[2:]):
                scan.errors.append(
                    Problem(
                        where,
                        f"has {len(fields)} TAB-separated fields; expected 2 (name<TAB>rle)",
                        "remove the extra columns (the RLE itself is space-separated)",
                        "extra-column",
                    )
                )
            else:
                scan.warnings.append(
                    Problem(
                        where,
                        "ends with an extra TAB (an empty third column)",
                        "remove the trailing TAB",
                        "trailing-tab",
                    )
                )
        elif len(fields) == 1 and "," in text:
            comma_rows.append(i)
        elif len(fields) == 1 and with_rle:
            scan.errors.append(
                Problem(
                    where,
                    "has no TAB; expected name<TAB>rle",
                    "put one TAB after the name; an empty mask is the name and a TAB with nothing after",
                    "no-tab",
                )
            )
        if name != name.strip():
            scan.warnings.append(
                Problem(
                    where, f"name {name!r} has leading or trailing spaces", "remove the spaces", "name-spaces"
                )
            )
        name, value = name.strip(), value.strip()
        if not name:
            scan.errors.append(
                Problem(
                    where, "has an empty name", "write the tile's file name, or delete the row", "empty-name"
                )
            )
            continue
        row = CsvRow(i, name, value)
        if name in seen:
            first = seen[name]
            same = "the same mask" if first.rle == value else "a different mask"
            scan.errors.append(
                Problem(
                    where,
                    f"duplicate name {name} (first at row {first.row}, {same})",
                    f"keep one of rows {first.row} and {i}: every tile has exactly one row",
                    "duplicate-name",
                )
            )
            continue
        seen[name] = row
        scan.rows.append(row)

    n_rows = len(scan.rows) + len([p for p in scan.errors if p.code == "duplicate-name"])
    if comma_rows and len(comma_rows) == n_rows and n_rows > 1:
        # The whole file is comma-separated: one problem, not one per row.
        scan.errors.append(
            Problem(
                label,
                f"is comma-separated (all {n_rows} rows); the competition format is TAB-separated",
                "replace the first comma of each line by a TAB (sed -i 's/,/\\t/' FILE); "
                "pandas: df.to_csv(path, sep='\\t', header=False, index=False)",
                "comma",
            )
        )
    else:
        for i in comma_rows:
            scan.errors.append(
                Problem(
                    f"{label}, row {i}",
                    "has a comma instead of a TAB between name and rle",
                    "replace the comma after the name by a TAB",
                    "comma",
                )
            )
    if blank:
        scan.warnings.append(
            Problem(
                label,
                f"has blank lines (rows {_rows_text(blank)}); they are ignored",
                "delete the blank lines",
                "blank-line",
            )
        )
    if not scan.rows and not scan.errors:
        scan.errors.append(
            Problem(label, "has no data rows", "write one row per tile: name<TAB>rle", "empty-csv")
        )
    return scan


def _header_problem(where: str, text: str) -> Problem:
    return Problem(
        where,
        f"looks like a header row ({text.strip()[:60]!r}); the format has no header",
        "delete this row (pandas: to_csv(..., header=False))",
        "header",
    )


def rle_problem(value: str, shape: tuple[int, int]) -> tuple[str, str, str] | None:
    """``(what, fix, code)`` if ``value`` is not a valid mask of ``shape`` (H, W), else None.

    Applies every rule of :func:`pipeline.rle.parse`, plus the NaN literals that a frame with
    missing masks writes (``nan``, ``None``): those are not empty masks for the competition's reader.
    """
    if value.strip().lower() in NAN_LITERALS:
        return (
            f"mask is the literal {value.strip()!r}, which is not an RLE",
            "an empty mask is an empty field: write name<TAB> with nothing after the TAB "
            "(pandas: df['rle'] = df['rle'].fillna('') before to_csv)",
            "nan-mask",
        )
    try:
        rle.validate(value, shape)
    except rle.RLEError as e:
        h, w = shape
        fix = RLE_FIX
        if "past the end" in str(e):
            fix = (
                f"the mask does not fit this {h}x{w} tile: check that the row names the right tile and "
                f"encode the mask at the tile's size ({h}x{w}) with pipeline.rle.encode"
            )
        return f"malformed RLE: {e}", fix, "bad-rle"
    return None


# ----------------------------------------------------------------------------- images


def _jpeg_has_eoi(path: Path) -> bool:
    """True if the file ends with the JPEG end-of-image marker FFD9 (padding NULs allowed).

    A JPEG cut by a few bytes can still decode without an error (seen on small tiles: the last
    entropy-coded bytes were already buffered), so the decoder alone may miss it; the marker does not.
    """
    with open(path, "rb") as f:
        f.seek(0, 2)
        f.seek(max(0, f.tell() - 64))
        tail = f.read()
    return tail.rstrip(b"\x00").endswith(b"\xff\xd9")


class _Checker:
    """Checks one data folder into ``report``; images are inspected once even when two CSVs list them."""

    def __init__(self, root: Path, size: int, report: Report):
        self.root, self.size, self.report = root, size, report
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
        report, s = self.report, self.size
        remove = "re-export the tile, or delete it and its CSV row"
        try:
            im = Image.open(path)
        except Exception as e:  # PIL raises many types for a bad header; any of them means unreadable
            report.error(
                where, f"is not a readable image ({type(e).__name__}: {e})", remove, "unreadable-image"
            )
            return None
        with im:
            fmt, mode = im.format, im.mode
            w, h = im.size
            damage = ""
            if fmt == "JPEG" and not _jpeg_has_eoi(path):
                damage = "no end-of-image marker FFD9: the file was cut short"
            try:
                if fmt == "JPEG":
                    # Decode at 1/8 scale: libjpeg still reads every compressed byte, so a cut or
                    # broken file fails, but the inverse DCT and colour work shrink ~10x.
                    im.draft(mode, (max(1, w // 8), max(1, h // 8)))
                im.load()
            except Exception as e:  # the decoder's error types vary by format; all mean damaged data
                damage = f"{damage}; " if damage else ""
                damage += f"the decoder failed: {type(e).__name__}: {e}"
        if damage:
            report.error(
                where,
                f"{fmt or 'image'} is truncated or corrupt ({damage})",
                "copy or re-export the tile again (a partial download or copy is the usual cause), "
                "or delete it and its CSV row",
                "truncated-image",
            )
        if not s and h == w:  # size 0: the first square tile sets the size every other tile must have
            self.size = s = h
        if (h, w) != (s, s):
            report.error(
                where,
                f"tile is {h}x{w} (HxW) but {s}x{s} is expected",
                f"re-export the tile at {s}x{s}; or, if every tile is {h}x{w}, pass --size / set "
                "data.image_size to match",
                "wrong-size",
            )
        if mode != "RGB":
            desc = MODE_NAMES.get(mode, mode)
            if mode in HIGH_BIT_MODES:
                fix = "scale it to 8 bits yourself (read_image divides by 257 if any value > 255); save RGB"
            else:
                fix = "nothing if that is right; to be explicit, save RGB (PIL: im.convert('RGB').save(...))"
            report.warn(
                where,
                f"is a {desc} image (mode {mode}); it will be converted to 8-bit RGB when read",
                fix,
                "image-mode",
            )
        expected = SUFFIX_FORMATS.get(path.suffix.lower())
        if fmt and expected and fmt != expected:
            report.warn(
                where,
                f"contains {fmt} data but its name ends in {path.suffix}",
                f"rename it or re-encode it as {expected}; some tools trust the extension",
                "format-mismatch",
            )
        return h, w

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
        for r in rows:
            if r.name in have:
                self.image(dir_name, r.name)

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
        for r in rows:
            shape = self.sizes.get(self.root / dir_name / r.name) or (self.size, self.size)
            problem = rle_problem(r.rle, shape)
            if problem:
                what, fix, code = problem
                self.report.error(f"{csv_name}, row {r.row} ({r.name})", what, fix, code)
            elif not r.rle:
                empty += 1
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
    if cfg.layout != "competition":
        report.warn(
            str(root),
            f"layout {cfg.layout!r} is not checked (only the competition layout is)",
            "nothing to do; check the folder by hand",
            "layout",
        )
        return report
    c = _Checker(root, cfg.image_size, report)
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.check_data", description=__doc__.splitlines()[0])
    d = DataConfig()
    p.add_argument("data", help="the data folder")
    p.add_argument("--train-dir", default=d.train_dir)
    p.add_argument("--mask-csv", default=d.mask_csv)
    p.add_argument("--test-dir", default=d.test_dir)
    p.add_argument("--sample-csv", default=d.sample_csv)
    p.add_argument("--test-mask-csv", default=d.test_mask_csv, help="optional ground truth of the test tiles")
    p.add_argument("--size", type=int, default=d.image_size,
                   help="expected tile height and width (0: all tiles the size of the first)")
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
