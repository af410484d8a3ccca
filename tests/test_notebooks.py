"""The notebooks run headless, end to end, on a run folder; the committed notebooks match their builder.

``demo_run`` is a synthetic finished run (config, folds, two folds of metrics and OOF probabilities,
the threshold search, the manifest, a submission) over the demo data of ``conftest.demo_root``, in
the exact layout ``make train`` / ``make submit`` write, but with made-up probabilities and no
checkpoints, so it costs a fraction of a second. The lead may replace its body with a real tiny
training (``pipeline.train.run`` on ``tiny_cfg``); the tests only rely on the returned paths.
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
from pipeline.layouts import read_source

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


@dataclass
class DemoRun:
    data: Path
    run: Path
    submission: Path


def _fake_probs(mask: np.ndarray, rng: np.random.Generator, shift: int) -> np.ndarray:
    """uint8 probabilities: the mask shifted by ``shift`` px, noise, and a 3x3 false-positive speck."""
    p = 0.8 * np.roll(mask, shift, axis=1).astype(np.float32) + 0.1 + rng.normal(0, 0.08, mask.shape)
    p[2:5, 2:5] = 0.9  # removed by min_area >= 16: the search should find that
    return np.rint(p.clip(0, 1) * 255).astype(np.uint8)


def _metrics(fold: int) -> pd.DataFrame:
    """Five epochs of falling losses and rising Dice, in metrics.csv's columns."""
    e = np.arange(1, 6)
    return pd.DataFrame(
        {
            "epoch": e,
            "train_loss": 0.7 * 0.7**e + 0.02 * fold,
            "val_loss": 0.75 * 0.75**e + 0.03 * fold,
            "val_dice": 0.9 - 0.5 * 0.6**e - 0.02 * fold,
            "val_iou": 0.8 - 0.5 * 0.6**e,
            "lr": 1e-3 * np.cos(e / 6),
            "seconds": 1.0,
        }
    )


def write_synthetic_run(run_dir: Path, data_root: Path, seed: int = 0) -> Path:
    """A finished two-fold run over ``data_root`` in ``make train``'s layout, without checkpoints."""
    rng = np.random.default_rng(seed)
    train = read_source(DataConfig(root=str(data_root)), with_test=False).train
    masks = dict(zip(train.names, np.asarray(train.masks)))
    folds = pd.DataFrame({"name": train.names, "fold": [i % 2 for i in range(len(train))]})
    run_dir.mkdir(parents=True)
    cfg = Config(name=run_dir.name, data=DataConfig(root=str(data_root), n_folds=2))
    save_config(cfg, run_dir / "config.yaml")
    folds.to_csv(run_dir / "folds.csv", index=False)
    probs, truths = [], []
    for k in (0, 1):
        fold_dir = run_dir / f"fold{k}"
        fold_dir.mkdir()
        _metrics(k).to_csv(fold_dir / "metrics.csv", index=False)
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


