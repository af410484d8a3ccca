"""Accuracy of a recipe on the real tiles: k-fold OOF Dice, then test_a Dice of four ensembles.

    python -m bench.accuracy                                  # GPU: configs/default.yaml on the real data
    python -m bench.accuracy --config configs/unet-vgg16.yaml --recipe unet-vgg16
    python -m bench.accuracy --tiny                           # CPU check on generated tiles (no real figure)

Trains every fold (choose recipes on OOF Dice), then predicts ``test_a`` once per variant:
single fold without TTA, single fold with D4, all folds without TTA, all folds with D4, and scores
each against ``test_a_mask.csv``. Appends (or replaces) the recipe's row in
``bench/results/accuracy.json`` with the device named, the minutes used and every override applied
(``model.encoder_weights=null`` included: the rows are from scratch unless an override says otherwise).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench.common import RESULTS, device_info, peak_gib, real_data_dir, reset_peak, tiny_data, write_result
from pipeline.core.config import load_config, run_name
from pipeline.core.device import pick_device
from pipeline.infer.submit import make_submission
from pipeline.runs.manifest import load_manifest
from pipeline.train import trainer

VARIANTS = [("fold0", "none"), ("fold0", "d4"), ("all", "none"), ("all", "d4")]


def evaluate_recipe(
    cfg,
    out_dir: Path,
    device: str = "auto",
    folds: list[int] | None = None,
    variants: list[tuple[str, str]] = VARIANTS,
) -> dict:
    """Train ``folds`` (all by default) of ``cfg``, tune, and score ``variants`` ((fold0 | all, TTA set)) of
    the ensemble on test_a; minutes, peak GPU memory and the device go into the row."""
    dev = pick_device(device)
    reset_peak(dev)
    t0 = time.time()
    run_dir = trainer.run(cfg, folds)
    train_min = (time.time() - t0) / 60
    manifest = load_manifest(run_dir)
    rows = {}
    t1 = time.time()
    for which, tta in variants:
        ckpts = manifest.checkpoints[:1] if which == "fold0" else manifest.checkpoints
        infer = dataclasses.replace(manifest.infer, tta=tta)
        m = dataclasses.replace(manifest, checkpoints=ckpts, infer=infer)
        res = make_submission(m, cfg.data, out_dir, tta, device, num_workers=cfg.data.num_workers)
        rows[f"{which}/{tta}"] = round(res.score["dice"], 4) if res.score else None
    submit_min = (time.time() - t1) / 60
    return {
        "recipe": run_name(cfg),
        "oof_dice": round(manifest.oof["oof_dice"], 4),
        "oof_dice@0.5": round(manifest.oof["oof_dice@0.5"], 4),
        "threshold": manifest.infer.threshold,
        "min_area": manifest.infer.min_area,
        "test_a_dice": rows,
        "epochs": cfg.train.epochs,
        "train_minutes": round(train_min, 2),
        "submit_minutes": round(submit_min, 2),
        "peak_gpu_mem_gib": peak_gib(dev),
        **device_info(dev),
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.accuracy", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="")
    p.add_argument("--config", default="configs/default.yaml")
    p.add_argument("--recipe", default="", help="row name (default: the config's run name)")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--out", default="accuracy.json")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if a.tiny:
            root = tiny_data(Path(tmp), size=64, n_train=16, n_test=8)
            over = [
                "train.device=cpu",
                "model.encoder=resnet18",
                "data.n_folds=2",
                "train.epochs=1",
                "train.batch_size=4",
                "data.num_workers=0",
                f"train.runs_dir={tmp}/runs",
            ]
            out_name = "accuracy-cpu-tiny.json"
        else:
            root, over, out_name = a.data or real_data_dir(), [], a.out
        name = [f"name={a.recipe}"] if a.recipe else []
        # Random init unless an override says otherwise: the recorded rows were measured that way.
        overrides = [f"data.root={root}", "model.encoder_weights=null", *over, *name, *a.overrides]
        cfg = load_config(a.config, overrides)
        row = evaluate_recipe(cfg, Path(tmp) / "subs", cfg.train.device)
    row["config"] = a.config
    row["overrides"] = overrides  # every one applied, the forced ones too
    path = RESULTS / out_name
    table = json.loads(path.read_text()) if path.is_file() else {"rows": []}
    table["rows"] = [r for r in table["rows"] if r["recipe"] != row["recipe"]] + [row]
    write_result(out_name, table)
    print(json.dumps(row, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
