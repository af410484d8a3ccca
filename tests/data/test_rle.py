"""pipeline.data.rle: round trips, one hand-derived string that pins the pixel order, every error, real CSVs.

The reference the codec is compared with is the public baseline's encoder (``_reference_encode``): a
direct transcription of the competition's definition, slow but obviously right.
"""

from __future__ import annotations

import math
import re
from unittest import mock

import numpy as np
import pandas as pd
import pytest
from conftest import real_data_or_skip
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pipeline.data import rle
from pipeline.data.rle import RLEError


def _reference_encode(mask: np.ndarray) -> str:
    """The competition's definition, spelled out: column-major, 1-based 'start length' pairs."""
    pixels = np.concatenate([[0], (mask != 0).flatten(order="F").astype(np.int64), [0]])
    runs = np.where(pixels[1:] != pixels[:-1])[0] + 1
    runs[1::2] -= runs[::2]
    return " ".join(str(x) for x in runs)


# --------------------------------------------------------------------------------------------- pinned order

# H=4 rows, W=3 columns. Numbering pixels column by column from 1 (the competition's order):
#
#        col0 col1 col2          pixel numbers      col0 col1 col2
#   row0   0    1    0                              1    5    9
#   row1   1    1    0                              2    6   10
#   row2   1    0    0                              3    7   11
#   row3   1    0    1                              4    8   12
#
# Buildings at pixels 2, 3, 4 (col0) and 5, 6 (col1) form ONE run across the column boundary,
# start 2, length 5; pixel 12 is a run of length 1.  -> "2 5 12 1".
# Row-major numbering would give "2 1 4 2 7 1 10 1 12 1" and 0-based starts "1 5 11 1": both wrong.
PINNED_MASK = np.array([[0, 1, 0], [1, 1, 0], [1, 0, 0], [1, 0, 1]], dtype=np.uint8)
PINNED_RLE = "2 5 12 1"


def test_pinned_string_encodes_column_major_one_based():
    assert rle.encode(PINNED_MASK) == PINNED_RLE
    assert rle.encode(np.asfortranarray(PINNED_MASK)) == PINNED_RLE


def test_pinned_string_decodes_to_the_mask():
    decoded = rle.decode(PINNED_RLE, (4, 3))
    assert decoded.dtype == np.uint8 and decoded.shape == (4, 3)
    np.testing.assert_array_equal(decoded, PINNED_MASK)


def test_parse_returns_zero_based_starts_and_lengths():
    starts, lengths = rle.parse(PINNED_RLE, (4, 3))
    assert starts.tolist() == [1, 11] and lengths.tolist() == [5, 1]


# --------------------------------------------------------------------------------------------- round trips


@st.composite
def masks(draw) -> np.ndarray:
    """Random 0/1 masks of random (often non-square) shape, density and memory layout."""
    h = draw(st.integers(1, 40))
    w = draw(st.integers(1, 40))
    kind = draw(st.sampled_from(["random", "empty", "full", "corners", "blocks"]))
    if kind == "random":
        m = draw(arrays(np.uint8, (h, w), elements=st.integers(0, 1)))
    elif kind == "blocks":  # long runs, many crossing column boundaries
        m = np.zeros((h, w), np.uint8)
        for r0, r1, c0, c1 in draw(st.lists(st.tuples(*[st.integers(0, 40)] * 4), max_size=5)):
            m[min(r0, r1) : max(r0, r1) + 1, min(c0, c1) : max(c0, c1) + 1] = 1
    else:
        m = np.full((h, w), kind == "full", np.uint8)
        if kind == "corners":  # a 1 in the first and in the last pixel (column-major)
            m[0, 0] = m[-1, -1] = 1
    layout = draw(st.sampled_from(["C", "F", "strided"]))
    if layout == "F":
        m = np.asfortranarray(m)
    elif layout == "strided":  # a view that is neither C- nor F-contiguous
        big = np.zeros((h, 2 * w), np.uint8)
        big[:, ::2] = m
        m = big[:, ::2]
    return m


@settings(max_examples=300, deadline=None)
@given(masks())
@example(np.zeros((1, 1), np.uint8))
@example(np.ones((1, 1), np.uint8))
@example(np.ones((7, 3), np.uint8))
def test_round_trip_matches_the_reference(mask):
    s = rle.encode(mask)
    assert s == _reference_encode(mask)
    decoded = rle.decode(s, mask.shape)
    np.testing.assert_array_equal(decoded, mask)
    assert (s == "") == (not mask.any())


