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

from pipeline.core.config import ConfigError, load_config
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


def _own_rows(checkpoint: Path, test, threshold: float, min_area: int) -> list[str]:
    """``name<TAB>rle`` of one checkpoint's own prediction: its probabilities, threshold, component filter."""
    model, _, _ = load_model(checkpoint)
    probs = [
        p for _, batch in iter_predictions([model], test, "none", torch.device("cpu"), 4, 0) for p in batch
    ]
    return [
        f"{n}\t{rle.encode(postprocess.binarize(p, threshold, min_area))}" for n, p in zip(test.names, probs)
    ]


def test_single_model_is_an_ensemble_of_one(tiny_run, tmp_path):
    """A manifest of one checkpoint (fold 1's, not the first listed) submits exactly that model's own
    prediction, with the manifest's threshold and minimum area (8 px here, so the filter has work)."""
    cfg, run = tiny_run
    manifest = load_manifest(run)
    one = dataclasses.replace(
        manifest, checkpoints=manifest.checkpoints[1:], infer=dataclasses.replace(manifest.infer, min_area=8)
    )
    res = submit.make_submission(one, cfg.data, tmp_path, tta="none", device="cpu", num_workers=0)
    assert validate_submission(res.path, Path(cfg.data.root) / cfg.data.sample_csv, (64, 64)) == []
    test = read_source(cfg.data, with_train=False).test
    own = _own_rows(run / manifest.checkpoints[1], test, one.infer.threshold, 8)
    assert res.path.read_text().splitlines() == own
    # The comparison can tell the folds apart: fold 0's model submits other rows.
    assert _own_rows(run / manifest.checkpoints[0], test, one.infer.threshold, 8) != own


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
    """Without --run, the run whose manifest.yaml was written last: not the first or last by name."""
    import shutil

    cfg, run = tiny_run
    monkeypatch.chdir(tmp_path)
    for name, written in (("a-run", 1_700_000_000), ("b-run", 1_600_000_000)):
        shutil.copytree(run, tmp_path / "runs" / name, ignore=shutil.ignore_patterns("last.pt", "oof.npz"))
        os.utime(tmp_path / "runs" / name / "manifest.yaml", (written, written))
    args = ["--device", "cpu", "--workers", "0", "--out", str(tmp_path / "subs")]
    assert submit.main(args) == 0
    out = capsys.readouterr().out
    assert "validated OK" in out and "score: Dice" in out
    assert f"submission: {tmp_path / 'subs' / 'a-run-none-'}" in out
    os.utime(tmp_path / "runs" / "b-run" / "manifest.yaml", (1_800_000_000, 1_800_000_000))  # re-tuned
    assert submit.main(args) == 0
    assert f"submission: {tmp_path / 'subs' / 'b-run-none-'}" in capsys.readouterr().out
    assert submit.main(["--run", str(tmp_path / "nope")]) == 2
    assert "not found" in capsys.readouterr().err


def test_predict_scene_with_a_trained_run(tiny_run, tmp_path):
    """make predict-scene: a synthetic GeoTIFF scene, CRS and transform preserved, output a 0/1 mask."""
    import rasterio
    from rasterio.transform import from_origin
    from synthetic_scenes import write_tif

    from pipeline.infer.scenes import predict_scene_file

    cfg, run = tiny_run
    test = read_source(cfg.data, with_train=False).test
    tiles = [np.asarray(Image.open(p)) for p in test.image_paths[:6]]
    scene = np.concatenate([np.concatenate(tiles[:3], 1), np.concatenate(tiles[3:6], 1)], 0)[:100, :150]
    src = tmp_path / "scene.tif"
    transform = from_origin(500000.0, 4500000.0, 0.5, 0.5)
    write_tif(src, scene, transform=transform)
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


def test_a_min_area_above_the_tile_is_refused_before_any_model_loads(tiny_run, tmp_path, monkeypatch):
    """It used to give an all-empty submission that validated OK."""
    cfg, run = tiny_run
    manifest = load_manifest(run)
    huge = dataclasses.replace(manifest, infer=dataclasses.replace(manifest.infer, min_area=64 * 64))
    monkeypatch.setattr(submit, "load_ensemble", lambda *a: pytest.fail("models loaded before the check"))
    with pytest.raises(ConfigError, match=r"min_area 4096 is at least the 64x64 tile's 4096 pixels"):
        submit.make_submission(huge, cfg.data, tmp_path, device="cpu", num_workers=0)
    assert list(tmp_path.glob("*.csv")) == []


