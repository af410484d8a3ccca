"""Submission throughput: ``make submit``'s path vs the bare forward passes it needs.

    python -m bench.infer_throughput                 # GPU: real test tiles, d4 TTA x 5 folds, bf16
    python -m bench.infer_throughput --tiny          # CPU check at a tiny size (no GPU figure)

(a) end to end: JPEG decode (DataLoader workers) -> d4 TTA x 5 fold models -> threshold on the
device -> small-component removal + RLE encode in a thread pool (``submit.predict_and_encode``);
(b) bare: the same models, batch, precision and number of forward passes on a batch already on the
device. Both in one run. Goal: (a) >= 0.85 x (b). The fold models are randomly initialised
(speed does not depend on the weights) and go through real checkpoints and a manifest. Precision is the
config's ``train.amp`` (what ``make submit`` uses). With a deadline (``bench.gpu``) (b) stops early and
(a) predicts as many tiles as fit in the time left at (b)'s rate.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from bench.common import (
    before,
    device_info,
    peak_gib,
    real_data_dir,
    reset_peak,
    sync,
    timed_loop,
    tiny_data,
    write_result,
)
from pipeline.core.config import load_config, to_dict
from pipeline.core.device import pick_device, resolve_amp
from pipeline.core.tta import TTA_SETS
from pipeline.data.dataset import IMAGE, SegDataset, Split
from pipeline.data.layouts import read_source
from pipeline.infer.ensemble import load_ensemble, predict_batch
from pipeline.infer.submit import predict_and_encode
from pipeline.model.registry import build_model
from pipeline.runs.checkpoint import BestCheckpoint, write_checkpoint
from pipeline.runs.manifest import Manifest, load_manifest, write_manifest

NO_DOWNLOAD = "model.encoder_weights=null"  # random checkpoints: pretrained weights change nothing here


def make_run(cfg, run_dir: Path, folds: int, tta: str, batch_size: int) -> Path:
    """A run folder with ``folds`` random checkpoints and a manifest, written as training writes them."""
    ckpts = []
    for f in range(folds):
        torch.manual_seed(f)
        path = run_dir / f"fold{f}" / "best.pt"
        model = build_model(cfg).state_dict()
        write_checkpoint(path, BestCheckpoint(model, to_dict(cfg), f, 0, "val_dice", 0.0, 0.5, 16))
        ckpts.append(f"fold{f}/best.pt")
    infer = dataclasses.replace(cfg.infer, tta=tta, threshold=0.5, min_area=16, batch_size=batch_size)
    return write_manifest(Manifest(run_dir, tuple(ckpts), infer, data_root=cfg.data.root))


def measure(
    cfg,
    folds: int,
    tta: str,
    batch_size: int,
    workers: int,
    repeats: int,
    device_spec: str,
    deadline: float | None = None,
) -> dict:
    t_start = time.monotonic()
    device = pick_device(device_spec)
    amp = cfg.train.amp
    torch.backends.cudnn.benchmark = device.type == "cuda"
    with tempfile.TemporaryDirectory() as tmp:
        manifest = load_manifest(make_run(cfg, Path(tmp) / "run", folds, tta, batch_size))
        models, _ = load_ensemble(manifest, device)
    test = read_source(cfg.data, with_train=False).test
    split = Split(test.names * repeats, test.image_paths * repeats, None)
    n = len(split)

    # Warm-up both paths (cudnn autotuning, worker start-up is part of (a) as in make submit).
    x = next(iter(torch.utils.data.DataLoader(SegDataset(split), batch_size=batch_size)))[IMAGE].to(device)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    predict_batch(models, x, tta, amp=amp)
    sync(device)
    reset_peak(device)

    # (b) bare forward passes on a resident batch: n / batch_size batches worth (half the time left).
    n_batches = -(-n // batch_size)
    half = None if deadline is None else time.monotonic() + (deadline - time.monotonic()) / 2
    done, seconds = timed_loop(lambda: predict_batch(models, x, tta, amp=amp), n_batches, half, device)
    bare = done * batch_size / seconds

    # (a) end to end, on as many tiles as fit in the time left at the bare rate (all of them if no deadline).
    if deadline is not None:
        fit = int(0.8 * bare * max(0.0, deadline - time.monotonic()))
        n = max(batch_size, min(n, fit - fit % batch_size))
        split = Split(split.names[:n], split.image_paths[:n], None)
    t0 = time.perf_counter()
    rows = predict_and_encode(models, split, tta, 0.5, 16, device, batch_size, workers, amp=amp)
    sync(device)
    e2e = n / (time.perf_counter() - t0)
    assert len(rows) == n
    views = len(TTA_SETS[tta])
    return {
        "model": f"{cfg.model.arch}/{cfg.model.encoder}",
        "folds": folds,
        "tta": tta,
        "forward_passes_per_image": folds * views,
        "image_size": int(x.shape[-1]),
        "batch_size": batch_size,
        "num_workers": workers,
        "precision": resolve_amp(device, amp),
        "images": n,
        "bare_batches_timed": done,
        "stopped_at_deadline": done < n_batches or not before(deadline),
        "seconds": round(time.monotonic() - t_start, 1),
        "end_to_end_img_s": round(e2e, 2),
        "bare_forward_img_s": round(bare, 2),
        "ratio": round(e2e / bare, 3),
        "peak_gpu_mem_gib": peak_gib(device),
        **device_info(device),
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.infer_throughput", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="")
    p.add_argument("--config", default="configs/default.yaml")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--tta", default="d4", choices=list(TTA_SETS))
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2, help="pass over the test tiles this many times")
    p.add_argument("--device", default="auto")
    p.add_argument("--tiny", action="store_true", help="CPU, 64 px generated tiles, resnet18, 2 folds")
    p.add_argument("--tag", default="")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if a.tiny:
            overrides = [
                f"data.root={tiny_data(Path(tmp))}",
                "model.encoder=resnet18",
                NO_DOWNLOAD,
                *a.overrides,
            ]
            result = measure(load_config(a.config, overrides), 2, "flip", 4, 1, 1, "cpu")
            tag = a.tag or "cpu-tiny"
        else:
            overrides = [f"data.root={a.data or real_data_dir()}", NO_DOWNLOAD, *a.overrides]
            cfg = load_config(a.config, overrides)
            result = measure(cfg, a.folds, a.tta, a.batch_size, a.workers, a.repeats, a.device)
            tag = a.tag
    result.update(config=a.config, overrides=overrides)
    result["goal"] = {"ratio": 0.85}
    if result["gpu"] is None:
        result["note"] = "CPU check of the benchmark script only; the GPU figure is still to be measured"
    path = write_result(f"infer_throughput{'-' + tag if tag else ''}.json", result)
    print(
        f"end to end {result['end_to_end_img_s']} img/s, bare forward {result['bare_forward_img_s']} img/s, "
        f"ratio {result['ratio']} -> {path}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
