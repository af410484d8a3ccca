"""Many scenes (``make predict-scenes``): one process against a two-"node" gloo job on this machine, and a
killed job run again (``make bench-scenes``).

    python -m bench.scenes [--work DIR] [--sizes 2048,2560,...]

Scenes: 8 mosaics of the real training tiles (``../shared/data/buildings-real``, 512 px JPEGs) of
2,048 to 6,000 px, cut side by side from one virtual mosaic (a tile grid) with a UTM CRS and 0.3 m
pixels, every other neighbour overlapping by 256 px, the others touching: the merged footprints cross
both kinds of border. Model: U-Net with a tiny encoder (``tu-mobilenetv3_small_050``, decoder
32-16-16-8-8, 0.4 M parameters, ``encoder_weights: null``) trained briefly on the real tiles (fold 0 of
2, 2 epochs of 28 steps of 8 random 256-px crops: enough for blob-shaped buildings, not for accuracy; a
randomly initialised one predicts thousands of specks per tile); 512 px windows with 128 px of overlap,
TTA none. Nothing derived from the data is kept: scenes, run and outputs live
in ``--work`` (a temporary folder by default).

Measured, each job in fresh processes: wall time; peak RSS per rank (each rank prints its own
``ru_maxrss``); that the two-node job writes exactly what one process writes (every mask byte of every
scene, every polygon and attribute of ``buildings.gpkg``); and that a two-node job killed (SIGKILL to
both "nodes") once some scenes were finished redoes only the unfinished ones when run again, ending with
the same outputs. Writes ``bench/results/scenes.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SIZES = (2048, 2048, 2560, 2560, 3072, 3584, 4096, 6000)
TILE = 512
OVERLAP = 256  # px shared by every other pair of neighbouring scenes
PIXEL = 0.3  # m
ORIGIN = (600_000.0, 3_500_000.0)  # UTM 50N (EPSG:32650)
TINY = [
    "model.encoder=tu-mobilenetv3_small_050",
    "model.encoder_weights=null",
    "model.decoder_channels=[32,16,16,8,8]",
    "data.n_folds=2",
    "data.num_workers=0",
    "train.device=cpu",
    "data.crop_size=256",
    "train.epochs=2",
    "train.batch_size=8",
    "optim.warmup_epochs=0",
]


def train_run(work: Path, data: Path) -> Path:
    """The tiny model of the module notes (minutes on 2 cores), reused if already in ``work``.

    Its manifest is written here, not by ``make tune``: tuning compares the OOF maps (crop-sized) with the
    512-px masks and refuses them; the bench needs a model, not a tuned threshold (0.5, min_area 32).
    """
    import dataclasses

    from pipeline.core.config import InferConfig
    from pipeline.runs.manifest import Manifest, write_manifest

    run = work / "runs" / "tiny-real"
    if not (run / "fold0" / "best.pt").is_file():
        cmd = [sys.executable, "-m", "pipeline.train", "--folds", "0", "name=tiny-real", f"data.root={data}"]
        cmd += [f"train.runs_dir={work / 'runs'}", *TINY]
        subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})  # its tune step fails
    infer = dataclasses.replace(InferConfig(), tta="none", threshold=0.5, min_area=32)
    write_manifest(Manifest(run, ("fold0/best.pt",), infer, 1, str(data)))
    return run


def layout(sizes: tuple[int, ...]) -> list[tuple[str, int, int]]:
    """(name, first column in the virtual mosaic, side) of each scene, side by side along one row."""
    out, col = [], 0
    for k, side in enumerate(sizes):
        out.append((f"scene{k}_{side}", col, side))
        col += side - (OVERLAP if k % 2 == 0 else 0)  # overlap after even scenes, touch after odd ones
    return out


def write_scenes(folder: Path, data: Path, sizes: tuple[int, ...]) -> list[dict[str, Any]]:
    """The scenes as JPEG-compressed GeoTIFFs: pixel (row, col) of the virtual mosaic is pixel
    (row % 512, col % 512) of tile ``(row // 512 * 97 + col // 512 * 13) % n`` of the sorted train tiles."""
    import numpy as np
    import rasterio
    from affine import Affine
    from PIL import Image

    tiles = sorted((data / "train").glob("*.jpg"))
    cache: dict[int, Any] = {}

    def tile(i: int, j: int) -> Any:
        k = (i * 97 + j * 13) % len(tiles)
        if k not in cache:
            cache[k] = np.asarray(Image.open(tiles[k]).convert("RGB"))
        return cache[k]

    folder.mkdir(parents=True, exist_ok=True)
    scenes = []
    for name, col0, side in layout(sizes):
        scenes.append({"name": name, "side": side, "first_column": col0})
        if (folder / f"{name}.tif").is_file():  # written by an earlier run with --work: the same pixels
            continue
        rgb = np.empty((side, side, 3), np.uint8)
        for i in range(-(-side // TILE)):
            for j in range(col0 // TILE, -(-(col0 + side) // TILE)):
                r0, c0 = i * TILE, max(j * TILE, col0)
                c1, r1 = min((j + 1) * TILE, col0 + side), min((i + 1) * TILE, side)
                rgb[r0:r1, c0 - col0 : c1 - col0] = tile(i, j)[: r1 - r0, c0 - j * TILE : c1 - j * TILE]
        transform = Affine(PIXEL, 0, ORIGIN[0] + col0 * PIXEL, 0, -PIXEL, ORIGIN[1])
        profile = dict(driver="GTiff", height=side, width=side, count=3, dtype="uint8", crs="EPSG:32650")
        profile.update(transform=transform, tiled=True, compress="jpeg", photometric="ycbcr", jpeg_quality=90)
        with rasterio.open(folder / f"{name}.tif", "w", **profile) as dst:
            dst.write(np.moveaxis(rgb, -1, 0))
    return scenes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def commands(run: Path, scenes: Path, out: Path, nodes: int) -> list[list[str]]:
    """One process, or one torchrun "node" (one process each) per ``nodes``, over loopback."""
    args = ["-m", "pipeline.infer.area", "--run-dir", str(run), "--scenes", str(scenes), "--out", str(out)]
    args += ["--device", "cpu"]
    if nodes == 1:
        return [[sys.executable, *args]]
    port = _free_port()
    return [
        [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nodes}", f"--node_rank={k}"]
        + ["--master_addr=127.0.0.1", f"--master_port={port}", "--nproc_per_node=1", *args]
        for k in range(nodes)
    ]


def launch(cmds: list[list[str]], env: dict[str, str]) -> list[subprocess.Popen]:
    pipe = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True, "cwd": ROOT, "env": env}
    return [subprocess.Popen(c, start_new_session=True, **pipe) for c in cmds]


def job(cmds: list[list[str]], env: dict[str, str]) -> dict[str, Any]:
    """Run the processes of one job to the end: wall time, return codes, logs, each rank's peak RSS."""
    t0 = time.perf_counter()
    procs = launch(cmds, env)
    logs = [p.communicate()[0] for p in procs]
    rss = [float(m.replace(",", "")) for log in logs for m in re.findall(r"peak RSS ([\d,]+) MB", log)]
    return {
        "seconds": round(time.perf_counter() - t0, 1),
        "rc": [p.returncode for p in procs],
        "peak_rss_mb_per_rank": rss,
        "scenes_per_rank": [
            int(m) for log in logs for m in re.findall(r"rank \d+ of \d+: (\d+) scenes?,", log)
        ],
        "log_tail": [log.strip().splitlines()[-3:] for log in logs],
    }


def same_outputs(a: Path, b: Path) -> dict[str, Any]:
    """Every mask byte and every polygon (and attribute) of two OUT folders."""
    import geopandas as gpd

    masks = sorted(p.name for p in (a / "scenes").glob("*.tif"))
    bytes_equal = all((a / "scenes" / m).read_bytes() == (b / "scenes" / m).read_bytes() for m in masks)
    fa, fb = (gpd.read_file(d / "buildings.gpkg") for d in (a, b))
    polygons = len(fa) == len(fb) and all(x.equals_exact(y, 0) for x, y in zip(fa.geometry, fb.geometry))
    attributes = fa.drop(columns="geometry").equals(fb.drop(columns="geometry"))
    return {"masks": len(masks), "mask_bytes_equal": bytes_equal, "buildings": len(fa),
            "polygons_equal": polygons, "attributes_equal": attributes}  # fmt: skip


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts its workers in sessions of their own: killing the
    launcher's process group leaves them running)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def killed_and_rerun(run: Path, scenes: Path, out: Path, env: dict[str, str], after: int) -> dict[str, Any]:
    """One process (one thread, as each torchrun process has) killed with SIGKILL, with all it started,
    once ``after`` scenes are finished; then the same command again."""
    cmds = commands(run, scenes, out, 1)
    procs = launch(cmds, env)
    markers: list[str] = []
    while len(markers) < after and all(p.poll() is None for p in procs):
        time.sleep(0.2)
        markers = sorted(p.stem for p in (out / "scenes").glob("*.json")) if (out / "scenes").is_dir() else []
    for p in procs:
        for pid in [p.pid, *_descendants(p.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        p.communicate()
    finished = sorted(p.stem for p in (out / "scenes").glob("*.json"))
    again = job(cmds, env)
    summary = json.loads((out / "summary.json").read_text())
    return {
        "finished_when_killed": finished,
        "redone": sorted(summary["done"]),
        "skipped": sorted(summary["skipped"]),
        "redid_only_the_unfinished": sorted(summary["skipped"]) == finished
        and not set(summary["done"]) & set(finished)
        and len(summary["done"]) + len(finished) == summary["scenes"],
        "rerun": again,
    }


PARTS = ("one_process", "two_nodes", "kill_and_rerun")


def measure(part: str, run: Path, work: Path, kill_after: int) -> dict[str, Any]:
    """One part of the bench in ``work`` (its outputs are kept there for the comparisons)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "BUILDSEG_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    out = work / part
    if out.exists():
        shutil.rmtree(out)
    load = os.getloadavg()
    if part == "kill_and_rerun":
        result = killed_and_rerun(run, work / "scenes", out, env, kill_after)
    else:
        # one process uses every core; torchrun gives each of its processes one thread when unset
        nodes, threads = (1, os.cpu_count() or 1) if part == "one_process" else (2, 1)
        result = job(commands(run, work / "scenes", out, nodes), {**env, "OMP_NUM_THREADS": str(threads)})
        result["torch_threads_per_rank"] = threads
    return {**result, "load_average_before": [round(x, 2) for x in load]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.scenes")
    p.add_argument("--work", default="", help="folder for scenes, run and outputs (default: a temporary one)")
    p.add_argument("--sizes", default=",".join(map(str, SIZES)))
    p.add_argument("--kill-after", type=int, default=3, help="finished scenes before the kill")
    p.add_argument("--parts", default=",".join(PARTS), help="parts to (re)measure; the others are kept")
    p.add_argument("--prepare", action="store_true", help="only train the model and write the scenes")
    a = p.parse_args(argv)
    from bench.common import real_data_dir

    data = real_data_dir()
    sizes = tuple(int(s) for s in a.sizes.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(a.work or tmp)
        t0 = time.perf_counter()
        run = train_run(work, data)
        scenes = write_scenes(work / "scenes", data, sizes)
        print(f"run {run}, {len(scenes)} scenes in {time.perf_counter() - t0:.0f} s", flush=True)
        if a.prepare:
            return 0
        results: dict[str, Any] = {}
        for part in a.parts.split(","):
            results[part] = measure(part, run, work, a.kill_after)
            print(part, results[part], flush=True)
        for a_, b_ in (("one_process", "two_nodes"), ("kill_and_rerun", "two_nodes")):
            if (work / a_ / "buildings.gpkg").is_file() and (work / b_ / "buildings.gpkg").is_file():
                results[f"{b_}_equal_{a_}"] = same_outputs(work / a_, work / b_)
                print(b_, "equal", a_, results[f"{b_}_equal_{a_}"], flush=True)
        merged = json.loads((work / "one_process" / "summary.json").read_text())["merged"]
    return _write(scenes, results, merged)


def _write(scenes: list[dict[str, Any]], results: dict[str, Any], merged: dict[str, Any]) -> int:
    import torch

    from bench.common import RESULTS, device_info, write_result

    path = RESULTS / "scenes.json"
    kept = json.loads(path.read_text()) if path.is_file() else {}
    result = {
        "benchmark": "make predict-scenes: one process vs two gloo 'nodes' on one machine; kill and rerun",
        "model": "U-Net, tu-mobilenetv3_small_050 encoder (0.4 M parameters, encoder_weights null), decoder "
        "32-16-16-8-8, trained 2 epochs x 28 steps of 8 256-px crops on fold 0 of the real tiles; 512 px "
        "windows, 128 px overlap, TTA none",
        "scenes": scenes,
        "megapixels": round(sum(s["side"] ** 2 for s in scenes) / 1e6, 1),
        "merged": {k: v for k, v in merged.items() if k != "path"},
        **{k: v for k, v in kept.items() if k in PARTS},  # parts not re-run
        **results,
        "gpu": "scenes per hour per GPU: to be measured (no GPU lent to this task)",
        "machine": device_info(torch.device("cpu")),  # the processor named by bench.common.cpu_name
    }
    print(f"-> {write_result('scenes.json', result)}")
    e = result.get("two_nodes_equal_kill_and_rerun")  # one thread per process in both: every byte equal
    ok = e is None or (e["mask_bytes_equal"] and e["polygons_equal"] and e["attributes_equal"])
    return 0 if ok and result.get("kill_and_rerun", {}).get("redid_only_the_unfinished", True) else 1


if __name__ == "__main__":
    sys.exit(main())
