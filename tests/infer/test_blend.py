"""pipeline.infer.blend (make blend): a blend of one run is that run, byte for byte; the nested OOF Dice of a
constructed case is known; runs that cannot be blended are refused in one line naming the run and the fix."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import TINY_OVERRIDES
from fake_runs import oof_run, tile_data

from pipeline.core.config import load_config
from pipeline.data.folds import save_folds
from pipeline.infer import blend, submit
from pipeline.infer.blend import BlendError, blend_runs
from pipeline.runs.manifest import load_manifest, write_manifest
from pipeline.train import trainer

S = 16  # tile side of the constructed data
HALF = np.zeros((S, S), np.uint8)
HALF[:, : S // 2] = 1  # every tile's building: its left half (128 of 256 px)
NAMES = ["t0.jpg", "t1.jpg", "t2.jpg", "t3.jpg"]
FOLDS = [0, 0, 1, 1]
GRID = ["infer.thresholds=[0.5]", "infer.min_areas=[0]"]


def _data(root: Path, size: int = S) -> Path:
    """Four tiles of ``size`` px, each a left-half building."""
    mask = np.zeros((size, size), np.uint8)
    mask[:, : size // 2] = 1
    return tile_data(root, np.stack([mask] * 4), NAMES)


def _run(path: Path, data: Path, probs: np.ndarray, folds: list[int] = FOLDS) -> Path:
    return oof_run(path, data, NAMES, folds, probs)


def _maps(*per_tile: str) -> np.ndarray:
    """uint8 OOF maps [N, S, S]: ``right`` (the building, p = 1), ``empty`` (p = 0), ``full`` (p = 1)."""
    kinds = {"right": HALF * 255, "empty": np.zeros((S, S), np.uint8), "full": np.full((S, S), 255, np.uint8)}
    return np.stack([kinds[k] for k in per_tile]).astype(np.uint8)


@pytest.fixture
def two_runs(tmp_path: Path) -> tuple[Path, Path]:
    """Run a is right on fold 0 and predicts nothing on fold 1; run b is right on fold 1 and predicts
    everything on fold 0 (Dice 2 * 128 / (256 + 128) = 2/3 there)."""
    data = _data(tmp_path / "data")
    a = _run(tmp_path / "runs" / "a", data, _maps("right", "right", "empty", "empty"))
    b = _run(tmp_path / "runs" / "b", data, _maps("full", "full", "right", "right"))
    return a, b


def test_nested_oof_of_a_constructed_case_is_known(two_runs, tmp_path):
    """Choosing one run (steps=1): in-sample b wins, (2/3 + 2/3 + 1 + 1) / 4 = 5/6. Nested: fold 1 picks b,
    which scores 2/3 on held-out fold 0; fold 0 picks a, which scores 0 on held-out fold 1: 1/3."""
    a, b = two_runs
    result = blend_runs([a, b], tmp_path / "runs" / "ab", overrides=GRID, steps=1)
    assert result.weights == {"a": 0.0, "b": 1.0}
    assert result.oof_dice == pytest.approx(5 / 6, abs=1e-12)
    assert result.oof_dice_nested == pytest.approx(1 / 3, abs=1e-12)
    assert {g: r["weights"] for g, r in result.nested.items()} == {0: [0.0, 1.0], 1: [1.0, 0.0]}
    assert {g: r["dice"] for g, r in result.nested.items()} == pytest.approx({0: 2 / 3, 1: 0.0})
    manifest = load_manifest(result.path)  # what make submit reads
    assert manifest.is_blend and [m.run for m in manifest.members] == ["../a", "../b"]
    assert manifest.oof["oof_dice_nested"] == pytest.approx(1 / 3) and manifest.infer.tta == "flip"
    assert manifest.checkpoints == (
        "../a/fold0/best.pt",
        "../a/fold1/best.pt",
        "../b/fold0/best.pt",
        "../b/fold1/best.pt",
    )


def test_a_blend_of_runs_that_err_on_different_tiles_beats_both(two_runs, tmp_path):
    """Weights on the 0.1 grid: a blend with both runs and a threshold at or above b's share is right
    everywhere; in-sample Dice 1 where the runs alone score 1/2 and 5/6."""
    a, b = two_runs
    a2 = _run(tmp_path / "runs" / "a2", tmp_path / "data", _maps("right", "right", "full", "full"))
    result = blend_runs([a2, b], tmp_path / "runs" / "ab", overrides=["infer.min_areas=[0]"])
    assert result.oof_dice == pytest.approx(1.0)
    assert all(0 < w < 1 for w in result.weights.values()) and sum(result.weights.values()) == pytest.approx(
        1
    )
    assert result.oof_dice_nested is not None and result.oof_dice_nested <= result.oof_dice


def test_single_fold_runs_are_nested_over_parts_of_their_fold(tmp_path):
    """Runs trained on fold 0 only (the CPU proxy's) hold out parts of fold 0 for the nested Dice."""
    data = _data(tmp_path / "data")
    maps = _maps("right", "right", "right", "empty")
    a = _run(tmp_path / "runs" / "a", data, maps, folds=[0, 0, 0, 0])
    b = _run(tmp_path / "runs" / "b", data, maps[::-1].copy(), folds=[0, 0, 0, 0])
    result = blend_runs([a, b], tmp_path / "runs" / "ab", overrides=GRID, steps=1)
    assert result.manifest.oof["nested_over"] == "4 parts of fold 0 (tiles)"
    assert sorted(r["n"] for r in result.nested.values()) == [1, 1, 1, 1]
    assert result.oof_dice == pytest.approx(0.75) and result.oof_dice_nested is not None


# ----------------------------------------------------------------------------- refusals


def _refusal(tmp_path: Path, case: str) -> list[Path]:
    data = _data(tmp_path / "data")
    good = _run(tmp_path / "runs" / "a", data, _maps("right", "right", "right", "right"))
    other = tmp_path / "runs" / "b"
    if case == "folds":
        _run(other, data, _maps("right", "right", "right", "right"), folds=[0, 1, 0, 1])
    elif case == "size":
        big = _data(tmp_path / "data32", 32)
        _run(other, big, np.zeros((4, 32, 32), np.uint8))
    elif case == "no oof":
        _run(other, data, _maps("right", "right", "right", "right"))
        for f in other.glob("fold*/oof.npz"):
            f.unlink()
    elif case == "missing fold":
        _run(other, data, _maps("right", "right", "right", "right"))
        (other / "fold1" / "oof.npz").unlink()
    elif case == "multi-class":
        _run(other, data, _maps("right", "right", "right", "right"))
        m = load_manifest(other)
        write_manifest(dataclasses.replace(m, classes=3))
    elif case == "blend":
        blend_runs([good], other, overrides=GRID)
    elif case == "twice":
        other = good
    return [good, other]


@pytest.mark.parametrize(
    "case, message",
    [
        ("folds", r"runs/b was trained on other folds than .*runs/a .*data\.folds_csv=.*runs/a/folds\.csv"),
        ("size", r"runs/b's tiles are 32x32 px, .*runs/a's 16x16"),
        ("no oof", r"runs/b has no out-of-fold files \(fold<k>/oof.npz\)"),
        ("missing fold", r"runs/b has no out-of-fold file for fold 1 .*make train FOLDS=1"),
        ("multi-class", r"runs/b is a multi-class run \(classes=3\) and .*runs/a a binary one"),
        ("blend", r"runs/b is a blend, not a run; blend its runs directly"),
        ("twice", r"runs/a is listed twice in RUNS"),
    ],
)
def test_runs_that_cannot_be_blended_are_refused_naming_the_run(tmp_path, case, message):
    runs = _refusal(tmp_path, case)
    with pytest.raises(BlendError, match=message):
        blend_runs(runs, tmp_path / "runs" / "ab", overrides=GRID)
    assert not (tmp_path / "runs" / "ab").exists()


def test_cli_refuses_in_one_line_and_writes_the_blend(two_runs, tmp_path, capsys):
    a, b = two_runs
    shutil.copytree(a, tmp_path / "runs" / "c")
    save_folds(tmp_path / "runs" / "c" / "folds.csv", pd.DataFrame({"name": NAMES, "fold": [1, 1, 0, 0]}))
    assert blend.main(["--runs", f"{a},{tmp_path / 'runs' / 'c'}", *GRID]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "data.folds_csv=" in err
    assert blend.main(["--runs", f"{a},{b}", "--steps", "1", *GRID]) == 0
    out = capsys.readouterr().out
    assert (
        "blend OOF Dice nested" in out
        and "0.3333" in out
        and f"make submit RUN={a.parent / 'blend-a+b'}" in out
    )
    assert blend.main(["--runs", f"{a},{b}", "--name", "a", *GRID]) == 2  # a trained run is never overwritten
    assert "holds a trained run" in capsys.readouterr().err


# ----------------------------------------------------------------------------- a blend of one trained run


@pytest.fixture(scope="module")
def trained(demo_root, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    over = [f"data.root={demo_root}", f"train.runs_dir={runs}", "name=one", *TINY_OVERRIDES]
    over += ["infer.min_areas=[0,8]", "infer.tile_size=64", "infer.overlap=16"]
    cfg = load_config(None, over)
    return cfg, trainer.run(cfg)


def test_a_blend_of_one_run_submits_that_runs_submission_byte_for_byte(trained, tmp_path):
    cfg, run = trained
    result = blend_runs([run], run.parent / "blend-one")
    own = load_manifest(run)
    assert (result.threshold, result.min_area) == (own.infer.threshold, own.infer.min_area)
    assert result.oof_dice == pytest.approx(own.oof["oof_dice"], abs=1e-12)
    subs = [
        submit.make_submission(load_manifest(r), cfg.data, tmp_path / r.name, device="cpu", num_workers=0)
        for r in (run, result.path)
    ]
    assert subs[1].path.name.startswith("blend-one-flip-")
    assert subs[0].path.read_bytes() == subs[1].path.read_bytes()


def test_predict_scene_takes_a_blend_like_its_run(trained, tmp_path):
    import rasterio
    from synthetic_scenes import scene, write_tif

    from pipeline.infer.scenes import predict_scene_file

    cfg, run = trained
    blended = blend_runs([run], tmp_path / "blend").path
    rgb, _ = scene(64, 96)
    write_tif(tmp_path / "scene.tif", rgb)
    outs = [
        predict_scene_file(r, tmp_path / "scene.tif", tmp_path / f"{r.name}.tif", device="cpu")
        for r in (run, blended)
    ]
    with rasterio.open(outs[0]) as x, rasterio.open(outs[1]) as y:
        np.testing.assert_array_equal(x.read(), y.read())


def test_a_blend_on_data_of_another_tile_size_says_so(two_runs, tmp_path):
    """The OOF maps are checked against DATA's masks as make tune checks them (once an IndexError)."""
    other = _data(tmp_path / "other", size=2 * S)
    with pytest.raises(BlendError, match=r"the OOF maps are 16x16 but the masks of .* are 32x32"):
        blend_runs(list(two_runs), tmp_path / "runs" / "ab", data=str(other), overrides=GRID)
