"""pipeline.report.runs (make runs): one row per run or blend from manifests alone, best OOF Dice first; runs
training, unfinished or broken are listed as such; submissions are matched to their run by name."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from fake_runs import oof_run, tile_data

from pipeline.core.io import load_yaml, save_yaml
from pipeline.infer.blend import blend_runs
from pipeline.report.runs import format_table, main, runs_table, submissions_by_run

NOW = 1_800_000_000.0
NAMES = ["t0.jpg", "t1.jpg", "t2.jpg", "t3.jpg"]


@pytest.fixture
def runs_dir(tmp_path: Path) -> Path:
    """Runs a (OOF 0.7) and a-x (0.9, FPN), their blend (both runs' OOF maps are right: 1.0), one training
    (OOF 0.99, but a lock), one unfinished, one broken; the submissions of a and a-x, one scored."""
    masks = np.zeros((4, 16, 16), np.uint8)
    masks[:, :, :8] = 1
    data = tile_data(tmp_path / "data", masks, NAMES)
    runs = tmp_path / "runs"
    probs = masks * 255
    from pipeline.core.config import ModelConfig

    oof_run(runs / "a", data, NAMES, [0, 0, 1, 1], probs, oof_dice=0.7)
    oof_run(runs / "a-x", data, NAMES, [0, 0, 1, 1], probs, oof_dice=0.9, model=ModelConfig(arch="FPN"))
    blend_runs([runs / "a", runs / "a-x"], runs / "blend", overrides=["infer.min_areas=[0]"])
    oof_run(runs / "busy", data, NAMES, [0, 0, 1, 1], probs, oof_dice=0.99)
    (runs / ".busy.lock").write_text(json.dumps({"pid": 1, "host": "elsewhere"}))
    (runs / "cut" / "fold0").mkdir(parents=True)  # killed before its manifest
    oof_run(runs / "broken", data, NAMES, [0, 0, 1, 1], probs, oof_dice=0.95)
    manifest = load_yaml(runs / "broken" / "manifest.yaml")
    save_yaml(runs / "broken" / "manifest.yaml", {**manifest, "threshold": 2.0})
    subs = tmp_path / "submissions"
    subs.mkdir()
    for i, name in enumerate(("a-d4-20250101-000000", "a-x-d4-20250102-000000", "a-x-none-20250103-000000")):
        (subs / f"{name}.csv").write_text("")
        os.utime(subs / f"{name}.csv", (NOW - 100 + i, NOW - 100 + i))
    (subs / "a-x-d4-20250102-000000.csv.score.json").write_text(json.dumps({"dice": 0.8123}))
    for p in (runs / "a", runs / "a-x", runs / "blend"):
        os.utime(p / "manifest.yaml", (NOW - 7200, NOW - 7200))
    return runs


def test_the_table_ranks_runs_by_oof_dice_and_lists_the_rest_as_they_are(runs_dir):
    table = runs_table(runs_dir, runs_dir.parent / "submissions", now=NOW).set_index("run")
    assert list(table.index) == ["blend", "a-x", "a", "broken", "busy", "cut"]
    ax, blend, a = table.loc["a-x"], table.loc["blend"], table.loc["a"]
    assert (ax["kind"], ax["model"], ax["epochs"], ax["folds"], ax["oof_dice"]) == (
        "run",
        "FPN/resnet34",
        200,
        2,
        0.9,
    )
    assert (
        ax["submissions"] == "none -, d4 0.8123" and a["submissions"] == "d4 -"
    )  # newest first, a-x never a's
    assert a["model"] == "Unet/resnet34" and a["age"] == "2 h 00 min" and a["status"] == "ok"
    assert (
        blend["kind"] == "blend"
        and blend["model"] == "a 1 + a-x 0"
        and blend["oof_dice"] == pytest.approx(1.0)
    )
    assert blend["nested"] == pytest.approx(1.0) and np.isnan(ax["nested"])
    assert table.loc["busy", "status"] == "training"
    assert table.loc["cut", "status"].startswith("unfinished: no manifest.yaml")
    assert (
        table.loc["broken", "status"].startswith("broken: ")
        and "threshold must be between 0 and 1" in (table.loc["broken", "status"])
    )


def test_submission_names_are_split_at_the_tta_and_time(tmp_path):
    for name in (
        "blend-a+b-per-run-20250101-000000",
        "r-d4_ms-20250101-000000",
        "notes",
        "x-20250101-000000",
    ):
        (tmp_path / f"{name}.csv").write_text("")
    found = submissions_by_run(tmp_path)
    assert {k: [s["tta"] for s in v] for k, v in found.items()} == {"blend-a+b": ["per-run"], "r": ["d4_ms"]}


def test_cli_prints_the_table_and_an_empty_folder_is_no_error(runs_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(runs_dir.parent)
    assert main([]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:6] == ["run", "kind", "model", "epochs", "folds", "oof_dice"]
    assert out[2].startswith("a-x ") and "0.9000" in out[2] and len(out) == 7
    assert main(["--runs-dir", str(tmp_path / "none")]) == 0 and capsys.readouterr().out.strip() == "no runs"
    assert format_table(runs_table(tmp_path / "none")) == "no runs"
