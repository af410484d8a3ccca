"""Vectorising a large mask window by window: wall time and peak memory; regularisation measured on the
real masks (``make bench-footprints``).

    python -m bench.footprints [--size 10000] [--windows 1024,2048] [--skip-regularize]
    python -m bench.footprints --only-regularize [--tiles 448]

Generates a ``size`` x ``size`` building mask (a GeoTIFF with a UTM CRS, 30 cm pixels): about one
building per 70 x 70 px cell, rectangles of 8-50 px rotated at random and some L shapes, placed so that
many cross window edges. Each window size is then vectorised by ``python -m pipeline.infer.footprints --mask``
(what ``make footprints MASK=`` runs) in a fresh process: its wall time, start-up included, and its peak
RSS (``ru_maxrss`` of that child's ``resource`` usage, from ``os.wait4``). The same for a process that
only imports the module, so the part the vectorising adds can be read off. Checks that the polygon
count equals the mask's 8-connected component count.

Regularisation (:func:`regularisation`): ``none`` / ``rectangle`` / ``full`` on the real training masks
(``../shared/data/buildings-real``) laid out as mosaics of 8 x 8 tiles with 16 px of background between
tiles (a building is never joined to one of another tile), vectorised window by window as ``make footprints``
does, and scored per building against the exact outlines of the same masks: mean IoU of the matched
buildings, precision / recall / F1 at IoU >= 0.5, vertices per building, milliseconds per building. The
predictions stand in for a model's: the true mask itself (``true``), the mask blurred (Gaussian 1.5 px,
then >= 0.5: rounded corners, ``blur``) and blurred with edges moved by a smooth random field
(``wobble``: up to ~2 px, correlated along the edge, what a CNN's outlines look like). Writes
``bench/results/footprints.json``.
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
    p.add_argument("--tiles", type=int, default=0, help="regularisation: first N real masks (0 = all)")
    p.add_argument("--skip-regularize", action="store_true", help="only the generated-mask timing")
    p.add_argument("--only-regularize", action="store_true", help="only regularisation on the real masks")
    p.add_argument("--make-mask", nargs=2, metavar=("PATH", "SIZE"), help=argparse.SUPPRESS)
    p.add_argument("--regularize-json", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.make_mask:  # in a child process: the parent stays small (see measure)
        print(json.dumps(write_mask(Path(a.make_mask[0]), int(a.make_mask[1]))))
        return 0
    if a.regularize_json:  # in a child process too: the real masks and polygons stay out of the parent
        from bench.common import real_data_dir

        Path(a.regularize_json).write_text(json.dumps(regularisation(real_data_dir(), a.tiles)))
        return 0
    result: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        if not a.only_regularize:
            result.update(_timing(Path(tmp), a.size, a.windows))
        if not a.skip_regularize:
            reg = Path(tmp) / "regularize.json"
            cmd = [
                sys.executable,
                "-m",
                "bench.footprints",
                "--regularize-json",
                str(reg),
                "--tiles",
                str(a.tiles),
            ]
            run = measure(cmd)
            if run["rc"] != 0:
                raise SystemExit(f"regularisation bench failed: {run['output']}")
            result["regularize"] = {**json.loads(reg.read_text()), "seconds": run["seconds"]}
    return _write(result)


def _timing(tmp: Path, size: int, windows: str) -> dict:
    """The generated ``size``^2 mask vectorised by the CLI in a fresh process per window size."""
    path = tmp / "mask.tif"
    made = measure([sys.executable, "-m", "bench.footprints", "--make-mask", str(path), str(size)])
    mask_info = json.loads(made["output"][-1])
    print(f"{size}x{size} mask: {mask_info}, made in {made['seconds']} s")
    imports = measure([sys.executable, "-c", "import pipeline.infer.footprints"])
    print(f"python -c 'import pipeline.infer.footprints': {imports}")
    runs = []
    for window in [int(w) for w in windows.split(",")]:
        out = tmp / f"b{window}.gpkg"
        cmd = [sys.executable, "-m", "pipeline.infer.footprints", "--mask", str(path), "--out", str(out)]
        run = {"window": window, **measure([*cmd, "--window", str(window)])}
        run["polygons"] = _count(out) if run["rc"] == 0 else None
        run["polygons_equal_components"] = run["polygons"] == mask_info["buildings"]
        print(run)
        runs.append(run)
    return {
        "size": size,
        **mask_info,
        "imports_only": {k: imports[k] for k in ("seconds", "peak_rss_mb")},
        "runs": runs,
    }


# ----------------------------------------------------------------------------- regularisation on real masks

MOSAIC = 8  # tiles per side of a mosaic
GAP = 16  # px of background between tiles in a mosaic


def degrade(mask: Any, kind: str, seed: int) -> Any:
    """A stand-in prediction uint8 [H, W] of a true 0/1 mask: ``true``, ``blur`` or ``wobble`` (see above)."""
    import cv2
    import numpy as np

    if kind == "true":
        return mask
    p = cv2.GaussianBlur(mask.astype(np.float32), (0, 0), 1.5, borderType=cv2.BORDER_REFLECT)
    if kind == "wobble":
        z = cv2.GaussianBlur(
            np.random.default_rng(seed).standard_normal(mask.shape).astype(np.float32), (0, 0), 2.0
        )
        p = p + 0.4 * (z / z.std()) * 4 * p * (1 - p)  # only where the blur is unsure: along the edges
    return (p >= 0.5).astype(np.uint8)


def mosaics(masks: list[Any], size: int = 512) -> Any:
    """Yield (first tile index, mosaic uint8 [S, S]) of ``MOSAIC`` x ``MOSAIC`` masks, ``GAP`` px apart."""
    import numpy as np

    step = size + GAP
    per = MOSAIC * MOSAIC
    for start in range(0, len(masks), per):
        group = masks[start : start + per]
        rows = -(-len(group) // MOSAIC)
        out = np.zeros((rows * step - GAP, MOSAIC * step - GAP), np.uint8)
        for k, m in enumerate(group):
            r, c = divmod(k, MOSAIC)
            out[r * step : r * step + size, c * step : c * step + size] = m
        yield start, out


def _vertices(geoms: Any) -> Any:
    """Corners per building: coordinates less each ring's closing repeat."""
    import numpy as np
    import shapely

    rings = shapely.get_num_interior_rings(geoms) + shapely.get_num_geometries(geoms)
    return np.asarray(shapely.get_num_coordinates(geoms) - rings)


