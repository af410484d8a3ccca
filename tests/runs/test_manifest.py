"""pipeline.runs.manifest: manifest.yaml (a run's or a blend's), one writer and one strict reader; hand edits
out of range are named."""

from __future__ import annotations

import dataclasses

import pandas as pd
import pytest

from pipeline.core.config import ConfigError, InferConfig
from pipeline.core.io import load_yaml, save_yaml
from pipeline.runs.manifest import KEYS, Manifest, load_manifest, read_search, write_manifest, write_search

# What make tune writes for a binary run (pipeline.train.tune.publish).
VALID = {
    "run": "r",
    "data_root": "data/demo",
    "checkpoints": ["fold0/best.pt", "fold1/best.pt"],
    "tta": "flip",
    "threshold": 0.45,
    "min_area": 16,
    "batch_size": 8,
    "max_images": 32,
    "tile_size": 512,
    "overlap": 128,
    "classes": 1,
    "oof": {"oof_dice": 0.8},
}


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"checkpoints": []}, r"manifest.yaml: 'checkpoints' is empty; list at least one fold\*/best.pt"),
        ({"tta": "d8"}, r"manifest.yaml: tta must be one of none, flip, d4, ms or d4_ms, not 'd8'"),
        ({"threshold": "high"}, r"manifest.yaml: manifest.threshold: expected a number, got 'high'"),
        ({"threshold": 2.0}, r"manifest.yaml: threshold must be between 0 and 1 \(exclusive\), not 2.0"),
        ({"threshold": float("nan")}, r"threshold must be between 0 and 1 \(exclusive\), not nan"),
        ({"min_area": -5}, r"manifest.yaml: min_area must be >= 0 pixels, not -5"),
        ({"batch_size": 0}, r"manifest.yaml: batch_size must be >= 1, not 0; fix the value by hand"),
        ({"overlap": 600}, r"manifest.yaml: tile_size must be >= 32 and 0 <= overlap < tile_size"),
    ],
)
def test_hand_edited_manifest_errors(tmp_path, edit, message):
    data = {**VALID, **edit}
    save_yaml(tmp_path / "manifest.yaml", data)
    with pytest.raises(ConfigError, match=message):
        load_manifest(tmp_path / "manifest.yaml")


def test_written_manifest_reads_back_equal(tmp_path):
    infer = dataclasses.replace(InferConfig(), tta="d4", threshold=0.35, min_area=64, batch_size=8)
    manifest = Manifest(tmp_path, ("fold0/best.pt", "fold1/best.pt"), infer, 1, "data/x", {"oof_dice": 0.8})
    write_manifest(manifest)
    assert load_manifest(tmp_path) == manifest
    assert list(load_yaml(tmp_path / "manifest.yaml")) == list(KEYS)  # every key, in one order


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"min_aera": 16}, r"unknown key 'min_aera' \(did you mean 'min_area'\?\)"),
        (
            {"threshold": None},
            r"key 'threshold' is missing: the run's value cannot be guessed; add e.g. 'threshold: 0.5'",
        ),
        ({"tta": None, "overlap": None}, r"key 'tta' is missing \(and overlap\)"),
    ],
)
def test_unknown_and_missing_keys_are_errors_naming_the_key(tmp_path, edit, message):
    data = {k: v for k, v in {**VALID, **edit}.items() if v is not None}
    save_yaml(tmp_path / "manifest.yaml", data)
    with pytest.raises(ConfigError, match=message):
        load_manifest(tmp_path / "manifest.yaml")


def test_search_table_round_trip(tmp_path):
    assert read_search(tmp_path) is None
    table = pd.DataFrame({"threshold": [0.3, 0.5], "min_area": [0, 16], "dice": [0.7, 0.75]})
    write_search(tmp_path, table)
    pd.testing.assert_frame_equal(read_search(tmp_path), table)


# ----------------------------------------------------------------------------- blends (make blend)


def _blend(tmp_path):
    """A blend folder beside two run folders, as make blend writes it."""
    from pipeline.runs.manifest import Member

    for run in ("a", "b"):
        (tmp_path / "runs" / run).mkdir(parents=True)
    members = (
        Member("../a", 0.7, "d4", ("fold0/best.pt", "fold1/best.pt")),
        Member("../b", 0.3, "flip", ("fold0/best.pt",)),
    )
    infer = dataclasses.replace(InferConfig(), tta="d4", threshold=0.4, min_area=32)
    return Manifest(tmp_path / "runs" / "ab", (), infer, 1, "data/x", {"oof_dice": 0.8}, members)


def test_a_blend_manifest_reads_back_equal_with_its_members_checkpoints(tmp_path):
    from pipeline.runs.manifest import BLEND_KEYS

    blend = _blend(tmp_path)
    assert blend.checkpoints == ("../a/fold0/best.pt", "../a/fold1/best.pt", "../b/fold0/best.pt")
    write_manifest(blend)
    loaded = load_manifest(blend.run_dir)
    assert (
        loaded == blend
        and loaded.is_blend
        and loaded.member_dir(loaded.members[1]) == tmp_path / "runs" / "b"
    )
    data = load_yaml(blend.run_dir / "manifest.yaml")
    assert list(data) == list(BLEND_KEYS) and "checkpoints" not in data
    assert data["members"][0] == {
        "run": "../a",
        "weight": 0.7,
        "tta": "d4",
        "checkpoints": ["fold0/best.pt", "fold1/best.pt"],
    }


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            {"weight": -0.2},
            r"members\[1\]\.weight must be a number >= 0, not -0\.2; fix the value by hand or make the blend",
        ),
        ({"weight": float("nan")}, r"members\[1\]\.weight must be a number >= 0, not nan"),
        ({"weight": "heavy"}, r"members\[1\]\.weight must be a number >= 0, not 'heavy'"),
        ({"tta": "d8"}, r"members\[1\]\.tta must be one of none, flip, d4, ms or d4_ms, not 'd8'"),
        ({"checkpoints": []}, r"members\[1\]\.checkpoints is empty"),
        ({"weights": 1}, r"members\[1\] must have the keys run, weight, tta, checkpoints"),
        (
            {"run": "../gone"},
            r"members\[1\]: run \.\./gone \(.*gone\) not found: it was deleted or moved after the blend "
            r"was made; restore it, or make the blend again without it \(make blend RUNS=\.\.\.\)",
        ),
    ],
)
def test_hand_edited_blend_members_are_refused_naming_the_member(tmp_path, edit, message):
    blend = _blend(tmp_path)
    write_manifest(blend)
    data = load_yaml(blend.run_dir / "manifest.yaml")
    data["members"][1].update(edit)
    save_yaml(blend.run_dir / "manifest.yaml", data)
    with pytest.raises(ConfigError, match=message):
        load_manifest(blend.run_dir)


def test_a_blend_of_zero_weights_and_a_deleted_run_are_refused(tmp_path):
    import shutil

    blend = _blend(tmp_path)
    write_manifest(blend)
    data = load_yaml(blend.run_dir / "manifest.yaml")
    for m in data["members"]:
        m["weight"] = 0
    save_yaml(blend.run_dir / "manifest.yaml", data)
    with pytest.raises(ConfigError, match=r"every member's weight is 0; give one run a weight > 0"):
        load_manifest(blend.run_dir)
    write_manifest(blend)
    shutil.rmtree(tmp_path / "runs" / "a")
    with pytest.raises(ConfigError, match=r"members\[0\]: run \.\./a .* not found: it was deleted"):
        load_manifest(blend.run_dir)
