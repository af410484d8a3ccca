"""Shared helpers for benchmarks: device description, result files, data location."""

from __future__ import annotations

import contextlib
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


def cpu_name() -> str:
    """The processor's model name as the kernel reports it (``platform.processor()`` is often empty)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def device_info(device: torch.device) -> dict[str, Any]:
    """The machine a figure was measured on, as detected (never a hard-coded tag): ``gpu`` is the CUDA
    device's name (None on CPU), ``gpu_memory_gib`` its memory; ``cpu`` the processor's name."""
    info: dict[str, Any] = {
        "device": str(device),
        "torch": torch.__version__,
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "gpu": None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
    return info


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    """Peak GPU memory allocated since :func:`reset_peak`, GiB (None on CPU)."""
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


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


def before(deadline: float | None) -> bool:
    """Whether ``time.monotonic()`` is still before ``deadline`` (None: no deadline)."""
    return deadline is None or time.monotonic() < deadline


def timed_loop(run: Any, steps: int, deadline: float | None, device: torch.device) -> tuple[int, float]:
    """Call ``run()`` up to ``steps`` times, stopping early at ``deadline`` (checked between calls; no sync
    per call, which would serialise the host and the GPU: the queue runs a few calls past it at most);
    returns (calls made, seconds, synchronised)."""
    done, t0 = 0, time.perf_counter()
    while done < steps and (done == 0 or before(deadline)):
        run()
        done += 1
    sync(device)
    return done, time.perf_counter() - t0


def time_resident_steps(
    step: Any, x: torch.Tensor, y: torch.Tensor, steps: int, warmup: int, deadline: float | None = None
) -> tuple[float, Any, int]:
    """Images/s of ``step(x, y, lr)`` on a batch already on the device, peak GPU GiB (None on CPU) and the
    steps timed (fewer than ``steps`` when ``deadline`` came first; the warm-up always runs)."""
    device = x.device
    for _ in range(warmup):
        step(x, y, 1e-4)
    sync(device)
    reset_peak(device)
    done, seconds = timed_loop(lambda: step(x, y, 1e-4), steps, deadline, device)
    return done * x.shape[0] / seconds, peak_gib(device), done
