"""pipeline.data.maskcsv: one scanner of the competition CSV, and every reader agrees with it.

``check_data`` reports the scan's problems, ``data.read_mask_csv`` raises on its errors (and
tolerates its warnings), and the folds CLI reads through ``read_mask_csv``: a file that one of
them accepts, the others accept too.
"""

from __future__ import annotations

import codecs
from pathlib import Path

import pytest

from pipeline.core.config import DataConfig
from pipeline.data import DataError
from pipeline.data.check import check_dataset
from pipeline.data.demo import generate
from pipeline.data.folds import main as folds_main
from pipeline.data.maskcsv import scan_csv
from pipeline.data.masks import read_mask_csv


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("maskcsv") / "demo", n_train=12, n_test=2, size=32, seed=0)


def _copy(src: Path, dst: Path) -> Path:
    for p in src.rglob("*"):
        if p.is_file():
            (dst / p.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
            (dst / p.relative_to(src)).write_bytes(p.read_bytes())
    return dst


def _write(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "m.csv"
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


# ----------------------------------------------------------------------------- the scanner


def test_rows_keep_their_line_numbers_and_are_stripped(tmp_path):
    scan = scan_csv(_write(tmp_path, "a.jpg\t1 3\n\nb.jpg \t\n"), "m.csv")
    assert [(r.row, r.name, r.rle) for r in scan.rows] == [(1, "a.jpg", "1 3"), (3, "b.jpg", "")]
    assert not scan.errors
    assert {p.code for p in scan.warnings} == {"blank-line", "name-spaces"}


def test_label_defaults_to_the_path(tmp_path):
    path = _write(tmp_path, "a.jpg\t1 3\na.jpg\t\n")
    assert [p.where for p in scan_csv(path).errors] == [f"{path}, row 2"]


# ----------------------------------------------------------------------------- the readers agree

# (content, the problem codes of the scan); read_mask_csv raises exactly when one of them is an error.
TOLERATED = [
    ("a.jpg\t1 3\t\nb.jpg\t\t\n", {"trailing-tab"}),
    ("a.jpg\t1 3\r\nb.jpg\t\r\n", {"crlf"}),
    (codecs.BOM_UTF8 + b"a.jpg\t1 3\nb.jpg\t\n", {"bom"}),
    ("a.jpg\t1 3\n\nb.jpg\t\n", {"blank-line"}),
    ("a.jpg \t1 3\nb.jpg\t\n", {"name-spaces"}),
]
REFUSED = [
    ("a.jpg\t1 3\tbuilding\nb.jpg\t\n", {"extra-column"}),
    ("a.jpg\t1 3\n\t1 3\n", {"empty-name"}),
    (b"a.jpg\t1 3\nb\xe9.jpg\t\n", {"encoding"}),
    ("a.jpg\t1 3\nb.jpg\n", {"no-tab"}),
    ("a.jpg\t1 3\na.jpg\t\n", {"duplicate-name"}),
    ("name\trle\na.jpg\t1 3\n", {"header"}),
    ("a.jpg,1 3\nb.jpg,\n", {"comma"}),
    ("", {"empty-csv"}),
]


@pytest.mark.parametrize("content, codes", TOLERATED, ids=[sorted(c)[0] for _, c in TOLERATED])
def test_warnings_are_tolerated_by_read_mask_csv(tmp_path, content, codes):
    path = _write(tmp_path, content)
    scan = scan_csv(path, "m.csv")
    assert not scan.errors and {p.code for p in scan.warnings} == codes
    df = read_mask_csv(path)
    assert df["name"].tolist() == ["a.jpg", "b.jpg"] and df["rle"].tolist() == ["1 3", ""]


@pytest.mark.parametrize("content, codes", REFUSED, ids=[sorted(c)[0] for _, c in REFUSED])
def test_errors_are_refused_by_read_mask_csv_with_the_same_message(tmp_path, content, codes):
    path = _write(tmp_path, content)
    scan = scan_csv(path, str(path))
    assert {p.code for p in scan.errors} == codes
    with pytest.raises(DataError) as e:
        read_mask_csv(path)
    for p in scan.errors:
        assert p.where in str(e.value) and p.what in str(e.value) and p.fix in str(e.value)


def test_a_trailing_tab_is_a_warning_everywhere(demo, tmp_path, capsys):
    """check_data warns, training reads the masks, and make folds writes the same folds as without it."""
    clean = _copy(demo, tmp_path / "clean")
    tabbed = _copy(demo, tmp_path / "tabbed")
    csv = tabbed / "train_mask.csv"
    csv.write_text("".join(f"{line}\t\n" for line in csv.read_text().splitlines()))

    report = check_dataset(tabbed, DataConfig(image_size=32))
    assert report.ok and {p.code for p in report.warnings} == {"trailing-tab"}
    assert read_mask_csv(csv).equals(read_mask_csv(clean / "train_mask.csv"))
    assert folds_main(["--data", str(tabbed), "--n-folds", "3"]) == 0, capsys.readouterr().err
    assert folds_main(["--data", str(clean), "--n-folds", "3"]) == 0, capsys.readouterr().err
    assert (tabbed / "folds.csv").read_text() == (clean / "folds.csv").read_text()


def test_an_extra_column_is_an_error_everywhere(demo, tmp_path, capsys):
    root = _copy(demo, tmp_path / "extra")
    csv = root / "train_mask.csv"
    csv.write_text("".join(f"{line}\tbuilding\n" for line in csv.read_text().splitlines()))
    report = check_dataset(root, DataConfig(image_size=32))
    assert not report.ok and {p.code for p in report.errors} == {"extra-column"}
    with pytest.raises(DataError, match="row 1: has 3 TAB-separated fields"):
        read_mask_csv(csv)
    assert folds_main(["--data", str(root), "--n-folds", "3"]) == 2
    assert "row 1: has 3 TAB-separated fields" in capsys.readouterr().err
