"""Shared fixtures: tiny generated data sets and tiny training configs (CPU, seconds)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Decoded-mask cache and albumentations' network check: keep tests hermetic.
os.environ.setdefault("BUILDSEG_CACHE", tempfile.mkdtemp(prefix="buildseg-cache-"))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

ROOT = Path(__file__).resolve().parents[1]
REAL_DATA = Path(os.environ.get("BUILDSEG_REAL_DATA", ROOT.parent / "shared" / "data" / "buildings-real"))

TINY_OVERRIDES = [
    "model.encoder=tu-mobilenetv3_small_050",  # 0.4 M parameters: checkpoints stay small and fast
    "model.decoder_channels=[32,16,16,8,8]",
    "data.n_folds=2",
    "data.num_workers=0",
    "train.device=cpu",
    "train.epochs=2",
    "train.batch_size=4",
    "train.seed=0",
    "optim.lr=0.003",
    "optim.warmup_epochs=0",
    "infer.tta=flip",
    "infer.batch_size=8",
]


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """A tiny demo data set in the competition layout: 24 train + 8 test tiles of 64x64, with truth."""
    from pipeline.demo_data import generate

    return Path(generate(tmp_path_factory.mktemp("demo") / "data", n_train=24, n_test=8, size=64, seed=0))


@pytest.fixture
def tiny_cfg(demo_root, tmp_path):
    """Factory: a tiny CPU config on the demo data, runs under tmp_path; extra overrides as arguments."""
    from pipeline.config import load_config

    def make(*overrides: str):
        return load_config(
            None,
            [
                f"data.root={demo_root}",
                f"train.runs_dir={tmp_path / 'runs'}",
                "name=tiny",
                *TINY_OVERRIDES,
                *overrides,
            ],
        )

    return make


def real_data_or_skip() -> Path:
    if not (REAL_DATA / "train_mask.csv").is_file():
        pytest.skip(f"real data not found at {REAL_DATA} (set BUILDSEG_REAL_DATA)")
    return REAL_DATA
