"""Where a process runs: its place in a (possibly one-process) torchrun job, its device, autocast, seeds.

Every stage that runs a model (training, the out-of-fold pass, submit, predict, scene prediction,
the benchmarks) picks its device with :func:`pick_device` and mixed precision with
:func:`autocast_ctx`, so "auto", "cuda:N" and the CPU fallback mean the same thing everywhere.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pipeline.core.errors import BuildsegError


class DeviceError(BuildsegError, RuntimeError):
    """A device that cannot be used here; the message says which setting to change."""


@dataclass(frozen=True)
class Dist:
    """This process's place in a (possibly one-process) job."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_spec: str) -> Dist:
    """Join the torchrun job if there is one (WORLD_SIZE > 1); gloo on CPU, nccl on CUDA.

    ``device_spec`` is ``train.device`` (auto | cpu | cuda | cuda:N): it picks the backend.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    cuda = device_spec.startswith("cuda") or (device_spec == "auto" and torch.cuda.is_available())
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def close_distributed(d: Dist) -> None:
    if d.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    """Sum ``t`` over ranks in place (a no-op for one process); returns ``t``."""
    if d.world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_buffers(module: torch.nn.Module, d: Dist) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics).

    DDP syncs gradients, not buffers: each rank's last forward updated its own running statistics,
    so without this the ranks would validate slightly different models, and rank 0 alone saves them.
    """
    if d.world > 1:
        for b in module.buffers():
            dist.broadcast(b, src=0)


def barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()


def pick_device(spec: str = "auto", d: Dist = Dist()) -> torch.device:
    """``auto`` -> CUDA when visible, else CPU; under torchrun ``cuda`` means this rank's local GPU."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cuda" and d.world > 1:
        spec = f"cuda:{d.local_rank}"
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise DeviceError(f"unknown device {spec!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {spec} asked for, but no CUDA GPU is visible; use cpu (or auto)")
        torch.cuda.set_device(device)
    else:
        reuse_host_memory()
    return device


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


@functools.cache
def reuse_host_memory() -> bool:
    """Let glibc keep and reuse the memory of large freed blocks instead of mapping fresh pages for each.

    By default a block over 32 MB (every activation of a 512 px forward) is mmap'd when allocated and
    unmapped when freed, so each forward touches fresh zero pages: 4.7 M minor page faults and 10 s of
    system time for 4 forwards of 8 tiles of U-Net/ResNet34 on CPU (``make submit`` spent 37 % of its
    CPU time in the kernel, 175 M faults for 112 tiles with D4). Served from the heap and not trimmed:
    37 k faults, 0.1 s of system time, peak RSS 11 % higher. Once per process; False where there is no
    glibc (the allocator is left as it is)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    ok = libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30) == 1  # blocks up to 1 GB from the heap
    return ok and libc.mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1) == 1  # freed heap kept for reuse


# train.amp values and the autocast dtype each one asks for ("none": no autocast, float32).
AMP_DTYPES: dict[str, torch.dtype | None] = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}


def resolve_amp(device: torch.device, amp: str = "auto") -> str:
    """``train.amp`` on ``device``: ``auto`` is bf16 on CUDA and none (float32) elsewhere, so a CPU run
    computes in float32 unless a precision is asked for by name; bf16, fp16 and none mean themselves on
    every device (CPU autocast included)."""
    if amp == "auto":
        return "bf16" if device.type == "cuda" else "none"
    if amp not in AMP_DTYPES:
        raise DeviceError(f"train.amp={amp!r}; use auto, bf16, fp16 or none")
    return amp


def resolve_channels_last(device: torch.device, value: bool | str = "auto") -> bool:
    """``train.channels_last`` on ``device``: ``auto`` is on for CUDA only (CPU kernels would change the
    float32 numbers of a CPU run); true/false mean themselves on every device."""
    return device.type == "cuda" if value == "auto" else bool(value)


def autocast_ctx(device: torch.device, amp: str = "auto") -> Any:
    """Autocast to ``amp``'s dtype (:func:`resolve_amp`) on ``device``'s type, CPU included; a no-op
    for none (and for auto off CUDA)."""
    dtype = AMP_DTYPES[resolve_amp(device, amp)]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def grad_scaler(device: torch.device, amp: str = "auto") -> Any:
    """The loss scaler fp16 training needs (its gradients underflow without one), on any device;
    None for every other precision (bf16 has float32's exponent range)."""
    if resolve_amp(device, amp) != "fp16":
        return None
    return torch.amp.GradScaler(device.type)


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed Python, numpy's global state (third-party code uses it) and torch; optionally deterministic."""
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 - seeds third-party code that uses the global state
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True


def resolve_workers(n: int) -> int:
    """DataLoader workers for a ``data.num_workers``-style value: ``n`` itself, or for -1 (auto)
    :func:`default_workers`. The one rule every stage applies (training, OOF pass, submit, pseudo)."""
    return n if n >= 0 else default_workers()


def default_workers(limit: int = 8) -> int:
    """DataLoader workers when ``data.num_workers`` is -1 (auto): the cores this process may use, at most
    ``limit``, leaving one for the main process where there are more than two."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(0, min(limit, cores - 1 if cores > 2 else cores))
