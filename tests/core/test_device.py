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


def test_a_cpu_run_is_float32_unless_a_precision_is_named():
    """auto (the default) keeps a CPU run in float32 (make demo's numbers); bf16 and fp16 autocast on CPU
    too when named, so the GPU recipe's code paths run in the CPU tests."""
    cpu = torch.device("cpu")
    a, b = torch.randn(4, 8), torch.randn(8, 4)
    for amp, want in [("auto", torch.float32), ("none", torch.float32), ("bf16", torch.bfloat16),
                      ("fp16", torch.float16)]:  # fmt: skip
        with device.autocast_ctx(cpu, amp):
            assert (a @ b).dtype == want, amp
    assert isinstance(device.autocast_ctx(cpu), contextlib.nullcontext)
    assert (
        device.resolve_amp(cpu, "auto") == "none"
        and device.resolve_amp(torch.device("cuda"), "auto") == "bf16"
    )
    assert isinstance(device.grad_scaler(cpu, "fp16"), torch.amp.GradScaler)
    assert device.grad_scaler(cpu, "bf16") is None and device.grad_scaler(cpu, "auto") is None
    with pytest.raises(device.DeviceError, match="use auto, bf16, fp16 or none"):
        device.resolve_amp(cpu, "fp8")


def test_channels_last_auto_is_cuda_only_and_explicit_values_hold_everywhere():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert device.resolve_channels_last(cpu, "auto") is False and device.resolve_channels_last(gpu, "auto")
    assert device.resolve_channels_last(cpu, True) and not device.resolve_channels_last(gpu, False)


@pytest.mark.parametrize(
    ("amp", "dtype"),
    [("bf16", torch.bfloat16), ("fp16", torch.float16), ("none", None), ("auto", torch.bfloat16)],
    ids=["bf16", "fp16", "none", "auto"],
)
@pytest.mark.parametrize("gpu", [torch.device("cuda"), torch.device("cuda", 1)], ids=["cuda", "cuda:1"])
def test_autocast_on_cuda_asks_for_the_configured_dtype(monkeypatch, amp, dtype, gpu):
    """train.amp -> torch.autocast's arguments on a CUDA device, checked without one: torch.autocast is
    replaced by a recorder. ``none`` asks for nothing; ``auto`` (the default) is bf16 on CUDA."""
    calls = []

    def record(device_type, dtype=None, **kwargs):
        calls.append((device_type, dtype, kwargs))
        return contextlib.nullcontext()

    monkeypatch.setattr(torch, "autocast", record)
    ctx = device.autocast_ctx(gpu, amp)
    if dtype is None:
        assert calls == [] and isinstance(ctx, contextlib.nullcontext)
    else:
        assert calls == [("cuda", dtype, {})]


def test_default_workers_follow_the_cores(monkeypatch):
    for cores, want in [(1, 1), (2, 2), (4, 3), (16, 8), (64, 8)]:
        monkeypatch.setattr(device.os, "sched_getaffinity", lambda _pid, n=cores: set(range(n)))
        assert device.default_workers() == want


def test_single_process_job():
    d = device.init_distributed("cpu")
    assert (d.rank, d.world, d.main) == (0, 1, True)


def test_large_cpu_blocks_are_reused_instead_of_faulted_in_afresh():
    """Each 512 px forward's activations were mmap'd fresh and unmapped again: 175 M minor page faults and
    37 % of submit's CPU time in the kernel for 112 tiles. Run in a fresh process (the setting is global)."""
    import subprocess
    import sys

    code = (
        "import resource, torch\n"
        "from pipeline.core.device import reuse_host_memory\n"
        "x = torch.rand(4, 16, 512, 512)\n"  # 64 MB blocks, as a 512 px forward's activations
        "conv = torch.nn.Conv2d(16, 16, 3, padding=1, groups=16)\n"
        "def faults():\n"
        "    with torch.no_grad():\n"
        "        for _ in range(2):\n"  # warm up: glibc's heap settles over the first blocks
        "            torch.sigmoid(conv(torch.relu(conv(x))))\n"
        "        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "        for _ in range(3):\n"
        "            torch.sigmoid(conv(torch.relu(conv(x))))\n"
        "    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before\n"
        "print(faults(), reuse_host_memory(), faults())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    default, ok, reused = out.split()
    assert ok == "True"
    assert (
        int(default) > 3 * 4 * 16_384 and int(reused) < int(default) // 8
    )  # 4 blocks of 64 MB a forward; one or two may settle late
