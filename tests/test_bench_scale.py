"""bench.scale: each stage runs in a fresh process (its peak RSS its own) on generated 512 px tiles in the
competition layout; the stages live in bench.scale_stages, the parent side in bench.scale."""

from __future__ import annotations

import pytest

from bench import scale


def test_stages_run_in_child_processes_and_report_time_and_memory(tmp_path):
    root, cache = tmp_path / "data", tmp_path / "cache"
    scale.generate(root, 8, 2)
    assert len(list((root / "train").glob("*.jpg"))) == 8 and (root / "test_a_samplesubmit.csv").is_file()
    row = scale.run_stage("check_data", root, cache)
    assert row["errors"] == 0 and row["seconds"] > 0 and row["peak_rss_mb"] >= row["peak_anon_mb"] > 0
    scale.run_stage("folds", root, cache)
    assert (root / "folds.csv").read_text().count("\n") == 9  # a header and the 8 tiles


def test_growth_is_the_exponent_of_a_power_law():
    assert scale.growth([1000, 10000], [2.0, 20.0]) == pytest.approx(1.0)
    assert scale.growth([1000], [2.0]) is None