@settings(max_examples=100, deadline=None)
@given(masks(), st.sampled_from([np.bool_, np.uint8, np.int32, np.float32]), st.integers(1, 255))
def test_encode_treats_any_nonzero_as_building(mask, dtype, value):
    assert rle.encode((mask * value).astype(dtype)) == rle.encode(mask)


@settings(max_examples=100, deadline=None)
@given(masks(), st.sampled_from(["\t", "  ", "\n", " \t "]), st.booleans())
def test_careful_path_decodes_like_the_canonical_path(mask, sep, zero_pad):
    """Any whitespace and leading zeros are accepted and mean the same (they take the slower path)."""
    s = rle.encode(mask)
    assume(s)
    tokens = s.split()
    if zero_pad:
        tokens = [t.zfill(9) for t in tokens]  # 9 digits: also past the fast path's 8-digit limit
    np.testing.assert_array_equal(rle.decode(f" {sep.join(tokens)}{sep}", mask.shape), mask)


def test_numbers_at_every_digit_count_boundary_parse_exactly():
    # parse() does not paint, so a huge shape costs nothing; 8 digits is the fast path's limit.
    values = [
        1,
        9,
        10,
        99,
        100,
        999,
        1000,
        9999,
        10**4,
        10**5 - 1,
        10**5,
        10**6 - 1,
        10**6,
        10**7 - 1,
        10**7,
        10**8 - 1,
        10**8,
        10**9,
    ]
    shape = (10**5, 10**5)
    for v in values:
        starts, lengths = rle.parse(f"{v} {v} {2 * v + 5} 1", shape)
        assert starts.tolist() == [v - 1, 2 * v + 4] and lengths.tolist() == [v, 1], v


def test_numbers_at_every_digit_count_boundary_format_exactly():
    values = np.array(
        [
            1,
            9,
            10,
            99,
            100,
            999,
            1000,
            9999,
            10**4,
            12345,
            10**5 - 1,
            10**5,
            10**6 - 1,
            10**6,
            1234567,
            10**7 - 1,
            7,
            80,
            900,
        ]
    )
    assert rle._format_ints(values) == " ".join(map(str, values.tolist()))


def test_encode_images_over_ten_megapixels():
    # Tokens >= 10**7 leave the fast ASCII writer for plain Python formatting; the result is the same.
    mask = np.zeros((4000, 2600), np.bool_)  # 10.4 million pixels
    mask[0, 0] = mask[-2:, -1] = True
    s = rle.encode(mask)
    assert s == f"1 1 {4000 * 2600 - 1} 2"
    assert rle.decode(s, mask.shape).sum() == 3


def test_encode_rejects_non_2d_input():
    with pytest.raises(ValueError, match=r"2-D mask \[H, W\]"):
        rle.encode(np.zeros((2, 4, 4), np.uint8))


# --------------------------------------------------------------------------------------------- empty values


@pytest.mark.parametrize("value", [None, "", "   ", float("nan"), np.float32("nan"), pd.NA], ids=repr)
def test_missing_values_decode_to_an_empty_mask(value):
    m = rle.decode(value, (5, 7))
    assert m.shape == (5, 7) and m.dtype == np.uint8 and not m.any()
    rle.validate(value, (5, 7))  # valid: an empty mask


def test_non_string_values_are_errors():
    with pytest.raises(RLEError, match="expected a string, got int"):
        rle.decode(3, (2, 2))


# --------------------------------------------------------------------------------------------- errors

