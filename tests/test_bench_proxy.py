"""The accuracy proxy (bench/proxy.py): the shrunk data, the plain loop's own RLE reader, the summary."""

from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
import pytest

from bench import proxy
from pipeline.data import rle
from pipeline.data.demo import generate
from pipeline.data.images import read_image
from pipeline.data.masks import read_mask_csv


def test_shrink_area_averages_images_and_keeps_masks_nearest(tmp_path):
    src = generate(tmp_path / "src", n_train=40, n_test=4, size=64, seed=0)
    dst = proxy.shrink(src, tmp_path / "small", 32)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".small-")]  # no temp folder left
    big, small = read_mask_csv(src / "train_mask.csv"), read_mask_csv(dst / "train_mask.csv")
    errors = []
    assert big["name"].tolist() == small["name"].tolist()
    for name, a, b in zip(big["name"], big["rle"], small["rle"]):
        want = cv2.resize(rle.decode(a, (64, 64)), (32, 32), interpolation=cv2.INTER_NEAREST)
        assert np.array_equal(rle.decode(b, (32, 32)), want), name
        img, full = read_image(dst / "train" / name).astype(float), read_image(src / "train" / name)
        area = cv2.resize(full, (32, 32), interpolation=cv2.INTER_AREA)
        nearest = cv2.resize(full, (32, 32), interpolation=cv2.INTER_NEAREST)
        assert img.shape == (32, 32, 3)
        errors.append((np.abs(img - area).mean(), np.abs(img - nearest).mean()))
    # area-averaged up to JPEG (quality 95) error, and closer to that than to a nearest-neighbour shrink
    to_area, to_nearest = np.mean(errors, axis=0)
    assert to_area < 3 and to_area < 0.8 * to_nearest
    folds = pd.read_csv(dst / "folds.csv")
    groups = dict(pd.read_csv(dst / "manifest.csv")[["name", "group"]].values)
    assert sorted(folds["name"]) == sorted(big["name"])
    # grouped by scene: a group never spans two folds
    assert folds.assign(g=folds["name"].map(groups)).groupby("g")["fold"].nunique().max() == 1
    assert proxy.shrink(src, dst, 32) == dst  # built once


def test_plain_rle_reader_agrees_with_the_pipeline_codec():
    g = np.random.default_rng(0)
    for shape in [(8, 8), (5, 7), (128, 128)]:
        mask = (g.random(shape) > 0.6).astype(np.uint8)
        assert np.array_equal(proxy._plain_decode(rle.encode(mask), shape), mask)
    assert not proxy._plain_decode("", (4, 4)).any()


def _row(recipe, seed, oof, none, d4, **extra):
    return {"recipe": recipe, "seed": seed, "oof_dice": oof, "test_a_dice": {"none": none, "d4": d4, **extra}}


TWO_RECIPES = [
    _row("default", 0, 0.40, 0.50, 0.52),
    _row("default", 1, 0.44, 0.48, 0.50),
    _row("swa", 0, 0.50, 0.55, 0.60),
    _row("swa", 1, 0.52, 0.49, 0.58),
]


def test_summary_means_spreads_and_gains_known_answer():
    by = {s["recipe"]: s for s in proxy.summarise(TWO_RECIPES)}
    assert by["default"]["oof_dice"] == {"mean": 0.42, "spread": 0.04}
    swa = by["swa"]
    assert swa["oof_dice"]["mean"] == pytest.approx(0.51) and swa["oof_dice"]["gain"] == pytest.approx(0.09)
    assert swa["oof_dice"]["significant"]  # 0.09 > both spreads (0.02, 0.04)
    assert swa["test_a_dice/none"]["gain"] == pytest.approx(0.03)
    assert not swa["test_a_dice/none"]["significant"]  # 0.03 < swa's own spread 0.06: noise
    assert swa["test_a_dice/d4"]["significant"]  # 0.08 > 0.02


def test_summary_reports_extra_tta_sets_only_when_every_seed_has_them():
    rows = [_row("ms", 0, 0.4, 0.5, 0.5, d4_ms=0.6), _row("ms", 1, 0.4, 0.5, 0.5, d4_ms=0.7)]
    (entry,) = proxy.summarise(rows)
    assert entry["test_a_dice/d4_ms"] == {"mean": 0.65, "spread": 0.1}
    (entry,) = proxy.summarise([*rows, _row("ms", 2, 0.4, 0.5, 0.5)])
    assert "test_a_dice/d4_ms" not in entry


def test_markdown_table_marks_gains_within_the_noise():
    table = proxy.markdown(proxy.summarise(TWO_RECIPES)).splitlines()
    assert table[2].startswith("| default | configs/default.yaml at CPU scale | 2 | — | 0.420 ± 0.040 |")
    assert (
        "| 0.510 ± 0.020 (+0.090) | — | — | — | 0.520 ± 0.060 (+0.030, noise) | 0.590 ± 0.020 (+0.080) |"
        in table[3]
    )


def test_the_plain_loop_is_shown_at_0_5_only_and_its_epoch_selection_is_marked():
    """Its best-epoch validation Dice is not a tuned OOF Dice: it goes to the @0.5 column, marked."""
    plain = [
        {
            "recipe": "plain",
            "seed": s,
            "oof_dice@0.5": o,
            "oof_dice": None,
            "test_a_dice": None,
            "test_a_dice@0.5": {"none": n, "d4": d},
        }
        for s, o, n, d in ((0, 0.42, 0.45, 0.46), (1, 0.43, 0.46, 0.43))
    ]
    default = [
        {**r, "oof_dice@0.5": 0.44 + 0.01 * r["seed"], "test_a_dice@0.5": {"none": 0.45, "d4": 0.46}}
        for r in TWO_RECIPES[:2]
    ]
    by = {e["recipe"]: e for e in proxy.summarise([*default, *plain])}
    assert "oof_dice" not in by["plain"] and "test_a_dice/none" not in by["plain"]
    assert by["plain"]["test_a_dice@0.5/none"]["gain"] == pytest.approx(
        0.005
    )  # compared at equal post-processing
    row = next(r for r in proxy.markdown(list(by.values())).splitlines() if r.startswith("| plain"))
    assert "0.425 ± 0.010 (-0.020) † | — |" in row
