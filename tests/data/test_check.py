"""pipeline.data.check: one broken data folder per case, each problem named with its file/row and a fix.

Every case starts from the same clean 64x64 folder (4 train tiles, 2 test tiles), breaks one thing,
and asserts the problem it must produce (severity, kind, where, what, fix) and that nothing else is
reported, so a case fails both when a problem is missed and when a spurious one appears.
"""

from __future__ import annotations

import codecs
import shutil
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import real_data_or_skip
from PIL import Image

from pipeline.core.config import DataConfig
from pipeline.data import DataError, rle
from pipeline.data.check import check_dataset, main, require_clean
from pipeline.data.maskcsv import scan_csv

SIZE = 64
CFG = DataConfig(image_size=SIZE)
TRAIN = ["t0.jpg", "t1.jpg", "t2.jpg", "t3.jpg"]  # rows 1..4 of train_mask.csv; t3 has an empty mask
TEST = ["s0.jpg", "s1.jpg"]


def _tile(seed: int, size: tuple[int, int] = (SIZE, SIZE), mode: str = "RGB") -> Image.Image:
    """A noise tile (H, W) = ``size``: noise makes JPEGs large enough that a cut lands in the scan data."""
    rng = np.random.default_rng(seed)
    h, w = size
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)


def _masks() -> list[str]:
    # t0: a box in the first 12 columns (fits a 32x48 tile too); t1: columns 40-50 (only fits 64 wide);
    # t2: a single pixel; t3: empty.
    m0 = np.zeros((SIZE, SIZE), np.uint8)
    m0[2:10, 3:12] = 1
    m1 = np.zeros((SIZE, SIZE), np.uint8)
    m1[20:30, 40:50] = 1
    m2 = np.zeros((SIZE, SIZE), np.uint8)
    m2[5, 5] = 1
    return [rle.encode(m0), rle.encode(m1), rle.encode(m2), ""]


def make_clean(root: Path) -> Path:
    """Write a clean data folder in the competition layout and return it."""
    (root / "train").mkdir(parents=True)
    (root / "test_a").mkdir()
    for i, name in enumerate(TRAIN):
        _tile(i).save(root / "train" / name, quality=90)
    for i, name in enumerate(TEST):
        _tile(100 + i).save(root / "test_a" / name, quality=90)
    (root / "train_mask.csv").write_text("".join(f"{n}\t{r}\n" for n, r in zip(TRAIN, _masks())))
    (root / "test_a_samplesubmit.csv").write_text("".join(f"{n}\t\n" for n in TEST))
    (root / "test_a_mask.csv").write_text("".join(f"{n}\t1 3\n" for n in TEST))
    return root


# ----------------------------------------------------------------------------- mutations


def edit_lines(root: Path, csv: str, fn: Callable[[list[str]], list[str]]) -> None:
    path = root / csv
    path.write_text("".join(f"{line}\n" for line in fn(path.read_text().splitlines())))


def set_row(csv: str, row: int, line: str) -> Callable[[Path], None]:
    def mutate(root: Path) -> None:
        edit_lines(root, csv, lambda lines: [line if i == row else x for i, x in enumerate(lines, 1)])

    return mutate


def set_mask(row: int, value: str) -> Callable[[Path], None]:
    return set_row("train_mask.csv", row, f"{TRAIN[row - 1]}\t{value}")


def replace_tile(old: str, new: str, image: Image.Image, **save: object) -> Callable[[Path], None]:
    """Swap train/old for train/new holding ``image``, renaming its CSV row."""

    def mutate(root: Path) -> None:
        (root / "train" / old).unlink()
        image.save(root / "train" / new, **save)
        edit_lines(root, "train_mask.csv", lambda lines: [x.replace(old, new) for x in lines])

    return mutate


def cut(name: str, keep: Callable[[int], int]) -> Callable[[Path], None]:
    def mutate(root: Path) -> None:
        path = root / "train" / name
        data = path.read_bytes()
        path.write_bytes(data[: keep(len(data))])

    return mutate


def rename_file(old: str, new: str) -> Callable[[Path], None]:
    return lambda root: (root / "train" / old).rename(root / "train" / new)


