"""RLE codec speed: ``pipeline.data.rle`` against the public baseline's codec, on every real train mask.

    python -m bench.rle [--data DIR] [--out bench/results/rle.json] [--repeat 7]

Decode is measured two ways, side by side:

* per mask: ``rle.decode(s)`` against ``baseline_decode(s)``, one string at a time;
* the column (what the pipeline does: ``pipeline.data.masks.decode_masks`` decodes a CSV's whole mask
  column once into a cache): ``rle.decode_many`` over all rows against the baseline decoder looped
  over all rows, both writing every mask into a preallocated [N, W, H] buffer (each mask
  column-major: the layout the cache uses and the baseline's own F-ordered result). The decode goal
  is judged on the column; the per-mask number is reported too.

Codecs run in the same process on the same masks, taking turns pass by pass so that load from other
processes hits both alike; a time is the best of ``--repeat`` passes (the least disturbed one), per
mask (a codec's per-mask total is the sum of its per-mask bests) or per column. Every mask is also
checked: both decoders (and ``decode_many``) give the same arrays and both encoders the same string,
which equals the CSV's. Encode is timed on C-contiguous masks, the layout a model's prediction arrives
in.

Without the real data (``--data``, ``$BUILDSEG_REAL_DATA``, or ``../shared/data/buildings-real``)
it falls back to a small seeded synthetic set and says so in the JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.common import RESULTS, real_data_dir
from pipeline.core.io import atomic_write_text
from pipeline.data import rle

GOAL = {"decode_speedup": 20.0, "encode_speedup": 3.0}
SHAPE = (512, 512)


# ----------------------------------------------------------------------------------------------------
# REFERENCE: the public baseline's codec, verbatim (the thing being measured against; do not "fix").
# It assumes 512x512 tiles.


def baseline_decode(mask_rle: str, shape: tuple[int, int] = SHAPE) -> np.ndarray:
    """Public baseline decoder: a Python loop over runs. Returns uint8 [H, W] (F-ordered view)."""
    s = mask_rle.split()
    starts, lengths = [np.asarray(x, dtype=int) for x in (s[0:][::2], s[1:][::2])]
    starts -= 1
    ends = starts + lengths
    img = np.zeros(512 * 512, dtype=np.uint8)
    for lo, hi in zip(starts, ends):
        img[lo:hi] = 1
    return img.reshape(shape, order="F")


def baseline_encode(img: np.ndarray) -> str:
    """Public baseline encoder: ``str()`` of every numpy integer, joined."""
    pixels = img.flatten(order="F")
    pixels = np.concatenate([[0], pixels, [0]])
    runs = np.where(pixels[1:] != pixels[:-1])[0] + 1
    runs[1::2] -= runs[::2]
    return " ".join(str(x) for x in runs)


# ----------------------------------------------------------------------------------------------------


def load_masks(data: Path) -> tuple[list[str], list[str], dict[str, Any]]:
    """Names and RLE strings of ``data/train_mask.csv``, or of a synthetic set if it is absent."""
    csv = data / "train_mask.csv"
    if csv.is_file():
        df = pd.read_csv(csv, sep="\t", header=None, names=["name", "rle"], keep_default_na=False, dtype=str)
        return df["name"].tolist(), df["rle"].tolist(), {"source": str(csv), "synthetic": False}
    names, rles = synthetic_masks()
    return (
        names,
        rles,
        {
            "source": f"synthetic: {len(rles)} seeded random-rectangle masks of 512x512 ({csv} not found)",
            "synthetic": True,
        },
    )


def synthetic_masks(n: int = 48, seed: int = 0) -> tuple[list[str], list[str]]:
    """``n`` seeded 512x512 masks of 0-40 axis-aligned rectangles (some empty), as RLE strings."""
    rng = np.random.default_rng(seed)
    names, rles = [], []
    for i in range(n):
        m = np.zeros(SHAPE, dtype=np.uint8)
        for _ in range(int(rng.integers(0, 41))):
            r, c = rng.integers(0, 480, size=2)
            h, w = rng.integers(8, 64, size=2)
            m[r : r + h, c : c + w] = 1
        names.append(f"synthetic_{i:03d}")
        rles.append(rle.encode(m))
    return names, rles


def best_times(fns: dict[str, Callable[[Any], Any]], inputs: list[Any], repeat: int) -> dict[str, np.ndarray]:
    """Best-of-``repeat`` seconds per input for each function, float [N] per name.

    Each repeat is one pass of every function over all inputs (as a data loader would call it), the
    functions taking turns pass by pass, so load from other processes falls on all of them alike.
    """
    best = {k: np.full(len(inputs), np.inf) for k in fns}
    clock = time.perf_counter
    gc_was_on = gc.isenabled()
    gc.disable()  # as timeit does: a collection would land on whichever call happens to trigger it
    try:
        for _ in range(repeat):
            for k, f in fns.items():
                times = best[k]
                for i, x in enumerate(inputs):
                    t0 = clock()
                    f(x)
                    t = clock() - t0
                    if t < times[i]:
                        times[i] = t
    finally:
        if gc_was_on:
            gc.enable()
    return best


def check_agreement(rles: list[str], names: list[str]) -> dict[str, Any]:
    """Both codecs agree on every mask and reproduce the CSV's string; mismatching names listed."""
    bad_decode, bad_encode = [], []
    for name, s in zip(names, rles):
        ours, ref = rle.decode(s, SHAPE), baseline_decode(s, SHAPE)
        if not np.array_equal(ours, ref):
            bad_decode.append(name)
        c_mask = np.ascontiguousarray(ref)
        if not (rle.encode(c_mask) == baseline_encode(c_mask) == rle.encode(ours) == s):
            bad_encode.append(name)
    return {
        "all_agree": not bad_decode and not bad_encode,
        "decode_mismatches": bad_decode,
        "encode_mismatches": bad_encode,
    }


