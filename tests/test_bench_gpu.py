"""The one GPU check (bench/gpu.py): its --tiny run is the same code on CPU, so it cannot first fail on the
GPU; every part is capped by wall-clock time as well as steps, and says when it stopped or was skipped."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench import gpu

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_runs_every_part_that_fits_and_says_which_stopped_or_were_skipped(tmp_path, monkeypatch, capsys):
    """On CPU: the speed parts stop their (10^6) steps at their slots' ends, the accuracy part trains the
    epochs that fit its slot; two parts whose slots exceed the budget (here made 10^6 s) are skipped with a
    line; the results name the device as detected and every override applied."""
    huge = {"gpu": 10**6, "tiny": 10**6}
    parts = [dataclasses.replace(p, slot=huge) if p.name in ("train_speed_compile", "accuracy_long") else p
             for p in gpu.PARTS]  # fmt: skip
    monkeypatch.setattr(gpu, "PARTS", parts)
    monkeypatch.setattr(gpu, "T0", time.monotonic())
    assert gpu.main(["--tiny", "--budget", "300", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu.json").read_text())
    parts = report["parts"]
    assert list(parts) == [p.name for p in gpu.PARTS]
    assert report["gpu"] is None and report["cpu"] and report["device"] == "cpu"
    for name in ("train_speed", "infer_speed", "models"):
        assert parts[name]["status"].startswith("done: its steps stopped at the slot's end"), name
    assert parts["train_speed"]["steps_timed"]["full_loop"] < 10**6
    assert parts["train_speed_compile"]["status"].startswith(
        "skipped: its 1000000 s slot does not fit in the"
    )
    acc = parts["accuracy_short"]
    assert acc["status"].startswith("done"), acc["status"]
    assert (
        "model.encoder_weights=null" in acc["overrides"]
        and f"train.epochs={acc['epochs']}" in acc["overrides"]
    )
    assert 0 <= acc["oof_dice"] <= 1 and 0 <= acc["test_a_dice"]["fold0/d4"] <= 1
    assert parts["accuracy_long"]["status"].startswith("skipped")
    for name in ("train_speed", "infer_speed"):
        assert "model.encoder_weights=null" in parts[name]["overrides"] and parts[name]["gpu"] is None
    out = capsys.readouterr().out
    assert (
        "budget 300 s from the process start" in out and "plan: train_speed 6 s, train_speed_compile" in out
    )
    assert "skip train_speed_compile (the same, train.compile=true): needs 1000000 s" in out


def test_a_part_past_its_slot_is_stopped_and_a_failing_part_costs_the_others_nothing(monkeypatch, tmp_path):
    monkeypatch.setattr(gpu, "GRACE_S", 0.05)

    def forever(ctx, deadline):
        while True:
            time.sleep(0.01)

    def broken(ctx, deadline):
        raise RuntimeError("CUDA error: an illegal memory access")

    parts = [
        gpu.Part("hangs", {"tiny": 0.05}, forever, "a part that ignores its deadline"),
        gpu.Part("breaks", {"tiny": 1}, broken, "a part that fails"),
        gpu.Part("fine", {"tiny": 1}, lambda ctx, deadline: {"figure": 1}, "a part that works"),
        gpu.Part("huge", {"tiny": 10**6}, lambda ctx, deadline: {}, "a part that cannot fit"),
    ]
    ctx = gpu.Context(True, tmp_path, tmp_path, "cpu")
    lines = []
    monkeypatch.setattr(gpu, "T0", time.monotonic())
    out = gpu.run_check(ctx, 100, parts, lines.append)
    assert out["hangs"]["status"] == "stopped: still running 0 s after its 0 s slot"
    assert out["breaks"]["status"] == "failed: RuntimeError: CUDA error: an illegal memory access"
    assert out["fine"]["status"] == "done" and out["fine"]["figure"] == 1
    assert out["huge"]["status"].startswith("skipped: its 1000000 s slot does not fit")
    assert any(line.startswith("skip huge (a part that cannot fit): needs 1000000 s") for line in lines)


def test_the_shell_command_runs_the_check_here_without_installing_the_gpu_machines_wheels(tmp_path):
    """`bash bench/gpu.sh --tiny`, as the GPU machine runs it but on CPU (one part, to stay short): the wheels
    carried for the GPU image (.whl/, Python 3.12) are left alone where the packages import, and the results
    land in $OUT/gpu.json."""
    env = {**os.environ, "OUT": str(tmp_path), "PY": sys.executable, "OMP_NUM_THREADS": "1"}
    cmd = [
        "bash",
        "bench/gpu.sh",
        "--tiny",
        "--parts",
        "train_speed",
        "--budget",
        "120",
    ]  # start-up under load
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert report["device"] == "cpu" and report["gpu"] is None and list(report["parts"]) == ["train_speed"]
    assert report["parts"]["train_speed"]["status"].startswith("done"), report["parts"]["train_speed"]
    assert "plan: train_speed 6 s" in done.stdout and "nvidia-smi" not in done.stderr
    # The budget counts from the shell command's start (the wheels' install inside it): 1000 s ago here.
    env["BUILDSEG_GPU_START"] = str(time.time() - 1000)
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert (
        done.returncode == 0
        and "skip train_speed (train step: model-only vs full loop): needs 6 s (+20 s " in (done.stdout)
    ), done.stdout
    assert json.loads((tmp_path / "gpu.json").read_text())["parts"]["train_speed"]["status"].startswith(
        "skipped"
    )