def test_too_little_free_space_fails_before_predicting_naming_the_folder(tiny_run, tmp_path, monkeypatch):
    import shutil

    cfg, run = tiny_run
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=10_000))
    monkeypatch.setattr(submit, "load_ensemble", lambda *a: pytest.fail("predicted before the check"))
    with pytest.raises(OSError, match="MB free, a submission of 8 tiles needs up to") as e:
        submit.make_submission(load_manifest(run), cfg.data, tmp_path, device="cpu", num_workers=0)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path)


# ----------------------------------------------------------------------------- blends (make blend)


def _blend_of(
    run: Path, other: Path, blend: Path, weights: tuple[float, float], tta: str = "none"
) -> Manifest:
    """A blend of ``run`` (both folds) and ``other`` (one fold) as make blend writes it."""
    from pipeline.runs.manifest import Member

    own = load_manifest(run)
    members = (
        Member(os.path.relpath(run, blend), weights[0], "none", own.checkpoints),
        Member(os.path.relpath(other, blend), weights[1], tta, ("fold0/best.pt",)),
    )
    infer = dataclasses.replace(own.infer, tta="none", min_area=8)
    write_manifest(Manifest(blend, (), infer, 1, own.data_root, {}, members))
    return load_manifest(blend)


def test_a_blend_submits_every_fold_of_every_run_with_its_weight(tiny_run, tmp_path):
    """Run 1's two folds averaged, weight 0.7; run 2 (fold 1's model alone), weight 0.3: thresholded with the
    blend's threshold and minimum area."""
    import shutil

    cfg, run = tiny_run
    (tmp_path / "other" / "fold0").mkdir(parents=True)
    shutil.copy(run / "fold1/best.pt", tmp_path / "other/fold0/best.pt")
    manifest = _blend_of(run, tmp_path / "other", tmp_path / "blend", (0.7, 0.3))
    res = submit.make_submission(manifest, cfg.data, tmp_path / "subs", device="cpu", num_workers=0)
    assert res.path.name.startswith("blend-none-")
    test = read_source(cfg.data, with_train=False).test
    cpu = torch.device("cpu")
    p0, p1 = (
        np.concatenate([p for _, p in iter_predictions([load_model(run / c)[0]], test, "none", cpu, 4, 0)])
        for c in ("fold0/best.pt", "fold1/best.pt")
    )
    probs = ((p0 + p1) / 2 * np.float32(0.7) + p1 / 1 * np.float32(0.3)) / np.float32(1.0)
    want = [
        f"{n}\t{rle.encode(postprocess.binarize(p, manifest.infer.threshold, 8))}"
        for n, p in zip(test.names, probs)
    ]
    assert res.path.read_text().splitlines() == want
    assert submit.tta_label(manifest, "none") == "none" and submit.tta_label(manifest, "d4") == "d4"
    mixed = _blend_of(run, tmp_path / "other", tmp_path / "mixed", (0.7, 0.3), tta="flip")
    assert submit.tta_label(mixed, "none") == "per-run"  # each run with its own TTA set
    # TTA= asked for applies to every run, also when the caller set the blend's tta key to it (bench.proxy)
    asked = dataclasses.replace(mixed, infer=dataclasses.replace(mixed.infer, tta="none"))
    res = submit.make_submission(asked, cfg.data, tmp_path / "asked", "none", device="cpu", num_workers=0)
    assert res.path.name.startswith("mixed-none-") and res.path.read_text().splitlines() == want


def test_submit_names_a_run_deleted_after_the_blend_was_made(tiny_run, tmp_path, capsys):
    import shutil

    cfg, run = tiny_run
    shutil.copytree(run, tmp_path / "copy", ignore=shutil.ignore_patterns("last.pt", "oof.npz"))
    _blend_of(run, tmp_path / "copy", tmp_path / "blend", (0.5, 0.5))
    shutil.rmtree(tmp_path / "copy")
    args = ["--run", str(tmp_path / "blend"), "--device", "cpu", "--out", str(tmp_path / "subs")]
    assert submit.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "members[1]: run ../copy" in err and "deleted or moved after the blend was made" in err
    assert "make blend RUNS=" in err and not (tmp_path / "subs").exists()
