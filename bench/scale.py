"""Every CPU-side stage at growing size: wall time, peak RSS, disk, and the growth exponent over N.

    python -m bench.scale [--sizes 1000,3000,10000,30000] [--test 2500] [--work DIR]   # make bench-scale

Data: generated 512x512 tiles in the competition layout (valid JPEGs, RLE masks: rectangles on a
smooth background, about 10% building pixels), N training tiles and ``--test`` test tiles. Each stage
runs in a fresh child process, so its peak RSS (``ru_maxrss``) is its own:

* ``check_data``: the whole folder (every tile decoded); ``mask_cache``: the decoded-mask memmap
  (time, disk); ``folds``: ``make folds``; ``data_path``: decode + default augmentation, images/s of
  one DataLoader worker at 512 px, and the workers needed to feed each GPU training step measured by
  ``python -m bench.gpu`` (``bench/results/gpu-*.json``, full-loop img/s; none until a GPU has run it);
  ``tune``: threshold x min-area search over N OOF tiles
  (synthetic probabilities, 5 fold files); ``blend``: ``make blend`` of that run and a second one
  (other noise) over N OOF tiles: the 0.1 weight grid, the threshold search, the nested estimate;
  ``submit_cpu``: threshold, components, RLE and CSV of the test tiles given probabilities;
* once: ``make_tiles`` on a 5000 x 5000 GeoTIFF scene with a CRS, and ``predict_scene`` on 5k, 10k
  and 20k square scenes with a trivial predict function (memory and the I/O + blending cost), plus
  the per-window time of a small real model at 512 px to extrapolate a real run's time (said so);
  ``forward_memory``: the RSS one inference forward adds for 1, 8, 16 and 32 tiles of 512 px (what
  ``infer.max_images`` bounds).

Results: ``bench/results/scale.json`` with the machine named.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import device_info, write_result
from bench.scale_stages import child, generate, mkdir, write_gt, write_scene

# ----------------------------------------------------------------------------- parent side


def run_stage(stage: str, root: Path, cache: Path, **opts: Any) -> dict:
    env = {**os.environ, "BUILDSEG_CACHE": str(cache), "NO_ALBUMENTATIONS_UPDATE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "bench.scale",
        "--child",
        stage,
        "--root",
        str(root),
        "--opts",
        json.dumps(opts),
    ]
    out = subprocess.run(
        cmd, capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[1]
    )
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode or not lines:
        raise RuntimeError(f"stage {stage} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    result = json.loads(lines[-1].removeprefix("RESULT "))
    print(f"  {stage}: {result}", flush=True)
    return result


def growth(ns: Sequence[int], values: Sequence[float]) -> float | None:
    """The exponent b of values ~ N^b, least squares in log-log (None with fewer than 2 sizes)."""
    if len(ns) < 2 or min(values) <= 0:
        return None
    return round(float(np.polyfit(np.log(ns), np.log(values), 1)[0]), 3)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1000,3000,10000,30000", help="training tiles per data set")
    p.add_argument("--test", type=int, default=2500, help="test tiles (the competition's test_a size)")
    p.add_argument("--scenes", default="5000,10000,20000", help="predict-scene sizes (px, square)")
    p.add_argument("--work", default="", help="working folder (default: a temporary one, removed after)")
    p.add_argument("--out", default="scale.json")
    p.add_argument(
        "--only", default="", help="per-size stages to measure alone (e.g. blend), merged into --out"
    )
    p.add_argument(
        "--submit-memory",
        action="store_true",
        help="only the peak RSS of make submit per TTA set (4 tiles of 512 px), merged into --out",
    )
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    p.add_argument("--root", default="", help=argparse.SUPPRESS)
    p.add_argument("--opts", default="{}", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        child(a.child, Path(a.root), json.loads(a.opts))
        return 0
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="buildseg-scale-"))
    sizes = [int(s) for s in a.sizes.split(",") if s]
    if a.submit_memory:
        merge_result(a.out, {"submit_memory": submit_memory(work)})
        return 0
    if a.only:
        measure_only(work, sizes, a.test, a.only.split(","), a.out)
        return 0
    result: dict[str, Any] = {"sizes": sizes, "test_tiles": a.test, "per_size": {}, **device_info_cpu()}
    for n in sizes:
        root = work / f"n{n}"
        t0 = time.perf_counter()
        generate(root, n, a.test)
        print(f"N={n}: generated in {time.perf_counter() - t0:.0f}s", flush=True)
        cache = work / f"cache{n}"
        shutil.rmtree(cache, ignore_errors=True)  # mask_cache measures the decode, not a cache hit
        cache.mkdir(parents=True)
        stages = {s: run_stage(s, root, cache) for s in ("check_data", "mask_cache", "folds", "data_path")}
        if len(list((root / "run").glob("fold*/oof.npz"))) < 5:  # synthetic, deterministic: made once
            run_stage("make_oof", root, cache)
        stages["tune"] = run_stage("tune", root, cache)
        if len(list((root / "run2").glob("fold*/oof.npz"))) < 5:
            run_stage("make_oof", root, cache, run="run2", seed=1)
        stages["blend"] = run_stage("blend", root, cache)
        stages["submit_cpu"] = run_stage("submit_cpu", root, cache)
        stages["disk_mb"] = round(sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) / 2**20, 1)
        result["per_size"][str(n)] = stages
        write_result(a.out, result)  # after every size: a long run that stops keeps what it measured
    per = result["per_size"]
    done = [n for n in sizes if str(n) in per]
    result["growth_exponent"] = {
        s: growth(done, [per[str(n)][s]["seconds"] for n in done])
        for s in ("check_data", "mask_cache", "folds", "tune", "blend", "submit_cpu")
    }
    result["scenes"] = scenes(work, [int(s) for s in a.scenes.split(",") if s])
    result["forward_memory"] = [run_stage("forward_memory", work, work, images=n) for n in (1, 8, 16, 32)]
    result["submit_memory"] = submit_memory(work)
    write_result(a.out, result)
    if not a.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def submit_memory(work: Path, tiles: int = 4) -> list[dict]:
    """Peak RSS of ``make submit`` for every TTA set on ``tiles`` generated 512 px tiles, each in a fresh
    process; each row records its overrides, the machine, when it was measured and the 1-minute load
    average around it."""
    from pipeline.core.tta import TTA_SETS

    root = work / "submit-memory"
    generate(root, 0, tiles)
    machine = {k: v for k, v in device_info_cpu().items() if k in ("device", "machine_name", "torch")}
    rows = []
    for tta in TTA_SETS:
        before = round(os.getloadavg()[0], 2)
        row = run_stage("submit_memory", root, mkdir(work / "cache-submit"), tta=tta)
        after = round(os.getloadavg()[0], 2)
        rows.append(
            {**row, **machine, "measured": time.strftime("%Y-%m-%d %H:%M"), "load_1min": [before, after]}
        )
    return rows


def merge_result(out: str, rows: dict[str, Any]) -> None:
    """Merge top-level ``rows`` into ``bench/results/<out>`` (the rest stays as measured)."""
    from bench.common import RESULTS

    path = RESULTS / out
    result = json.loads(path.read_text()) if path.is_file() else {}
    write_result(out, {**result, **rows})


def measure_only(work: Path, sizes: Sequence[int], test: int, only: Sequence[str], out: str) -> None:
    """Measure the per-size stages ``only`` alone and merge them into ``bench/results/<out>``: a new stage's
    row without the hour of a full run. Each merged row records when it was measured and the 1-minute load
    average at its start and end; the file is re-read before each write, so the other rows stay as they
    are. Data and OOF files are made if missing."""
    from bench.common import RESULTS

    path = RESULTS / out
    for n in sizes:
        root, cache = work / f"n{n}", mkdir(work / f"cache{n}")
        generate(root, n, test)
        if not (root / "folds.csv").is_file():
            run_stage("folds", root, cache)
        for run, seed in (("run", 0), ("run2", 1)):
            if len(list((root / run).glob("fold*/oof.npz"))) < 5:
                run_stage("make_oof", root, cache, run=run, seed=seed)
        for stage in only:
            before = round(os.getloadavg()[0], 2)
            row = run_stage(stage, root, cache)
            row.update(
                measured=time.strftime("%Y-%m-%d %H:%M"), load_1min=[before, round(os.getloadavg()[0], 2)]
            )
            result = json.loads(path.read_text()) if path.is_file() else {"sizes": [], "per_size": {}}
            result["per_size"].setdefault(str(n), {})[stage] = row
            done = [k for k in result["per_size"] if stage in result["per_size"][k]]
            seconds = [result["per_size"][k][stage]["seconds"] for k in done]
            result.setdefault("growth_exponent", {})[stage] = growth([int(k) for k in done], seconds)
            write_result(out, result)


def scenes(work: Path, sizes: Sequence[int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    root = mkdir(work / "scenes-bench")
    (root / "scenes" / "images").mkdir(parents=True, exist_ok=True)
    (root / "scenes" / "gt").mkdir(parents=True, exist_ok=True)
    write_scene(root / "scenes" / "images" / "s5000.tif", 5000)
    write_gt(root / "scenes" / "gt" / "s5000.tif", 5000)
    out["make_tiles"] = run_stage("make_tiles", root, root, scene=5000)
    base = min(sizes)
    # Height grows at a fixed width (memory must stay flat), then width grows at a fixed height.
    shapes = [(h, base) for h in sizes] + [(base, w) for w in sizes if w != base]
    window = run_stage("model_window", root, root)
    out["model_window"] = window
    for h, w in shapes:
        write_scene(root / f"scene{h}x{w}.tif", h, w)
        r = run_stage("predict_scene", root, root, height=h, width=w)
        r["extrapolated_model_seconds"] = round(r["windows"] * window["s_per_window"])
        out[f"predict_scene_{h}x{w}"] = r
        (root / f"scene{h}x{w}.tif").unlink()
    return out


def device_info_cpu() -> dict[str, Any]:
    import torch

    info = device_info(torch.device("cpu"))
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    info["machine_name"] = f"{os.cpu_count()} CPU cores, {round(ram)} GiB RAM"
    return info


if __name__ == "__main__":
    sys.exit(main())