ERRORS = [
    # (string, message fragment) on a 4x3 image (12 pixels)
    ("1 2 3", r"odd number of tokens \(3\)"),
    ("1 x", r"token 'x' is not an integer"),
    ("1 2.5", r"token '2.5' is not an integer"),
    ("+1 2", r"token '\+1' is not an integer"),  # Python int() would accept these three
    ("1_0 2", r"token '1_0' is not an integer"),
    ("1 --5", r"token '--5' is not an integer"),
    ("1 2 ٣ 1", r"token '٣' is not an integer"),  # a non-ASCII digit
    ("1 99999999999999999999", r"token '99999999999999999999' is too large"),
    ("0 2", r"run 1: start 0 < 1 \(pixels are numbered from 1\)"),
    ("3 1 -4 2", r"run 2: start -4 < 1"),
    ("1 0", r"run 1: length 0 must be > 0"),
    ("1 2 5 -1", r"run 2: length -1 must be > 0"),
    ("11 3", r"run 1: start 11 \+ length 3 runs past the end of a 4x3 image \(12 pixels\)"),
    ("13 1", r"run 1: start 13 \+ length 1 runs past the end"),
    ("9223372036854775807 9223372036854775807", r"runs past the end"),  # start + length overflows int64
    ("5 1 2 1", r"runs 1 and 2 are unsorted \(start 5 length 1, then start 2\)"),
    ("1 3 3 1", r"runs 1 and 2 are overlapping \(start 1 length 3, then start 3\)"),
    ("1 1 4 2 5 1", r"runs 2 and 3 are overlapping"),
]


@pytest.mark.parametrize(("text", "message"), ERRORS, ids=[e[0] for e in ERRORS])
def test_every_malformed_string_is_an_error_that_says_what_is_wrong(text, message):
    for fn in (rle.parse, rle.validate, rle.decode):
        with pytest.raises(RLEError, match=message):
            fn(text, (4, 3))


def test_touching_runs_are_valid_and_merge():
    # "1 2 3 1": runs 1-2 and 3-3 touch; legal (disjoint), and re-encoding merges them.
    m = rle.decode("1 2 3 1", (4, 3))
    assert rle.encode(m) == "1 3"


def test_a_run_may_end_on_the_last_pixel():
    assert rle.decode("12 1", (4, 3))[-1, -1] == 1
    assert rle.decode("1 12", (4, 3)).all()


# --------------------------------------------------------------------------------------------- decode_many


def test_decode_many_fills_out_in_order():
    rles = [PINNED_RLE, "", "1 12", float("nan")]
    out = np.full((4, 4, 3), 7, np.uint8)
    result = rle.decode_many(rles, (4, 3), out=out)
    assert result is out
    np.testing.assert_array_equal(out[0], PINNED_MASK)
    assert not out[1].any() and out[2].all() and not out[3].any()


def test_decode_many_reports_every_bad_row_with_its_number_and_name():
    rles = pd.Series(["1 2", "0 1", "", "1 2 3", "x 1", "2 2"], index=[10, 11, 12, 13, 14, 15])
    names = pd.Series([f"t{i}.jpg" for i in range(6)], index=rles.index)  # label index must not matter
    with pytest.raises(RLEError) as e:
        rle.decode_many(rles, (4, 3), source="train_mask.csv", names=names, first_row=1)
    msg = str(e.value)
    assert msg.startswith("3 malformed RLE value(s)")
    assert "train_mask.csv, row 2 (t1.jpg): run 1: start 0 < 1" in msg
    assert "train_mask.csv, row 4 (t3.jpg): odd number of tokens" in msg
    assert "train_mask.csv, row 5 (t4.jpg): token 'x' is not an integer" in msg
    for good in ("row 1 ", "row 3 ", "row 6 "):
        assert good not in msg


def test_decode_many_truncates_a_long_list_of_problems():
    with pytest.raises(RLEError) as e:
        rle.decode_many(["0 1"] * 25, (4, 3))
    msg = str(e.value)
    assert msg.startswith("25 malformed") and "masks, row 20:" in msg and "masks, row 21:" not in msg
    assert msg.endswith("... and 5 more")


# --------------------------------------------------------------------------------------------- batch path
# decode_many parses, validates and paints groups of rows in bulk, and falls back to decode() row by
# row for a group with anything unusual. The reference below is decode_many as it was before the batch
# path (row by row): outputs and error messages must match it exactly.


def _decode_rows(rles, shape, source="masks", names=None, first_row=1):
    """decode_many, row by row: uint8 [N, H, W], or the RLEError message it raises."""
    out = np.zeros((len(rles), *shape), np.uint8)
    problems = []
    for i, value in enumerate(rles):
        try:
            out[i] = rle.decode(value, shape)
        except RLEError as e:
            name = f" ({names[i]})" if names is not None else ""
            problems.append(f"{source}, row {first_row + i}{name}: {e}")
    if problems:
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        return f"{len(problems)} malformed RLE value(s):\n  " + "\n  ".join(problems[:20]) + more
    return out