def write(rel: str, data: bytes) -> Callable[[Path], None]:
    return lambda root: (root / rel).write_bytes(data)


def delete(rel: str) -> Callable[[Path], None]:
    def mutate(root: Path) -> None:
        path = root / rel
        shutil.rmtree(path) if path.is_dir() else path.unlink()

    return mutate


def with_bytes(fn: Callable[[bytes], bytes], rel: str = "train_mask.csv") -> Callable[[Path], None]:
    return lambda root: (root / rel).write_bytes(fn((root / rel).read_bytes()))


def sixteen_bit() -> Image.Image:
    return Image.fromarray(np.arange(SIZE * SIZE, dtype=np.uint16).reshape(SIZE, SIZE) * 16)


def all_train_deleted(root: Path) -> None:
    for n in TRAIN:
        (root / "train" / n).unlink()


NFD = unicodedata.normalize("NFD", "café.jpg")
NFC = unicodedata.normalize("NFC", "café.jpg")


def nfc_csv_nfd_file(root: Path) -> None:
    rename_file("t1.jpg", NFD)(root)
    edit_lines(root, "train_mask.csv", lambda lines: [x.replace("t1.jpg", NFC) for x in lines])


def non_ascii(root: Path) -> None:
    rename_file("t0.jpg", "建筑0.jpg")(root)
    edit_lines(root, "train_mask.csv", lambda lines: [x.replace("t0.jpg", "建筑0.jpg") for x in lines])


# ----------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """A mutation and the problem it must cause; ``also`` lists the other kinds it legitimately causes."""

    id: str
    mutate: Callable[[Path], None]
    severity: str  # "error" | "warning"
    code: str
    where: str
    what: str
    fix: str
    also: frozenset[str] = frozenset()


