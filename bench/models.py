"""Every architecture of the registry: parameters, training and inference throughput.

    python -m bench.models                      # CUDA: 512x512, bf16 autocast, channels_last, batch 16/32
    python -m bench.models --tiny               # CPU check of the script: 64x64, fp32, batch 2
    python -m bench.models --tag h100 --classes 21

Per model: parameter count (``pipeline.model.registry.count_parameters``), training img/s (one full
``pipeline.train.engine.TrainStep``: forward, CE+Dice loss, backward, AdamW step, on one batch resident on the
device) and inference img/s (``pipeline.infer.ensemble.predict_batch``, no TTA). Random uint8 images
and masks:
this measures the model, not the data loader (``bench/train_throughput.py`` does that).
Writes ``bench/results/models[-<tag>].json`` with the device named; a CPU run says so in ``note``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import torch

from bench.common import before, device_info, sync, time_resident_steps, timed_loop, write_result
from pipeline.core.config import load_config
from pipeline.core.device import Dist, pick_device
from pipeline.infer.ensemble import predict_batch
from pipeline.model.registry import count_parameters
from pipeline.train.engine import build_training

DLV3P = ["model.arch=DeepLabV3Plus", "model.encoder=resnet34"]
# (label, overrides): the README's table, in this order.
MODELS: list[tuple[str, list[str]]] = [
    ("U-Net / ResNet34 (default)", ["model.arch=Unet", "model.encoder=resnet34"]),
    ("U-Net / VGG16", ["model.arch=Unet", "model.encoder=vgg16"]),
    ("FCN-8s / VGG16", ["model.arch=FCN8s", "model.encoder=vgg16"]),
    ("DeepLab-V3+ / ResNet34 OS16", [*DLV3P, "model.output_stride=16"]),
    ("DeepLab-V3+ / ResNet34 OS8", [*DLV3P, "model.output_stride=8"]),
    ("FPN / ResNet34", ["model.arch=FPN", "model.encoder=resnet34"]),
    ("U-Net++ / ResNet34", ["model.arch=UnetPlusPlus", "model.encoder=resnet34"]),
]


def measure(
    overrides: Sequence[str],
    size: int,
    train_bs: int,
    infer_bs: int,
    steps: int,
    warmup: int,
    deadline: float | None = None,
) -> dict:
    """One model: parameters, train img/s, inference img/s, peak GPU memory (GiB) of the train step; with
    ``deadline`` each half of the timing stops early (its steps timed are recorded)."""
    cfg = load_config(None, list(overrides))
    device = pick_device(cfg.train.device, Dist())
    torch.backends.cudnn.benchmark = device.type == "cuda"
    torch.manual_seed(0)
    step = build_training(cfg, device, pretrained=False)  # exactly the training step of make train
    model = step.model
    row = {
        "overrides": list(overrides),
        "arch": cfg.model.arch,
        "encoder": cfg.model.encoder,
        "classes": cfg.model.classes,
        "parameters": count_parameters(model),
    }
    if cfg.model.arch == "DeepLabV3Plus":
        row["output_stride"] = cfg.model.output_stride
    k = max(2, cfg.model.classes)
    x = torch.randint(0, 256, (train_bs, 3, size, size), dtype=torch.uint8, device=device)
    y = torch.randint(0, k, (train_bs, size, size), dtype=torch.uint8, device=device)

    model.train()
    half = None if deadline is None else time.monotonic() + (deadline - time.monotonic()) / 2
    img_s, peak, done = time_resident_steps(step, x, y, steps, warmup, half)
    row["train_img_s"] = round(img_s, 2)
    row["train_steps_timed"] = done
    row["peak_gpu_mem_gib"] = peak
    step.check_finite(0, 0)

    del step
    model.eval()
    xi = torch.randint(0, 256, (infer_bs, 3, size, size), dtype=torch.uint8, device=device)
    if device.type == "cuda":
        xi = xi.contiguous(memory_format=torch.channels_last)
    amp = cfg.train.amp

    def forward() -> None:
        predict_batch([model], xi, "none", cfg.model.classes, amp=amp)

    for _ in range(warmup):
        forward()
    sync(device)
    done, seconds = timed_loop(forward, steps, deadline, device)
    row["infer_img_s"] = round(done * infer_bs / seconds, 2)
    row["infer_batches_timed"] = done
    return row


def measure_all(
    base: Sequence[str],
    size: int,
    bs: int,
    steps: int,
    warmup: int,
    wanted: Sequence[str] = (),
    deadline: float | None = None,
    tail: Sequence[str] = (),
) -> list[dict]:
    """:func:`measure` of every model of :data:`MODELS` whose label holds one of ``wanted`` (all if
    empty), with the overrides ``base``, the model's own, then ``tail``; with ``deadline`` each model gets
    an equal share of the time left, and the models it leaves no time for are listed as skipped."""
    todo = [(label, over) for label, over in MODELS if not wanted or any(w in label.lower() for w in wanted)]
    rows = []
    for i, (label, over) in enumerate(todo):
        share = (
            None if deadline is None else time.monotonic() + (deadline - time.monotonic()) / (len(todo) - i)
        )
        if not before(deadline):
            rows.append({"model": label, "skipped": "no time left before the deadline"})
            continue
        try:
            row = {"model": label, **measure([*base, *over, *tail], size, bs, 2 * bs, steps, warmup, share)}
        except torch.cuda.OutOfMemoryError:
            row = {"model": label, "error": f"CUDA out of memory at batch {bs}; use --batch-size {bs // 2}"}
            torch.cuda.empty_cache()
        rows.append(row)
        print(
            f"{label:<30} {row.get('parameters', 0) / 1e6:7.1f} M params  train {row.get('train_img_s')} im/s"
            f"  infer {row.get('infer_img_s')} im/s  peak {row.get('peak_gpu_mem_gib')} GiB",
            flush=True,
        )
    return rows


GPU_BASE = ["train.device=cuda", "train.amp=bf16", "train.channels_last=true"]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.models", description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="CPU, 64x64, fp32, batch 2, 2 steps (script check)")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=16, help="training batch (inference uses twice this)")
    p.add_argument("--classes", type=int, default=1, help="model.classes (1 = binary buildings)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--only", default="", help="comma-separated substrings of model labels to run")
    p.add_argument("--tag", default="", help="suffix of the result file name")
    a = p.parse_args(argv)
    if a.tiny:
        size, bs, steps, warmup, tag = 64, 2, 2, 1, a.tag or "cpu-tiny"
        base = ["train.device=cpu"]
    else:
        if not torch.cuda.is_available():
            p.error("no CUDA GPU: these are GPU figures; --tiny checks the script on CPU")
        size, bs, steps, warmup, tag = a.size, a.batch_size, a.steps, a.warmup, a.tag
        base = list(GPU_BASE)
    base += [f"model.classes={a.classes}", "model.encoder_weights=null"]
    wanted = [s.strip().lower() for s in a.only.split(",") if s.strip()]
    rows = measure_all(base, size, bs, steps, warmup, wanted)
    device = torch.device("cuda" if not a.tiny else "cpu")
    result = {
        "image_size": size,
        "train_batch_size": bs,
        "infer_batch_size": 2 * bs,
        "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
        "channels_last": device.type == "cuda",
        "steps": steps,
        "warmup_steps": warmup,
        "overrides": base,  # every model's own are in its row
        "models": rows,
        **device_info(device),
    }
    if device.type != "cuda":
        result["note"] = "CPU check of the script only (64 px); the GPU figures are still to be measured"
    path = write_result(f"models{'-' + tag if tag else ''}.json", result)
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
