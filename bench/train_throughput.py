"""Training throughput: the full loop (JPEG decode + augmentation + step) vs the model-only step.

    python -m bench.train_throughput                  # GPU, real tiles, U-Net/ResNet34 512 bf16
    python -m bench.train_throughput --tiny           # CPU check at a tiny size (no GPU figure)

Both are measured in one run with the same model, batch, precision and ``TrainStep`` as
``pipeline.train.trainer``: (a) batches come from the training DataLoader (workers, augmentation, pinned
memory); (b) one batch already on the device is stepped repeatedly. Goal: (a)/(b) >= 0.9.
Writes ``bench/results/train_throughput[-<tag>].json`` with the device named and peak GPU memory.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from bench.common import device_info, real_data_dir, sync, time_resident_steps, tiny_data, write_result
from pipeline.core.config import load_config
from pipeline.core.device import Dist, pick_device
from pipeline.data.dataset import IMAGE, MASK, SegDataset, build_transforms
from pipeline.data.layouts import read_source
from pipeline.model.registry import count_parameters
from pipeline.train.engine import ResumableSampler, build_training, make_loader


def measure(cfg, steps: int, warmup: int) -> dict:
    d = Dist()
    device = pick_device(cfg.train.device, d)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    source = read_source(cfg.data, with_test=False)
    ds = SegDataset(source.train, build_transforms(cfg.aug, True), seed=0)
    step = build_training(cfg, device, d, pretrained=False)  # exactly the training step of make train
    model = step.model
    bs = cfg.train.batch_size

    sampler = ResumableSampler(ds, d, seed=0)
    loader = make_loader(ds, cfg, device, sampler)  # one loader, persistent workers: as in training

    def batches():
        epoch = 0
        while True:
            sampler.set_epoch(epoch)
            ds.set_epoch(epoch)
            yield from loader
            epoch += 1

    # (b) model only: one batch resident on the device.
    it = batches()
    first = next(it)
    x, y = first[IMAGE].to(device), first[MASK].to(device)
    model_only, peak = time_resident_steps(step, x, y, steps, warmup)

    # (a) full loop: loader -> device -> step, the loader already warm (workers started).
    for _ in range(warmup):
        b = next(it)
        step(b[IMAGE], b[MASK], 1e-4)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        b = next(it)
        step(b[IMAGE], b[MASK], 1e-4)
    sync(device)
    full = steps * bs / (time.perf_counter() - t0)
    return {
        "model": f"{cfg.model.arch}/{cfg.model.encoder}",
        "parameters": count_parameters(model),
        "image_size": int(x.shape[-1]),
        "batch_size": bs,
        "amp": cfg.train.amp if device.type == "cuda" else "fp32 (cpu)",
        "channels_last": cfg.train.channels_last and device.type == "cuda",
        "compile": cfg.train.compile,
        "num_workers": cfg.data.num_workers,
        "steps": steps,
        "warmup_steps": warmup,
        "full_loop_img_s": round(full, 2),
        "model_only_img_s": round(model_only, 2),
        "ratio": round(full / model_only, 3),
        "peak_gpu_mem_gib": peak,
        **device_info(device),
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.train_throughput", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="", help="data folder (default: the real tiles)")
    p.add_argument("--config", default="configs/default.yaml")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=15)
    p.add_argument("--tiny", action="store_true", help="CPU, 64 px generated tiles, resnet18, 3 steps")
    p.add_argument("--tag", default="", help="suffix of the result file name")
    p.add_argument(
        "overrides", nargs="*", help="config overrides, e.g. train.batch_size=32 train.compile=true"
    )
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if a.tiny:
            root = tiny_data(Path(tmp))
            over = ["train.device=cpu", "model.encoder=resnet18", "train.batch_size=4", "data.num_workers=1"]
            steps, warmup, tag = 3, 1, a.tag or "cpu-tiny"
        else:
            root, over, steps, warmup, tag = a.data or real_data_dir(), [], a.steps, a.warmup, a.tag
        # Speed does not depend on the initial weights: never download them.
        cfg = load_config(a.config, [f"data.root={root}", "model.encoder_weights=null", *over, *a.overrides])
        result = measure(cfg, steps, warmup)
    result["goal"] = {"ratio": 0.9, "full_loop_img_s_h100_unet_r34_512_bf16": 600}
    if result["gpu"] is None:
        result["note"] = "CPU check of the benchmark script only; the GPU figure is still to be measured"
    path = write_result(f"train_throughput{'-' + tag if tag else ''}.json", result)
    print(
        f"full loop {result['full_loop_img_s']} img/s, model only {result['model_only_img_s']} img/s, "
        f"ratio {result['ratio']}, peak {result['peak_gpu_mem_gib']} GiB -> {path}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