def regularisation(
    data: Path, n_tiles: int = 0, modes: tuple[str, ...] = ("none", "rectangle", "full")
) -> dict:
    """Per-building scores of each regularisation mode against the truth, for each stand-in prediction."""
    import time

    import numpy as np

    from pipeline.data import rle
    from pipeline.data.masks import read_mask_csv
    from pipeline.geo.vectorize import VectorizeOptions, vectorize_array
    from pipeline.metrics import buildings

    table = read_mask_csv(data / "train_mask.csv", require_rle=False)
    if n_tiles:
        table = table.iloc[:n_tiles]
    masks = [rle.decode(r, (512, 512)) for r in table["rle"]]
    truth = [
        g
        for _, m in mosaics(masks)
        for g in vectorize_array(m, options=VectorizeOptions(simplify=0)).geometry
    ]
    out: dict = {"tiles": len(masks), "true_buildings": len(truth), "predictions": {}}
    for kind in ("true", "blur", "wobble"):
        pred_masks = [degrade(m, kind, seed=i) for i, m in enumerate(masks)]
        rows = {}
        for mode in modes:
            opts = VectorizeOptions(regularize=mode)
            t0 = time.perf_counter()
            pred = [g for _, m in mosaics(pred_masks) for g in vectorize_array(m, options=opts).geometry]
            seconds = time.perf_counter() - t0
            geoms = np.array(pred, dtype=object)
            match = buildings.match_polygons(geoms, np.array(truth, dtype=object))
            tp = len(match.iou)
            p, r = tp / max(len(pred), 1), tp / max(len(truth), 1)
            rows[mode] = {
                "iou_matched": round(float(match.iou.mean()), 4) if tp else None,
                "precision": round(p, 4),
                "recall": round(r, 4),
                "f1": round(2 * p * r / max(p + r, 1e-12), 4),
                "vertices_per_building": round(float(_vertices(geoms).mean()), 2),
                "buildings": len(pred),
                "vectorise_ms_per_building": round(1000 * seconds / max(len(pred), 1), 3),
            }
            print(f"{kind:6} {mode:9} {rows[mode]}", flush=True)
        out["predictions"][kind] = rows
    return out


def _count(path: Path) -> int:
    import pyogrio

    return int(pyogrio.read_info(path)["features"])


def _write(result: dict) -> int:
    import torch  # only now: a large parent would inflate the children's ru_maxrss

    from bench.common import RESULTS, device_info, write_result

    path = RESULTS / "footprints.json"
    previous = json.loads(path.read_text()) if path.is_file() else {}
    merged = {
        "benchmark": "footprints: vectorise a mask GeoTIFF window by window (make footprints); "
        "regularisation on the real masks",
        **{k: v for k, v in previous.items() if k not in ("benchmark", "machine")},  # a part not re-run
        **result,
        "machine": device_info(torch.device("cpu")),  # the processor named by bench.common.cpu_name
    }
    print(f"-> {write_result('footprints.json', merged)}")
    runs = result.get("runs", [])
    return 0 if all(r["rc"] == 0 and r["polygons_equal_components"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
