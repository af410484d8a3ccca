"""pipeline.data.demo: byte-identical per seed, the full competition layout, plausible masks, groups."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.data import rle
from pipeline.data.demo import STAMP, generate, main, plan_scenes

SIZE = 64
N_TRAIN, N_TEST = 24, 8


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _read(csv: Path) -> pd.DataFrame:
    return pd.read_csv(csv, sep="\t", header=None, names=["name", "rle"], keep_default_na=False, dtype=str)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return generate(
        tmp_path_factory.mktemp("demo") / "data", n_train=N_TRAIN, n_test=N_TEST, size=SIZE, seed=0
    )


def test_same_seed_gives_the_same_bytes_and_another_seed_does_not(demo, tmp_path):
    again = generate(tmp_path / "again", n_train=N_TRAIN, n_test=N_TEST, size=SIZE, seed=0)
    first, second = _files(demo), _files(again)
    assert first.keys() == second.keys()
    assert [k for k in first if first[k] != second[k]] == []
    other = _files(generate(tmp_path / "other", n_train=N_TRAIN, n_test=N_TEST, size=SIZE, seed=1))
    assert other["train_mask.csv"] != first["train_mask.csv"]
    jpegs = {v for k, v in first.items() if k.endswith(".jpg")}
    assert not jpegs & {v for k, v in other.items() if k.endswith(".jpg")}  # no tile is the same


def test_layout_is_complete(demo):
    train, test = _read(demo / "train_mask.csv"), _read(demo / "test_a_mask.csv")
    sample = _read(demo / "test_a_samplesubmit.csv")
    assert len(train) == N_TRAIN and len(test) == N_TEST
    assert sorted(p.name for p in (demo / "train").iterdir()) == sorted(train["name"])
    assert sorted(p.name for p in (demo / "test_a").iterdir()) == sorted(test["name"])
    assert sample["name"].tolist() == test["name"].tolist() and (sample["rle"] == "").all()
    assert (demo / "test_a_samplesubmit.csv").read_text().splitlines()[0].endswith("\t")  # name<TAB>, no rle
    names = train["name"].tolist() + test["name"].tolist()
    assert len(set(names)) == len(names) and all(n.startswith("demo_") and n.endswith(".jpg") for n in names)
    for path in [demo / "train" / train["name"][0], demo / "test_a" / test["name"][0]]:
        with Image.open(path) as im:
            assert im.format == "JPEG" and im.mode == "RGB" and im.size == (SIZE, SIZE)


def test_masks_decode_and_cover_a_sensible_share_of_the_tiles(demo):
    for csv in ("train_mask.csv", "test_a_mask.csv"):
        df = _read(demo / csv)
        masks = rle.decode_many(df["rle"].tolist(), (SIZE, SIZE), source=csv, names=df["name"].tolist())
        assert [rle.encode(m) for m in masks] == df["rle"].tolist()
    fractions = _fractions(demo / "train_mask.csv")
    # Real tiles of this task are ~20% building; the demo mixes dense, sparse and empty scenes.
    assert 0.05 < fractions.mean() < 0.4
    assert 1 <= (fractions == 0).sum() <= N_TRAIN // 3  # some empty tiles, not most
    assert fractions.max() > 0.15


def _fractions(csv: Path) -> np.ndarray:
    df = _read(csv)
    return rle.decode_many(df["rle"].tolist(), (SIZE, SIZE)).mean(axis=(1, 2))


def test_roofs_differ_from_the_background(demo):
    # A learnability floor: roof pixels must not look like the rest of the tile on average.
    df = _read(demo / "train_mask.csv")
    roof, ground = [], []
    for name, s in zip(df["name"], df["rle"]):
        img = np.asarray(Image.open(demo / "train" / name), dtype=np.float32)
        m = rle.decode(s, (SIZE, SIZE)).astype(bool)
        roof.append(img[m])
        ground.append(img[~m])
    roof_px, ground_px = np.concatenate(roof), np.concatenate(ground)
    assert np.abs(roof_px.mean(axis=0) - ground_px.mean(axis=0)).max() > 10
    assert roof_px.std(axis=0).mean() > 20  # many roof colours: a single colour threshold cannot work


def test_manifest_groups_are_scenes_that_never_straddle_splits(demo):
    manifest = pd.read_csv(demo / "manifest.csv", dtype=str)
    assert list(manifest.columns) == ["name", "split", "group"]
    train, test = _read(demo / "train_mask.csv"), _read(demo / "test_a_mask.csv")
    assert sorted(manifest["name"]) == sorted(train["name"].tolist() + test["name"].tolist())
    split_of = dict(zip(manifest["name"], manifest["split"]))
    assert {split_of[n] for n in train["name"]} == {"train"} and {split_of[n] for n in test["name"]} == {
        "test_a"
    }
    sizes = manifest.groupby("group")["name"].size()
    assert sizes.max() <= 4 and len(sizes) == len(plan_scenes(N_TRAIN, N_TEST)) == 8
    assert (manifest.groupby("group")["split"].nunique() == 1).all()
    # Names are shuffled across scenes: consecutive names must not simply be one group after another.
    ordered = manifest.sort_values("name")["group"].tolist()
    assert sum(a != b for a, b in zip(ordered, ordered[1:])) > len(sizes)


def test_stamp_skips_regeneration_and_other_parameters_regenerate(tmp_path):
    out = generate(tmp_path / "d", n_train=4, n_test=2, size=32, seed=0)
    mtime = (out / "train_mask.csv").stat().st_mtime_ns
    assert generate(out, n_train=4, n_test=2, size=32, seed=0) == out
    assert (out / "train_mask.csv").stat().st_mtime_ns == mtime  # untouched
    generate(out, n_train=8, n_test=2, size=32, seed=0)
    assert len(_read(out / "train_mask.csv")) == 8 and '"n_train": 8' in (out / STAMP).read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["d"]  # no temporary folders left behind


def test_refuses_to_replace_a_folder_that_is_not_a_demo_set(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a demo data set"):
        generate(tmp_path / "mine", n_train=4, n_test=2, size=32)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_cli_writes_then_reports_up_to_date(tmp_path, capsys):
    args = ["--out", str(tmp_path / "cli"), "--n-train", "4", "--n-test", "2", "--size", "32", "--seed", "3"]
    assert main(args) == 0
    assert "4 train + 2 test tiles of 32x32" in capsys.readouterr().out
    assert main(args) == 0
    assert "up to date" in capsys.readouterr().out
    assert main(["--out", str(tmp_path / "bad"), "--size", "8"]) == 2
    assert "size >= 32" in capsys.readouterr().err


@pytest.mark.slow
def test_default_set_at_full_size_is_fast(tmp_path):
    # The brief: 80 tiles of 512x512 in < 10 s on one core. CPU time, so a busy machine does not fail it.
    t0 = time.process_time()
    generate(tmp_path / "full", n_train=64, n_test=16, size=512, seed=0)
    assert time.process_time() - t0 < 10
