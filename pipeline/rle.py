"""The competition's run-length encoding, vectorised.

Convention (Tianchi "地表建筑物识别", inherited from Kaggle): mask value 1 = building; pixels are
numbered column-major (``mask.flatten(order='F')``), starting at 1; the string is space-separated
``start length`` pairs; an empty string (or NaN, as pandas reads an empty field) is an empty mask.

Encode and decode use numpy only, never a Python loop over runs or tokens. Measured on the real
train masks (``python -m bench.rle``, results in ``bench/results/rle.json``), the text <-> integer
conversion dominates both directions, so it is done in bulk too:

* decode reads each token as the 8 bytes that end at it (one gather from a byte view of the string)
  and turns the ASCII digits into an integer with a few SWAR (SIMD-within-a-register) multiplies,
  then paints the mask with one ``np.repeat`` of alternating 0/1 over gap/length counts;
* encode finds run edges with one ``flatnonzero`` in the mask's own memory order (no transposed
  copy of a C-ordered mask) and writes all numbers as ASCII with the inverse SWAR steps.

Strings that are not in the canonical form (tabs, double spaces, signs, tokens over 8 digits) take
a slower, careful path whose errors say exactly what is wrong.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence

import numpy as np

DEFAULT_SHAPE = (512, 512)

_SPACE = ord(" ")
_ZERO = ord("0")
_NINE = ord("9")
_PAD = b" " * 9
# _DIGIT_BITS_BY_STEP[k + 1]: keeps the low nibble (the digit value of '0'..'9') of the top k bytes of
# a little-endian uint64 read that ends at a token's last byte, i.e. exactly the token's k digits.
# Indexed by k + 1, the distance between the spaces around the token.
_DIGIT_BITS_BY_STEP = np.array(
    [0, 0] + [(0xFFFF_FFFF_FFFF_FFFF << (8 * (8 - k))) & 0x0F0F_0F0F_0F0F_0F0F for k in range(1, 9)],
    dtype=np.uint64,
)
_MAX_FAST_VALUE = 10**7  # encode's ASCII writer packs 7 digits + a space into one uint64
_INT_TOKEN = re.compile(r"-?[0-9]+")


class RLEError(ValueError):
    """A malformed RLE string. ``str(e)`` says what is wrong; callers prefix the file and row."""


# ----------------------------------------------------------------------------------------------- encode


def encode(mask: np.ndarray) -> str:
    """Encode a mask [H, W] (any dtype; non-zero = 1) as the competition's RLE string.

    Returns "" for an empty mask. C- and F-ordered masks are both read in place (no transposed copy).
    """
    if mask.ndim != 2:
        raise ValueError(f"encode expects a 2-D mask [H, W], got shape {mask.shape}")
    edges = _run_edges(mask)
    if edges.size == 0:
        return ""
    edges[1::2] -= edges[::2]  # end -> length
    edges[::2] += 1  # 0-based -> 1-based start
    if edges.max() < _MAX_FAST_VALUE:
        return _format_ints(edges)
    return " ".join(map(str, edges.tolist()))  # images over 10 megapixels: plain Python formatting


def _run_edges(mask: np.ndarray) -> np.ndarray:
    """Column-major flat positions where runs start and end (end exclusive), int64 [2R], sorted."""
    h, w = mask.shape
    if mask.size == 0:
        return np.zeros(0, dtype=np.int64)
    if mask.flags.f_contiguous:
        # mask.T is C-contiguous, so the column-major pixel sequence is a free view.
        flat = mask.T.ravel() != 0
        edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
        first, last = flat[0], flat[-1]
    else:
        # A C-ordered mask (model output) would need a 150 us transposed copy to flatten column-major.
        # Instead compare each pixel with its column-major predecessor in place: the pixel above, or
        # for row 0 the last pixel of the previous column; then reorder the few edges found.
        b = np.ascontiguousarray(mask != 0)
        change = np.empty((h, w), dtype=bool)
        np.not_equal(b[1:], b[:-1], out=change[1:])
        np.not_equal(b[0, 1:], b[-1, :-1], out=change[0, 1:])
        change[0, 0] = False  # pixel 0 has no predecessor; handled by `first` below
        idx = np.flatnonzero(change)  # row-major order
        rows, cols = np.divmod(idx, w)
        # Stable sort by column keeps rows ascending within a column; 16-bit keys use radix sort.
        key = cols.astype(np.uint16) if w <= 1 << 16 else cols
        edges = (cols * h + rows)[np.argsort(key, kind="stable")]
        first, last = b[0, 0], b[-1, -1]
    if first:
        edges = np.concatenate(([0], edges))
    if last:
        edges = np.concatenate((edges, [h * w]))
    return edges


def _format_ints(values: np.ndarray) -> str:
    """``" ".join(map(str, values))`` for int64 [N] with 1 <= values < 10**7, without a Python loop.

    Each number becomes one uint64 holding its 7 decimal digits (leading zeros) and a trailing space,
    most significant digit in the lowest byte, so that the little-endian bytes read as text; the
    leading zeros are then dropped with one boolean selection over all bytes.
    """
    # Times 10 puts a 0 digit in byte 7, which becomes the separating space.
    u = values.astype(np.uint64) * 10
    # Split into two 4-digit halves, one per 32-bit lane (first half in the low lane) ...
    hi = u // 10000
    x = hi | ((u - hi * 10000) << 32)
    # ... each lane into two 2-digit halves in 16-bit lanes (x // 100 as a multiply-shift) ...
    y = ((x * 10486) >> 20) & 0x0000_007F_0000_007F
    x = ((x - y * 100) << 16) | y
    # ... and each 16-bit lane into two digits in bytes (x // 10 as a multiply-shift).
    z = ((x * 103) >> 10) & 0x000F_000F_000F_000F
    x = ((x - z * 10) << 8) | z
    # Keep every byte from the first non-zero digit on: x | -x sets all bits above the lowest set bit.
    keep = (x | (0 - x)).astype("<u8", copy=False).view(np.uint8) != 0
    text = (x | 0x2030_3030_3030_3030).astype("<u8", copy=False).view(np.uint8)[keep]
    return text[:-1].tobytes().decode("ascii")


# ----------------------------------------------------------------------------------------------- decode


def _is_empty(rle: object) -> bool:
    if rle is None or type(rle).__name__ == "NAType":  # pandas.NA, without importing pandas
        return True
    if isinstance(rle, (float, np.floating)):
        return math.isnan(rle)
    return isinstance(rle, str) and not rle.strip()


def _parse_canonical(text: str) -> np.ndarray | None:
    """Tokens of ``text`` as int64 [T] when it is plain ASCII digits separated by single spaces and no
    token is longer than 8 digits; None otherwise (the caller then takes the careful path)."""
    if not text.isascii():
        return None
    parsed = _parse_padded(_PAD + text.encode("ascii") + b" ")
    return None if parsed is None else parsed[0]


def _parse_padded(raw: bytes) -> tuple[np.ndarray, np.ndarray] | None:
    """Integers of ``raw`` = 9 spaces + text + 1 space, None unless the text is canonical (see
    ``_parse_canonical``): (values int64 [T], ends int64 [T + 1]); ``ends[k + 1] - 1`` is the offset
    in the text just past token k (``ends[0] == 0`` stands for the last pad space).
    """
    b = np.frombuffer(raw, dtype=np.uint8)
    # Every token ends at a space; the 9th pad space starts the list, so ends[k + 1] - ends[k] - 1 is
    # the length of token k, and with 8 pad bytes before, its 8 bytes end at raw[ends[k + 1] + 8].
    ends = np.flatnonzero(b[8:] == _SPACE)
    # Only '0'..'9' and spaces: nothing above '9', and below '0' only the spaces.
    text = b[9:]
    if text.max() > _NINE or np.count_nonzero(text < _ZERO) != ends.size - 1:
        return None
    steps = np.diff(ends)  # token length + 1
    if steps.min() < 2 or steps.max() > 9:  # a double space, or a number this path cannot hold
        return None
    # words[i] = raw[i : i + 8] as one little-endian uint64 (a strided view, nothing copied).
    words = np.ndarray((b.size - 7,), dtype="<u8", buffer=raw, strides=(1,))
    v = np.take(words, ends[1:])  # the 8 bytes that end at each token's last digit
    v &= np.take(_DIGIT_BITS_BY_STEP, steps)  # its digit values, right-aligned, zeros before
    # Combine digit bytes pairwise (first digit in the lowest byte): within each 32-bit half, into
    # 2-digit numbers in bytes 0 and 2, then a 4-digit number; the two halves into one 8-digit number.
    # 32-bit lanes: twice the SIMD width of 64-bit ones, and AVX2 has no 64-bit vector multiply.
    w = v.view(np.uint32)
    w *= np.uint32(1 + (10 << 8))
    w >>= np.uint32(8)
    w &= np.uint32(0x00FF_00FF)
    w *= np.uint32(1 + (100 << 16))
    w >>= np.uint32(16)
    v *= np.uint64(1 + (10_000 << 32))
    v >>= np.uint64(32)
    return v.view(np.int64), ends


def _parse_careful(text: str) -> np.ndarray:
    """Tokens of any whitespace-separated ``text`` as int64 [T]; RLEError names the bad token."""
    tokens = text.split()
    for t in tokens:
        if not _INT_TOKEN.fullmatch(t):
            raise RLEError(f"token {t!r} is not an integer")
    try:
        return np.array([int(t) for t in tokens], dtype=np.int64)
    except OverflowError:
        big = next(t for t in tokens if abs(int(t)) >= 2**63)
        raise RLEError(f"token {big!r} is too large for a pixel index") from None


def _run_counts(rle: str | float | None, shape: tuple[int, int]) -> np.ndarray:
    """Validated runs of ``rle`` as int64 [2R + 1]: gap before run 1, length of run 1, gap, length, ...,
    gap after the last run. The counts sum to H * W; painting them alternately 0/1 gives the mask."""
    n_pixels = shape[0] * shape[1]
    if _is_empty(rle):
        return np.array([n_pixels], dtype=np.int64)
    if not isinstance(rle, str):
        raise RLEError(f"expected a string, got {type(rle).__name__} {rle!r}")
    text = rle.strip()
    nums = _parse_canonical(text)
    careful = nums is None
    if careful:
        nums = _parse_careful(text)
    if nums.size % 2:
        raise RLEError(f"odd number of tokens ({nums.size}): RLE must be 'start length' pairs")
    starts, lengths = nums[0::2], nums[1::2]  # 1-based starts
    # The canonical path yields 0 <= tokens < 10**8, so the sums below cannot overflow; the careful
    # path's int64 tokens can (e.g. start 2**62, length 2**62): out-of-range tokens are errors anyway.
    if careful and (nums.min() < 0 or nums.max() > n_pixels):
        _explain(starts, lengths, shape)
    # Run edges between 0 and n: 0, start 1 (0-based), end 1 (exclusive), start 2, ..., n.
    edges = np.empty(nums.size + 2, dtype=np.int64)
    edges[0], edges[-1] = 0, n_pixels
    inner = edges[1:-1]
    np.subtract(starts, 1, out=inner[0::2])
    np.add(inner[0::2], lengths, out=inner[1::2])
    counts = edges[1:] - edges[:-1]  # (np.diff with prepend/append costs 3x more here)
    # A negative count is a start < 1, unsorted or overlapping runs, or a run past the end.
    if counts.min() < 0 or lengths.min() < 1:
        _explain(starts, lengths, shape)
    return counts


def _explain(starts: np.ndarray, lengths: np.ndarray, shape: tuple[int, int]) -> None:
    """Raise the RLEError that names the first problem of runs known to be invalid (1-based starts)."""
    n_pixels = shape[0] * shape[1]
    if (starts < 1).any():
        i = int(np.argmax(starts < 1))
        raise RLEError(f"run {i + 1}: start {starts[i]} < 1 (pixels are numbered from 1)")
    if (lengths <= 0).any():
        i = int(np.argmax(lengths <= 0))
        raise RLEError(f"run {i + 1}: length {lengths[i]} must be > 0")
    past = lengths > n_pixels + 1 - starts  # not starts + lengths: that can overflow int64
    if past.any():
        i = int(np.argmax(past))
        raise RLEError(
            f"run {i + 1}: start {starts[i]} + length {lengths[i]} runs past the end of a "
            f"{shape[0]}x{shape[1]} image ({n_pixels} pixels); is the image size right?"
        )
    bad = starts[1:] < starts[:-1] + lengths[:-1]
    if bad.any():
        i = int(np.argmax(bad))
        kind = "unsorted" if starts[i + 1] < starts[i] else "overlapping"
        raise RLEError(
            f"runs {i + 1} and {i + 2} are {kind} (start {starts[i]} length {lengths[i]}, "
            f"then start {starts[i + 1]}); runs must be sorted and disjoint"
        )
    raise AssertionError("_explain called on valid runs")  # pragma: no cover - callers check first


def parse(rle: str | float | None, shape: tuple[int, int] = DEFAULT_SHAPE) -> tuple[np.ndarray, np.ndarray]:
    """Parse and validate an RLE string into 0-based ``starts`` and ``lengths`` (int64 arrays [R]).

    Raises :class:`RLEError` for: odd token count, non-integer token, start < 1, zero or negative
    length, a run past the end of the image, runs unsorted or overlapping.
    """
    counts = _run_counts(rle, shape)
    ends = np.cumsum(counts[:-1])  # ends[2k] = 0-based start of run k, ends[2k+1] = its exclusive end
    return ends[0::2], counts[1::2]


def validate(rle: str | float | None, shape: tuple[int, int] = DEFAULT_SHAPE) -> None:
    """Raise :class:`RLEError` if ``rle`` is not a valid mask of ``shape``."""
    _run_counts(rle, shape)


def decode(rle: str | float | None, shape: tuple[int, int] = DEFAULT_SHAPE) -> np.ndarray:
    """Decode an RLE string to a uint8 mask [H, W] of 0/1. Empty string / NaN / None -> all zeros.

    The result is an F-ordered view (column-major is the order the runs are painted in); use
    ``np.ascontiguousarray`` where C order matters.
    """
    counts = _run_counts(rle, shape)
    values = np.zeros(counts.size, dtype=np.uint8)
    values[1::2] = 1
    flat = np.repeat(values, counts)
    return flat.reshape(shape[1], shape[0]).T  # column-major order without a copy


def decode_many(
    rles: Sequence[str | float | None],
    shape: tuple[int, int] = DEFAULT_SHAPE,
    out: np.ndarray | None = None,
    source: str = "masks",
    names: Sequence[str] | None = None,
    first_row: int = 1,
) -> np.ndarray:
    """Decode a column of RLE strings into uint8 masks [N, H, W] of 0/1 (``out``, or a new array).

    Layout: runs are painted in the competition's pixel order, so masks are fastest to write
    column-major. Without ``out`` the result is ``buf.transpose(0, 2, 1)`` of a C-contiguous
    ``buf`` [N, W, H]: an [N, H, W] view whose masks ``result[i]`` are F-contiguous [H, W] (use
    ``np.ascontiguousarray`` where C order matters). ``out`` may be any [N, H, W] array; one in that
    same layout (``out.transpose(0, 2, 1)`` C-contiguous, e.g. a memmap [N, W, H] transposed) is
    filled with plain copies, a C-ordered one with a transposing copy (3x slower in all).

    Rows are parsed, validated and painted in bulk, one group of rows per pass of numpy calls. A
    group with anything unusual (text not in the canonical form, an invalid row) is decoded row by
    row, so errors name ``source`` (e.g. the CSV path), the row (``first_row`` + index) and the tile
    name exactly as :func:`decode` would. All bad rows are reported in one error, not just the first.
    """
    rles = list(rles)  # a pandas Series would index by label, not position
    names = None if names is None else list(names)
    h, w = shape
    n = len(rles)
    if out is None:
        out = np.empty((n, w, h), dtype=np.uint8).transpose(0, 2, 1)
    elif out.shape != (n, h, w):
        raise ValueError(f"out has shape {out.shape}; expected {(n, h, w)} ([N, H, W] for {n} masks)")
    dest = out.transpose(0, 2, 1)  # [N, W, H]: each mask's pixels in RLE order
    problems = []
    alternating = np.zeros(0, dtype=np.uint8)  # 0, 1, 0, 1, ...: gaps and runs, grown as needed
    for lo, hi, texts in _groups(rles, h * w):
        counts = None if texts is None else _batch_counts(texts, h * w)
        if counts is not None:
            if alternating.size < counts.size:
                alternating = np.zeros(2 * counts.size, dtype=np.uint8)
                alternating[1::2] = 1
            dest[lo:hi] = np.repeat(alternating[: counts.size], counts).reshape(hi - lo, w, h)
            continue
        for i in range(lo, hi):
            try:
                out[i] = decode(rles[i], shape)
            except RLEError as e:
                name = f" ({names[i]})" if names is not None else ""
                problems.append(f"{source}, row {first_row + i}{name}: {e}")
    if problems:
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise RLEError(f"{len(problems)} malformed RLE value(s):\n  " + "\n  ".join(problems[:20]) + more)
    return out


# Batch decoding works on groups of rows small enough for the numpy temporaries of one pass to stay
# in the L2 cache (about 20 bytes per byte of text; a mask per pixel), and large enough to amortise
# the ~1 us fixed cost of each of its ~30 numpy calls.
_GROUP_TEXT_BYTES = 1 << 17
_GROUP_PIXELS = 1 << 22


def _groups(rles: list, n_pixels: int) -> Iterator[tuple[int, int, list[str] | None]]:
    """Consecutive row ranges [lo, hi) of at most ``_GROUP_TEXT_BYTES`` of text and ``_GROUP_PIXELS``
    pixels (at least one row), with the rows' stripped texts ("" for an empty mask), or None where a
    row is neither a string nor empty (the per-row path reports it)."""
    max_rows = max(1, _GROUP_PIXELS // n_pixels)
    lo, size, texts = 0, 0, []
    for i, rle in enumerate(rles):
        if isinstance(rle, str):
            t = rle.strip()
        elif _is_empty(rle):
            t = ""
        else:
            t = None
        if t is None:
            texts = None
        elif texts is not None:
            texts.append(t)
        size += 1 if t is None else len(t) + 1
        if size >= _GROUP_TEXT_BYTES or i + 1 - lo == max_rows or i + 1 == len(rles):
            yield lo, i + 1, texts
            lo, size, texts = i + 1, 0, []


def _batch_counts(texts: list[str], n_pixels: int) -> np.ndarray | None:
    """Run counts of a group of g rows painted as one pixel sequence, int64 [2R + 1]: gap, run, gap,
    ..., run, gap over g * n_pixels pixels (R runs in all; a gap may span row ends and empty rows).

    None unless every row is canonical text (see ``_parse_canonical``) of valid runs; the per-row path
    then finds the problem. Validated without a loop over rows: with each row's first start >= 1,
    its last run ending inside the image and every length >= 1, the runs of each row are sorted and
    disjoint exactly when no count is negative.
    """
    rows = [r for r, t in enumerate(texts) if t]
    if not rows:
        return np.array([len(texts) * n_pixels], dtype=np.int64)
    parts = [texts[r] for r in rows]
    text = " ".join([""] * len(_PAD) + parts + [""])  # _parse_padded's padding, in the same join
    if not text.isascii():
        return None
    parsed = _parse_padded(text.encode("ascii"))
    if parsed is None:
        return None
    values, ends = parsed
    # Each row's tokens: the space after the row's text is at ``ends`` offset sum(len + 1) so far.
    row_ends = np.cumsum(np.fromiter(map(len, parts), dtype=np.int64, count=len(parts)) + 1)
    last = np.searchsorted(ends, row_ends)  # tokens up to and including each row
    if (last & 1).any():
        return None  # an odd number of tokens in some row
    first = np.concatenate(([0], last[:-1]))  # each row's first token
    # Edges of each row's runs within its own image: start - 1, start - 1 + length, ...
    starts, lengths = values[0::2], values[1::2]
    edges = np.empty(values.size + 2, dtype=np.int64)
    np.subtract(starts, 1, out=edges[1:-1:2])
    np.add(edges[1:-1:2], lengths, out=edges[2:-1:2])
    if lengths.min() < 1 or values[first].min() < 1 or edges[last].max() > n_pixels:
        return None  # edges[last]: the end of each row's last run
    edges[0] = 0
    edges[-1] = (len(texts) - rows[-1]) * n_pixels  # the last row's image ends there
    counts = edges[1:] - edges[:-1]
    # The gap before each row's first run also spans the images of the rows before it (so it cannot
    # be negative: the previous row's runs end inside their image).
    counts[first] += np.diff(np.asarray(rows, dtype=np.int64), prepend=0) * n_pixels
    if counts.min() < 0:
        return None  # unsorted or overlapping runs in some row
    return counts
