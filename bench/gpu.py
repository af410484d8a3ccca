"""One GPU check sized to the device budget: every figure the README leaves "to be measured", one command.

    python -m bench.gpu --out "$OUT"                 # a CUDA GPU; real tiles in .gpu/buildings-real
    python -m bench.gpu --tiny --out /tmp/gpu-tiny   # the same code on CPU with generated tiles (tests)

Parts, in this order, each capped by steps *and* by a wall-clock slot (cooperative deadline checked
between steps, and SIGALRM a little later as a hard stop); a part whose slot no longer fits in what is
left of ``--budget`` (default 480 s, from bench/gpu.sh's start) is skipped with a line saying so:

* ``train_speed``, ``train_speed_compile``: model-only vs full-loop img/s and their ratio, U-Net/ResNet34
  at 512 px, bf16 + channels_last, without and with ``train.compile`` (:mod:`bench.train_throughput`);
* ``infer_speed``: bare forwards vs the submit path with D4 x 5 folds (:mod:`bench.infer_throughput`);
* ``accuracy_short``, ``accuracy_long``: the default recipe from scratch (``model.encoder_weights=null``,
  recorded with every other override), fold 0 only, for the epochs that fit the slot at the rate measured
  here (said in the row); OOF Dice and test_a Dice with D4 (:mod:`bench.accuracy`); the two budgets are
  the first two points of a Dice-against-minutes curve;
* ``models``: every architecture's train and inference img/s (:mod:`bench.models`).

Peak GPU memory is recorded per part. Writes ``<out>/gpu.json``: the device as detected, the budget,
and per part its status (done, stopped at its slot, skipped, failed), seconds, overrides and figures.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The budget counts from bench/gpu.sh's start (BUILDSEG_GPU_START, epoch seconds: the wheels' install is
# inside it), else from here; torch and the pipeline are imported inside the functions, so their start-up
# is inside the budget and printed.
T0 = time.monotonic() - max(0.0, time.time() - float(os.environ.get("BUILDSEG_GPU_START") or time.time()))
GRACE_S = 20.0  # SIGALRM this long after a part's deadline: a hard stop for work that missed it
RESERVE_S = 10.0  # kept back at the end for writing the results


class PartTimeout(Exception):
    """A part ran past its slot and the grace after it (SIGALRM)."""


@dataclass(frozen=True)
class Part:
    name: str
    slot: dict[str, float]  # "gpu" / "tiny" -> wall-clock seconds
    run: Callable[[Any, float], dict]  # (context, deadline) -> figures
    what: str


@dataclass
class Context:
    """What the parts share: the mode, data, device, scratch folder and the rates measured so far."""

    tiny: bool
    data: Path
    tmp: Path
    device: str
    rates: dict[str, float] = field(default_factory=dict)

    def overrides(self) -> list[str]:
        """The settings every part applies to ``configs/default.yaml``."""
        base = [f"data.root={self.data}", "model.encoder_weights=null"]  # speed and scratch accuracy
        if self.tiny:  # CPU, 64 px tiles: a stem-only ResNet-18 U-Net and one worker
            base += [
                "train.device=cpu",
                "model.encoder=resnet18",
                "model.decoder_channels=[8]",
                "data.n_folds=2",
            ]
            base += ["train.batch_size=4", "data.num_workers=1", "infer.batch_size=4"]
        return base


# ----------------------------------------------------------------------------- parts


def _speed(ctx: Context, deadline: float, compile_: bool) -> dict:
    from bench.train_throughput import measure
    from pipeline.core.config import load_config

    over = [*ctx.overrides(), "train.amp=bf16", "train.channels_last=true", f"train.compile={compile_}"]
    steps, warmup = (10**6, 1) if ctx.tiny else (200, 3 if compile_ else 10)  # the slot stops the steps
    row = measure(load_config("configs/default.yaml", over), steps, warmup, deadline)
    ctx.rates.setdefault("full_loop_img_s", row["full_loop_img_s"])
    return {"overrides": over, **row}


def train_speed(ctx: Context, deadline: float) -> dict:
    return _speed(ctx, deadline, compile_=False)


def train_speed_compile(ctx: Context, deadline: float) -> dict:
    return _speed(ctx, deadline, compile_=True)


def infer_speed(ctx: Context, deadline: float) -> dict:
    from bench.infer_throughput import measure
    from pipeline.core.config import load_config
    from pipeline.core.tta import TTA_SETS

    over = [*ctx.overrides(), "train.amp=bf16"]
    folds, batch, repeats = (2, 4, 1000) if ctx.tiny else (5, 16, 20)
    workers = 1 if ctx.tiny else -1
    row = measure(
        load_config("configs/default.yaml", over), folds, "d4", batch, workers, repeats, ctx.device, deadline
    )
    ctx.rates["forward_img_s"] = (
        row["bare_forward_img_s"] * folds * len(TTA_SETS["d4"])
    )  # one model, one view
    return {"overrides": over, **row}


def epochs_that_fit(
    ctx: Context, seconds: float, train_tiles: int, val_tiles: int, test_tiles: int
) -> tuple[int, str]:
    """Epochs of fold 0 that fit in ``seconds``, from rates measured in this run (never assumed): the
    full-loop training rate, the forward rate (3x the training rate where infer_speed did not run), and
    after the first accuracy part its measured seconds per epoch and fixed cost. Returns (epochs, how)."""
    full = ctx.rates["full_loop_img_s"]
    forward = ctx.rates.get("forward_img_s", 3 * full)
    if "epoch_s" in ctx.rates:  # measured by the short run: validation, checkpoints and curves included
        per_epoch, fixed = ctx.rates["epoch_s"], ctx.rates["fixed_s"]
        how = f"{per_epoch:.2f} s per epoch and {fixed:.0f} s of fixed cost, measured by accuracy_short"
        use = 0.85
    else:  # the first run: steps at the measured rates, twice over for what they leave out
        per_epoch = 2 * (train_tiles / full + val_tiles / forward) + 0.5
        fixed = 15 + 2 * 8 * (val_tiles + test_tiles) / forward
        how = f"~{per_epoch:.2f} s per epoch from {full:.0f} img/s training and {forward:.0f} img/s forward"
        use = 0.6
    return max(1, min(200, int((use * seconds - fixed) / per_epoch))), how


def _accuracy(ctx: Context, deadline: float, label: str) -> dict:
    from bench.accuracy import evaluate_recipe
    from pipeline.core.config import load_config
    from pipeline.data.folds import resolve_folds
    from pipeline.data.layouts import read_source
    from pipeline.runs.history import read_metrics

    if "full_loop_img_s" not in ctx.rates:
        return {"status": "skipped: no training rate measured (train_speed did not run)"}
    base = [*ctx.overrides(), f"train.runs_dir={ctx.tmp / 'runs'}"]
    cfg0 = load_config("configs/default.yaml", base)
    source = read_source(cfg0.data)
    folds = resolve_folds(cfg0, source, ctx.tmp / "folds-probe", announce=False)
    val = int((folds["fold"] == 0).sum())
    epochs, how = epochs_that_fit(ctx, deadline - time.monotonic(), len(folds) - val, val, len(source.test))
    over = [*base, f"train.epochs={epochs}", f"name=gpu-{label}-{epochs}e"]
    t0 = time.monotonic()
    row = evaluate_recipe(
        load_config("configs/default.yaml", over), ctx.tmp / "subs", ctx.device, [0], [("fold0", "d4")]
    )
    seconds = time.monotonic() - t0
    metrics = read_metrics(ctx.tmp / "runs" / f"gpu-{label}-{epochs}e" / "fold0")
    epoch_s = float(metrics["seconds"].mean())
    ctx.rates.setdefault("epoch_s", epoch_s)
    ctx.rates.setdefault("fixed_s", max(0.0, seconds - float(metrics["seconds"].sum())))
    return {
        "overrides": over,
        "epochs": epochs,
        "epochs_sized_from": how,
        "seconds_per_epoch": round(epoch_s, 2),
        "minutes": round(seconds / 60, 2),
        **row,
    }


def accuracy_short(ctx: Context, deadline: float) -> dict:
    return _accuracy(ctx, deadline, "short")


def accuracy_long(ctx: Context, deadline: float) -> dict:
    return _accuracy(ctx, deadline, "long")


def models(ctx: Context, deadline: float) -> dict:
    from bench.models import GPU_BASE, measure_all

    base = ["model.encoder_weights=null"]
    if ctx.tiny:  # the default model with a stem-only encoder: the code path, not a figure
        base, size, bs, steps, warmup, wanted = (
            ["train.device=cpu", *base],
            64,
            2,
            10**6,
            1,
            ["u-net / resnet34"],
        )
        tail = ["model.decoder_channels=[8]"]
    else:
        base, size, bs, steps, warmup, wanted, tail = [*GPU_BASE, *base], 512, 16, 20, 5, [], []
    rows = measure_all(base, size, bs, steps, warmup, wanted, deadline, tail)
    cut = [
        r
        for r in rows
        if "skipped" in r or min(r.get("train_steps_timed", 0), r.get("infer_batches_timed", 0)) < steps
    ]
    return {
        "overrides": base,
        "image_size": size,
        "batch_size": bs,
        "models": rows,
        "stopped_at_deadline": bool(cut),
    }


PARTS = [
    Part("train_speed", {"gpu": 45, "tiny": 6}, train_speed, "train step: model-only vs full loop"),
    Part("train_speed_compile", {"gpu": 90, "tiny": 60}, train_speed_compile, "the same, train.compile=true"),
    Part("infer_speed", {"gpu": 45, "tiny": 6}, infer_speed, "inference: bare forwards vs submit, D4"),
    Part("accuracy_short", {"gpu": 100, "tiny": 25}, accuracy_short, "default recipe, fold 0, short budget"),
    Part("accuracy_long", {"gpu": 140, "tiny": 40}, accuracy_long, "default recipe, fold 0, longer budget"),
    Part("models", {"gpu": 50, "tiny": 6}, models, "every architecture: train/infer img/s"),
]


# ----------------------------------------------------------------------------- the run


def _alarm(signum: int, frame: Any) -> None:
    raise PartTimeout


def run_part(part: Part, ctx: Context, slot: float) -> dict:
    """Run ``part`` with a deadline ``slot`` seconds from now and a hard stop :data:`GRACE_S` later."""
    start = time.monotonic()
    deadline = start + slot
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, slot + GRACE_S)
    try:
        out = part.run(ctx, deadline)
        late = time.monotonic() - deadline
        status = out.pop("status", "done")
        if status == "done" and out.get("stopped_at_deadline"):
            status = "done: its steps stopped at the slot's end"
        if status.startswith("done") and late >= 1:
            status += f" ({late:.0f} s past its slot)"
    except PartTimeout:
        out, status = {}, f"stopped: still running {GRACE_S:.0f} s after its {slot:.0f} s slot"
    except SystemExit as e:  # the trainer saves last.pt and exits 130 on a signal
        out, status = {}, f"stopped: exit {e.code}"
    except Exception as e:  # a part that fails must not cost the others their figures
        traceback.print_exc()
        out, status = {}, f"failed: {type(e).__name__}: {e}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    return {**out, "status": status, "slot_s": slot, "seconds": round(time.monotonic() - start, 1)}


def run_check(
    ctx: Context, budget: float, parts: Sequence[Part], log: Callable[[str], None]
) -> dict[str, Any]:
    """Every part whose slot and hard stop fit in what is left of ``budget`` (seconds since :data:`T0`), in
    order: even a part that ignores its deadline ends before the budget does."""
    mode = "tiny" if ctx.tiny else "gpu"
    results: dict[str, Any] = {}
    for part in parts:
        left = budget - (time.monotonic() - T0) - RESERVE_S
        slot = part.slot[mode]
        if left < slot + GRACE_S:
            results[part.name] = {
                "status": f"skipped: its {slot:.0f} s slot does not fit in the {max(0, left):.0f} s left"
            }
            log(
                f"skip {part.name} ({part.what}): needs {slot:.0f} s (+{GRACE_S:.0f} s hard stop), "
                f"{max(0, left):.0f} s left of the budget"
            )
            continue
        log(f"{part.name} ({part.what}): up to {slot:.0f} s, {left:.0f} s left of the budget")
        results[part.name] = run_part(part, ctx, slot)
        log(f"{part.name}: {results[part.name]['status']} in {results[part.name]['seconds']} s")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--out", default="", help="folder for gpu.json (default: bench/results, as gpu-<device>.json)"
    )
    p.add_argument(
        "--budget", type=float, default=0, help="seconds from bench/gpu.sh's start (default 480; --tiny 60)"
    )
    p.add_argument(
        "--data", default="", help="the real tiles (default .gpu/buildings-real, else ../shared/...)"
    )
    p.add_argument("--parts", default="", help="comma-separated part names (default: all, in order)")
    p.add_argument("--tiny", action="store_true", help="CPU, generated 64 px tiles: the test suite's check")
    a = p.parse_args(argv)
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    budget = a.budget or (60.0 if a.tiny else 480.0)
    wanted = [s.strip() for s in a.parts.split(",") if s.strip()]
    unknown = sorted(set(wanted) - {pt.name for pt in PARTS})
    if unknown:
        p.error(f"unknown parts {unknown}; the parts are {', '.join(pt.name for pt in PARTS)}")
    parts = [pt for pt in PARTS if not wanted or pt.name in wanted]

    def log(line: str) -> None:
        print(f"[{time.monotonic() - T0:6.1f} s] {line}", flush=True)

    import torch

    import bench.accuracy
    import bench.infer_throughput
    import bench.models
    import bench.train_throughput  # noqa: F401 - start-up (torch, timm, smp: seconds) before any part's slot
    from bench.common import device_info, real_data_dir, tiny_data
    from pipeline.core.io import atomic_write_text

    device = torch.device("cpu" if a.tiny else "cuda")
    if not a.tiny and not torch.cuda.is_available():
        p.error("no CUDA GPU is visible; --tiny runs the same code on CPU")
    info = device_info(device)
    log(f"device: {info['gpu'] or info['cpu']}; budget {budget:.0f} s from the process start, "
        f"{time.monotonic() - T0:.0f} s gone on start-up")  # fmt: skip
    mode = "tiny" if a.tiny else "gpu"
    log(
        "plan: "
        + ", ".join(f"{pt.name} {pt.slot[mode]:.0f} s" for pt in parts)
        + f" (+{GRACE_S:.0f} s hard stop each)"
    )
    with tempfile.TemporaryDirectory(prefix="buildseg-gpu-") as tmp:
        if a.tiny:
            data = tiny_data(Path(tmp), size=64, n_train=16, n_test=8)
        else:
            carried = Path(".gpu/buildings-real")
            data = Path(a.data) if a.data else carried if carried.is_dir() else real_data_dir()
        ctx = Context(a.tiny, Path(data), Path(tmp), str(device))
        results = run_check(ctx, budget, parts, log)
    report = {
        "benchmark": "bench.gpu: every README figure still to be measured, capped by a device budget",
        "command": "python -m bench.gpu " + " ".join(sys.argv[1:] if argv is None else argv),
        "budget_s": budget,
        "seconds": round(time.monotonic() - T0, 1),
        "data": str(data) if not a.tiny else "generated 64 px tiles (--tiny)",
        **info,
        "parts": results,
    }
    if info["gpu"] is None:
        report["note"] = "CPU check of the script (--tiny); no GPU figure"
    slug = (info["gpu"] or "cpu-tiny").lower().replace(" ", "-")
    out = Path(a.out) / "gpu.json" if a.out else Path(__file__).parent / "results" / f"gpu-{slug}.json"
    atomic_write_text(out, json.dumps(report, indent=1) + "\n")
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