def summarise(ours: np.ndarray, base: np.ndarray, goal: float) -> dict[str, Any]:
    speedup = float(base.sum() / ours.sum())
    return {
        "ours_total_s": round(float(ours.sum()), 6),
        "baseline_total_s": round(float(base.sum()), 6),
        "ours_mean_us": round(float(ours.mean() * 1e6), 2),
        "baseline_mean_us": round(float(base.mean() * 1e6), 2),
        "speedup": round(speedup, 2),
        "median_per_mask_speedup": round(float(np.median(base / ours)), 2),
        "goal": goal,
        "met": speedup >= goal,
    }


def stage_profile(s: str, repeat: int = 200) -> dict[str, float]:
    """Microseconds per stage of our codec on one string (best of ``repeat``): where the time goes."""
    mask = np.ascontiguousarray(rle.decode(s, SHAPE))
    counts = rle._run_counts(s, SHAPE)
    values = np.zeros(counts.size, dtype=np.uint8)
    values[1::2] = 1
    edges = rle._run_edges(mask)
    tokens = edges.copy()
    tokens[1::2] -= tokens[::2]
    tokens[::2] += 1
    stages = {
        "decode.text_to_ints": lambda: rle._parse_canonical(s.strip()),
        "decode.text_to_validated_runs": lambda: rle._run_counts(s, SHAPE),
        "decode.paint_np_repeat": lambda: np.repeat(values, counts),
        "decode.total": lambda: rle.decode(s, SHAPE),
        "encode.find_run_edges": lambda: rle._run_edges(mask),
        "encode.ints_to_text": lambda: rle._format_ints(tokens),
        "encode.total": lambda: rle.encode(mask),
        "baseline.decode": lambda: baseline_decode(s, SHAPE),
        "baseline.encode": lambda: baseline_encode(mask),
    }
    out = {}
    for k, f in stages.items():
        best = np.inf
        for _ in range(repeat):
            t0 = time.perf_counter()
            f()
            best = min(best, time.perf_counter() - t0)
        out[k] = round(best * 1e6, 1)
    return out


def column_buffers(n: int) -> dict[str, np.ndarray]:
    """Preallocated outputs for the column timings, [N, H, W] views, pages already touched."""
    bufs = {
        "ours": np.empty((n, SHAPE[1], SHAPE[0]), np.uint8).transpose(0, 2, 1),
        "baseline": np.empty((n, SHAPE[1], SHAPE[0]), np.uint8).transpose(0, 2, 1),
        "ours_c_order": np.empty((n, *SHAPE), np.uint8),
    }
    for b in bufs.values():
        b.fill(0)  # fault the pages in: the timed passes measure decoding, not the kernel's zeroing
    return bufs


