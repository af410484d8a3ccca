"""Training throughput: the full loop (JPEG decode + augmentation + step) vs the model-only step.

    python -m bench.train_throughput                  # GPU, real tiles, U-Net/ResNet34 512 bf16
    python -m bench.train_throughput --tiny           # CPU check at a tiny size (no GPU figure)

Both are measured in one run with the same model, batch, precision and ``TrainStep`` as
``pipeline.train.trainer``: (a) batches come from the training DataLoader (workers, augmentation, pinned
memory); (b) one batch already on the device is stepped repeatedly. Goal: (a)/(b) >= 0.9. Each is capped
at ``--steps`` steps and, with a deadline (``bench.gpu``), by wall-clock time.
Writes ``bench/results/train_throughput[-<tag>].json`` with the device, every override and peak GPU memory.
"""

from __future__ import annotations

import argparse
import os
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
    sync,
    time_resident_steps,
    timed_loop,
    tiny_data,
    write_result,
)
from pipeline.core.config import Config, load_config
from pipeline.core.device import Dist, pick_device, resolve_amp, resolve_channels_last
from pipeline.data.dataset import IMAGE, MASK, SegDataset, build_transforms
from pipeline.data.layouts import read_source
from pipeline.model.registry import count_parameters
from pipeline.train.engine import ResumableSampler, build_training, make_loader

NO_DOWNLOAD = "model.encoder_weights=null"  # speed does not depend on the initial weights: never download


def measure(cfg: Config, steps: int, warmup: int, deadline: float | None = None) -> dict:
    """Model-only and full-loop img/s of ``cfg``'s training step; with ``deadline`` (time.monotonic())
    each half gets at most half the time left and stops early (``steps_timed`` says how many ran)."""
    d = Dist()
    device = pick_device(cfg.train.device, d)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    source = read_source(cfg.data, with_test=False)
    ds = SegDataset(source.train, build_transforms(cfg.aug, True), seed=0)
    step = build_training(cfg, device, d, pretrained=False)  # exactly the training step of make train
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

    # (b) model only: one batch resident on the device. The warm-up includes torch.compile's compilation.
    t_start = time.monotonic()
    it = batches()
    first = next(it)
    x, y = first[IMAGE].to(device), first[MASK].to(device)
    half = None if deadline is None else time.monotonic() + (deadline - time.monotonic()) / 2
    model_only, _, steps_b = time_resident_steps(step, x, y, steps, warmup, half)

    # (a) full loop: loader -> device -> step, the loader already warm (workers started).
    for _ in range(warmup):
        b = next(it)
        step(b[IMAGE], b[MASK], 1e-4)
    sync(device)

    def one() -> None:
        b = next(it)
        step(b[IMAGE], b[MASK], 1e-4)

    steps_a, seconds = timed_loop(one, steps, deadline, device)
    full = steps_a * bs / seconds
    return {
        "model": f"{cfg.model.arch}/{cfg.model.encoder}",
        "parameters": count_parameters(step.model),
        "image_size": int(x.shape[-1]),
        "batch_size": bs,
        "amp": resolve_amp(device, cfg.train.amp),
        "channels_last": resolve_channels_last(device, cfg.train.channels_last),
        "compile": cfg.train.compile,
        "num_workers": cfg.data.num_workers,
        "steps": steps,
        "steps_timed": {"model_only": steps_b, "full_loop": steps_a},
        "stopped_at_deadline": steps_a < steps or steps_b < steps or not before(deadline),
        "warmup_steps": warmup,
        "seconds": round(time.monotonic() - t_start, 1),  # compile and cudnn autotuning included
        "full_loop_img_s": round(full, 2),
        "model_only_img_s": round(model_only, 2),
        "ratio": round(full / model_only, 3),
        "peak_gpu_mem_gib": peak_gib(device),  # since the model-only timing began, both halves
        **device_info(device),
    }


def tiny_overrides(root: Path) -> list[str]:
    return [f"data.root={root}", "train.device=cpu", "model.encoder=resnet18", "train.batch_size=4",
            "data.num_workers=1"]  # fmt: skip


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
    load = [round(x, 2) for x in os.getloadavg()]  # a shared CPU measures less: say how shared it was
    with tempfile.TemporaryDirectory() as tmp:
        if a.tiny:
            over = tiny_overrides(tiny_data(Path(tmp)))
            steps, warmup, tag = 3, 1, a.tag or "cpu-tiny"
        else:
            over, steps, warmup, tag = [f"data.root={a.data or real_data_dir()}"], a.steps, a.warmup, a.tag
        overrides = [*over, NO_DOWNLOAD, *a.overrides]
        result = measure(load_config(a.config, overrides), steps, warmup)
    result.update(config=a.config, overrides=overrides, load_average_before=load)
    result["goal"] = {"ratio": 0.9, "full_loop_img_s_h100_unet_r34_512_bf16": 600}
    if result["gpu"] is None:
        result["note"] = (
            "CPU check of the benchmark script only; the GPU figure is still to be measured"
            if a.tiny
            else "the recipe on this CPU (README: training cost); the GPU figure is still to be measured"
        )
    path = write_result(f"train_throughput{'-' + tag if tag else ''}.json", result)
    print(
        f"full loop {result['full_loop_img_s']} img/s, model only {result['model_only_img_s']} img/s, "
        f"ratio {result['ratio']}, peak {result['peak_gpu_mem_gib']} GiB -> {path}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
