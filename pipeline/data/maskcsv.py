"""The competition CSV format (``name<TAB>rle``, no header): one scanner for every reader.

``train_mask.csv``, ``test_a_mask.csv``, the sample submission and a submission are all this
format: one row per tile, the tile's file name, a TAB, and its RLE mask (an empty field for a tile
without buildings; a sample submission may give bare names). :func:`scan_csv` reads a file line by
line and returns the rows it could read plus every problem of the format, each an error or a
warning with its row and a fix. Every reader goes through it, so they agree on what is acceptable:

* ``pipeline.data.masks.read_mask_csv`` (training, scoring, ``make folds``) raises on the errors and
  tolerates the warnings;
* ``pipeline.data.check`` and ``pipeline.infer.validate`` report both.

Errors: not UTF-8 (or UTF-16), empty, a header row, comma-separated, no TAB (mask CSVs), extra
columns, empty or duplicate names. Warnings (the rows still read the same): a UTF-8 BOM, CRLF line
ends, blank lines, spaces around a name, a trailing TAB (an empty third column).

The RLE values are not validated by the scan: that needs the tile's size (:func:`rle_problem`).
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.data import rle

# Tile names are image file names; a first row whose name is not (and whose mask is not a number)
# is a header.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")

# Strings that pandas/numpy/Python write for a missing value: a mask column containing them was
# written from a frame with NaN masks, and the competition's reader does not read them as empty.
NAN_LITERALS = frozenset({"nan", "none", "null", "na", "<na>"})

RLE_FIX = (
    "re-encode the mask with pipeline.data.rle.encode(mask): 1-based, column-major 'start length' pairs, "
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

    def error_text(self, limit: int = 20) -> str:
        """The errors, one a line (at most ``limit``, then how many more)."""
        more = f"\n... {len(self.errors) - limit} more" if len(self.errors) > limit else ""
        return "\n".join(map(str, self.errors[:limit])) + more


def format_csv(rows: Iterable[tuple[str, str]]) -> str:
    """The text of a competition CSV: ``name<TAB>rle`` per (name, rle), LF line ends, no header."""
    return "".join(f"{name}\t{mask}\n" for name, mask in rows)


# ----------------------------------------------------------------------------- the scanner


def scan_csv(path: str | Path, label: str | None = None, with_rle: bool = True) -> CsvScan:
    """Read a ``name<TAB>rle`` CSV line by line, collecting every format problem.

    Args:
        path: the file (must exist).
        label: how problems name the file (e.g. ``train_mask.csv`` relative to the data folder);
            default the path.
        with_rle: the second column is required (mask CSVs, submissions); False for a sample
            submission, whose rows may be bare names.

    Rows that can still be read (a comma-separated row is split at its first comma) are returned,
    so later checks (missing images, RLE) run on them too. Names and masks are stripped of spaces.
    """
    path = Path(path)
    s = _Scanner(str(path) if label is None else label, with_rle)
    for i, line in enumerate(_lines(path.read_bytes(), s.label, with_rle, s.scan), start=1):
        s.line(i, line)
    s.finish()
    return s.scan


class _Scanner:
    """The state of one scan: rows so far, blank and comma-separated lines, names seen."""

    def __init__(self, label: str, with_rle: bool):
        self.label, self.with_rle = label, with_rle
        self.scan = CsvScan()
        self.blank: list[int] = []
        self.comma_rows: list[int] = []
        self.first_data = True
        self.seen: dict[str, CsvRow] = {}

    def error(self, where: str, what: str, fix: str, code: str) -> None:
        self.scan.errors.append(Problem(where, what, fix, code))

    def warn(self, where: str, what: str, fix: str, code: str) -> None:
        self.scan.warnings.append(Problem(where, what, fix, code))

    def line(self, i: int, line: bytes) -> None:
        where = f"{self.label}, row {i}"
        try:
            text = line.removesuffix(b"\r").decode("utf-8")
        except UnicodeDecodeError as e:
            self.error(
                where,
                f"is not valid UTF-8 ({e.reason} at byte {e.start})",
                "save the file as UTF-8",
                "encoding",
            )
            return
        if not text.strip():
            self.blank.append(i)
            return
        fields = text.split("\t")
        if len(fields) > 1:
            name, value = fields[0], fields[1]
        elif "," in text:
            name, value = text.split(",", 1)  # read on, so missing images and RLE are still checked
        else:
            name, value = text, ""
        if self.first_data:
            self.first_data = False
            if _looks_like_header(name.strip(), value.strip()):
                self.error(
                    where,
                    f"looks like a header row ({text.strip()[:60]!r}); the format has no header",
                    "delete this row (pandas: to_csv(..., header=False))",
                    "header",
                )
                return
        self.fields(i, where, text, fields)
        if name != name.strip():
            self.warn(
                where, f"name {name!r} has leading or trailing spaces", "remove the spaces", "name-spaces"
            )
        self.row(i, where, name.strip(), value.strip())

    def fields(self, i: int, where: str, text: str, fields: list[str]) -> None:
        """Problems of the number of TAB-separated fields."""
        if len(fields) > 2 and any(f.strip() for f in fields[2:]):
            self.error(
                where,
                f"has {len(fields)} TAB-separated fields; expected 2 (name<TAB>rle)",
                "remove the extra columns (the RLE itself is space-separated)",
                "extra-column",
            )
        elif len(fields) > 2:
            self.warn(
                where,
                "ends with an extra TAB (an empty third column)",
                "remove the trailing TAB",
                "trailing-tab",
            )
        elif len(fields) == 1 and "," in text:
            self.comma_rows.append(i)  # reported in finish(): once for the file when every row is
        elif len(fields) == 1 and self.with_rle:
            self.error(
                where,
                "has no TAB; expected name<TAB>rle",
                "put one TAB after the name; an empty mask is the name and a TAB with nothing after",
                "no-tab",
            )

    def row(self, i: int, where: str, name: str, value: str) -> None:
        if not name:
            self.error(
                where, "has an empty name", "write the tile's file name, or delete the row", "empty-name"
            )
            return
        first = self.seen.get(name)
        if first is not None:
            same = "the same mask" if first.rle == value else "a different mask"
            self.error(
                where,
                f"duplicate name {name} (first at row {first.row}, {same})",
                f"keep one of rows {first.row} and {i}: every tile has exactly one row",
                "duplicate-name",
            )
            return
        self.seen[name] = CsvRow(i, name, value)
        self.scan.rows.append(self.seen[name])

    def finish(self) -> None:
        """Problems of the whole file: comma-separated, blank lines, no rows."""
        scan, label = self.scan, self.label
        n_rows = len(scan.rows) + len([p for p in scan.errors if p.code == "duplicate-name"])
        if self.comma_rows and len(self.comma_rows) == n_rows and n_rows > 1:
            # The whole file is comma-separated: one problem, not one per row.
            self.error(
                label,
                f"is comma-separated (all {n_rows} rows); the competition format is TAB-separated",
                "replace the first comma of each line by a TAB (sed -i 's/,/\\t/' FILE); "
                "pandas: df.to_csv(path, sep='\\t', header=False, index=False)",
                "comma",
            )
        else:
            for i in self.comma_rows:
                self.error(
                    f"{label}, row {i}",
                    "has a comma instead of a TAB between name and rle",
                    "replace the comma after the name by a TAB",
                    "comma",
                )
        if self.blank:
            more = f", ... ({len(self.blank)} in all)" if len(self.blank) > 10 else ""
            self.warn(
                label,
                f"has blank lines (rows {', '.join(map(str, self.blank[:10]))}{more}); they are ignored",
                "delete the blank lines",
                "blank-line",
            )
        if not scan.rows and not scan.errors:
            self.error(label, "has no data rows", "write one row per tile: name<TAB>rle", "empty-csv")


def _lines(raw: bytes, label: str, with_rle: bool, scan: CsvScan) -> list[bytes]:
    """The file's lines (without their LF), after the whole-file checks: encoding, BOM, empty, CRLF."""
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        scan.errors.append(Problem(label, "is UTF-16 encoded", "save it as UTF-8 (without BOM)", "encoding"))
        return []
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
        return []
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
    return lines


def _looks_like_header(name: str, value: str) -> bool:
    # Tile names end in an image suffix and masks start with a digit; "name<TAB>rle" or
    # "ImageId,EncodedPixels" do neither.
    return Path(name).suffix.lower() not in IMAGE_SUFFIXES and not value[:1].isdigit()


# ----------------------------------------------------------------------------- the mask column


def rle_problem(value: str, shape: tuple[int, int]) -> tuple[str, str, str] | None:
    """``(what, fix, code)`` if ``value`` is not a valid mask of ``shape`` (H, W), else None.

    Applies every rule of :func:`pipeline.data.rle.parse`, plus the NaN literals that a frame with
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
                f"encode the mask at the tile's size ({h}x{w}) with pipeline.data.rle.encode"
            )
        return f"malformed RLE: {e}", fix, "bad-rle"
    return None
