"""Every CPU-side stage at growing size: wall time, peak RSS, disk, and the growth exponent over N.

    python -m bench.scale [--sizes 1000,3000,10000,30000] [--test 2500] [--work DIR]   # make bench-scale

Data: generated 512x512 tiles in the competition layout (valid JPEGs, RLE masks: rectangles on a
smooth background, about 10% building pixels), N training tiles and ``--test`` test tiles. Each stage
runs in a fresh child process, so its peak RSS (``ru_maxrss``) is its own:

* ``check_data``: the whole folder (every tile decoded); ``mask_cache``: the decoded-mask memmap
  (time, disk); ``folds``: ``make folds``; ``data_path``: decode + default augmentation, images/s of
  one DataLoader worker at 512 px, and the workers needed to feed the H100 step (535 img/s bf16,
  716 with compile, measured elsewhere); ``tune``: threshold x min-area search over N OOF tiles
  (synthetic probabilities, 5 fold files); ``submit_cpu``: threshold, components, RLE and CSV of the
  test tiles given probabilities;
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
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from bench.common import device_info, write_result

H100_STEP_IMG_S = {"bf16 + channels_last": 535, "bf16 + channels_last + compile": 716}
TILE = 512


# ----------------------------------------------------------------------------- data


def _tile(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A 512 px RGB tile (smooth background, bright rectangles) and its 0/1 mask."""
    low = rng.integers(40, 140, (8, 8, 3), dtype=np.uint8)
    rgb = np.asarray(Image.fromarray(low).resize((TILE, TILE), Image.BILINEAR)).copy()
    mask = np.zeros((TILE, TILE), np.uint8)
    for _ in range(int(rng.integers(0, 9))):
        y, x = rng.integers(0, TILE - 20, 2)
        h, w = rng.integers(10, 80, 2)
        mask[y : y + h, x : x + w] = 1
    rgb[mask == 1] = rgb[mask == 1] // 2 + 120
    return rgb, mask


def generate(root: Path, n_train: int, n_test: int, seed: int = 0) -> None:
    """The competition layout with ``n_train`` + ``n_test`` tiles; tiles already there are kept."""
    from pipeline.data import rle
    from pipeline.data.maskcsv import format_csv

    rng = np.random.default_rng(seed)
    for split, n, csv in (("train", n_train, "train_mask.csv"), ("test_a", n_test, "test_a_mask.csv")):
        (root / split).mkdir(parents=True, exist_ok=True)
        rows = []
        for i in range(n):
            name = f"{split}_{i:06d}.jpg"
            rgb, mask = _tile(np.random.default_rng([seed, i, split == "train"]))
            path = root / split / name
            if not path.is_file():
                Image.fromarray(rgb).save(path, quality=90)
            rows.append((name, rle.encode(mask)))
        (root / csv).write_text(format_csv(rows))
        if split == "test_a":
            (root / "test_a_samplesubmit.csv").write_text(format_csv((n, "") for n, _ in rows))
    del rng


# ----------------------------------------------------------------------------- stages (child side)


def _stage_check_data(root: Path, _: dict) -> dict:
    from pipeline.data.check import check_dataset

    report = check_dataset(root)
    return {"errors": len(report.errors)}


def _stage_mask_cache(root: Path, _: dict) -> dict:
    from pipeline.core.config import DataConfig
    from pipeline.data.layouts import read_source
    from pipeline.data.masks import cache_dir

    read_source(DataConfig(root=str(root)), with_test=False)
    return {"disk_mb": round(sum(p.stat().st_size for p in cache_dir().glob("masks-*")) / 2**20, 1)}


def _stage_folds(root: Path, _: dict) -> dict:
    from pipeline.data.folds import write_folds

    write_folds(root, out=root / "folds.csv")
    return {}


