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
    "model.encoder_weights=null",  # random init: the default, imagenet, would download
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
    from pipeline.data.demo import generate

    return Path(generate(tmp_path_factory.mktemp("demo") / "data", n_train=24, n_test=8, size=64, seed=0))


@pytest.fixture
def tiny_cfg(demo_root, tmp_path):
    """Factory: a tiny CPU config on the demo data, runs under tmp_path; extra overrides as arguments."""
    from pipeline.core.config import load_config

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


class Network(list):
    """The URLs the weights reachability check was asked about; ``reachable`` is its answer."""

    reachable = False


@pytest.fixture
def network(monkeypatch, tmp_path) -> Network:
    """No test downloads weights: empty Hugging Face / torch hub caches and a stub reachability check
    (offline unless the test sets ``network.reachable = True``)."""
    import torch
    from huggingface_hub import constants

    from pipeline.model import pretrained

    net = Network()

    def reachable(url: str, timeout: float = 0) -> bool:
        net.append(url)
        return net.reachable

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch-hub"))
    monkeypatch.setattr(pretrained, "_hub_offline", lambda: False)
    monkeypatch.setattr(pretrained, "_weights_reachable", reachable)
    return net


def on_ci() -> bool:
    """True under a CI runner (``CI=true``, as GitHub Actions, GitLab and most others set it)."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def real_data_or_skip(*files: str) -> Path:
    """The real data folder (``BUILDSEG_REAL_DATA``, default ``../shared/data/buildings-real``) holding
    ``files`` (default ``train_mask.csv``). Missing, the test is skipped on a workstation and fails under
    CI, which always has the data: a skip there would pass a run that tested nothing real."""
    missing = [f for f in files or ("train_mask.csv",) if not (REAL_DATA / f).is_file()]
    if missing:
        where = f"real data not found at {REAL_DATA} (no {', '.join(missing)})"
        if on_ci():
            pytest.fail(
                f"{where}: CI must run the real-data tests; set BUILDSEG_REAL_DATA to the data folder"
            )
        pytest.skip(f"{where}; set BUILDSEG_REAL_DATA")
    return REAL_DATA


@pytest.fixture
def small_run(tmp_path: Path):
    """A fake finished run of 5 tiles of 8x8 (see fake_runs) and the Split holding their truth."""
    import numpy as np
    from fake_runs import H, W, masks, png, write_run

    from pipeline.data.dataset import Split

    names = [f"t{i}.png" for i in range(5)]
    truths = masks(5)
    probs = (truths * 200).astype(np.uint8)
    probs[3] = 0  # tile 3 missed entirely -> Dice 0
    run = write_run(tmp_path / "run", names, [0, 1, 0, 1, 0], probs)
    images = tmp_path / "images"
    images.mkdir()
    paths = [png(images / n, np.zeros((H, W, 3), np.uint8)) for n in names]
    return run, Split(names, paths, truths)


@pytest.fixture(scope="session")
def demo_run(demo_root: Path, tmp_path_factory: pytest.TempPathFactory):
    """Demo data + a finished run + a submission; session-scoped: the notebooks and report only read it."""
    from fake_runs import DemoRun, write_submission, write_synthetic_run

    tmp = tmp_path_factory.mktemp("demo_run")
    run = write_synthetic_run(tmp / "runs" / "demo", demo_root)
    sub = write_submission(tmp / "submissions" / "demo-none-20250101-000000.csv", demo_root)
    return DemoRun(demo_root, run, sub)


@pytest.fixture
def simulated_progress(monkeypatch):
    """``use(clock)``: pipeline.core.progress reads ``clock`` (simulated time) and prints log lines (no
    bar) into a log of phases of its own, with no heartbeat thread: the test calls ``progress.beat()``
    where the thread would. A fresh log, not a reset one: a heartbeat thread an earlier test started
    beats the log it was started on, and on a slow machine it would print extra lines into this test's."""

    from pipeline.core import progress

    def use(clock) -> None:
        monkeypatch.setattr(progress, "clock", clock)
        monkeypatch.setattr(progress, "HEARTBEAT_SECONDS", 0)
        monkeypatch.setattr(progress, "LOG", progress._Log())
        monkeypatch.delenv("BUILDSEG_PROGRESS", raising=False)
        monkeypatch.delenv("BUILDSEG_LOG_SECONDS", raising=False)

    return use
