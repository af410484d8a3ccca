"""The notebooks run headless, end to end, on a run folder; the committed notebooks match their builder.

``demo_run`` builds a tiny data set in the competition layout and a synthetic finished run over it
(config, folds, two folds of metrics and OOF probabilities, the threshold search, the manifest, a
submission) in the exact layout ``make train`` / ``make submit`` write. The lead may replace its body
with a real tiny training (``pipeline.train.run`` on ``TINY_OVERRIDES``); the tests below only rely
on the returned paths.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest
from nbclient import NotebookClient
from PIL import Image

from pipeline import postprocess, rle
from pipeline.config import Config, DataConfig, save_config
from pipeline.io import save_yaml

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
SIZE = 64  # tile side: small enough that three notebooks run in seconds


@dataclass
class DemoRun:
    data: Path
    run: Path
    submission: Path


def _tile(rng: np.random.Generator, n_buildings: int) -> tuple[np.ndarray, np.ndarray]:
    """A textured background with ``n_buildings`` bright rectangles: (image [S, S, 3], mask [S, S])."""
    img = rng.normal((90, 105, 80), 12, size=(SIZE, SIZE, 3))
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    for _ in range(n_buildings):
        h, w = rng.integers(6, 20, size=2)
        y, x = rng.integers(0, SIZE - h), rng.integers(0, SIZE - w)
        mask[y : y + h, x : x + w] = 1
        img[y : y + h, x : x + w] = rng.normal((200, 185, 170), 8, size=(h, w, 3))
    return img.clip(0, 255).astype(np.uint8), mask


def write_tiny_data(root: Path, n_train: int = 12, n_test: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    """The competition layout under ``root`` (every 4th train tile empty); returns masks by tile name."""
    rng = np.random.default_rng(seed)
    masks = {}
    for split, n, folder, csvs in (
        ("train", n_train, "train", ["train_mask.csv"]),
        ("test", n_test, "test_a", ["test_a_mask.csv"]),
    ):
        (root / folder).mkdir(parents=True)
        rows = []
        for i in range(n):
            name = f"{split}{i:03d}.jpg"
            img, m = _tile(rng, i % 4 if split == "train" else 1 + i % 3)
            Image.fromarray(img).save(root / folder / name, quality=95)
            masks[name] = m
            rows.append((name, rle.encode(m)))
        for csv in csvs:
            (root / csv).write_text("".join(f"{n}\t{r}\n" for n, r in rows))
        if split == "test":
            (root / "test_a_samplesubmit.csv").write_text("".join(f"{n}\t\n" for n, _ in rows))
    return masks


def _fake_probs(mask: np.ndarray, rng: np.random.Generator, shift: int) -> np.ndarray:
    """uint8 probabilities: the mask shifted by ``shift`` px, noise, and a 3x3 false-positive speck."""
    p = 0.8 * np.roll(mask, shift, axis=1).astype(np.float32) + 0.1 + rng.normal(0, 0.08, mask.shape)
    p[2:5, 2:5] = 0.9  # removed by min_area >= 16: the search should find that
    return np.rint(p.clip(0, 1) * 255).astype(np.uint8)


def write_synthetic_run(run_dir: Path, data_root: Path, masks: dict[str, np.ndarray], seed: int = 0) -> Path:
    """A finished two-fold run in ``make train``'s layout (no checkpoints); returns ``run_dir``."""
    rng = np.random.default_rng(seed)
    train = sorted(n for n in masks if n.startswith("train"))
    folds = pd.DataFrame({"name": train, "fold": [i % 2 for i in range(len(train))]})
    run_dir.mkdir(parents=True)
    save_config(
        Config(name=run_dir.name, data=DataConfig(root=str(data_root), n_folds=2)), run_dir / "config.yaml"
    )
    folds.to_csv(run_dir / "folds.csv", index=False)
    probs, truths = [], []
    for k in (0, 1):
        fold_dir = run_dir / f"fold{k}"
        fold_dir.mkdir()
        epochs = np.arange(1, 6)
        pd.DataFrame(
            {
                "epoch": epochs,
                "train_loss": 0.7 * 0.7**epochs + 0.02 * k,
                "val_loss": 0.75 * 0.75**epochs + 0.03 * k,
                "val_dice": 0.9 - 0.5 * 0.6**epochs - 0.02 * k,
                "val_iou": 0.8 - 0.5 * 0.6**epochs,
                "lr": 1e-3 * np.cos(epochs / 6),
                "seconds": 1.0,
            }
        ).to_csv(fold_dir / "metrics.csv", index=False)
        names = folds.loc[folds["fold"] == k, "name"].tolist()[::-1]  # not sorted: load_run must sort
        p = np.stack([_fake_probs(masks[n], rng, shift=i % 3) for i, n in enumerate(names)])
        np.savez_compressed(fold_dir / "oof.npz", names=np.array(names), probs=p)
        probs.append(p)
        truths.append(np.stack([masks[n] for n in names]))
    result = postprocess.search_threshold(
        np.concatenate(probs), np.concatenate(truths), (0.3, 0.4, 0.5, 0.6, 0.7), (0, 16, 32)
    )
    result.table.to_csv(run_dir / "threshold_search.csv", index=False)
    save_yaml(
        run_dir / "manifest.yaml",
        {
            "run": run_dir.name,
            "data_root": str(data_root),
            "checkpoints": ["fold0/best.pt", "fold1/best.pt"],  # not written: fold agreement is skipped
            "tta": "none",
            "threshold": result.threshold,
            "min_area": result.min_area,
            "classes": 1,
            "oof": {"oof_dice": result.dice, "n_oof": len(train)},
        },
    )
    return run_dir