def _stage_data_path(root: Path, opts: dict) -> dict:
    import torch

    from pipeline.core.config import AugConfig, DataConfig
    from pipeline.data.dataset import SegDataset, build_transforms
    from pipeline.data.layouts import read_source

    torch.set_num_threads(1)  # one DataLoader worker = one process on one core
    train = read_source(DataConfig(root=str(root)), with_test=False).train
    n = min(len(train), opts.get("data_path_tiles", 300))
    ds = SegDataset(train.subset(range(n)), build_transforms(AugConfig(), True), seed=0)
    ds[0]
    t0 = time.perf_counter()
    for i in range(n):
        ds[i]
    per_worker = n / (time.perf_counter() - t0)
    return {
        "tiles": n,
        "img_s_per_worker": round(per_worker, 1),
        "workers_to_feed_h100": {k: int(np.ceil(v / per_worker)) for k, v in H100_STEP_IMG_S.items()},
    }


def _stage_make_oof(root: Path, _: dict) -> dict:
    """Synthetic OOF files for every training tile (not timed as a pipeline stage)."""

    from pipeline.core.config import Config, DataConfig, save_config
    from pipeline.data.folds import load_folds, save_folds
    from pipeline.data.layouts import read_source
    from pipeline.runs.oof import oof_writer

    run = root / "run"
    shutil.rmtree(run, ignore_errors=True)
    train = read_source(DataConfig(root=str(root)), with_test=False).train
    folds = load_folds(root / "folds.csv", train.names)
    save_config(Config(name="scale", data=DataConfig(root=str(root))), _mkdir(run) / "config.yaml")
    save_folds(run / "folds.csv", folds)
    rng = np.random.default_rng(0)
    for k in sorted(folds["fold"].unique()):
        names = folds.loc[folds["fold"] == k, "name"].tolist()
        split = train.select(names)
        with oof_writer(_mkdir(run / f"fold{k}") / "oof.npz", names, "probs") as write:
            for lo in range(0, len(names), 64):
                m = np.asarray(split.subset(range(lo, min(lo + 64, len(names)))).masks)
                noise = rng.integers(0, 90, m.shape, dtype=np.uint8)
                write(list(range(lo, lo + len(m))), (m * 150 + noise).astype(np.uint8))
    return {}


def _stage_tune(root: Path, _: dict) -> dict:
    from pipeline.core.config import load_config
    from pipeline.data.layouts import read_source
    from pipeline.train.tune import tune_run

    cfg = load_config(root / "run" / "config.yaml")
    tuned = tune_run(cfg, read_source(cfg.data, with_test=False), root / "run")
    return {"oof_tiles": tuned["n_oof"], "oof_dice": round(tuned["oof_dice"], 4)}


def _stage_submit_cpu(root: Path, _: dict) -> dict:
    """Threshold, small components, RLE and the CSV for the test tiles, given their probabilities."""
    from pipeline.core.config import DataConfig
    from pipeline.core.io import atomic_write
    from pipeline.data.layouts import read_source
    from pipeline.infer.submit import _encode

    test = read_source(DataConfig(root=str(root)), with_train=False).test
    rng = np.random.default_rng(1)
    masks = test.masks
    seconds, rows = 0.0, []
    for lo in range(0, len(test), 64):
        m = np.asarray(test.subset(range(lo, min(lo + 64, len(test)))).masks)
        probs = (m * 150 + rng.integers(0, 90, m.shape, dtype=np.uint8)).astype(np.uint8)
        t0 = time.perf_counter()
        for i, p in enumerate(probs):
            rows.append((test.names[lo + i], _encode((p > 127).astype(np.uint8), 16)))
        seconds += time.perf_counter() - t0
    t0 = time.perf_counter()
    with atomic_write(root / "scale-submission.csv", "w") as f:
        f.writelines(f"{n}\t{r}\n" for n, r in rows)
    seconds += time.perf_counter() - t0
    del masks
    return {
        "tiles": len(rows),
        "cpu_seconds": round(seconds, 2),
        "tiles_per_s": round(len(rows) / seconds, 1),
    }