def _batch_only():
    """Inside this context a call of the careful per-row fallback fails the test."""
    return mock.patch.object(rle, "_decode_careful", side_effect=AssertionError("took the per-row path"))


EMPTY_VALUES = ["", "  ", None, float("nan"), pd.NA]


@st.composite
def mask_columns(draw) -> tuple[list, tuple[int, int]]:
    """A column of RLE values of one random shape: encoded random / empty / full / first-and-last-pixel
    / block masks, empty ones spelled in every way pandas or a user might write them."""
    shape = (draw(st.integers(1, 24)), draw(st.integers(1, 24)))
    values = []
    for _ in range(draw(st.integers(0, 12))):
        kind = draw(st.sampled_from(["random", "empty", "full", "corners", "blocks"]))
        m = np.zeros(shape, np.uint8)
        if kind == "random":
            m = draw(arrays(np.uint8, shape, elements=st.integers(0, 1)))
        elif kind == "full":
            m[:] = 1
        elif kind == "corners":  # the first and the last pixel
            m[0, 0] = m[-1, -1] = 1
        elif kind == "blocks":
            for r0, r1, c0, c1 in draw(st.lists(st.tuples(*[st.integers(0, 24)] * 4), max_size=4)):
                m[min(r0, r1) : max(r0, r1) + 1, min(c0, c1) : max(c0, c1) + 1] = 1
        s = rle.encode(m)
        if not s:
            s = draw(st.sampled_from(EMPTY_VALUES))
        elif draw(st.booleans()):
            s = f" {s}\n"  # surrounding whitespace (a CSV field) keeps the text canonical
        values.append(s)
    return values, shape


@settings(max_examples=300, deadline=None)
@given(mask_columns())
def test_batch_path_decodes_like_the_per_row_path(column):
    values, shape = column
    expected = _decode_rows(values, shape)
    with _batch_only():
        got = rle.decode_many(values, shape)
    assert got.shape == (len(values), *shape) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, expected)


@st.composite
def token_columns(draw) -> tuple[list[str], tuple[int, int]]:
    """Columns of canonical text of small random tokens: mostly valid runs, often one token changed,
    so that every rule (odd count, start 0, length 0, past the end, unsorted, overlapping) is hit."""
    shape = (draw(st.integers(1, 5)), draw(st.integers(1, 5)))
    n_pixels = shape[0] * shape[1]
    values = []
    for _ in range(draw(st.integers(1, 8))):
        mask = draw(arrays(np.uint8, shape, elements=st.integers(0, 1)))
        tokens = rle.encode(mask).split()
        if draw(st.booleans()):  # break something
            action = draw(st.sampled_from(["set", "drop", "add"]))
            value = str(draw(st.integers(0, n_pixels + 2)))
            if action == "add" or not tokens:
                tokens.insert(draw(st.integers(0, len(tokens))), value)
            elif action == "set":
                tokens[draw(st.integers(0, len(tokens) - 1))] = value
            else:
                tokens.pop(draw(st.integers(0, len(tokens) - 1)))
        values.append(" ".join(tokens))
    return values, shape


@settings(max_examples=500, deadline=None)
@given(token_columns())
def test_batch_validation_accepts_and_rejects_exactly_what_the_per_row_path_does(column):
    values, shape = column
    names = [f"t{i}.jpg" for i in range(len(values))]
    expected = _decode_rows(values, shape, source="x.csv", names=names, first_row=2)
    if isinstance(expected, str):
        with pytest.raises(RLEError) as e:
            rle.decode_many(values, shape, source="x.csv", names=names, first_row=2)
        assert str(e.value) == expected
    else:
        got = rle.decode_many(values, shape, source="x.csv", names=names)
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize(("text", "message"), ERRORS, ids=[e[0] for e in ERRORS])
def test_one_bad_row_among_good_ones_is_reported_as_the_per_row_path_does(text, message):
    good = [PINNED_RLE, "", "1 12", "3 2 7 1"] * 5
    values = good[:9] + [text] + good[9:]
    names = [f"tile_{i}.jpg" for i in range(len(values))]
    with pytest.raises(RLEError) as e:
        rle.decode_many(values, (4, 3), source="train_mask.csv", names=names)
    per_row = _decode_rows(values, (4, 3), source="train_mask.csv", names=names)
    assert str(e.value) == per_row
    assert str(e.value).startswith("1 malformed RLE value(s):\n  train_mask.csv, row 10 (tile_9.jpg): ")
    assert re.search(message, str(e.value))