def write_submission(path: Path, data_root: Path) -> Path:
    """The test truth as a submission: the first tile predicted empty, the others shifted by 2 px."""
    test = read_source(DataConfig(root=str(data_root)), with_train=False).test
    masks = np.asarray(test.masks).copy()
    masks[0] = 0
    masks[1:] = np.roll(masks[1:], 2, axis=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{n}\t{rle.encode(m)}\n" for n, m in zip(test.names, masks)))
    return path


@pytest.fixture(scope="module")
def demo_run(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> DemoRun:
    """Demo data + a finished run + a submission; module-scoped because every test here reads it."""
    tmp = tmp_path_factory.mktemp("demo_run")
    run = write_synthetic_run(tmp / "runs" / "demo", demo_root)
    sub = write_submission(tmp / "submissions" / "demo-none-20250101-000000.csv", demo_root)
    return DemoRun(demo_root, run, sub)


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
    client = NotebookClient(
        nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
    )
    client.execute()
    return nb


def _outputs(nb: nbformat.NotebookNode, mime: str) -> list[str]:
    return [o["data"][mime] for c in nb.cells for o in c.get("outputs", []) if mime in o.get("data", {})]


def _text(nb: nbformat.NotebookNode) -> str:
    """Everything printed (stdout and stderr streams)."""
    return "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))


def _stderr(nb: nbformat.NotebookNode) -> str:
    """What the notebook wrote to stderr (warnings), less tqdm's notice that ipywidgets is absent.

    That notice comes from ``tqdm.auto`` in inference code imported by the fold-agreement cell
    when checkpoints exist; it is harmless and not the notebooks' doing.
    """
    text = "".join(o["text"] for c in nb.cells for o in c.get("outputs", []) if o.get("name") == "stderr")
    return re.sub(r".*TqdmWarning: IProgress not found.*\n(.*notebook_tqdm\n)?", "", text)


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
            assert not c.get("outputs") and not c.get("execution_count"), f"{name}: commit it without outputs"


def test_01_data(demo_run: DemoRun) -> None:
    nb = _execute("01_data.ipynb", DATA=str(demo_run.data), EXAMPLES=4)
    fractions = read_source(DataConfig(root=str(demo_run.data)), with_test=False).train.building_fraction()
    # fraction histogram, examples, and the empty tiles when there are any
    assert len(_outputs(nb, "image/png")) == 2 + bool((fractions == 0).any())
    text = _text(nb)
    assert f"{int((fractions == 0).sum())} of {len(fractions)} train tiles have no building" in text
    assert (
        "train_mask.csv: every row round-trips" in text and "test_a_mask.csv: every row round-trips" in text
    )
    assert not _stderr(nb), "warnings in the notebook's output"


def test_02_folds(demo_run: DemoRun) -> None:
    # The notebook itself asserts that its OOF Dice equals the manifest's oof_dice.
    nb = _execute(
        "02_folds.ipynb", DATA=str(demo_run.data), RUN=str(demo_run.run), WORST=3, AGREEMENT_TILES=4
    )
    # fold summary, learning curves, threshold curve, Dice histogram, worst tiles
    assert len(_outputs(nb, "image/png")) == 5
    assert "skipped: fold agreement needs at least two fold checkpoints" in _text(nb)
    assert not _stderr(nb), "warnings in the notebook's output"


def test_03_submission(demo_run: DemoRun) -> None:
    from pipeline.score import score_submission

    nb = _execute(
        "03_submission.ipynb",
        DATA=str(demo_run.data),
        SUBMISSION=str(demo_run.submission),
        EXAMPLES=4,
        WORST=2,
    )
    # predicted fractions, masks over tiles, test Dice histogram, worst tiles
    assert len(_outputs(nb, "image/png")) == 4
    truth = demo_run.data / "test_a_mask.csv"
    with Image.open(next((demo_run.data / "test_a").iterdir())) as im:
        shape = im.size[::-1]
    expected = score_submission(demo_run.submission, truth, shape)
    assert f"test mean Dice {expected['dice']:.4f} over {expected['n']} tiles" in _text(nb)
    # the first tile was written empty; no mask is full
    counts = rf"masks\s+{expected['n']}\s+1\s+0\s"
    assert any(re.search(r"tiles\s+empty\s+full.*\n\s*" + counts, t) for t in _outputs(nb, "text/plain"))
    assert not _stderr(nb), "warnings in the notebook's output"


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


def test_02_folds_on_a_real_tiny_training(tiny_cfg) -> None:
    """The folds notebook on what `make train` really writes (checkpoints included: fold agreement runs)."""
    from pipeline import train

    cfg = tiny_cfg("infer.tta=none")
    run = train.run(cfg)
    nb = _execute("02_folds.ipynb", DATA=cfg.data.root, RUN=str(run), WORST=3, AGREEMENT_TILES=4)
    # fold summary, learning curves, threshold curve, Dice histogram, worst tiles, fold agreement
    assert len(_outputs(nb, "image/png")) == 6
    assert "skipped" not in _text(nb)
    assert not _stderr(nb), "warnings in the notebook's output"
