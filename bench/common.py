"""Shared helpers for benchmarks: device description, result files, data location."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from pipeline.core.io import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def real_data_dir() -> Path:
    """../shared/data/buildings-real beside the checkout, or $BUILDSEG_REAL_DATA."""
    return Path(os.environ.get("BUILDSEG_REAL_DATA", ROOT.parent / "shared" / "data" / "buildings-real"))


def device_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": str(device),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    else:
        info["gpu"] = None
    return info


def write_result(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    atomic_write_text(path, json.dumps(data, indent=1) + "\n")
    return path


def tiny_data(tmp: Path, size: int = 64, n_train: int = 16, n_test: int = 8) -> Path:
    """Generated demo tiles for --tiny runs (CPU check of a GPU benchmark)."""
    from pipeline.data.demo import generate

    return generate(tmp / "demo", n_train=n_train, n_test=n_test, size=size, seed=0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_resident_steps(
    step: Any, x: torch.Tensor, y: torch.Tensor, steps: int, warmup: int
) -> tuple[float, Any]:
    """Images/s of ``step(x, y, lr)`` on a batch already on the device, and peak GPU GiB (None on CPU)."""
    device = x.device
    for _ in range(warmup):
        step(x, y, 1e-4)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step(x, y, 1e-4)
    sync(device)
    img_s = steps * x.shape[0] / (time.perf_counter() - t0)
    peak = round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None
    return img_s, peak