def test_a_non_canonical_row_falls_back_to_the_careful_path_and_decodes_the_same():
    values = [PINNED_RLE, "2\t5  12 1", "0002 05 12 1", "1 12"]
    np.testing.assert_array_equal(rle.decode_many(values, (4, 3)), _decode_rows(values, (4, 3)))


def test_a_non_string_row_is_reported_among_batched_rows():
    with pytest.raises(RLEError, match=r"masks, row 3: expected a string, got int 7"):
        rle.decode_many([PINNED_RLE, "1 12", 7, ""], (4, 3))


def test_decode_many_returns_column_major_masks_without_out():
    masks = rle.decode_many([PINNED_RLE, "1 1", ""], (4, 3))
    assert masks.shape == (3, 4, 3) and masks.dtype == np.uint8
    assert masks.transpose(0, 2, 1).flags.c_contiguous  # [N, W, H] underneath: RLE pixel order
    assert all(m.flags.f_contiguous for m in masks)
    np.testing.assert_array_equal(masks[0], PINNED_MASK)


@pytest.mark.parametrize("layout", ["column-major", "C"])
def test_decode_many_fills_out_in_either_layout(layout):
    values = [PINNED_RLE, "", "1 12", float("nan"), "12 1"] * 3
    if layout == "C":
        out = np.full((len(values), 4, 3), 7, np.uint8)
    else:  # each mask column-major, e.g. a memmap [N, W, H] seen through .transpose(0, 2, 1)
        out = np.full((len(values), 3, 4), 7, np.uint8).transpose(0, 2, 1)
    with _batch_only():
        result = rle.decode_many(values, (4, 3), out=out)
    assert result is out
    np.testing.assert_array_equal(out, _decode_rows(values, (4, 3)))
    if layout == "column-major":  # the buffer underneath holds each mask in RLE pixel order
        assert "".join(map(str, out.transpose(0, 2, 1)[0].ravel())) == "011111000001"  # "2 5 12 1"


def test_decode_many_rejects_out_of_the_wrong_shape():
    with pytest.raises(ValueError, match=r"out has shape \(2, 3, 4\); expected \(2, 4, 3\)"):
        rle.decode_many([PINNED_RLE, ""], (4, 3), out=np.zeros((2, 3, 4), np.uint8))


# --------------------------------------------------------------------------------------------- real data


@pytest.mark.parametrize("csv", ["train_mask.csv", "test_a_mask.csv"])
def test_every_real_mask_round_trips(csv):
    path = real_data_or_skip(csv) / csv
    df = pd.read_csv(path, sep="\t", header=None, names=["name", "rle"], keep_default_na=False, dtype=str)
    assert len(df) > 0
    with _batch_only():  # every real row is canonical text: all of it goes through the batch path
        masks = rle.decode_many(df["rle"].tolist(), (512, 512), source=str(path), names=df["name"].tolist())
    bad = [n for n, s, m in zip(df["name"], df["rle"], masks) if rle.encode(m) != s]
    assert not bad, f"{len(bad)} masks do not round-trip, e.g. {bad[:5]}"
    # Spot-check the decoder against the reference on a few rows (the reference encoder is slow).
    for s, m in list(zip(df["rle"], masks))[:: max(1, len(df) // 8)]:
        assert _reference_encode(m) == s
    fraction = masks.mean()
    assert 0.01 < fraction < 0.9 and not math.isnan(fraction)


def test_numpy_fallback_without_numba_decodes_the_same(monkeypatch):
    """GPU hosts without numba take the numpy path: same masks, same errors."""
    values = [PINNED_RLE, "", "1 12", float("nan"), "12 1", "2\t5 12 1"]
    expected = rle.decode_many(values, (4, 3))
    monkeypatch.setattr(rle, "_paint_rows", None)
    np.testing.assert_array_equal(rle.decode_many(values, (4, 3)), expected)
    np.testing.assert_array_equal(rle.decode(PINNED_RLE, (4, 3)), PINNED_MASK)
    with pytest.raises(RLEError, match="row 2"):
        rle.decode_many([PINNED_RLE, "0 1"], (4, 3))
