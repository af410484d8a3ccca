"""Pseudo-labelling: both-tail thresholds, test tiles in every fold's training and no validation, a tiny
teacher -> pseudo round on CPU, the test truth never read, and bad label files refused before training."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_OVERRIDES

from pipeline.core.config import ConfigError, DataConfig, load_config, save_config
from pipeline.core.device import Dist
from pipeline.core.io import load_yaml
from pipeline.data import DataError
from pipeline.data.dataset import MASK, load_pseudo_labels, load_unlabelled
from pipeline.data.folds import resolve_folds
from pipeline.data.layouts import read_source
from pipeline.infer import pseudo
from pipeline.infer.ensemble import iter_predictions, load_ensemble
from pipeline.runs.manifest import load_manifest
from pipeline.train import engine, trainer

# One epoch of two steps per fold, no TTA, one threshold: the teacher exists to be predicted with.
FAST = ["train.epochs=1", "train.max_steps_per_epoch=2", "infer.tta=none", "infer.thresholds=[0.5]",
        "infer.min_areas=[0]"]  # fmt: skip
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def teacher(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished two-fold tiny run on the demo data (its manifest holds both folds' models)."""
    runs = tmp_path_factory.mktemp("pseudo") / "runs"
    cfg = load_config(
        None, [f"data.root={demo_root}", f"train.runs_dir={runs}", "name=teacher", *TINY_OVERRIDES, *FAST]
    )
    return trainer.run(cfg)


def _test_tiles(root: Path):
    return load_unlabelled(root, "test_a", "test_a_samplesubmit.csv")


def _teacher_probs(teacher: Path, root: Path) -> np.ndarray:
    """The teacher ensemble's probabilities float32 [N, H, W] of the test tiles, batched as the round does."""
    manifest = load_manifest(teacher)
    models, _ = load_ensemble(manifest, CPU)
    batches = iter_predictions(models, _test_tiles(root), "none", CPU, manifest.infer.batch_size, 0)
    return np.concatenate([p for _, p in batches])


def _copy_data(demo_root: Path, dst: Path, truth: str) -> Path:
    """The demo data with its test truth corrupted ("corrupt") or deleted ("delete")."""
    shutil.copytree(demo_root, dst)
    if truth == "corrupt":
        (dst / "test_a_mask.csv").write_text("this is not a mask file\n")
    else:
        (dst / "test_a_mask.csv").unlink()
    return dst


# ----------------------------------------------------------------------------- thresholds


def test_pseudo_targets_keep_both_tails_and_ignore_the_band():
    values = [[0.0, 0.3, 0.31, 0.5], [0.69, 0.7, 1.0, np.nan]]
    want = np.array([[0, 0, 255, 255], [255, 1, 1, 255]], dtype=np.uint8)
    for dtype in (np.float32, np.float64):  # float32(0.3) > 0.3, yet a probability of 0.3 is "<= low"
        np.testing.assert_array_equal(pseudo.pseudo_targets(np.array(values, dtype), 0.3, 0.7), want)
    probs = np.array(values, np.float32)
    assert pseudo.pseudo_targets(probs).dtype == np.uint8 and (pseudo.LOW, pseudo.HIGH) == (0.3, 0.7)
    for low, high in ((0.7, 0.3), (0.5, 0.5), (-0.1, 0.5), (0.5, 1.1)):
        with pytest.raises(ConfigError, match="--low"):
            pseudo.pseudo_targets(probs, low, high)


# ----------------------------------------------------------------------------- folds


def test_pseudo_tiles_train_every_fold_and_validate_none(tiny_cfg, demo_root, tmp_path):
    test = _test_tiles(demo_root)
    masks = np.random.default_rng(0).choice(np.array([0, 1, 255], np.uint8), size=(len(test), 64, 64))
    path = pseudo.write_pseudo_labels(tmp_path / "labels.npz", test.names, masks, {})
    cfg = tiny_cfg(f"data.pseudo_labels={path}", "loss.ignore_index=255")
    source = read_source(cfg.data, with_test=False)
    source = dataclasses.replace(source, pseudo=load_pseudo_labels(cfg.data, cfg.loss.ignore_index))
    folds_df = resolve_folds(cfg, source, tmp_path / "run", announce=False)
    for k in (0, 1):
        fd = engine.fold_data(cfg, source, folds_df, k, Dist(), CPU)
        held_out = folds_df.loc[folds_df["fold"] == k, "name"].tolist()
        assert sorted(fd.val_ds.split.names) == sorted(held_out)  # validation: the fold's own tiles only
        assert not set(test.names) & set(fd.val_ds.split.names)
        split = fd.train_ds.split
        assert split.names == [n for n in source.train.names if n not in held_out] + test.names
        for j, name in enumerate(test.names):
            i = split.names.index(name)
            assert split.image_paths[i] == demo_root / "test_a" / name
            np.testing.assert_array_equal(split.masks[i], masks[j])
        # Through the training augmentation a pseudo mask keeps its three values (255 never blended).
        assert set(np.unique(fd.train_ds[len(split) - 1][MASK].numpy())) <= {0, 1, 255}


# ----------------------------------------------------------------------------- end to end


