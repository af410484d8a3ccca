"""The child side of :mod:`bench.scale`: generated data and every stage it measures, each run in a fresh
process (``python -m bench.scale --child <stage>``) so that its peak RSS is its own; see
:mod:`bench.scale` for what each stage is and the results."""

from __future__ import annotations

import json
import resource
import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image


def gpu_step_rates(results: Path = Path(__file__).parent / "results") -> dict[str, float]:
    """Training img/s of every GPU step measured here (``bench/results/gpu-*.json`` of ``bench.gpu``), keyed
    ``<gpu>, <part>``. Two rates once copied in (535 and 716 img/s, "an H100, measured elsewhere") had no
    record in this repository and are gone: only measured files count."""
    rates = {}
    for path in sorted(results.glob("gpu-*.json")):
        report = json.loads(path.read_text())
        for part in ("train_speed", "train_speed_compile"):
            rate = report.get("parts", {}).get(part, {}).get("full_loop_img_s")
            if report.get("gpu") and rate:
                rates[f"{report['gpu']}, {part}"] = rate
    return rates


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
        "workers_to_feed_gpu_step": {k: int(np.ceil(v / per_worker)) for k, v in gpu_step_rates().items()},
    }


def _stage_make_oof(root: Path, opts: dict) -> dict:
    """Synthetic OOF files for every training tile (not timed as a pipeline stage); ``opts``: the run's
    folder name (default ``run``) and the seed of its noise."""

    from pipeline.core.config import Config, DataConfig, save_config
    from pipeline.data.folds import load_folds, save_folds
    from pipeline.data.layouts import read_source
    from pipeline.runs.oof import oof_writer

    run = root / opts.get("run", "run")
    shutil.rmtree(run, ignore_errors=True)
    train = read_source(DataConfig(root=str(root)), with_test=False).train
    folds = load_folds(root / "folds.csv", train.names)
    save_config(Config(name="scale", data=DataConfig(root=str(root))), mkdir(run) / "config.yaml")
    save_folds(run / "folds.csv", folds)
    rng = np.random.default_rng(opts.get("seed", 0))
    for k in sorted(folds["fold"].unique()):
        names = folds.loc[folds["fold"] == k, "name"].tolist()
        split = train.select(names)
        with oof_writer(mkdir(run / f"fold{k}") / "oof.npz", names, "probs") as write:
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


def _stage_blend(root: Path, _: dict) -> dict:
    """``make blend`` of the two synthetic runs (their manifests written first: no checkpoints exist)."""
    import dataclasses

    from pipeline.core.config import InferConfig
    from pipeline.infer.blend import blend_runs
    from pipeline.runs.manifest import Manifest, write_manifest

    runs = [root / "run", root / "run2"]
    for run in runs:
        ckpts = tuple(sorted(f"{p.parent.name}/best.pt" for p in run.glob("fold*/oof.npz")))
        infer = dataclasses.replace(InferConfig(), tta="none")
        write_manifest(Manifest(run, ckpts, infer, 1, str(root), {}))
    result = blend_runs(runs, root / "blend")
    return {
        "oof_tiles": result.manifest.oof["n_oof"],
        "weights": list(result.weights.values()),
        "oof_dice": round(result.oof_dice, 4),
        "oof_dice_nested": round(result.oof_dice_nested, 4),
    }


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


def write_scene(path: Path, size: int, width: int | None = None) -> None:
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


def _stage_submit_memory(root: Path, opts: dict) -> dict:
    """``make submit`` of ``root``'s test tiles (512 px) with TTA set ``opts["tta"]``: one fold of the
    default U-Net/ResNet34 (random weights: memory does not depend on them), fp32 on CPU, batch 32, the
    default ``infer.max_images``; the child's peak RSS is the figure."""
    import tempfile

    from bench.infer_throughput import make_run
    from pipeline.core.config import load_config
    from pipeline.core.tta import TTA_SETS
    from pipeline.infer.submit import make_submission
    from pipeline.runs.manifest import load_manifest

    over = [f"data.root={root}", "model.encoder_weights=null", "train.device=cpu"]
    cfg = load_config(None, over)
    with tempfile.TemporaryDirectory() as tmp:
        manifest = load_manifest(make_run(cfg, Path(tmp) / "run", 1, opts["tta"], cfg.infer.batch_size))
        res = make_submission(manifest, cfg.data, Path(tmp) / "subs", opts["tta"], "cpu")
    views = len(TTA_SETS[opts["tta"]])
    return {"tta": opts["tta"], "views": views, "tiles": res.rows, "max_images": cfg.infer.max_images,
            "batch_size": cfg.infer.batch_size, "overrides": over}  # fmt: skip


STAGES = {
    "check_data": _stage_check_data,
    "mask_cache": _stage_mask_cache,
    "folds": _stage_folds,
    "data_path": _stage_data_path,
    "make_oof": _stage_make_oof,
    "tune": _stage_tune,
    "blend": _stage_blend,
    "submit_cpu": _stage_submit_cpu,
    "make_tiles": _stage_make_tiles,
    "predict_scene": _stage_predict_scene,
    "model_window": _stage_model_window,
    "forward_memory": _stage_forward_memory,
    "submit_memory": _stage_submit_memory,
}


def mkdir(p: Path) -> Path:
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


def child(stage: str, root: Path, opts: dict) -> None:
    anon = _AnonPeak()
    t0 = time.perf_counter()
    out = STAGES[stage](root, opts)
    out["seconds"] = round(time.perf_counter() - t0, 2)
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    out["peak_anon_mb"] = anon.stop()
    print("RESULT " + json.dumps(out), flush=True)


def write_gt(path: Path, size: int) -> None:
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
