"""pipeline.infer.area (make predict-scenes): scenes shared among ranks largest first, resumable per scene,
bad scenes named while the others go on, one merged footprints file; two gloo "nodes" over loopback
write exactly what one process writes."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import torch
from affine import Affine
from conftest import TINY_OVERRIDES
from synthetic_scenes import TRANSFORM, write_tif
from synthetic_scenes import scene as synthetic_scene

from pipeline.core.config import load_config, to_dict
from pipeline.infer import area
from pipeline.model.registry import build_model
from pipeline.runs.checkpoint import BestCheckpoint, write_checkpoint
from pipeline.runs.manifest import Manifest, write_manifest

ROOT = Path(__file__).resolve().parents[2]


def random_run(run_dir: Path, classes: int = 1, seed: int = 0) -> Path:
    """A run of one randomly initialised tiny U-Net (no training: seconds), 64-px windows."""
    cfg = load_config(None, [*TINY_OVERRIDES, f"model.classes={classes}", "data.root=unused"])
    torch.manual_seed(seed)
    model = build_model(cfg, pretrained=False)
    ckpt = BestCheckpoint(model.state_dict(), to_dict(cfg), 0, 1, "val_dice", 0.5, 0.5, 0)
    write_checkpoint(run_dir / "fold0" / "best.pt", ckpt)
    infer = dataclasses.replace(cfg.infer, tta="none", tile_size=64, overlap=16, min_area=4, batch_size=4)
    write_manifest(Manifest(run_dir, ("fold0/best.pt",), infer, classes))
    return run_dir


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_run(tmp_path_factory.mktemp("runs") / "rand")


def _scenes(folder: Path, sizes: list[tuple[int, int]]) -> list[Path]:
    """Synthetic georeferenced scenes s0, s1, ... side by side (each starts where the last one ended)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths, col = [], 0
    for k, (h, w) in enumerate(sizes):
        rgb, _ = synthetic_scene(h, w, seed=k)
        write_tif(folder / f"s{k}.tif", rgb, transform=TRANSFORM @ Affine.translation(col, 0))
        paths.append(folder / f"s{k}.tif")
        col += w
    return paths


def _main(run: Path, scenes: Path, out: Path, *extra: str) -> int:
    return area.main(
        ["--run-dir", str(run), "--scenes", str(scenes), "--out", str(out), "--device", "cpu", *extra]
    )


def _outputs(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "scenes").glob("*.tif"))}


# ----------------------------------------------------------------------------- planning


def test_scenes_are_shared_largest_first_to_the_least_loaded_rank() -> None:
    sizes = {"a": 100, "b": 90, "c": 50, "d": 45, "e": 40, "f": 5}
    scenes = [area.Scene(f"{n}.tif", n, s, 1, 0, 0, "EPSG:32631", ()) for n, s in sizes.items()]
    ranks = area.share(scenes, 2)
    assert [[s.name for s in r] for r in ranks] == [["a", "d", "f"], ["b", "c", "e"]]  # 150 and 180 px
    assert [s.name for s in area.share(scenes, 1)[0]] == list(sizes)
    assert area.share(scenes[:1], 3)[1:] == [[], []]


def test_bad_scene_folders_and_outputs_are_refused(tmp_path: Path, run: Path, capsys) -> None:
    """No scenes; two scenes of one name in two folders; OUT inside SCENES; an OUT of another run or of
    something else (unless --force): one line each, nothing written."""
    (tmp_path / "empty").mkdir()
    assert _main(run, tmp_path / "empty", tmp_path / "out") == 2
    assert "no scenes found" in capsys.readouterr().err
    _scenes(tmp_path / "a", [(40, 40)])
    _scenes(tmp_path / "b", [(40, 40)])
    assert _main(run, tmp_path / "*" / "*.tif", tmp_path / "out") == 2
    assert "used twice" in capsys.readouterr().err
    assert _main(run, tmp_path / "a", tmp_path / "a" / "out") == 2
    assert "is inside SCENES" in capsys.readouterr().err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "job.json").write_text(json.dumps({"run": "/runs/another"}))
    assert _main(run, tmp_path / "a", tmp_path / "other") == 2
    assert "holds the scenes of another run (/runs/another)" in capsys.readouterr().err
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    assert _main(run, tmp_path / "a", tmp_path / "mine") == 2
    err = capsys.readouterr().err
    assert "no predict-scenes output" in err and err.count("error:") == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "mine" / "scenes").exists()
    assert _main(run, tmp_path / "a", tmp_path / "other", "--force") == 0
    assert json.loads((tmp_path / "other" / "job.json").read_text())["run"] == str(run.resolve())


