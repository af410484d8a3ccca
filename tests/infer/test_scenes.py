"""Ensemble inference over large scenes (``make predict-scene``): a multi-class run, a binary one; bad
scenes and outputs refused before any model; the mask's tags; the lines a log gets.

The ensembles are fixed pixel-wise models (no training): logits from the pixel colours, so the class of
every pixel is known by construction and the written GeoTIFF can be checked pixel for pixel.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import rasterio
import torch
from rasterio.transform import from_origin
from synthetic_scenes import write_tif

from pipeline.core.config import ConfigError, load_config
from pipeline.geo import GeoError
from pipeline.geo.scene import MaskTags
from pipeline.geo.tiling import TileGrid
from pipeline.infer import scenes
from pipeline.runs.manifest import Manifest, write_manifest

COLORS = [(0, 0, 0), (200, 40, 40), (40, 40, 200)]
GRAY, RED, BLUE = (90, 90, 90), (200, 40, 40), (40, 40, 200)


class ColourModel(torch.nn.Module):
    """Pixel-wise logits [B, 3, H, W] from uint8 RGB: grey -> 0, red -> 1, blue -> 2, by wide margins."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255
        r, b = x[:, 0:1], x[:, 2:3]
        return torch.cat([torch.zeros_like(r), 10 * (r - b) - 2, 10 * (b - r) - 2], dim=1)


