"""``make predict-scenes``: every scene of an area on every rank of a torchrun job, resumable, and one
footprints file for the whole area.

    python -m pipeline.infer.area --run-dir runs/<run> --scenes scenes/ --out area/ [--format gpkg|parquet]
    torchrun --nnodes 2 --node_rank k --master_addr host --master_port 29500 --nproc_per_node N \
        -m pipeline.infer.area ...                                        # what make's LAUNCH runs

Rank 0 lists the scenes (a folder, searched recursively, or a glob), opens each (readable, 8-bit RGB,
with a CRS: a scene that fails is named in the summary and the others go on), skips the finished ones,
and shares the rest among the ranks, largest first, each to the rank with the fewest pixels so far, so
the slowest scene does not come last. Each rank loads the run's ensemble once and, per scene, writes
``OUT/scenes/<scene>.tif`` (the mask, a COG, atomically), then ``OUT/scenes/<scene>.gpkg|.parquet``
(its footprints; buildings cut by the scene's border as exact pixel outlines, so that the merge joins
them exactly), then ``OUT/scenes/<scene>.json``: the marker that records the scene's size and mtime,
the run (its manifest and checkpoints) and the settings. A re-run of the same command (after a kill,
or on other machines) redoes only scenes without a matching marker; a changed scene, run or setting
is redone, never skipped. Rank 0 then merges every scene's footprints into ``OUT/buildings.<format>``
(:func:`pipeline.geo.merge.merge_scenes`: one CRS, each building once) and writes ``OUT/summary.json``.

``OUT/job.json`` names the run: an OUT of another run is refused unless ``--force``. A multi-class run
writes masks only. The ranks share the scenes, not a model: a scene is predicted by one process.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import hashlib
import json
import resource
import sys
import time
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from pipeline.core.device import Dist, close_distributed, init_distributed
from pipeline.core.errors import BuildsegError, cli
from pipeline.core.io import atomic_write_text, remove_stale_temps
from pipeline.core.progress import format_duration, progress
from pipeline.geo.tiling import open_raster
from pipeline.geo.vectorize import VectorizeOptions
from pipeline.infer import footprints as fp
from pipeline.runs.manifest import Manifest, latest_run, load_manifest

SCENE_SUFFIXES = (".tif", ".tiff", ".jp2", ".png", ".jpg", ".jpeg", ".vrt")
FORMATS = {"gpkg": ".gpkg", "parquet": ".parquet"}  # --format -> suffix of the footprints files
JOB, SUMMARY, SCENES = "job.json", "summary.json", "scenes"
COMMAND = "make predict-scenes"


class AreaError(BuildsegError, ValueError):
    """Scenes or an output folder that cannot be used; the message names them and the fix."""


@dataclasses.dataclass(frozen=True)
class Scene:
    """A scene of the area as rank 0 found it: where, how large, where on Earth."""

    path: str
    name: str  # the file's stem: names its outputs
    height: int
    width: int
    size: int  # bytes and mtime: a changed file is predicted again
    mtime_ns: int
    crs: str
    transform: tuple[float, ...]


def list_scenes(spec: str) -> list[Path]:
    """The scene files of a folder (recursively) or a glob, sorted; scene names (stems) must be unique."""
    root = Path(spec)
    if root.is_dir():
        paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in SCENE_SUFFIXES)
    else:
        paths = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
    if not paths:
        kinds = ", ".join(SCENE_SUFFIXES)
        raise AreaError(f"SCENES={spec}: no scenes found ({kinds}); give a folder of scenes or a glob")
    by_name: dict[str, list[Path]] = {}
    for p in paths:
        by_name.setdefault(p.stem, []).append(p)
    twins = [" and ".join(map(str, ps)) for ps in by_name.values() if len(ps) > 1]
    if twins:
        raise AreaError(
            f"SCENES={spec}: {len(twins)} scene names are used twice ({'; '.join(twins[:3])}); outputs are "
            "named by scene: rename one of each, or run each folder as its own job"
        )
    return paths


def scenes_root(spec: str) -> Path:
    """The folder a SCENES folder or glob searches: the glob's part before its first wildcard."""
    if Path(spec).is_dir():
        return Path(spec)
    parts = Path(spec).parts
    first_wild = next((i for i, p in enumerate(parts) if any(c in p for c in "*?[")), len(parts))
    fixed = list(parts[:first_wild])
    return Path(*fixed) if fixed else Path(".")


def check_out(out: Path, spec: str) -> None:
    """OUT must not lie inside the scenes' folder: its masks would be read as scenes by the next run."""
    root = scenes_root(spec).resolve()
    if out.resolve() == root or out.resolve().is_relative_to(root):
        raise AreaError(
            f"OUT={out} is inside SCENES={spec}: the masks written there would be read as scenes next "
            "time; choose an OUT outside it"
        )


