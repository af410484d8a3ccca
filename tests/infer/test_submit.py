"""Submission: manifest -> ensemble -> TTA -> threshold/min-area -> RLE CSV, validated; scene prediction."""

from __future__ import annotations

import dataclasses
import errno
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_OVERRIDES
from PIL import Image

from pipeline.core.config import load_config
from pipeline.core.tta import TTA_SETS
from pipeline.data import rle
from pipeline.data.layouts import read_source
from pipeline.data.masks import read_mask_csv
from pipeline.infer import submit
from pipeline.infer.ensemble import iter_predictions, load_ensemble, load_model, predict_batch
from pipeline.infer.validate import validate_submission
from pipeline.metrics import postprocess
from pipeline.runs.manifest import Manifest, load_manifest, write_manifest
from pipeline.train import trainer


@pytest.fixture(scope="module")
def tiny_run(demo_root, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    cfg = load_config(
        None,
        [
            f"data.root={demo_root}",
            f"train.runs_dir={runs}",
            "name=sub",
            *TINY_OVERRIDES,
            "infer.tta=none",
            "infer.min_areas=[0,8]",
        ],
    )
    return cfg, trainer.run(cfg)


def test_single_model_is_an_ensemble_of_one(tiny_run, tmp_path):
    cfg, run = tiny_run
    manifest = load_manifest(run)
    one = dataclasses.replace(manifest, checkpoints=manifest.checkpoints[:1])
    res = submit.make_submission(one, cfg.data, tmp_path, tta="none", device="cpu", num_workers=0)
    assert validate_submission(res.path, Path(cfg.data.root) / cfg.data.sample_csv, (64, 64)) == []


@pytest.mark.parametrize("tta", list(TTA_SETS))
def test_submission_rows_in_sample_order_and_valid(tiny_run, tmp_path, tta):
    cfg, run = tiny_run
    res = submit.make_submission(load_manifest(run), cfg.data, tmp_path, tta=tta, device="cpu", num_workers=0)
    assert res.path.name.startswith(f"sub-{tta}-") and res.path.suffix == ".csv"
    sample = read_mask_csv(Path(cfg.data.root) / cfg.data.sample_csv, require_rle=False)
    rows = res.path.read_text().splitlines()
    assert [r.split("\t")[0] for r in rows] == sample["name"].tolist()
    assert all(r.count("\t") == 1 for r in rows)  # TAB-separated, empty string for an empty mask
    assert res.score is not None and Path(f"{res.path}.score.json").is_file()
    assert list(tmp_path.glob(".*.tmp")) == []


def test_hot_path_equals_postprocess_of_averaged_probabilities(tiny_run):
    """Threshold on the device + components on the host == binarize() of the ensemble's probabilities."""
    cfg, run = tiny_run
    loaded = load_manifest(run)
    infer = dataclasses.replace(loaded.infer, threshold=0.45, min_area=8)
    manifest = dataclasses.replace(loaded, infer=infer)
    models, _ = load_ensemble(manifest, torch.device("cpu"))
    test = read_source(cfg.data, with_train=False).test
    rows = dict(submit.predict_and_encode(models, test, "flip", 0.45, 8, torch.device("cpu"), 4, 0))
    probs = np.concatenate([p for _, p in iter_predictions(models, test, "flip", torch.device("cpu"), 4, 0)])
    for name, p in zip(test.names, probs):
        assert rows[name] == rle.encode(postprocess.binarize(p, 0.45, 8))
    # and the ensemble is the mean of its members
    x = torch.from_numpy(np.asarray(Image.open(test.image_paths[0])).transpose(2, 0, 1).copy())[None]
    each = [predict_batch([m], x, "flip") for m in models]
    torch.testing.assert_close(predict_batch(models, x, "flip"), sum(each) / len(each))


def test_model_rebuilds_from_checkpoint_alone(tiny_run):
    cfg, run = tiny_run
    model, cfg2, state = load_model(run / "fold0/best.pt")
    manifest = load_manifest(run)
    assert cfg2 == cfg and state.fold == 0
    assert (state.threshold, state.min_area) == (manifest.infer.threshold, manifest.infer.min_area)
    out = model(torch.zeros(1, 3, 70, 90, dtype=torch.uint8))  # not a multiple of 32: padded, cropped back
    assert out.shape == (1, 1, 70, 90)


def test_disk_full_leaves_no_partial_submission(tiny_run, tmp_path, monkeypatch):
    cfg, run = tiny_run

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        submit.make_submission(load_manifest(run), cfg.data, tmp_path, device="cpu", num_workers=0)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fault", ["not-a-folder", "disk-full"])
def test_unwritable_output_fails_before_predicting(tiny_run, tmp_path, monkeypatch, capsys, fault):
    """A read-only or full output folder was found only after predicting every tile (issue 12)."""
    cfg, run = tiny_run
    out = tmp_path / "subs"
    if fault == "not-a-folder":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "subs"
    else:
        monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space")))

    def never(*a, **k):
        raise AssertionError("predicted before checking the output folder")

    monkeypatch.setattr(submit, "load_ensemble", never)
    data = f"--data={cfg.data.root}"
    assert submit.main(["--run", str(run), data, "--device", "cpu", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err and str(out.parent) in err


def test_submit_removes_temp_files_of_killed_writes(tiny_run, tmp_path):
    from pipeline.core.io import HOST

    cfg, run = tiny_run
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    stale = tmp_path / f".sub-none-20250101-000000.csv.{int(gone.stdout)}@{HOST}.a1b2c3d4.tmp"
    stale.write_text("half a submission")
    submit.make_submission(load_manifest(run), cfg.data, tmp_path, tta="none", device="cpu", num_workers=0)
    assert not stale.exists()


def test_cli_uses_newest_run_and_validates(tiny_run, tmp_path, monkeypatch, capsys):
    cfg, run = tiny_run
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").symlink_to(run.parent)
    assert submit.main(["--device", "cpu", "--workers", "0", "--out", str(tmp_path / "subs")]) == 0
    out = capsys.readouterr().out
    assert "validated OK" in out and "score: Dice" in out
    assert submit.main(["--run", str(tmp_path / "nope")]) == 2
    assert "not found" in capsys.readouterr().err


def test_predict_scene_with_a_trained_run(tiny_run, tmp_path):
    """make predict-scene: a synthetic GeoTIFF scene, CRS and transform preserved, output a 0/1 mask."""
    import rasterio
    from rasterio.transform import from_origin

    from pipeline.infer.scenes import predict_scene_file

    cfg, run = tiny_run
    test = read_source(cfg.data, with_train=False).test
    tiles = [np.asarray(Image.open(p)) for p in test.image_paths[:6]]
    scene = np.concatenate([np.concatenate(tiles[:3], 1), np.concatenate(tiles[3:6], 1)], 0)[:100, :150]
    src = tmp_path / "scene.tif"
    transform = from_origin(500000.0, 4500000.0, 0.5, 0.5)
    with rasterio.open(
        src,
        "w",
        driver="GTiff",
        height=100,
        width=150,
        count=3,
        dtype="uint8",
        crs="EPSG:32631",
        transform=transform,
    ) as dst:
        dst.write(scene.transpose(2, 0, 1))
    manifest = load_manifest(run)
    infer = dataclasses.replace(
        manifest.infer, tta="none", threshold=0.5, tile_size=64, overlap=16, batch_size=4
    )
    write_manifest(Manifest(tmp_path, tuple(str(run / c) for c in manifest.checkpoints), infer))
    out = predict_scene_file(tmp_path / "manifest.yaml", src, tmp_path / "mask.tif", device="cpu")
    with rasterio.open(out) as r:
        assert r.crs.to_epsg() == 32631 and r.transform == transform
        mask = r.read(1)
    assert mask.shape == (100, 150) and set(np.unique(mask)) <= {0, 1}