# ----------------------------------------------------------------------------- one process


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_bad_scenes_are_named_and_the_others_go_on(tmp_path: Path, run: Path, capsys) -> None:
    """A scene of one band, one without CRS and an unreadable file: each named with its reason in the
    summary (and summary.json), the good scenes predicted and merged, exit 2 with one error line."""
    scenes = tmp_path / "scenes"
    _scenes(scenes, [(70, 90), (60, 50)])
    write_tif(scenes / "gray.tif", np.zeros((30, 30), np.uint8))
    write_tif(scenes / "nocrs.tif", np.zeros((30, 30, 3), np.uint8), crs=None, transform=Affine.identity())
    (scenes / "broken.tif").write_text("not a raster")
    assert _main(run, scenes, tmp_path / "out") == 2
    captured = capsys.readouterr()
    assert "5 scenes: 2 done, 0 skipped (finished before), 3 failed" in captured.out
    assert "gray.tif: expected an 8-bit RGB image" in captured.out and "nocrs.tif has no CRS" in captured.out
    assert "broken.tif is not a readable raster" in captured.out
    assert captured.err.count("error:") == 1 and "3 of 5 scenes failed" in captured.err
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["done"] == ["s0", "s1"] and len(summary["failed"]) == 3
    merged = gpd.read_file(tmp_path / "out" / "buildings.gpkg")
    assert set(merged["scene"]) <= {"s0", "s1"} and merged["id"].tolist() == list(range(1, len(merged) + 1))
    assert merged.crs.to_epsg() == 32631 and "scene" in merged and "pieces" in merged


def test_a_rerun_redoes_only_unfinished_or_changed_scenes(tmp_path: Path, run: Path, capsys) -> None:
    """After a kill (a scene without its marker, a dead writer's temp file), the same command redoes
    that scene only; a changed scene file or setting is redone, never skipped; outputs stay identical."""
    scenes = tmp_path / "scenes"
    paths = _scenes(scenes, [(80, 100), (64, 64), (50, 90)])
    out = tmp_path / "out"
    assert _main(run, scenes, out) == 0
    first, merged = _outputs(out), gpd.read_file(out / "buildings.gpkg")
    (out / "scenes" / "s1.json").unlink()  # killed after its mask, before its marker
    (out / "scenes" / ".s2.tif.999999@nohost.abcd.tmp").write_bytes(b"half a COG")
    capsys.readouterr()
    assert _main(run, scenes, out) == 0
    text = capsys.readouterr()
    assert "3 scenes: 1 done, 2 skipped" in text.out and "scene 1/1 s1" in text.err
    assert _outputs(out) == first
    again = gpd.read_file(out / "buildings.gpkg")
    assert all(a.equals_exact(b, 0) for a, b in zip(again.geometry, merged.geometry)) and len(again) == len(
        merged
    )
    os.utime(paths[0], ns=(1, 1))  # the same bytes, another mtime: redone
    assert _main(run, scenes, out) == 0
    assert "1 done, 2 skipped" in capsys.readouterr().out
    assert _main(run, scenes, out, "--simplify", "0") == 0  # another setting: every scene again
    assert "3 done, 0 skipped" in capsys.readouterr().out


