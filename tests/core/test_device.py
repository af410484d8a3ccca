"""pipeline.core.device: one device choice, autocast and worker count for every stage."""

from __future__ import annotations

import contextlib

import pytest
import torch

from pipeline.core import device


def test_auto_is_cpu_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    assert device.pick_device("auto").type == "cpu"
    assert device.pick_device("cpu") == torch.device("cpu")


def test_cuda_without_a_gpu_says_which_setting_to_change():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(device.DeviceError, match="no CUDA GPU is visible; use cpu"):
        device.pick_device("cuda")


def test_unknown_device_is_a_clear_error():
    with pytest.raises(device.DeviceError, match="unknown device 'tpu'"):
        device.pick_device("tpu")


def test_autocast_is_off_on_cpu():
    assert isinstance(device.autocast_ctx(torch.device("cpu"), "bf16"), contextlib.nullcontext)


def test_default_workers_follow_the_cores(monkeypatch):
    for cores, want in [(1, 1), (2, 2), (4, 3), (16, 8), (64, 8)]:
        monkeypatch.setattr(device.os, "sched_getaffinity", lambda _pid, n=cores: set(range(n)))
        assert device.default_workers() == want


def test_single_process_job():
    d = device.init_distributed("cpu")
    assert (d.rank, d.world, d.main) == (0, 1, True)
