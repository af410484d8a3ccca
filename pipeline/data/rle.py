"""The competition's run-length encoding, vectorised.

Convention (Tianchi "地表建筑物识别", inherited from Kaggle): mask value 1 = building; pixels are
numbered column-major (``mask.flatten(order='F')``), starting at 1; the string is space-separated
``start length`` pairs; an empty string (or NaN, as pandas reads an empty field) is an empty mask.

Measured on the real train masks (``python -m bench.rle``, ``bench/results/rle.json``), the text <->
integer conversion dominates both directions, so neither side loops over runs in Python:

* decode (``decode`` and ``decode_many``, a CSV's whole column as the data cache decodes it) runs one
  compiled pass (numba) over the string's bytes that parses the digits, checks every rule and
  writes each pixel once. Masks come out column-major ([N, W, H] underneath), the order the runs
  are painted in. Any row the pass does not accept exactly goes to a careful numpy path that
  accepts any whitespace and raises the precise error; without numba that path does everything;
* encode finds run edges with one ``flatnonzero`` in the mask's own memory order (no transposed
  copy of a C-ordered mask) and writes all numbers as ASCII with SWAR (SIMD-within-a-register)
  arithmetic on uint64 words.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np

from pipeline.core.errors import BuildsegError

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


def _compile_painter():
    """The column decoder's inner loop, compiled with numba when it is installed (else None).

    numpy needs ~30 calls per row and a per-run ``np.repeat``; this is one pass over the bytes that
    parses digits and fills runs in place (measured in bench/rle.py). Any row it does not accept
    exactly (a non-digit, a double space, a start < 1, a zero length, runs unsorted, overlapping or
    past the end, an odd token count) is flagged and left to the careful per-row path.
    """
    try:
        from numba import njit
    except ImportError:  # pragma: no cover - numba is in requirements.txt; GPU hosts may lack it
        return None

    @njit(cache=True, nogil=True)
    def paint_rows(buf, offsets, flat, bad):  # pragma: no cover - compiled
        n_pixels = flat.shape[1]
        for r in range(offsets.size - 1):
            row = flat[r]  # every pixel is written once: gaps with 0, runs with 1
            i, end = offsets[r], offsets[r + 1]
            painted, k, start = 0, 0, 0
            while i < end:
                v, digits = 0, 0
                while i < end and buf[i] != 32:
                    c = np.int64(buf[i]) - 48
                    if c < 0 or c > 9 or digits == 12:
                        bad[r] = True
                        break
                    v = v * 10 + c
                    digits += 1
                    i += 1
                if bad[r] or digits == 0:  # a non-digit, or two spaces in a row
                    bad[r] = True
                    break
                i += 1  # the single space after a token
                if k % 2 == 0:
                    start = v - 1
                    if start < painted:  # start < 1, or before the end of the previous run
                        bad[r] = True
                        break
                else:
                    if v < 1 or v > n_pixels - start:
                        bad[r] = True
                        break
                    row[painted:start] = 0
                    row[start : start + v] = 1
                    painted = start + v
                k += 1
            if k % 2:
                bad[r] = True
            row[painted:] = 0

    return paint_rows


_paint_rows = _compile_painter()


class RLEError(BuildsegError, ValueError):
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
    if _paint_rows is not None and isinstance(rle, str):
        raw = rle.strip().encode()
        flat = np.empty((1, shape[0] * shape[1]), dtype=np.uint8)
        bad = np.zeros(1, dtype=np.bool_)
        _paint_rows(np.frombuffer(raw or b" ", dtype=np.uint8), np.array([0, len(raw)]), flat, bad)
        if not bad[0]:
            return flat.reshape(shape[1], shape[0]).T
    return _decode_careful(rle, shape)


def _decode_careful(rle: str | float | None, shape: tuple[int, int]) -> np.ndarray:
    """:func:`decode` in numpy alone; accepts any whitespace and raises the precise RLEError."""
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

    All rows are parsed, validated and painted in one compiled pass (numba) over their bytes. A row
    the pass does not accept (text not in the canonical form, a non-string value, an invalid row) is
    decoded again on its own by the careful path, which accepts any whitespace and raises the precise
    error; without numba every row takes that path. Errors name ``source`` (e.g. the CSV path), the
    row (``first_row`` + index) and the tile name exactly as :func:`decode` would; every bad row is
    counted in one :class:`RLEError`, the first 20 listed.
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
    flat = dest.reshape(n, h * w) if dest.flags.c_contiguous else np.empty((n, h * w), dtype=np.uint8)
    problems = []
    texts = [r.strip() if isinstance(r, str) else ("" if _is_empty(r) else None) for r in rles]
    if _paint_rows is not None and n:
        # One compiled pass over all rows' bytes; a row it rejects (not canonical, or invalid) is
        # decoded again below by the careful path, which accepts what is valid and names the error.
        parts = [b"" if t is None else t.encode() for t in texts]
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.fromiter(map(len, parts), dtype=np.int64, count=n), out=offsets[1:])
        buf = np.frombuffer(b"".join(parts) or b" ", dtype=np.uint8)
        bad = np.zeros(n, dtype=np.bool_)
        _paint_rows(buf, offsets, flat, bad)
        retry = [i for i in range(n) if bad[i] or texts[i] is None]
    else:
        retry = range(n)
    for i in retry:
        try:
            flat[i] = _decode_careful(rles[i], shape).T.reshape(-1)
        except RLEError as e:
            name = f" ({names[i]})" if names is not None else ""
            problems.append(f"{source}, row {first_row + i}{name}: {e}")
    if not dest.flags.c_contiguous:
        dest[...] = flat.reshape(n, w, h)  # a C-ordered ``out``: one transposing copy
    if problems:
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise RLEError(f"{len(problems)} malformed RLE value(s):\n  " + "\n  ".join(problems[:20]) + more)
    return out