def write_submission(path: Path, masks: dict[str, np.ndarray]) -> Path:
    """Test masks as a submission: the first tile predicted empty, the others shifted by 2 px."""
    test = sorted(n for n in masks if n.startswith("test"))
    rows = [(n, "" if i == 0 else rle.encode(np.roll(masks[n], 2, axis=0))) for i, n in enumerate(test)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{n}\t{r}\n" for n, r in rows))
    return path


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> DemoRun:
    """Data + a finished run + a submission; module-scoped because every notebook test reads it."""
    tmp = tmp_path_factory.mktemp("demo_run")
    masks = write_tiny_data(tmp / "data")
    run = write_synthetic_run(tmp / "runs" / "demo", tmp / "data", masks)
    sub = write_submission(tmp / "submissions" / "demo-none-20250101-000000.csv", masks)
    return DemoRun(tmp / "data", run, sub)


# ----------------------------------------------------------------------------- helpers


def _execute(name: str, **params: object) -> nbformat.NotebookNode:
    """Run ``notebooks/<name>`` with ``params`` injected; raises on the first failing cell.

    The parameters cell's source becomes its defaults followed by the overrides (what papermill's
    injected cell does), so a parameter the test does not set keeps its default.
    """
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"{name}: expected one cell tagged 'parameters'"
    cells[0].source += "\n# injected by the test\n" + "\n".join(f"{k} = {v!r}" for k, v in params.items())
    NotebookClient(
        nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
    ).execute()
    return nb


def _outputs(nb: nbformat.NotebookNode, mime: str) -> list[str]:
    return [o["data"][mime] for c in nb.cells for o in c.get("outputs", []) if mime in o.get("data", {})]


def _text(nb: nbformat.NotebookNode) -> str:
    return "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))


# ----------------------------------------------------------------------------- tests


def test_committed_notebooks_match_builder_and_have_no_outputs() -> None:
    spec = importlib.util.spec_from_file_location("build_notebooks", NOTEBOOKS / "build_notebooks.py")
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    for name, built in builder.build().items():
        committed = nbformat.read(NOTEBOOKS / name, as_version=4)
        assert [(c.cell_type, c.source, c.metadata.get("tags")) for c in committed.cells] == [
            (c.cell_type, c.source, c.metadata.get("tags")) for c in built.cells
        ], f"{name} is stale: run `python notebooks/build_notebooks.py`"
        for c in committed.cells:
            assert not c.get("outputs") and not c.get("execution_count"), f"{name}: commit without outputs"


def test_01_data(demo_run: DemoRun) -> None:
    nb = _execute("01_data.ipynb", DATA=str(demo_run.data), EXAMPLES=4)
    # fraction histogram, empty tiles, examples
    assert len(_outputs(nb, "image/png")) == 3
    text = _text(nb)
    assert "3 of 12 train tiles have no building" in text
    assert (
        "train_mask.csv: every row round-trips" in text and "test_a_mask.csv: every row round-trips" in text
    )


def test_02_folds(demo_run: DemoRun) -> None:
    nb = _execute(
        "02_folds.ipynb", DATA=str(demo_run.data), RUN=str(demo_run.run), WORST=3, AGREEMENT_TILES=4
    )
    # fold summary, learning curves, threshold curve, Dice histogram, worst tiles
    assert len(_outputs(nb, "image/png")) == 5
    assert "skipped: fold agreement needs at least two fold checkpoints" in _text(nb)


def test_03_submission(demo_run: DemoRun) -> None:
    nb = _execute(
        "03_submission.ipynb",
        DATA=str(demo_run.data),
        SUBMISSION=str(demo_run.submission),
        EXAMPLES=4,
        WORST=2,
    )
    # predicted fractions, masks over tiles, test Dice histogram, worst tiles
    assert len(_outputs(nb, "image/png")) == 4
    assert "test mean Dice" in _text(nb)
    # 4 test tiles, the first predicted empty, none full
    assert any(
        re.search(r"tiles\s+empty\s+full.*\n\s*masks\s+4\s+1\s+0\s", t) for t in _outputs(nb, "text/plain")
    )


def test_report_writes_every_figure(demo_run: DemoRun, tmp_path: Path) -> None:
    from pipeline.report import main, write_report

    paths = write_report(demo_run.run, out_dir=tmp_path / "report")
    assert [p.name for p in paths] == [
        "data_fractions.png",
        "data_examples.png",
        "folds.png",
        "learning_curves.png",
        "threshold_curve.png",
        "oof_dice_histogram.png",
        "worst_tiles.png",
    ]
    for p in paths:
        with Image.open(p) as im:
            assert im.format == "PNG" and min(im.size) > 100
    assert not list((tmp_path / "report").glob(".*.tmp")), "temporary files left behind"
    assert main([str(demo_run.run), "--data", str(demo_run.data), "--out", str(tmp_path / "cli")]) == 0
    assert len(list((tmp_path / "cli").glob("*.png"))) == 7


def test_report_cli_names_the_missing_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.report import main

    assert main([str(tmp_path / "nope")]) == 2
    assert "make train" in capsys.readouterr().err