def _scene(height: int = 150, width: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """RGB uint8 [H, W, 3] of grey ground with red and blue rectangles, and its class ids uint8 [H, W]."""
    ids = np.zeros((height, width), np.uint8)
    ids[10:40, 20:90] = 1
    ids[60:140, 150:190] = 2
    ids[100:120, 5:60] = 1
    ids[0:20, 120:200] = 2  # touches the border
    rgb = np.array([GRAY, RED, BLUE], np.uint8)[ids]
    return rgb, ids


@pytest.fixture
def multiclass_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A 3-class run folder (VOC layout with a colormap) whose ensemble is :class:`ColourModel`."""
    data = tmp_path / "voc"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (data / sub).mkdir(parents=True)
    names = ("bg", "roof", "pool")
    classes = [{"id": i, "name": n, "color": list(c)} for i, (n, c) in enumerate(zip(names, COLORS))]
    (data / "colormap.json").write_text(json.dumps({"classes": classes, "ignore_index": 255}))
    cfg = load_config(
        None,
        [
            f"data.root={data}",
            "data.layout=voc",
            "data.colormap_json=colormap.json",
            "model.classes=3",
            "loss.ignore_index=255",
        ],
    )
    run = tmp_path / "run"
    infer = dataclasses.replace(cfg.infer, tta="flip", tile_size=64, overlap=16, batch_size=4)
    write_manifest(Manifest(run, ("fold0/best.pt",), infer, classes=3))
    monkeypatch.setattr(scenes, "load_ensemble", lambda manifest, device: ([ColourModel().eval()], cfg))
    return run


def _write_scene(path: Path, rgb: np.ndarray) -> None:
    write_tif(path, rgb, transform=from_origin(500000.0, 4500000.0, 0.5, 0.5))


def _cli(run: Path, scene: Path, out: Path) -> list[str]:
    """``python -m pipeline.infer.scenes`` arguments for one scene."""
    return ["--run", str(run), "--scene", str(scene), "--out", str(out)]


def test_predict_scene_multiclass_writes_class_ids_with_the_run_colours(multiclass_run, tmp_path):
    """make predict-scene on a multi-class run: argmax class ids (not a thresholded background channel)."""
    rgb, ids = _scene()
    _write_scene(tmp_path / "scene.tif", rgb)
    out = scenes.predict_scene_file(
        multiclass_run, tmp_path / "scene.tif", tmp_path / "ids.tif", device="cpu"
    )
    with rasterio.open(out) as r:
        assert (r.count, r.dtypes[0]) == (1, "uint8")
        assert r.crs.to_epsg() == 32631 and r.transform == from_origin(500000.0, 4500000.0, 0.5, 0.5)
        np.testing.assert_array_equal(r.read(1), ids)
        assert [r.colormap(1)[c][:3] for c in range(3)] == COLORS


def test_predict_scene_multiclass_without_the_data_folder_still_writes_ids(multiclass_run, tmp_path):
    """The colour table comes from the run's data folder; without it the class ids are still right."""
    import shutil

    rgb, ids = _scene(70, 90)
    _write_scene(tmp_path / "scene.tif", rgb)
    shutil.rmtree(tmp_path / "voc")
    with pytest.warns(UserWarning, match="colour"):
        out = scenes.predict_scene_file(multiclass_run, tmp_path / "scene.tif", tmp_path / "ids.tif", "none")
    with rasterio.open(out) as r:
        np.testing.assert_array_equal(r.read(1), ids)


def test_predict_scene_unknown_tta_names_the_sets(multiclass_run, tmp_path):
    with pytest.raises(ConfigError, match="none, flip, d4"):
        scenes.predict_scene_file(multiclass_run, tmp_path / "scene.tif", tmp_path / "ids.tif", "d8", "cpu")
    assert not (tmp_path / "ids.tif").exists()


# ----------------------------------------------------------------------------- binary: checks, tags, logs


class RedModel(torch.nn.Module):
    """Binary logits [B, 1, H, W] from uint8 RGB: a building where red > 128, by a wide margin."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x[:, 0:1].float() - 128.5) / 4


@pytest.fixture
def binary_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """A binary run (``.path``) whose ensemble is :class:`RedModel`; ``.calls``, ``.manifests``: its loads."""
    cfg = load_config(None, ["data.root=unused"])
    run = tmp_path / "red"
    infer = dataclasses.replace(cfg.infer, tta="none", tile_size=64, overlap=16, batch_size=4, min_area=12)
    write_manifest(Manifest(run, ("fold0/best.pt",), infer, classes=1))
    calls, manifests = [], []

    def load(manifest, device):
        calls.append(manifest.name)
        manifests.append(manifest)
        return [RedModel().eval()], cfg

    monkeypatch.setattr(scenes, "load_ensemble", load)
    return SimpleNamespace(path=run, calls=calls, manifests=manifests)


def _red_scene(path: Path, height: int = 150, width: int = 200) -> np.ndarray:
    """A scene of grey ground and red rectangles; returns its true 0/1 mask."""
    rgb, ids = _scene(height, width)
    rgb[ids == 2] = GRAY  # blue is ground here
    _write_scene(path, rgb)
    return (ids == 1).astype(np.uint8)


def test_predict_scene_refuses_to_overwrite_its_input(
    binary_run: SimpleNamespace, tmp_path: Path, capsys
) -> None:
    """OUT= the input scene used to replace the scene with its mask: refused, scene untouched, no model."""
    _red_scene(tmp_path / "scene.tif")
    before = (tmp_path / "scene.tif").read_bytes()
    for out in (tmp_path / "scene.tif", tmp_path / "." / "scene.tif"):
        assert scenes.main(_cli(binary_run.path, tmp_path / "scene.tif", out)) == 2
    err = capsys.readouterr().err
    assert err.count("error: ") == 2 and "is the input scene" in err and "Traceback" not in err
    assert (tmp_path / "scene.tif").read_bytes() == before and binary_run.calls == []
    with pytest.raises(GeoError, match="is the input scene"):
        scenes.predict_scene_file(binary_run.path, tmp_path / "scene.tif", tmp_path / "scene.tif")


def test_bad_scenes_and_outputs_are_one_line_before_any_model(
    binary_run: SimpleNamespace, tmp_path: Path, capsys
) -> None:
    """Single-band and 16-bit scenes, an unknown output suffix: one line each, found before any model."""
    rgb = _scene()[0]
    _write_scene(tmp_path / "u16.tif", rgb.astype(np.uint16) * 100)
    _write_scene(tmp_path / "ok.tif", rgb)
    with (
        rasterio.open(tmp_path / "ok.tif") as src,
        rasterio.open(tmp_path / "gray.tif", "w", **{**src.profile, "count": 1}) as dst,
    ):
        dst.write(src.read(1), 1)
    cases = {
        "gray.tif": ("m.tif", "got 1 band(s) of uint8"),
        "u16.tif": ("m.tif", "got 3 band(s) of uint16"),
        "ok.tif": ("m.jpg", "m.jpg: output must be .tif/.tiff (GeoTIFF) or .png"),
    }
    for scene, (out, message) in cases.items():
        assert scenes.main(_cli(binary_run.path, tmp_path / scene, tmp_path / out)) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and message in err
    assert binary_run.calls == [] and not list(tmp_path.glob("m.*"))


def test_the_mask_carries_the_run_and_the_end_line_says_what_was_written(
    binary_run: SimpleNamespace, tmp_path: Path, capsys
) -> None:
    """The mask's tags hold the run's post-processing; the last line gives size, CRS, building share and
    time; replacing an existing output says so and who wrote it."""
    truth = _red_scene(tmp_path / "scene.tif")
    assert scenes.main(_cli(binary_run.path, tmp_path / "scene.tif", tmp_path / "m.tif")) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    share = 100 * truth.mean()
    assert line.startswith(
        f"wrote {tmp_path / 'm.tif'}: 200 x 150 px, EPSG:32631, buildings {share:.1f} % of pixels, "
    )
    with rasterio.open(tmp_path / "m.tif") as r:
        np.testing.assert_array_equal(r.read(1), truth)
    tags = MaskTags.read(tmp_path / "m.tif")
    assert (tags.run, tags.threshold, tags.min_area, tags.tta, tags.classes) == ("red", 0.5, 12, "none", 1)
    assert tags.command == "make predict-scene" and tags.scene == "scene.tif"
    assert scenes.main(_cli(binary_run.path, tmp_path / "scene.tif", tmp_path / "m.tif")) == 0
    assert f"note: replacing {tmp_path / 'm.tif'} (make predict-scene (run red))" in capsys.readouterr().err


def test_every_phase_prints_a_line_in_a_log(
    binary_run: SimpleNamespace, tmp_path: Path, capsys, monkeypatch, simulated_progress
) -> None:
    """Output to a file, simulated time: loading the models, every batch of windows and the COG copy each
    print a progress line when a minute has passed (the heartbeat stands in for the thread)."""
    from pipeline.core import progress as progress_mod
    from pipeline.geo import scene as scene_mod

    now = [0.0]

    def clock() -> float:
        now[0] += 61.0  # a minute passes between any two looks at the clock
        return now[0]

    simulated_progress(clock)
    load = scenes.load_ensemble
    monkeypatch.setattr(scenes, "load_ensemble", lambda *a: (progress_mod.beat(), load(*a))[1])
    copy = scene_mod.rasterio.shutil.copy
    monkeypatch.setattr(
        scene_mod.rasterio.shutil, "copy", lambda *a, **k: (progress_mod.beat(), copy(*a, **k))[1]
    )
    _red_scene(tmp_path / "scene.tif")
    assert scenes.main(_cli(binary_run.path, tmp_path / "scene.tif", tmp_path / "m.tif")) == 0
    err = capsys.readouterr().err
    assert "load red (1 checkpoints):" in err
    windows = [ln for ln in err.splitlines() if ln.startswith("predict scene.tif: ")]
    n = len(TileGrid(150, 200, 64, 16))  # 3 rows x 4 columns, in batches of 4: a line per batch
    assert len(windows) == n // 4 and windows[-1].startswith(f"predict scene.tif: {n}/{n} (100%)")
    assert "write m.tif as COG:" in err


def test_a_tta_set_asked_for_applies_to_every_run_of_a_blend(binary_run, tmp_path: Path) -> None:
    """TTA=d4 for a blend whose own set is d4 but whose run uses flip: every run predicts with d4, as
    make submit TTA=d4 does (pipeline.infer.ensemble.with_tta); without TTA= each run keeps its own."""
    from pipeline.runs.manifest import Member, load_manifest

    own = load_manifest(binary_run.path)
    blend = dataclasses.replace(own.infer, tta="d4")
    write_manifest(
        Manifest(tmp_path / "blend", (), blend, 1, "", {}, (Member("../red", 1.0, "flip", own.checkpoints),))
    )
    asked = scenes.ScenePredictor(tmp_path / "blend", "d4", "cpu")
    scenes.ScenePredictor(tmp_path / "blend", None, "cpu")
    assert [[m.tta for m in man.members] for man in binary_run.manifests] == [["d4"], ["flip"]]
    assert asked.tta == "d4" and asked.tags("s.tif").tta == "d4"
