"""Competition score of a submission against ground truth: mean per-image Dice (empty/empty = 1).

    python -m pipeline.score SUBMISSION [--truth DATA/test_a_mask.csv]      # make score

Writes ``<submission>.score.json`` next to the submission.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline import rle
from pipeline.data import DataError, read_mask_csv
from pipeline.io import atomic_write_text
from pipeline.metrics import dice_per_image, iou_per_image


def score_submission(sub_path: str | Path, truth_path: str | Path, shape: tuple[int, int] = (512, 512)) -> dict[str, Any]:
    """Mean per-image Dice and IoU of ``sub_path`` against ``truth_path`` (both name<TAB>rle).

    Every truth tile must be in the submission (a missing tile would silently inflate the score).
    """
    sub = read_mask_csv(sub_path, require_rle=False)
    truth = read_mask_csv(truth_path)
    pred_of = dict(zip(sub["name"], sub["rle"]))
    missing = [n for n in truth["name"] if n not in pred_of]
    if missing:
        raise DataError(f"{sub_path} lacks {len(missing)} tiles of {truth_path} ({', '.join(missing[:5])}); "
                        "a submission must list every test tile")
    names = truth["name"].tolist()
    t = rle.decode_many(truth["rle"].tolist(), shape, source=str(truth_path), names=names)
    p = rle.decode_many([pred_of[n] for n in names], shape, source=str(sub_path), names=names)
    dice = dice_per_image(p, t)
    iou = iou_per_image(p, t)
    return {
        "submission": str(sub_path),
        "truth": str(truth_path),
        "n": len(names),
        "dice": float(dice.mean()),
        "iou": float(iou.mean()),
        "dice_per_tile": {n: round(float(d), 6) for n, d in zip(names, dice)},
    }


def write_score(result: dict[str, Any], sub_path: str | Path) -> Path:
    out = Path(f"{sub_path}.score.json")
    atomic_write_text(out, json.dumps(result, indent=1))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.score", description=__doc__.split("\n\n")[0])
    p.add_argument("submission")
    p.add_argument("--truth", default="data/demo/test_a_mask.csv", help="ground-truth CSV (name<TAB>rle)")
    p.add_argument("--size", type=int, default=0, help="tile size (default: read from the data folder's images)")
    a = p.parse_args(argv)
    shape = (a.size, a.size) if a.size else _tile_shape(Path(a.truth))
    try:
        result = score_submission(a.submission, a.truth, shape)
    except (DataError, rle.RLEError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = write_score(result, a.submission)
    print(f"Dice {result['dice']:.4f}  IoU {result['iou']:.4f}  ({result['n']} tiles)  -> {out}")
    return 0


def _tile_shape(truth: Path) -> tuple[int, int]:
    """The tile size from the first image next to the truth CSV (test_a/), else 512."""
    from pipeline.data import image_size, list_images

    for folder in (truth.parent / "test_a", truth.parent / "train"):
        names = list_images(folder)
        if names:
            return image_size(folder / names[0])
    return (512, 512)


if __name__ == "__main__":
    sys.exit(main())
