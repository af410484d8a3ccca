"""Vectorising a large mask window by window: wall time and peak memory (``make bench-footprints``).

    python -m bench.footprints [--size 10000] [--windows 1024,2048]

Generates a ``size`` x ``size`` building mask (a GeoTIFF with a UTM CRS, 30 cm pixels): about one
building per 70 x 70 px cell, rectangles of 8-50 px rotated at random and some L shapes, placed so that
many cross window edges. Each window size is then vectorised by ``python -m pipeline.infer.footprints --mask``
(what ``make footprints MASK=`` runs) in a fresh process: its wall time, start-up included, and its peak
RSS (``ru_maxrss`` of that child's ``resource`` usage, from ``os.wait4``). The same for a process that
only imports the module, so the part the vectorising adds can be read off. Checks that the polygon
count equals the mask's 8-connected component count. Writes ``bench/results/footprints.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CELL = 70  # px per building cell: 10,000 px -> 142 x 142 = 20,164 cells


def make_mask(size: int, seed: int = 0) -> Any:
    """uint8 0/1 [size, size]: one rotated rectangle (every 5th an L) per ``CELL`` cell, jittered."""
    import cv2
    import numpy as np

    rng = np.random.default_rng(seed)
    mask = np.zeros((size, size), dtype=np.uint8)
    n = size // CELL
    for i in range(n):
        for j in range(n):
            cy, cx = (i + 0.5) * CELL + rng.uniform(-12, 12), (j + 0.5) * CELL + rng.uniform(-12, 12)
            w, h, angle = rng.uniform(8, 50), rng.uniform(8, 50), rng.uniform(0, 180)
            box = cv2.boxPoints(((cx, cy), (w, h), angle))
            cv2.fillPoly(mask, [np.rint(box).astype(np.int32)], 1)
            if (i * n + j) % 5 == 0:  # an L: a second wing from one corner
                wing = cv2.boxPoints(((cx + w / 3, cy + h / 3), (w / 2, h), angle))
                cv2.fillPoly(mask, [np.rint(wing).astype(np.int32)], 1)
    return mask


def write_mask(path: Path, size: int) -> dict:
    """Write :func:`make_mask` as a tiled GeoTIFF; its building (component) count and fraction."""
    import cv2
    import rasterio
    from affine import Affine

    mask = make_mask(size)
    profile = dict(
        driver="GTiff",
        height=size,
        width=size,
        count=1,
        dtype="uint8",
        tiled=True,
        blockxsize=256,
        blockysize=256,
        compress="deflate",
        crs="EPSG:32631",
        transform=Affine(0.3, 0, 431250.0, 0, -0.3, 5411200.0),
    )
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(mask, 1)
    return {
        "buildings": cv2.connectedComponents(mask, connectivity=8)[0] - 1,
        "building_fraction": round(float(mask.mean()), 4),
    }


def _cpu_name() -> str | None:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), None)


def measure(cmd: list[str]) -> dict:
    """Run ``cmd`` in the repository root; its wall time and peak RSS (``os.wait4``: this child only).

    Linux keeps the high-water RSS across fork and exec, so a child of a large process reports at least
    the parent's size: this module imports nothing large before its children have run.
    """
    env = {**os.environ, "PYTHONPATH": str(ROOT), "BUILDSEG_PROGRESS": "0"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {
        "rc": proc.returncode,
        "seconds": round(time.perf_counter() - t0, 2),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),  # KiB on Linux
        "output": out.strip().splitlines()[-1:] if out.strip() else [],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.footprints")
    p.add_argument("--size", type=int, default=10_000)
    p.add_argument("--windows", default="1024,2048")
    p.add_argument("--make-mask", nargs=2, metavar=("PATH", "SIZE"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.make_mask:  # in a child process: the parent stays small (see measure)
        print(json.dumps(write_mask(Path(a.make_mask[0]), int(a.make_mask[1]))))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mask.tif"
        made = measure([sys.executable, "-m", "bench.footprints", "--make-mask", str(path), str(a.size)])
        mask_info = json.loads(made["output"][-1])
        print(f"{a.size}x{a.size} mask: {mask_info}, made in {made['seconds']} s")
        imports = measure([sys.executable, "-c", "import pipeline.infer.footprints"])
        print(f"python -c 'import pipeline.infer.footprints': {imports}")
        runs = []
        for window in [int(w) for w in a.windows.split(",")]:
            out = Path(tmp) / f"b{window}.gpkg"
            cmd = [sys.executable, "-m", "pipeline.infer.footprints", "--mask", str(path), "--out", str(out)]
            run = {"window": window, **measure([*cmd, "--window", str(window)])}
            run["polygons"] = _count(out) if run["rc"] == 0 else None
            run["polygons_equal_components"] = run["polygons"] == mask_info["buildings"]
            print(run)
            runs.append(run)
    return _write(a.size, mask_info, imports, runs)


def _count(path: Path) -> int:
    import pyogrio

    return int(pyogrio.read_info(path)["features"])


def _write(size: int, mask_info: dict, imports: dict, runs: list[dict]) -> int:
    import torch  # only now: a large parent would inflate the children's ru_maxrss

    from bench.common import device_info, write_result

    result = {
        "benchmark": "footprints: vectorise a mask GeoTIFF window by window (make footprints)",
        "size": size,
        **mask_info,
        "imports_only": {k: imports[k] for k in ("seconds", "peak_rss_mb")},
        "runs": runs,
        "machine": {**device_info(torch.device("cpu")), "cpu": _cpu_name()},
    }
    print(f"-> {write_result('footprints.json', result)}")
    return 0 if all(r["rc"] == 0 and r["polygons_equal_components"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