def test_geoparquet_outputs(tmp_path: Path, run: Path) -> None:
    """--format parquet: every scene's footprints and the merged file as GeoParquet, for object stores."""
    _scenes(tmp_path / "scenes", [(60, 80), (60, 70)])
    assert _main(run, tmp_path / "scenes", tmp_path / "out", "--format", "parquet") == 0
    merged = gpd.read_parquet(tmp_path / "out" / "buildings.parquet")
    per_scene = [gpd.read_parquet(tmp_path / "out" / "scenes" / f"s{k}.parquet") for k in (0, 1)]
    assert merged.crs.to_epsg() == 32631 and 0 < len(merged) <= sum(map(len, per_scene))
    assert not list((tmp_path / "out").rglob("*.gpkg"))


@pytest.mark.filterwarnings("ignore:no colour table:UserWarning")
def test_a_multiclass_run_writes_masks_only(tmp_path: Path, capsys) -> None:
    mc = random_run(tmp_path / "mc", classes=3)
    _scenes(tmp_path / "scenes", [(40, 60)])
    assert _main(mc, tmp_path / "scenes", tmp_path / "out") == 0
    printed = capsys.readouterr().out
    assert "predicts 3 classes: masks only" in printed
    assert (tmp_path / "out" / "scenes" / "s0.tif").is_file() and not (
        tmp_path / "out" / "buildings.gpkg"
    ).exists()
    with rasterio.open(tmp_path / "out" / "scenes" / "s0.tif") as r:
        assert r.read(1).max() <= 2 and r.tags()["BUILDSEG_CLASSES"] == "3"


# ----------------------------------------------------------------------------- two "nodes"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make_command(**make_vars: str) -> list[str]:
    """The command `make predict-scenes` runs for these variables (make -n), with torchrun as a module."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    args = [f"{k}={v}" for k, v in make_vars.items()]
    cmd = ["make", "--no-print-directory", "-n", "predict-scenes", *args]
    text = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True, env=env).stdout
    line = [ln for ln in text.replace("\\\n", " ").splitlines() if "-m pipeline.infer.area" in ln][-1]
    import shlex

    words = shlex.split(line)
    if words[0].endswith("torchrun"):
        return [sys.executable, "-m", "torch.distributed.run", *words[1:]]
    return [sys.executable, *words[1:]]


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="gloo backend not available")
def test_two_nodes_over_loopback_write_what_one_process_writes(tmp_path: Path, run: Path) -> None:
    """`make predict-scenes NODES=2 NODE_RANK=k MASTER=host:port`, two local "nodes": every mask byte and
    every polygon equal to one process's; each rank predicted some of the scenes."""
    scenes = tmp_path / "scenes"
    _scenes(scenes, [(96, 130), (64, 64), (80, 70), (50, 120)])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    pipe = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True, "env": env, "cwd": ROOT}
    common = {"SCENES": str(scenes), "RUN": str(run), "ARGS": "--device cpu"}
    one = _make_command(OUT=str(tmp_path / "one"), **common)
    assert one[1] == "-m", one  # one process: plain python
    out = subprocess.run(one, timeout=300, **pipe)
    assert out.returncode == 0, out.stdout[-3000:]
    master = f"127.0.0.1:{_free_port()}"
    cmds = [
        _make_command(OUT=str(tmp_path / "two"), NODES="2", NODE_RANK=str(k), MASTER=master, **common)
        for k in (0, 1)
    ]
    procs = [subprocess.Popen(c, **pipe) for c in cmds]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    # largest first to the least loaded: 96x130 to rank 0, then 50x120, 80x70 and 64x64 to rank 1
    assert "rank 0 of 2: 1 scene," in logs[0] and "rank 1 of 2: 3 scenes" in logs[1]
    assert _outputs(tmp_path / "one") == _outputs(tmp_path / "two") and len(_outputs(tmp_path / "one")) == 4
    a, b = (gpd.read_file(tmp_path / d / "buildings.gpkg") for d in ("one", "two"))
    assert len(a) == len(b) > 0
    assert all(x.equals_exact(y, 0) for x, y in zip(a.geometry, b.geometry))
    assert a.drop(columns="geometry").equals(b.drop(columns="geometry"))