def test_pseudo_round_end_to_end_without_test_truth(teacher, demo_root, tmp_path, capsys):
    """Teacher -> labels -> ``<teacher>-pseudo`` (fold 0) on a copy of the data whose test truth is garbage:
    a new run with its own manifest, validated on the teacher's fold-0 tiles, 255 exactly on the band."""
    data = _copy_data(demo_root, tmp_path / "data", "corrupt")
    probs = _teacher_probs(teacher, demo_root)
    # A two-step teacher is unsure everywhere: a band from its own quantiles keeps some pixels of each kind.
    low, high = (float(q) for q in np.quantile(probs, [0.3, 0.7]))
    student = pseudo.pseudo_round(teacher, folds=[0], low=low, high=high, overrides=[f"data.root={data}"])

    assert student == teacher.parent / "teacher-pseudo"
    assert load_manifest(student).checkpoints == ("fold0/best.pt",)
    labels = pseudo.labels_path(teacher, low, high, "none")
    config = load_yaml(student / "config.yaml")
    assert config["data"]["pseudo_labels"] == str(labels) and config["loss"]["ignore_index"] == 255
    with np.load(student / "fold0/oof.npz") as z, np.load(teacher / "fold0/oof.npz") as t:
        assert list(z["names"]) == list(t["names"])  # the same validation tiles as the teacher's fold 0
    with np.load(labels) as z:
        names, masks = list(z["names"]), z["masks"]
    assert names == _test_tiles(demo_root).names
    assert masks.dtype == np.uint8 and set(np.unique(masks).tolist()) == {0, 1, 255}
    band = (probs > np.float32(low)) & (probs < np.float32(high))
    np.testing.assert_array_equal(masks == 255, band)
    np.testing.assert_array_equal(masks == 1, probs >= np.float32(high))
    meta = pseudo.read_meta(labels)
    assert meta["kept"] == pytest.approx(1 - band.mean()) and meta["teacher_folds"] == [0, 1]
    out = capsys.readouterr().out
    assert f"pseudo labels: {len(names)} tiles" in out and "may be slightly optimistic" in out

    # A rerun resumes the finished run and keeps the very labels it trained on.
    stamp = labels.stat().st_mtime_ns
    assert pseudo.pseudo_round(teacher, [0], low, high, None, [f"data.root={data}"]) == student
    assert labels.stat().st_mtime_ns == stamp and "note: reusing" in capsys.readouterr().out


@pytest.mark.parametrize("truth", ["corrupt", "delete"])
def test_test_truth_is_never_read(teacher, demo_root, tmp_path, truth):
    copy = _copy_data(demo_root, tmp_path / "data", truth)
    if truth == "corrupt":
        with pytest.raises(DataError):  # whatever read it would fail
            read_source(DataConfig(root=str(copy)))
    made = {}
    for root in (demo_root, copy):
        data = DataConfig(root=str(root))
        path = pseudo.make_pseudo_labels(teacher, device="cpu", data=data, num_workers=0)
        with np.load(path) as z:
            made[root] = (list(z["names"]), z["masks"].copy())
    assert made[copy][0] == made[demo_root][0]
    np.testing.assert_array_equal(made[copy][1], made[demo_root][1])


# ----------------------------------------------------------------------------- bad files


def _mutate(names: list[str], masks: np.ndarray, how: str) -> tuple[list[str], np.ndarray]:
    names, masks = list(names), masks.copy()
    if how == "unknown name":
        names[2] = "not_a_test_tile.jpg"
    elif how == "name twice":
        names[1] = names[0]
    elif how == "value 7":
        masks[3, 10, 20] = 7
    elif how == "wrong size":
        masks = masks[:, :32]
    return names, masks


@pytest.mark.parametrize(
    "how, message",
    [
        ("missing file", "cannot be read"),
        ("unknown name", "not_a_test_tile.jpg"),
        ("name twice", "name some tiles twice"),
        ("value 7", "mask values [7]"),
        ("wrong size", "(8, 32, 64), not uint8 [(8, 64, 64)]"),
        ("no ignore_index", "set loss.ignore_index=255"),
    ],
)
def test_bad_pseudo_labels_fail_in_one_line_naming_the_file(demo_root, tmp_path, how, message):
    test = _test_tiles(demo_root)
    names, masks = _mutate(test.names, np.zeros((len(test), 64, 64), np.uint8), how)
    path = tmp_path / "labels.npz"
    if how != "missing file":
        pseudo.write_pseudo_labels(path, names, masks, {})
    ignore = None if how == "no ignore_index" else 255
    with pytest.raises(DataError) as e:
        load_pseudo_labels(DataConfig(root=str(demo_root), pseudo_labels=str(path)), ignore)
    text = str(e.value)
    assert message in text and str(path) in text and "make pseudo" in text and "\n" not in text


def test_a_bad_pseudo_file_stops_make_train_before_any_step(tiny_cfg, demo_root, tmp_path, capsys):
    test = _test_tiles(demo_root)
    path = pseudo.write_pseudo_labels(
        tmp_path / "labels.npz", *_mutate(test.names, np.ones((len(test), 64, 64), np.uint8), "value 7"), {}
    )
    cfg = tiny_cfg(f"data.pseudo_labels={path}", "loss.ignore_index=255")
    save_config(cfg, tmp_path / "cfg.yaml")
    assert trainer.main(["--config", str(tmp_path / "cfg.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: pseudo labels") and "mask values [7]" in err and "\n" not in err
    assert not (Path(cfg.train.runs_dir) / "tiny" / "fold0" / "last.pt").exists()
    assert pseudo.main(["--run", str(tmp_path / "no-such-run")]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
