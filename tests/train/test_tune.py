"""pipeline.train.tune: OOF search written to the manifest and every checkpoint; re-tuning, no training."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from pipeline.core.io import load_checkpoint, load_yaml
from pipeline.train import trainer, tune


@pytest.fixture
def trained(tiny_cfg):
    cfg = tiny_cfg("train.epochs=1")
    return cfg, trainer.run(cfg)


def _checkpoint_values(run_dir: Path) -> set[tuple[float, int]]:
    manifest = load_yaml(run_dir / "manifest.yaml")
    return {
        (load_checkpoint(run_dir / c)["threshold"], load_checkpoint(run_dir / c)["min_area"])
        for c in manifest["checkpoints"]
    }


def test_training_ends_tuned(trained):
    cfg, run_dir = trained
    manifest = load_yaml(run_dir / "manifest.yaml")
    search = pd.read_csv(run_dir / "threshold_search.csv")
    best = search.loc[search["dice"].idxmax()]
    assert (manifest["threshold"], manifest["min_area"]) == (best["threshold"], best["min_area"])
    assert _checkpoint_values(run_dir) == {(manifest["threshold"], manifest["min_area"])}


def test_make_tune_retunes_without_training(trained, capsys):
    cfg, run_dir = trained
    last = {p: p.stat().st_mtime_ns for p in run_dir.glob("fold*/last.pt")}
    grid = ["infer.thresholds=[0.2,0.25]", "infer.min_areas=[0,4]"]
    assert tune.main(["--run", str(run_dir), *grid]) == 0
    out = capsys.readouterr().out
    assert "oof_dice@tuned" in out
    manifest = load_yaml(run_dir / "manifest.yaml")
    search = pd.read_csv(run_dir / "threshold_search.csv")
    assert {(0.2, 0), (0.2, 4), (0.25, 0), (0.25, 4)} <= set(zip(search["threshold"], search["min_area"]))
    best = search.loc[search["dice"].idxmax()]
    assert (manifest["threshold"], manifest["min_area"]) == (best["threshold"], best["min_area"])
    if len(search) > 4:  # the best sat at an edge of the 2 x 2 grid: the search widened it and says so
        assert "note: the best" in out and manifest["oof"]["widened"]
    # Every checkpoint carries the new values: a single best.pt is self-sufficient.
    assert _checkpoint_values(run_dir) == {(manifest["threshold"], manifest["min_area"])}
    assert {p: p.stat().st_mtime_ns for p in run_dir.glob("fold*/last.pt")} == last, "tuning retrained"


def test_make_tune_refuses_training_settings(trained, capsys):
    _, run_dir = trained
    assert tune.main(["--run", str(run_dir), "train.epochs=3"]) == 2
    assert "changes only infer.* settings" in capsys.readouterr().err


def test_manifest_refuses_checkpoints_of_another_config(trained, capsys):
    """A run's manifest lists only checkpoints of the run's config (the fold aside): a fold trained with
    another config (here another learning rate, as a fold copied in from another run) is refused, naming it,
    and every stage that loads the run refuses it too (issue 21: submit used it without a word). Runs are
    ensembled on purpose by make blend, or by a manifest.yaml in a folder of its own."""
    from pipeline.core.io import CheckpointError, save_checkpoint
    from pipeline.infer.ensemble import load_ensemble
    from pipeline.runs.manifest import load_manifest

    _, run_dir = trained
    state = load_checkpoint(run_dir / "fold1/best.pt")
    state["config"]["optim"]["lr"] = 0.5
    save_checkpoint(run_dir / "fold1/best.pt", state)
    before = (run_dir / "manifest.yaml").read_text()
    assert tune.main(["--run", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert "fold1/best.pt" in err and "optim.lr: 0.003 -> 0.5" in err and "of their own" in err
    assert (run_dir / "manifest.yaml").read_text() == before, "the manifest must not list the stranger"
    with pytest.raises(CheckpointError, match="fold1/best.pt was trained with another config"):
        load_ensemble(load_manifest(run_dir), torch.device("cpu"))


def test_tune_without_oof_says_what_to_run(tiny_cfg, tmp_path, capsys):
    from pipeline.core.config import save_config

    run_dir = tmp_path / "empty-run"
    run_dir.mkdir()
    save_config(tiny_cfg(), run_dir / "config.yaml")
    assert tune.main(["--run", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert "no out-of-fold files" in err and "Traceback" not in err


def test_format_table_known_rows():
    tuned = {
        "threshold": 0.45,
        "min_area": 16,
        "oof_dice": 0.8,
        "oof_dice@0.5": 0.75,
        "n_oof": 10,
        "per_fold": {
            0: {"n": 6, "dice@0.5": 0.7, "dice@tuned": 0.78},
            1: {"n": 4, "dice@0.5": 0.8, "dice@tuned": 0.83},
        },
        "best": {0: 0.71},
    }
    lines = tune.format_table(tuned).splitlines()
    assert lines[1].split() == ["0", "6", "0.7100", "0.7000", "0.7800"]
    assert lines[2].split() == ["1", "4", "-", "0.8000", "0.8300"]
    assert lines[3].split() == ["all", "10", "0.7500", "0.8000"]
    assert lines[4] == "threshold 0.45, min_area 16"


def _oof_run(root: Path, n: int, size: int = 64) -> tuple[object, Path]:
    """n generated tiles in the competition layout and a run with synthetic OOF files (no training)."""
    import numpy as np
    from PIL import Image

    from pipeline.core.config import Config, DataConfig, save_config
    from pipeline.data import rle
    from pipeline.data.folds import make_folds
    from pipeline.data.layouts import read_source
    from pipeline.data.maskcsv import format_csv
    from pipeline.runs.oof import oof_writer

    rng = np.random.default_rng(n)
    (root / "train").mkdir(parents=True)
    rows = []
    for i in range(n):
        mask = np.zeros((size, size), np.uint8)
        y, x = rng.integers(0, size - 8, 2)
        mask[y : y + rng.integers(2, 16), x : x + rng.integers(2, 16)] = 1
        Image.fromarray(np.full((size, size, 3), 90, np.uint8)).save(root / "train" / f"t{i:05d}.png")
        rows.append((f"t{i:05d}.png", rle.encode(mask)))
    (root / "train_mask.csv").write_text(format_csv(rows))
    cfg = Config(name="big", data=DataConfig(root=str(root)))
    source = read_source(cfg.data, with_test=False)
    folds = make_folds(source.train.names, source.train.foreground_fraction(), 5, 0)
    run = root / "run"
    run.mkdir()
    save_config(cfg, run / "config.yaml")
    for k in range(5):
        names = folds.loc[folds["fold"] == k, "name"].tolist()
        masks = np.asarray(source.train.select(names).masks)
        probs = (masks * 140 + rng.integers(0, 120, masks.shape)).astype(np.uint8)
        (run / f"fold{k}").mkdir()
        with oof_writer(run / f"fold{k}" / "oof.npz", names, "probs") as write:
            write(range(len(names)), probs)
    return source, run


def test_tuning_memory_does_not_grow_with_the_tiles(tmp_path):
    """Streamed: more OOF tiles cost only their per-tile counts (54 grid cells, under 4 KB a tile at the
    peak), never their maps (128 x 128 probabilities + mask = 32 KB a tile here, 512 KB at 512 px)."""
    import tracemalloc

    from pipeline.core.config import load_config

    peaks = {}
    for n in (300, 1200):
        source, run = _oof_run(tmp_path / f"n{n}", n, size=128)
        cfg = load_config(run / "config.yaml")
        tracemalloc.start()
        tuned = tune.tune_binary(cfg, source, run)
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert tuned["n_oof"] == n
    per_tile = (peaks[1200] - peaks[300]) / 900
    assert per_tile < 8 * 1024, f"{per_tile:.0f} bytes a tile: are OOF maps held whole?"


def test_an_interrupted_tune_changes_none_of_its_files(trained, monkeypatch, capsys):
    """Ctrl-C while writing the second best.pt used to leave a new manifest beside old thresholds."""
    from pipeline.runs import checkpoint

    _, run_dir = trained
    files = ["manifest.yaml", "threshold_search.csv", "fold0/best.pt", "fold1/best.pt"]
    before = {f: (run_dir / f).read_bytes() for f in files}
    real, calls = checkpoint.write_checkpoint, []

    def write_then_interrupt(path, ckpt):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(path, ckpt)

    monkeypatch.setattr(checkpoint, "write_checkpoint", write_then_interrupt)
    assert tune.main(["--run", str(run_dir), "infer.thresholds=[0.6,0.65]", "infer.min_areas=[8]"]) == 130
    assert {f: (run_dir / f).read_bytes() for f in files} == before
    assert not [p for p in run_dir.rglob(".*") if p.is_file()], "temp files left behind"


def test_tuning_on_data_of_another_tile_size_is_one_line(trained, tmp_path, capsys):
    """The same tile names at another size used to end in a traceback from the search's shape check."""
    from pipeline.data.demo import generate

    _, run_dir = trained
    other = generate(tmp_path / "other", n_train=24, n_test=8, size=96, seed=0)
    assert tune.main(["--run", str(run_dir), "--data", str(other)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "the OOF maps are 64x64 but the masks" in err and "96x96" in err