def _write_scene(path: Path, size: int, width: int | None = None) -> None:
    """A size x width (default square) RGB GeoTIFF with a projected CRS, written strip by strip."""
    import rasterio
    from affine import Affine
    from rasterio.windows import Window

    width = width or size
    profile = dict(driver="GTiff", height=size, width=width, count=3, dtype="uint8", tiled=True)
    profile.update(blockxsize=512, blockysize=512, compress="deflate", crs="EPSG:32631")
    profile["transform"] = Affine(0.3, 0, 431250.0, 0, -0.3, 5411200.0)
    rng = np.random.default_rng(size)
    with rasterio.open(path, "w", **profile) as dst:
        for r in range(0, size, TILE):
            h = min(TILE, size - r)
            strip = np.concatenate([_tile(rng)[0] for _ in range(-(-width // TILE))], axis=1)[:h, :width]
            dst.write(np.moveaxis(strip, -1, 0), window=Window(0, r, width, h))


def _stage_make_tiles(root: Path, opts: dict) -> dict:
    from pipeline.geo.tiling import make_tiles

    scenes = root / "scenes"
    summary = make_tiles(scenes / "images", scenes / "gt", root / "tiles", TILE, 0, 90)
    return {"tiles": len(summary.names), "scene_px": opts["scene"]}


def _stage_predict_scene(root: Path, opts: dict) -> dict:
    from pipeline.geo.scene import predict_scene

    h, w = opts["height"], opts["width"]
    src, dst = root / f"scene{h}x{w}.tif", root / f"mask{h}x{w}.tif"
    stats = predict_scene(src, dst, lambda t: t[..., 0] / np.float32(255), 512, 128, 8)
    return {"height": h, "width": w, "windows": stats.n_tiles, "accumulator_rows": stats.accumulator_rows}


def _stage_model_window(root: Path, _: dict) -> dict:
    """Seconds per 512 px window of a small real model (U-Net/ResNet18, fp32, CPU, batch 8)."""
    import torch

    from pipeline.core.config import load_config
    from pipeline.model.registry import build_model

    cfg = load_config(None, ["model.encoder=resnet18", "model.encoder_weights=null", "train.device=cpu"])
    model = build_model(cfg, pretrained=False).eval()
    x = torch.randint(0, 255, (8, 3, TILE, TILE), dtype=torch.uint8)
    with torch.no_grad():
        model(x)
        t0 = time.perf_counter()
        model(x)
    return {"model": "Unet/resnet18 fp32 CPU", "s_per_window": round((time.perf_counter() - t0) / 8, 3)}


def _stage_forward_memory(root: Path, opts: dict) -> dict:
    """Peak RSS of one inference forward of ``images`` 512 px tiles (default U-Net/ResNet34, fp32, CPU)."""
    import torch

    from pipeline.core.config import load_config
    from pipeline.model.registry import build_model

    cfg = load_config(None, ["model.encoder_weights=null", "train.device=cpu"])
    model = build_model(cfg, pretrained=False).eval()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    x = torch.randint(0, 255, (opts["images"], 3, TILE, TILE), dtype=torch.uint8)
    with torch.no_grad():
        model(x)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    model_name = "Unet/resnet34 fp32 CPU"
    return {"images": opts["images"], "model": model_name, "forward_mb": round(peak - before, 1)}


STAGES = {
    "check_data": _stage_check_data,
    "mask_cache": _stage_mask_cache,
    "folds": _stage_folds,
    "data_path": _stage_data_path,
    "make_oof": _stage_make_oof,
    "tune": _stage_tune,
    "submit_cpu": _stage_submit_cpu,
    "make_tiles": _stage_make_tiles,
    "predict_scene": _stage_predict_scene,
    "model_window": _stage_model_window,
    "forward_memory": _stage_forward_memory,
}


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


class _AnonPeak:
    """The peak of RssAnon (private, non-file memory) sampled every 20 ms from /proc/self/status.

    ``ru_maxrss`` also counts the pages of memory-mapped files (the decoded-mask cache), which the
    kernel can drop at any time; RssAnon is the memory that really has to fit.
    """

    def __init__(self) -> None:
        import threading

        self.peak_kb, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        self.peak_kb = max(self.peak_kb, int(line.split()[1]))

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return round(self.peak_kb / 1024, 1)


def _child(stage: str, root: Path, opts: dict) -> None:
    anon = _AnonPeak()
    t0 = time.perf_counter()
    out = STAGES[stage](root, opts)
    out["seconds"] = round(time.perf_counter() - t0, 2)
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    out["peak_anon_mb"] = anon.stop()
    print("RESULT " + json.dumps(out), flush=True)


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
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    p.add_argument("--root", default="", help=argparse.SUPPRESS)
    p.add_argument("--opts", default="{}", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        _child(a.child, Path(a.root), json.loads(a.opts))
        return 0
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="buildseg-scale-"))
    sizes = [int(s) for s in a.sizes.split(",") if s]
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
        stages["submit_cpu"] = run_stage("submit_cpu", root, cache)
        stages["disk_mb"] = round(sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) / 2**20, 1)
        result["per_size"][str(n)] = stages
        write_result(a.out, result)  # after every size: a long run that stops keeps what it measured
    per = result["per_size"]
    done = [n for n in sizes if str(n) in per]
    result["growth_exponent"] = {
        s: growth(done, [per[str(n)][s]["seconds"] for n in done])
        for s in ("check_data", "mask_cache", "folds", "tune", "submit_cpu")
    }
    result["scenes"] = scenes(work, [int(s) for s in a.scenes.split(",") if s])
    result["forward_memory"] = [run_stage("forward_memory", work, work, images=n) for n in (1, 8, 16, 32)]
    write_result(a.out, result)
    if not a.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def scenes(work: Path, sizes: Sequence[int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    root = _mkdir(work / "scenes-bench")
    (root / "scenes" / "images").mkdir(parents=True, exist_ok=True)
    (root / "scenes" / "gt").mkdir(parents=True, exist_ok=True)
    _write_scene(root / "scenes" / "images" / "s5000.tif", 5000)
    _write_gt(root / "scenes" / "gt" / "s5000.tif", 5000)
    out["make_tiles"] = run_stage("make_tiles", root, root, scene=5000)
    base = min(sizes)
    # Height grows at a fixed width (memory must stay flat), then width grows at a fixed height.
    shapes = [(h, base) for h in sizes] + [(base, w) for w in sizes if w != base]
    window = run_stage("model_window", root, root)
    out["model_window"] = window
    for h, w in shapes:
        _write_scene(root / f"scene{h}x{w}.tif", h, w)
        r = run_stage("predict_scene", root, root, height=h, width=w)
        r["extrapolated_model_seconds"] = round(r["windows"] * window["s_per_window"])
        out[f"predict_scene_{h}x{w}"] = r
        (root / f"scene{h}x{w}.tif").unlink()
    return out


def _write_gt(path: Path, size: int) -> None:
    import rasterio
    from affine import Affine

    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        height=size,
        width=size,
        count=1,
        dtype="uint8",
        crs="EPSG:32631",
        transform=Affine(0.3, 0, 431250.0, 0, -0.3, 5411200.0),
        tiled=True,
        blockxsize=512,
        blockysize=512,
        compress="deflate",
    ) as dst:
        gt = np.zeros((size, size), np.uint8)
        gt[::50, :] = 255
        dst.write(gt[None])


def device_info_cpu() -> dict[str, Any]:
    import torch

    info = device_info(torch.device("cpu"))
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    info["machine_name"] = f"{os.cpu_count()} CPU cores, {round(ram)} GiB RAM"
    return info


if __name__ == "__main__":
    sys.exit(main())