def run_stamp(manifest: Manifest) -> str:
    """A hash of the run: its manifest and every checkpoint's size and mtime (a retrained fold changes it)."""
    h = hashlib.sha256((manifest.run_dir / "manifest.yaml").read_bytes())
    for c in manifest.checkpoints:
        st = (manifest.run_dir / c).stat()
        h.update(f"{c}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def settings(manifest: Manifest, tta: str, opts: VectorizeOptions, fmt: str) -> dict[str, Any]:
    """What a scene's outputs depend on: the run, the TTA set, the footprint options (not the window
    they are read in) and the format; a marker records it, a different one redoes the scene."""
    vec = {k: v for k, v in dataclasses.asdict(opts).items() if k != "window"}
    return {
        "run": str(manifest.run_dir.resolve()),
        "run_stamp": run_stamp(manifest),
        "tta": tta,
        "footprints": vec if manifest.classes == 1 else None,
        "format": fmt,
    }


def check_job(out: Path, job: dict[str, Any], force: bool) -> None:
    """An existing OUT must be this run's (its ``job.json``) unless ``force``; nothing else is in it."""
    path = out / JOB
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = {"run": f"an unreadable {JOB}"}
        if old.get("run") != job["run"] and not force:
            raise AreaError(
                f"OUT={out} holds the scenes of another run ({old.get('run')}); choose another OUT, or "
                f"FORCE=1 (--force) to predict every scene again with {job['run']}"
            )
    elif out.is_dir() and any(out.iterdir()) and not force:
        raise AreaError(
            f"OUT={out} is not empty and is no predict-scenes output (no {JOB}); choose an empty or new "
            "folder, or FORCE=1 (--force) to write into it"
        )


def inspect(path: Path) -> Scene:
    """The :class:`Scene` of ``path``; a :class:`pipeline.geo.GeoError` (unreadable, not 8-bit RGB) or an
    :class:`AreaError` (no CRS) names what is wrong with it."""
    from pipeline.geo.tiling import check_rgb

    with open_raster(path) as src:
        check_rgb(src, path)
        if src.crs is None:
            raise AreaError(
                f"{path} has no CRS: its buildings cannot be placed among the others' (georeference it, "
                "e.g. gdal_edit.py -a_srs EPSG:xxxx -a_ullr ..., or predict it alone with make predict-scene)"
            )
        crs, transform, height, width = src.crs.to_string(), tuple(src.transform)[:6], src.height, src.width
    st = path.stat()
    return Scene(str(path), path.stem, height, width, st.st_size, st.st_mtime_ns, crs, transform)


def outputs(out: Path, name: str, fmt: str) -> dict[str, Path]:
    d = out / SCENES
    return {
        "mask": d / f"{name}.tif",
        "probs": d / f"{name}_probs.tif",
        "footprints": d / f"{name}{FORMATS[fmt]}",
        "marker": d / f"{name}.json",
    }


def finished(out: Path, scene: Scene, setup: dict[str, Any]) -> bool:
    """True when the scene's marker records this very scene file, run and settings, and its outputs exist."""
    paths = outputs(out, scene.name, setup["format"])
    try:
        marker = json.loads(paths["marker"].read_text())
    except (OSError, ValueError):
        return False
    same = marker.get("scene") == _plain(dataclasses.asdict(scene)) and marker.get("settings") == _plain(
        setup
    )
    needed = [paths["mask"]] + ([paths["footprints"]] if setup["footprints"] else [])
    return same and all(p.is_file() for p in needed)


def _plain(value: Any) -> Any:
    """``value`` as it comes back from JSON (tuples as lists), to compare with a marker."""
    return json.loads(json.dumps(value))


def share(scenes: Sequence[Scene], world: int) -> list[list[Scene]]:
    """Scenes per rank: largest first, each to the rank with the fewest pixels so far (ties: lowest rank)."""
    ranks: list[list[Scene]] = [[] for _ in range(world)]
    load = [0] * world
    for s in sorted(scenes, key=lambda s: (-s.height * s.width, s.name)):
        r = min(range(world), key=lambda k: (load[k], k))
        ranks[r].append(s)
        load[r] += s.height * s.width
    return ranks


def plan(paths: Sequence[Path], out: Path, setup: dict[str, Any], world: int) -> dict[str, Any]:
    """Rank 0's plan: the scenes per rank, the finished ones (skipped) and the failed ones (why)."""
    todo, done, failed = [], [], {}
    with progress(len(paths), "open scenes", unit="scene") as bar:
        for path in paths:
            bar.update(1)
            try:
                scene = inspect(path)
            except (BuildsegError, OSError) as e:  # one bad scene does not stop the others: it is named
                failed[str(path)] = str(e)
                continue
            (done if finished(out, scene, setup) else todo).append(scene)
    return {"ranks": share(todo, world), "skipped": done, "failed": failed}


# ----------------------------------------------------------------------------- one rank's scenes


def process(
    predictor: Any, scene: Scene, out: Path, setup: dict[str, Any], opts: VectorizeOptions, tag: str
) -> dict[str, Any]:
    """Predict one scene: its mask (COG), then its footprints, then its marker; returns its summary row."""
    t0 = time.monotonic()
    paths = outputs(out, scene.name, setup["format"])
    with_fp = setup["footprints"] is not None
    probs = paths["probs"] if with_fp else None  # read once for the buildings' attributes: no COG
    stats = predictor.predict(
        scene.path, paths["mask"], probs, COMMAND, f"{tag} predict {scene.name}", probs_cog=False
    )
    row: dict[str, Any] = {
        "scene": scene.name,
        "status": "done",
        "size": f"{scene.width} x {scene.height}",
        "building_fraction": round(stats.fraction, 4),
    }
    if with_fp:
        frame = fp.vectorize_raster(paths["mask"], paths["probs"], scene.name, opts)
        fp.write_footprints(frame, paths["footprints"])
        paths["probs"].unlink(missing_ok=True)  # its use was the buildings' probability attributes
        row["buildings"] = len(frame)
    row["seconds"] = round(time.monotonic() - t0, 1)
    marker = {"scene": dataclasses.asdict(scene), "settings": setup, "result": row}
    atomic_write_text(paths["marker"], json.dumps(marker, indent=1))
    return row


def run_rank(
    a: argparse.Namespace,
    manifest: Manifest,
    scenes: Sequence[Scene],
    setup: dict[str, Any],
    opts: VectorizeOptions,
    d: Dist,
) -> list[dict[str, Any]]:
    """This rank's scenes, one after the other; a scene that fails is recorded and the next one starts."""
    from rasterio.errors import RasterioError

    from pipeline.infer.scenes import ScenePredictor

    tag = f"rank {d.rank} of {d.world}"
    if not scenes:
        print(f"{tag}: no scene to predict", file=sys.stderr, flush=True)
        return []
    predictor = ScenePredictor(manifest, a.tta, a.device, d)
    pixels = sum(s.height * s.width for s in scenes)
    n = f"{len(scenes)} scene{'s' if len(scenes) > 1 else ''}"
    print(f"{tag}: {n}, {pixels / 1e6:,.2f} Mpx", file=sys.stderr, flush=True)
    rows = []
    for k, scene in enumerate(scenes, 1):
        try:
            row = process(predictor, scene, Path(a.out), setup, opts, tag)
        except (BuildsegError, OSError, RasterioError) as e:  # named in the summary; the others go on
            row = {"scene": scene.name, "status": "failed", "reason": str(e)}
        rows.append(row)
        what = (
            f"{row['size']} px, buildings {100 * row['building_fraction']:.1f} % of pixels"
            + (f", {row['buildings']:,} footprints" if "buildings" in row else "")
            + f", {format_duration(row['seconds'])}"
            if row["status"] == "done"
            else f"FAILED: {row['reason']}"
        )
        print(f"{tag}: scene {k}/{len(scenes)} {scene.name}: {what}", file=sys.stderr, flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(f"{tag}: finished its scenes, peak RSS {peak:,.0f} MB", file=sys.stderr, flush=True)
    return rows


# ----------------------------------------------------------------------------- rank 0: the whole area


def merge_area(
    out: Path, names: Sequence[str], fmt: str, crs: str | None, opts: VectorizeOptions
) -> tuple[Path, str, int]:
    """Every listed scene's footprints (in name order) -> ``OUT/buildings.<fmt>``; (path, note, count)."""
    from affine import Affine

    from pipeline.geo.merge import SceneExtent, merge_scenes

    frames, extents = [], []
    with progress(len(names), "merge: read footprints", unit="scene") as bar:
        for name in sorted(names):
            paths = outputs(out, name, fmt)
            scene = json.loads(paths["marker"].read_text())["scene"]
            frames.append(fp.read_footprints(paths["footprints"]))
            extents.append(
                SceneExtent(name, scene["crs"], Affine(*scene["transform"]), scene["height"], scene["width"])
            )
            bar.update(1)
    with progress(None, f"merge {sum(map(len, frames)):,} footprints of {len(frames)} scenes"):
        merged, note = merge_scenes(frames, extents, crs, opts)
    path = out / f"buildings{FORMATS[fmt]}"
    with progress(None, f"write {path}"):
        fp.write_footprints(merged, path)
    return path, note, len(merged)


def summarise(
    out: Path,
    found: int,
    skipped: Sequence[Scene],
    failed: dict[str, str],
    rows: list[dict[str, Any]],
    merged: dict[str, Any] | None,
) -> str:
    """Write ``OUT/summary.json``; the lines to print."""
    failed = {**failed, **{r["scene"]: r["reason"] for r in rows if r["status"] == "failed"}}
    done = [r for r in rows if r["status"] == "done"]
    summary = {
        "scenes": found,
        "done": [r["scene"] for r in done],
        "skipped": [s.name for s in skipped],
        "failed": failed,
        "results": rows,
        "merged": merged,
    }
    atomic_write_text(out / SUMMARY, json.dumps(summary, indent=1))
    lines = [
        f"{found} scenes: {len(done)} done, {len(skipped)} skipped (finished before), {len(failed)} failed"
    ]
    lines += [f"  failed: {name}: {why}" for name, why in failed.items()]
    if merged:
        lines.append(f"{merged['buildings']:,} buildings -> {merged['path']} ({merged['note']})")
    return "\n".join(lines)


def run_area(a: argparse.Namespace, d: Dist) -> int:
    """The job on this rank (every rank runs it; rank 0 plans, merges and summarises)."""
    import torch.distributed as dist

    out = Path(a.out)
    paths = list_scenes(a.scenes)
    check_out(out, a.scenes)
    manifest = load_manifest(a.run)
    tta = a.tta or manifest.infer.tta
    min_area = manifest.infer.min_area if a.min_area_px is None else a.min_area_px
    # cut buildings stay exact in each scene's footprints: the merge joins their pieces, then simplifies
    opts = dataclasses.replace(fp.options_of(a), min_area_px=min_area, exact_cut=True)
    setup = settings(manifest, tta, opts, a.format)
    check_job(out, {"run": setup["run"]}, a.force)
    # Every check above is deterministic: every rank passes them or stops on the same error.
    group = dist.new_group(backend="gloo", timeout=timedelta(days=7)) if d.world > 1 else None
    if d.main:
        (out / SCENES).mkdir(parents=True, exist_ok=True)
        remove_stale_temps(out)
        atomic_write_text(out / JOB, json.dumps({"run": setup["run"], "settings": setup}, indent=1))
        job = plan(paths, out, setup, d.world)
        if manifest.classes != 1:
            print(f"note: {manifest.name} predicts {manifest.classes} classes: masks only, no footprints")
    shared = [job if d.main else None]
    if group is not None:
        dist.broadcast_object_list(shared, src=0, group=group)
    job = shared[0]
    rows = run_rank(a, manifest, job["ranks"][d.rank], setup, opts, d)
    gathered = [rows] if group is None else [None] * d.world
    if group is not None:
        dist.gather_object(rows, gathered if d.main else None, dst=0, group=group)
    if not d.main:
        return 0
    rows = [r for rank_rows in gathered for r in rank_rows]
    ready = [s.name for s in job["skipped"]] + [r["scene"] for r in rows if r["status"] == "done"]
    merged = None
    if setup["footprints"] is not None and ready:
        path, note, n = merge_area(out, ready, a.format, a.crs, opts)
        merged = {"path": str(path), "buildings": n, "note": note}
    print(summarise(out, len(paths), job["skipped"], job["failed"], rows, merged))
    failed = len(job["failed"]) + sum(r["status"] == "failed" for r in rows)
    if failed:
        raise AreaError(
            f"{failed} of {len(paths)} scenes failed (listed above); fix them and run the same command "
            "again: the finished scenes are skipped"
        )
    return 0


@cli
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.infer.area", description=__doc__.split("\n\n")[0])
    p.add_argument("--scenes", required=True, help="a folder of scenes (searched recursively) or a glob")
    p.add_argument("--out", required=True, help="output folder: scenes/<scene>.tif|.gpkg|.json, buildings.*")
    # Not --run: torchrun's parser reads every argument, and --run is an ambiguous prefix of its --run-path.
    p.add_argument("--run-dir", dest="run", default="", help="run folder or manifest.yaml (default: newest)")
    p.add_argument(
        "--format", default="gpkg", choices=list(FORMATS), help="footprints: GeoPackage or GeoParquet"
    )
    p.add_argument("--crs", default=None, help="CRS of buildings.* (default: the CRS of most scenes)")
    p.add_argument(
        "--force", action="store_true", help="write into an OUT of another run (redoes every scene)"
    )
    p.add_argument("--tta", default=None)
    p.add_argument("--device", default="auto")
    fp.add_options(p)
    a = p.parse_args(argv)
    a.run = a.run or str(latest_run())
    fp.options_of(a)  # option values checked before any scene is opened
    d = init_distributed(a.device)
    try:
        return run_area(a, d)
    finally:
        close_distributed(d)


if __name__ == "__main__":
    sys.exit(main())
