"""The notebooks run headless, end to end, on a run folder; the committed notebooks match their builder.

``demo_run`` (conftest; built by ``fake_runs.write_synthetic_run``) is a synthetic finished run over
the demo data, in the exact layout ``make train`` / ``make submit`` write, with made-up probabilities
and no checkpoints; ``test_02_folds_on_a_real_tiny_training`` runs the folds notebook on a real one.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import nbformat
from fake_runs import DemoRun
from nbclient import NotebookClient
from PIL import Image

from pipeline.core.config import DataConfig
from pipeline.data.layouts import read_source

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


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
    fractions = read_source(DataConfig(root=str(demo_run.data)), with_test=False).train.foreground_fraction()
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
    from pipeline.infer.score import score_submission

    nb = _execute(
        "03_submission.ipynb",
        DATA=str(demo_run.data),
        SUBMISSION=str(demo_run.submission),
        EXAMPLES=4,
        WORST=2,
    )
    # predicted fractions, masks over tiles, test Dice histogram, worst tiles, building outlines
    assert len(_outputs(nb, "image/png")) == 5
    truth = demo_run.data / "test_a_mask.csv"
    with Image.open(next((demo_run.data / "test_a").iterdir())) as im:
        shape = im.size[::-1]
    expected = score_submission(demo_run.submission, truth, shape)
    assert f"test mean Dice {expected['dice']:.4f} over {expected['n']} tiles" in _text(nb)
    b = expected["buildings"]
    assert f"F1 {b['f1']:.4f}  (TP {b['tp']}, FP {b['fp']}, FN {b['fn']})" in _text(nb)
    # the first tile was written empty; no mask is full
    counts = rf"masks\s+{expected['n']}\s+1\s+0\s"
    assert any(re.search(r"tiles\s+empty\s+full.*\n\s*" + counts, t) for t in _outputs(nb, "text/plain"))
    assert not _stderr(nb), "warnings in the notebook's output"


def test_02_folds_on_a_real_tiny_training(tiny_cfg) -> None:
    """The folds notebook on what `make train` really writes (checkpoints included: fold agreement runs)."""
    from pipeline.train import trainer

    cfg = tiny_cfg("infer.tta=none")
    run = trainer.run(cfg)
    nb = _execute("02_folds.ipynb", DATA=cfg.data.root, RUN=str(run), WORST=3, AGREEMENT_TILES=4)
    # fold summary, learning curves, threshold curve, Dice histogram, worst tiles, fold agreement
    assert len(_outputs(nb, "image/png")) == 6
    assert "skipped" not in _text(nb)
    assert not _stderr(nb), "warnings in the notebook's output"