def column_times(rles: list[str], repeat: int) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Best-of-``repeat`` seconds to decode the whole column, per variant, and the variants' masks.

    ``ours`` and ``baseline`` are the pair the goal is judged on (same masks into the same kind of
    buffer); the others show what the choices cost: a newly allocated result, a C-ordered ``out``,
    and the baseline dropping its masks instead of storing them (less work than the pipeline needs).
    """
    bufs = column_buffers(len(rles))
    results: dict[str, np.ndarray] = {}

    def baseline(out: np.ndarray) -> np.ndarray:
        for i, s in enumerate(rles):
            out[i] = baseline_decode(s, SHAPE)
        return out

    def baseline_discard() -> None:
        for s in rles:
            baseline_decode(s, SHAPE)

    variants: dict[str, Callable[[], Any]] = {
        "ours": lambda: rle.decode_many(rles, SHAPE, out=bufs["ours"]),
        "baseline": lambda: baseline(bufs["baseline"]),
        "ours_new_array": lambda: rle.decode_many(rles, SHAPE),
        "ours_into_c_order_out": lambda: rle.decode_many(rles, SHAPE, out=bufs["ours_c_order"]),
        "baseline_discarding_masks": baseline_discard,
    }
    best = dict.fromkeys(variants, np.inf)
    gc_was_on = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeat):
            for k, f in variants.items():
                t0 = time.perf_counter()
                r = f()
                best[k] = min(best[k], time.perf_counter() - t0)
                if r is not None:
                    results[k] = r
    finally:
        if gc_was_on:
            gc.enable()
    return best, results


def column_agreement(rles: list[str], results: dict[str, np.ndarray]) -> dict[str, Any]:
    """Every variant's masks equal the baseline's, mask for mask."""
    reference = results["baseline"]
    differ = {
        k: [i for i in range(len(rles)) if not np.array_equal(v[i], reference[i])]
        for k, v in results.items()
        if k != "baseline"
    }
    return {"all_agree": not any(differ.values()), "rows_that_differ": differ}


def run(data: Path, repeat: int = 7) -> dict[str, Any]:
    """Time both codecs on every mask of ``data``; the result dict that ``main`` writes as JSON."""
    names, rles, source = load_masks(data)
    load_before = os.getloadavg()
    agreement = check_agreement(rles, names)
    masks = [np.ascontiguousarray(rle.decode(s, SHAPE)) for s in rles]
    dec = best_times(
        {"ours": lambda s: rle.decode(s, SHAPE), "baseline": lambda s: baseline_decode(s, SHAPE)},
        rles,
        repeat,
    )
    col, col_results = column_times(rles, repeat)
    col_agreement = column_agreement(rles, col_results)
    del col_results
    enc = best_times({"ours": rle.encode, "baseline": baseline_encode}, masks, repeat)
    n_runs = [len(s.split()) // 2 for s in rles]
    median_mask = rles[int(np.argsort(n_runs)[len(n_runs) // 2])]
    profile = stage_profile(median_mask)
    column = {
        "what": (
            "decode_many(rles, out=buffer) over all rows against `for i, s in enumerate(rles): "
            "buffer[i] = baseline_decode(s)`; both buffers preallocated uint8 [N, W, H] seen as [N, H, W] "
            "(each mask column-major, as pipeline.data.masks.decode_masks stores them)"
        ),
        "ours_ms": round(col["ours"] * 1e3, 2),
        "baseline_ms": round(col["baseline"] * 1e3, 2),
        "ours_us_per_mask": round(col["ours"] / len(rles) * 1e6, 1),
        "baseline_us_per_mask": round(col["baseline"] / len(rles) * 1e6, 1),
        "speedup": round(col["baseline"] / col["ours"], 2),
        "goal": GOAL["decode_speedup"],
        "met": col["baseline"] / col["ours"] >= GOAL["decode_speedup"],
        "variants_ms": {k: round(v * 1e3, 2) for k, v in col.items()},
        "speedup_vs_baseline_discarding_its_masks": round(col["baseline_discarding_masks"] / col["ours"], 2),
        "speedup_of_new_array_vs_baseline": round(col["baseline"] / col["ours_new_array"], 2),
        "agreement": col_agreement,
        "decoder": "numba kernel (one pass over the bytes)"
        if rle._paint_rows is not None
        else "numpy per row",
    }
    per_mask = summarise(dec["ours"], dec["baseline"], GOAL["decode_speedup"])
    encode = summarise(enc["ours"], enc["baseline"], GOAL["encode_speedup"])
    return {
        "benchmark": "RLE codec: pipeline.data.rle vs the public baseline",
        "command": "python -m bench.rle " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": {
            "cpu_count": os.cpu_count(),
            "machine": platform.machine(),
            "processor": platform.processor(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "load_average_1_5_15_min_before": [round(x, 2) for x in load_before],
            "load_average_1_5_15_min_after": [round(x, 2) for x in os.getloadavg()],
        },
        "data": {
            **source,
            "n_masks": len(rles),
            "shape": list(SHAPE),
            "runs_per_mask_mean": round(float(np.mean(n_runs)), 1),
            "runs_per_mask_max": int(max(n_runs)),
        },
        "method": (
            f"best of {repeat} passes, codecs taking turns pass by pass, gc off; per-mask totals are sums of "
            "per-mask bests, column times are whole passes; encode input is a C-contiguous uint8 mask"
        ),
        "goal": GOAL,
        "verdict": {
            "decode": {
                "judged_on": "decode_column (the pipeline decodes whole columns: data.masks.decode_masks)",
                "speedup": column["speedup"],
                "goal": GOAL["decode_speedup"],
                "met": column["met"],
                "per_mask_speedup_for_reference": per_mask["speedup"],
            },
            "encode": {"speedup": encode["speedup"], "goal": GOAL["encode_speedup"], "met": encode["met"]},
        },
        "decode_column": column,
        "decode_per_mask": per_mask,
        "encode": encode,
        "agreement": agreement,
        "stage_profile_us_median_mask": profile,
        "per_mask_us": [
            {
                "name": n,
                "runs": r,
                "decode_ours": round(do * 1e6, 1),
                "decode_baseline": round(db * 1e6, 1),
                "encode_ours": round(eo * 1e6, 1),
                "encode_baseline": round(eb * 1e6, 1),
            }
            for n, r, do, db, eo, eb in zip(
                names, n_runs, dec["ours"], dec["baseline"], enc["ours"], enc["baseline"]
            )
        ],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.rle", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--data", type=Path, default=None, help="folder with train_mask.csv (default: the real data)"
    )
    p.add_argument("--out", type=Path, default=RESULTS / "rle.json", help="result JSON")
    p.add_argument("--repeat", type=int, default=7, help="timed runs per mask and codec; the best counts")
    args = p.parse_args(argv)
    result = run(args.data or real_data_dir(), args.repeat)
    atomic_write_text(args.out, json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    c = result["decode_column"]
    print(
        f"decode, column of {result['data']['n_masks']} masks (judged): ours {c['ours_ms']:.1f} ms, "
        f"baseline {c['baseline_ms']:.1f} ms, speed-up {c['speedup']:.1f}x "
        f"(goal {c['goal']:.0f}x: {'met' if c['met'] else 'NOT met'})"
    )
    for k, label in (("decode_per_mask", "decode, per mask"), ("encode", "encode")):
        r = result[k]
        print(
            f"{label}: ours {r['ours_mean_us']:.1f} us/mask, baseline {r['baseline_mean_us']:.1f} us/mask, "
            f"speed-up {r['speedup']:.1f}x (goal {r['goal']:.0f}x: {'met' if r['met'] else 'NOT met'})"
        )
    agree = result["agreement"]["all_agree"] and c["agreement"]["all_agree"]
    print(f"{result['data']['n_masks']} masks from {result['data']['source']}; codecs agree: {agree}")
    print(f"wrote {args.out}")
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