E, W = "error", "warning"
# fmt: off
CASES = [
    # -- images listed but absent, present but not listed, folders
    Case("missing-image", delete("train/t1.jpg"), E, "missing-image", "train_mask.csv, row 2",
         "train/t1.jpg does not exist", "delete row 2"),
    Case("missing-image-case", rename_file("t1.jpg", "T1.jpg"), E, "missing-image", "train_mask.csv, row 2",
         "t1.jpg", "case-sensitive", frozenset({"unlisted-image"})),
    Case("missing-image-extension", rename_file("t1.jpg", "t1.jpeg"), E, "missing-image",
         "train_mask.csv, row 2", "t1.jpg", "has t1.jpeg: fix the extension", frozenset({"unlisted-image"})),
    Case("missing-image-unicode-normalisation", nfc_csv_nfd_file, E, "missing-image", "train_mask.csv, row 2",
         NFC, "Unicode normalisation", frozenset({"unlisted-image", "non-ascii-name"})),
    Case("missing-image-with-folder", set_row("train_mask.csv", 2, "train/t1.jpg\t1 3"), E, "missing-image",
         "train_mask.csv, row 2", "train/t1.jpg", "bare file names", frozenset({"unlisted-image"})),
    Case("all-images-missing", all_train_deleted, E, "missing-image", "train/", "none of the 4 images",
         "check the data folder"),
    Case("missing-train-folder", delete("train"), E, "missing-folder", "train/", "folder not found",
         "--train-dir"),
    Case("unlisted-image", lambda r: shutil.copy(r / "train/t0.jpg", r / "train/extra.jpg"), W,
         "unlisted-image", "train/extra.jpg", "not listed in train_mask.csv", "add a row"),
    Case("duplicate-name", lambda r: edit_lines(r, "train_mask.csv", lambda x: [*x, "t0.jpg\t"]), E,
         "duplicate-name", "train_mask.csv, row 5", "first at row 1, a different mask",
         "keep one of rows 1 and 5"),
    Case("non-ascii-name", non_ascii, W, "non-ascii-name", "train/建筑0.jpg", "not ASCII", "rename"),
    # -- image files
    # Cut in half, the decoder itself runs out of data (every tile is decoded fully) ...
    Case("truncated-jpeg-half", cut("t2.jpg", lambda n: n // 2), E, "truncated-image", "train/t2.jpg",
         "the decoder reports", "copy or re-export the tile"),
    # ... cut by two bytes it decodes, and only the missing end-of-image marker shows the damage.
    Case("truncated-jpeg-eoi-only", cut("t2.jpg", lambda n: n - 2), E, "truncated-image", "train/t2.jpg",
         "FFD9", "re-export"),
    Case("corrupt-file", write("train/t2.jpg", b"not an image at all" * 10), E, "unreadable-image",
         "train/t2.jpg", "not a readable image", "re-export the tile"),
    Case("grayscale", lambda r: _tile(7, mode="L").save(r / "train/t0.jpg"), W, "image-mode", "train/t0.jpg",
         "grayscale", "convert('RGB')"),
    Case("rgba", replace_tile("t0.jpg", "t0.png", _tile(7, mode="RGBA")), W, "image-mode", "train/t0.png",
         "RGBA", "convert('RGB')"),
    Case("palette", replace_tile("t0.jpg", "t0.png", _tile(7, mode="P")), W, "image-mode", "train/t0.png",
         "palette", "convert('RGB')"),
    Case("16-bit", replace_tile("t0.jpg", "t0.png", sixteen_bit()), W, "image-mode", "train/t0.png", "16-bit",
         "8 bits"),
    Case("format-mismatch", lambda r: _tile(0).save(r / "train/t0.jpg", format="PNG"), W, "format-mismatch",
         "train/t0.jpg", "PNG data", "rename it or re-encode it as JPEG"),
    Case("wrong-size", lambda r: _tile(0, (32, 48)).save(r / "train/t0.jpg"), E, "wrong-size", "train/t0.jpg",
         "32x48 (HxW) but 64x64", "re-export the tile at 64x64"),
    Case("rle-past-actual-size", lambda r: _tile(1, (32, 48)).save(r / "train/t1.jpg"), E, "bad-rle",
         "train_mask.csv, row 2 (t1.jpg)", "past the end of a 32x48 image", "this 32x48 tile",
         frozenset({"wrong-size"})),
    # -- RLE: every rule of the codec, with its row
    Case("rle-odd-tokens", set_mask(1, "1 2 3"), E, "bad-rle", "train_mask.csv, row 1 (t0.jpg)",
         "odd number of tokens", "pipeline.data.rle.encode"),
    Case("rle-not-integer", set_mask(1, "1 x"), E, "bad-rle", "train_mask.csv, row 1 (t0.jpg)",
         "'x' is not an integer", "pipeline.data.rle.encode"),
    Case("rle-start-below-1", set_mask(1, "0 5"), E, "bad-rle", "train_mask.csv, row 1 (t0.jpg)",
         "start 0 < 1", "1-based"),
    Case("rle-zero-length", set_mask(1, "5 0"), E, "bad-rle", "train_mask.csv, row 1 (t0.jpg)",
         "length 0 must be > 0", "pipeline.data.rle.encode"),
    Case("rle-past-end", set_mask(1, "4000 200"), E, "bad-rle", "train_mask.csv, row 1 (t0.jpg)",
         "past the end of a 64x64 image", "right tile"),
    Case("rle-unsorted", set_mask(1, "100 5 50 5"), E, "bad-rle", "train_mask.csv, row 1 (t0.jpg)",
         "unsorted", "sorted and disjoint"),
    Case("rle-overlapping", set_mask(1, "100 5 102 5"), E, "bad-rle", "train_mask.csv, row 1 (t0.jpg)",
         "overlapping", "sorted and disjoint"),
    *[
        Case(f"nan-literal-{v}", set_mask(4, v), E, "nan-mask", "train_mask.csv, row 4 (t3.jpg)", repr(v),
             "an empty mask is an empty field")
        for v in ("nan", "NaN", "None")
    ],
    # -- CSV format
    Case("header-row", lambda r: edit_lines(r, "train_mask.csv", lambda x: ["name\trle", *x]), E, "header",
         "train_mask.csv, row 1", "header row", "delete this row"),
    Case("bom", with_bytes(lambda b: codecs.BOM_UTF8 + b), W, "bom", "train_mask.csv, row 1",
         "byte-order mark", "without BOM"),
    Case("crlf", with_bytes(lambda b: b.replace(b"\n", b"\r\n")), W, "crlf", "train_mask.csv",
         "4 of 4 lines end with CRLF", "dos2unix"),
    Case("comma-whole-file", with_bytes(lambda b: b.replace(b"\t", b",")), E, "comma", "train_mask.csv",
         "comma-separated (all 4 rows)", "sep='\\t'"),
    Case("comma-one-row", set_row("train_mask.csv", 2, f"t1.jpg,{_masks()[1]}"), E, "comma",
         "train_mask.csv, row 2", "comma instead of a TAB", "replace the comma"),
    Case("no-tab", set_row("train_mask.csv", 2, "t1.jpg"), E, "no-tab", "train_mask.csv, row 2", "no TAB",
         "one TAB after the name"),
    Case("extra-column", set_row("train_mask.csv", 3, "t2.jpg\t1 3\tbuilding"), E, "extra-column",
         "train_mask.csv, row 3", "3 TAB-separated fields", "remove the extra columns"),
    Case("trailing-tab", set_row("train_mask.csv", 4, "t3.jpg\t\t"), W, "trailing-tab",
         "train_mask.csv, row 4", "extra TAB", "remove the trailing TAB"),
    Case("name-spaces", set_row("train_mask.csv", 2, f"t1.jpg \t{_masks()[1]}"), W, "name-spaces",
         "train_mask.csv, row 2", "leading or trailing spaces", "remove the spaces"),
    Case("empty-name", lambda r: edit_lines(r, "train_mask.csv", lambda x: [*x, "\t1 3"]), E, "empty-name",
         "train_mask.csv, row 5", "empty name", "delete the row"),
    Case("blank-line", lambda r: edit_lines(r, "train_mask.csv", lambda x: [x[0], "", *x[1:]]), W,
         "blank-line", "train_mask.csv", "rows 2", "delete the blank lines"),
    Case("not-utf8", with_bytes(lambda b: b.replace(b"t1.jpg", b"t\xe91.jpg")), E, "encoding",
         "train_mask.csv, row 2", "not valid UTF-8", "UTF-8", frozenset({"unlisted-image"})),
    Case("utf16", with_bytes(lambda b: b.decode().encode("utf-16")), E, "encoding", "train_mask.csv",
         "UTF-16", "UTF-8"),
    Case("empty-csv", write("train_mask.csv", b""), E, "empty-csv", "train_mask.csv", "empty",
         "one row per tile"),
    Case("missing-mask-csv", delete("train_mask.csv"), E, "missing-csv", "train_mask.csv", "not found",
         "name<TAB>rle"),
    # -- test set
    Case("sample-name-missing-from-test-folder", delete("test_a/s1.jpg"), E, "missing-image",
         "test_a_samplesubmit.csv, row 2", "test_a/s1.jpg does not exist", "delete row 2"),
    Case("sample-csv-missing", delete("test_a_samplesubmit.csv"), W, "missing-sample",
         "test_a_samplesubmit.csv", "sorted order", "sample submission"),
    Case("empty-sample-csv", write("test_a_samplesubmit.csv", b"\n"), E, "empty-csv",
         "test_a_samplesubmit.csv", "empty", "submission order"),
    Case("unlisted-test-image", lambda r: shutil.copy(r / "test_a/s0.jpg", r / "test_a/s9.jpg"), W,
         "unlisted-image", "test_a/s9.jpg", "will not be predicted", "add a row"),
    Case("truth-lacks-sample-tile", set_row("test_a_mask.csv", 2, ""), E, "missing-truth", "test_a_mask.csv",
         "no ground truth for 1 of the 2 tiles", "add their rows", frozenset({"blank-line"})),
    Case("truth-bad-rle", set_row("test_a_mask.csv", 1, "s0.jpg\t5000 3"), E, "bad-rle",
         "test_a_mask.csv, row 1 (s0.jpg)", "past the end", "right tile"),
]
# fmt: on


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_case(case: Case, tmp_path: Path) -> None:
    root = make_clean(tmp_path / "data")
    case.mutate(root)
    report = check_dataset(root, CFG)
    found = report.errors if case.severity == E else report.warnings
    hits = [p for p in found if p.code == case.code]
    assert hits, f"no {case.severity} {case.code!r}; report:\n{report.format()}"
    assert any(case.where in p.where and case.what in p.what and case.fix in p.fix for p in hits), (
        f"{case.code} reported, but not with where~{case.where!r} what~{case.what!r} fix~{case.fix!r}:\n"
        + "\n".join(map(str, hits))
    )
    codes = {p.code for p in report.errors + report.warnings}
    assert codes == {case.code} | case.also, f"unexpected problems:\n{report.format()}"
    assert report.ok is (case.severity == W), "warnings alone must not fail a check; errors must"


def test_clean_folder_has_no_problems(tmp_path: Path) -> None:
    report = check_dataset(make_clean(tmp_path / "data"), CFG)
    assert report.ok and not report.errors and not report.warnings, report.format()
    assert report.format().splitlines()[-1] == "0 errors, 0 warnings"
    assert any("4 rows (1 empty masks)" in s for s in report.summary)


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    root = make_clean(tmp_path / "data")
    delete("train/t1.jpg")(root)
    set_mask(3, "1 2 3")(root)
    cut("t0.jpg", lambda n: n // 2)(root)
    delete("test_a/s0.jpg")(root)
    with_bytes(lambda b: codecs.BOM_UTF8 + b)(root)
    report = check_dataset(root, CFG)
    wheres = {(p.code, p.where) for p in report.errors + report.warnings}
    assert {
        ("missing-image", "train_mask.csv, row 2"),
        ("bad-rle", "train_mask.csv, row 3 (t2.jpg)"),
        ("truncated-image", "train/t0.jpg"),
        ("missing-image", "test_a_samplesubmit.csv, row 1"),
        ("missing-image", "test_a_mask.csv, row 1"),
        ("bom", "train_mask.csv, row 1"),
    } <= wheres, report.format()
    assert report.format().splitlines()[-1] == f"{len(report.errors)} errors, 1 warnings"


def test_wrong_size_for_every_tile_is_one_line_per_tile_and_capped_in_format(tmp_path: Path) -> None:
    report = check_dataset(make_clean(tmp_path / "data"), DataConfig(image_size=32))
    assert [p.code for p in report.errors].count("wrong-size") == len(TRAIN) + len(TEST)
    text = report.format(max_per_code=2)
    assert "... and 4 more wrong-size problems" in text


def test_train_and_test_can_be_skipped(tmp_path: Path) -> None:
    root = make_clean(tmp_path / "data")
    delete("train")(root)
    delete("test_a/s0.jpg")(root)
    assert {p.code for p in check_dataset(root, CFG, train=False).errors} == {"missing-image"}
    assert {p.code for p in check_dataset(root, CFG, test=False).errors} == {"missing-folder"}


def test_missing_data_folder(tmp_path: Path) -> None:
    report = check_dataset(tmp_path / "nowhere", CFG)
    assert [p.code for p in report.errors] == ["missing-folder"] and "make demo" in report.errors[0].fix


def test_no_test_set_is_fine(tmp_path: Path) -> None:
    root = make_clean(tmp_path / "data")
    for rel in ("test_a", "test_a_samplesubmit.csv", "test_a_mask.csv"):
        delete(rel)(root)
    report = check_dataset(root, CFG)
    assert report.ok and not report.warnings and any("no test set" in s for s in report.summary)


def test_other_layouts_are_not_checked(tmp_path: Path) -> None:
    report = check_dataset(tmp_path, DataConfig(layout="voc"))
    assert report.ok and [p.code for p in report.warnings] == ["layout"]


def test_scan_csv_keeps_rows_of_a_comma_separated_file(tmp_path: Path) -> None:
    # Later checks (missing images, RLE) still run on a comma-separated file's rows.
    path = tmp_path / "m.csv"
    path.write_text("a.jpg,1 3\nb.jpg,\n")
    scan = scan_csv(path, "m.csv")
    assert [(r.row, r.name, r.rle) for r in scan.rows] == [(1, "a.jpg", "1 3"), (2, "b.jpg", "")]
    assert [p.code for p in scan.errors] == ["comma"]


# ----------------------------------------------------------------------------- CLI and require_clean


def test_cli_exit_codes_and_summary_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_clean(tmp_path / "data")
    assert main([str(root), "--size", "64"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "0 errors, 0 warnings"
    set_mask(2, "1 2 3")(root)
    assert main([str(root), "--size", "64"]) == 1
    out = capsys.readouterr().out
    assert "ERROR   train_mask.csv, row 2 (t1.jpg): malformed RLE" in out
    assert "fix: re-encode the mask" in out
    assert out.splitlines()[-1] == "1 errors, 0 warnings"


def test_cli_renamed_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_clean(tmp_path / "data")
    (root / "train_mask.csv").rename(root / "labels.tsv")
    (root / "train").rename(root / "images")
    assert main([str(root), "--size", "64", "--mask-csv", "labels.tsv", "--train-dir", "images"]) == 0
    assert main([str(root), "--size", "64"]) == 1
    assert "train_mask.csv: not found" in capsys.readouterr().out


def test_require_clean_raises_with_every_error(tmp_path: Path) -> None:
    root = make_clean(tmp_path / "data")
    delete("train/t1.jpg")(root)
    set_mask(1, "0 5")(root)
    with pytest.raises(DataError) as e:
        require_clean(DataConfig(root=str(root), image_size=SIZE))
    msg = str(e.value)
    assert "train_mask.csv, row 2: lists t1.jpg" in msg and "train_mask.csv, row 1 (t0.jpg)" in msg
    assert msg.splitlines()[-1] == "2 errors, 0 warnings"


def test_require_clean_prints_warnings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_clean(tmp_path / "data")
    with_bytes(lambda b: b.replace(b"\n", b"\r\n"))(root)
    report = require_clean(DataConfig(root=str(root), image_size=SIZE))
    assert report.ok and [p.code for p in report.warnings] == ["crlf"]
    assert "CRLF" in capsys.readouterr().err


# ----------------------------------------------------------------------------- real data


def test_real_data_is_clean() -> None:
    """(How fast the check is, at 1k to 30k tiles, is bench/scale_stages.py's to measure.)"""
    root = real_data_or_skip()
    report = check_dataset(root)
    assert report.ok and not report.warnings, report.format()
    assert any("448 rows" in s for s in report.summary) and any("112 rows" in s for s in report.summary)


def test_non_square_tiles_set_the_expected_size(tmp_path: Path) -> None:
    """A 640x480-like set (here 48x64, HxW): all tiles that size is clean; another size names both sizes
    correctly (it said "expected 0x0" when the first tile was not square; issue 12)."""
    root = make_clean(tmp_path / "data")
    for i, name in enumerate(TRAIN):
        _tile(i, (48, SIZE)).save(root / "train" / name, quality=90)
    for i, name in enumerate(TEST):
        _tile(100 + i, (48, SIZE)).save(root / "test_a" / name, quality=90)
    cropped = [rle.encode(rle.decode(m, (SIZE, SIZE))[:48]) for m in _masks()]
    (root / "train_mask.csv").write_text("".join(f"{n}\t{m}\n" for n, m in zip(TRAIN, cropped)))
    (root / "test_a_mask.csv").unlink()
    report = check_dataset(root, DataConfig())
    assert report.ok and not report.warnings, report.format()
    _tile(7, (SIZE, SIZE)).save(root / "test_a" / "s1.jpg", quality=90)
    report = check_dataset(root, DataConfig())
    assert [(p.code, p.where) for p in report.errors] == [("wrong-size", "test_a/s1.jpg")], report.format()
    assert "tile is 64x64 (HxW) but 48x64 is expected" in report.errors[0].what


def test_a_missing_train_folder_is_one_error_not_one_per_mask(tmp_path):
    """Every row used to be reported as running past the end of a 0x0 tile."""
    from pipeline.data.demo import generate

    root = generate(tmp_path / "d", n_train=8, n_test=2, size=64, seed=0)
    shutil.rmtree(root / "train")
    report = check_dataset(root)
    assert [i.code for i in report.errors] == ["missing-folder"]
    (root / "train").mkdir()
    (root / "train_mask.csv").write_text("x.jpg\t1 2 3\n")  # still checked: the syntax needs no size
    assert "odd number of tokens" in " ".join(i.what for i in check_dataset(root).errors)
