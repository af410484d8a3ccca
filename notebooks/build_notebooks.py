"""Write the analysis notebooks from this script, so they are reviewed as code and regenerated consistently.

    python notebooks/build_notebooks.py            # rewrites notebooks/*.ipynb (no outputs)

The notebooks only call ``pipeline`` functions (``pipeline.report.analysis`` for numbers,
``pipeline.runs``
for run folders, ``pipeline.report.figures`` for figures); any logic worth keeping lives there, under test.
Each notebook has a cell tagged ``parameters`` (papermill's convention):
``papermill notebooks/02_folds.ipynb out.ipynb -p RUN runs/<run>`` or the tests replace that cell.
Cell ids are fixed so that regenerating an unchanged notebook gives a byte-identical file.
``tests/test_notebooks.py`` checks that the committed files equal what this script writes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbformat.notebooknode import NotebookNode

HERE = Path(__file__).resolve().parent

# Parameters are relative to the repository root wherever Jupyter was started (make lab starts it in
# the root, an IDE may start it in notebooks/), so the setup cell moves there first.
SETUP = """\
%matplotlib inline
import os
import sys
from pathlib import Path

ROOT = next(p for p in (Path.cwd(), *Path.cwd().parents) if (p / "pipeline" / "__init__.py").is_file())
os.chdir(ROOT)
sys.path.insert(0, str(ROOT))

import numpy as np
import pandas as pd
from IPython.display import display

from pipeline.core.config import DataConfig
from pipeline.data.dataset import Split
from pipeline.data.layouts import read_source
from pipeline.report import analysis, figures
from pipeline.runs.folder import latest_submission
from pipeline.runs.manifest import run_data_config
from pipeline.runs.run import load_run
from pipeline.train import curve

pd.set_option("display.precision", 4)"""

# (kind, source) pairs; kind "params" is a code cell tagged "parameters".
DATA_NB = [
    (
        "md",
        """\
# 01 · The data

Counts, building fraction, empty tiles, per-channel statistics, example tiles, and a check that the
masks' RLE strings survive a decode/encode round trip. Run it on a new data set before training.
`DATA` is relative to the repository root.""",
    ),
    (
        "params",
        """\
DATA = "data/demo"
EXAMPLES = 6""",
    ),
    ("code", SETUP),
    ("md", "## Counts\n\nTiles per split, tile size, tiles without any building, mean building fraction."),
    (
        "code",
        """\
cfg = DataConfig(root=DATA)
source = read_source(cfg)
train = source.train
overview = analysis.data_overview(source)
overview""",
    ),
    (
        "md",
        """\
## Building fraction per tile

Folds are stratified on this fraction; a long tail of dense tiles or many empty tiles changes which
threshold and minimum area work best.""",
    ),
    (
        "code",
        """\
fractions = analysis.tile_fractions(train)
figures.fraction_histogram(fractions.to_numpy())""",
    ),
    (
        "md",
        """\
## Empty tiles

Are they really empty, or are buildings missing from the labels? Look at a few.""",
    ),
    (
        "code",
        """\
empty = np.flatnonzero(fractions.to_numpy() == 0)
print(f"{len(empty)} of {len(train)} train tiles have no building: {list(fractions.index[empty][:10])}")
if len(empty):
    display(figures.split_grid(train, empty[:EXAMPLES], colors=source.colors))""",
    ),
    (
        "md",
        """\
## Per-channel mean and standard deviation (0..1)

The model normalises with `data.mean` / `data.std` (ImageNet values by default, which pretrained
encoders expect). Compare them with this data's statistics.""",
    ),
    (
        "code",
        """\
analysis.channel_stats(train.image_paths).assign(config_mean=cfg.mean, config_std=cfg.std)""",
    ),
    ("md", "## Examples: image | overlay | mask\n\nTiles at evenly spaced ranks of building fraction."),
    (
        "code",
        """\
figures.split_grid(train, analysis.spread_sample(fractions.to_numpy(), EXAMPLES), colors=source.colors)""",
    ),
    (
        "md",
        """\
## RLE round trip

Every row must satisfy `encode(decode(rle)) == rle`: pixels numbered column-major from 1, runs
sorted and separated. A failure here means the CSV was written with another convention.""",
    ),
    (
        "code",
        """\
shape = (int(overview.loc["train", "height"]), int(overview.loc["train", "width"]))
for csv in (cfg.mask_csv, cfg.test_mask_csv):
    path = Path(DATA) / csv
    if path.is_file():
        bad = analysis.rle_roundtrip_mismatches(path, shape)
        assert not bad, f"{len(bad)} rows of {path} do not round-trip, e.g. {bad[:5]}"
        print(f"{path}: every row round-trips")""",
    ),
]

FOLDS_NB = [
    (
        "md",
        """\
# 02 · A trained run: folds, curves, out-of-fold predictions

For a finished `make train` run: fold sizes, learning curves, OOF Dice per fold, the threshold search,
the per-tile Dice distribution, the worst tiles, and how much the fold models agree.
`RUN` and `DATA` are relative to the repository root.""",
    ),
    (
        "params",
        """\
DATA = "data/demo"
RUN = "runs/demo"
WORST = 8
AGREEMENT_TILES = 16""",
    ),
    ("code", SETUP),
    (
        "code",
        """\
run = load_run(RUN)
data_cfg = run_data_config(run.path, DATA)
train = read_source(data_cfg, with_test=False).train
print(f"run {run.name}: folds {sorted(run.metrics)}, {len(run.oof_names)} OOF tiles, "
      f"threshold {run.threshold}, min_area {run.min_area}")""",
    ),
    ("md", "## Folds: size and building fraction"),
    (
        "code",
        """\
summary = analysis.fold_summary(run.folds, analysis.tile_fractions(train))
display(summary)
figures.fold_summary_plot(summary)""",
    ),
    ("md", "## Learning curves of every fold"),
    ("code", "curve.learning_curves(run.metrics)"),
    (
        "md",
        """\
## OOF Dice per fold and overall

Each tile is predicted by the one fold model that did not train on it. `dice` uses the tuned
threshold and minimum area, `dice@0.5` the defaults. The overall value must equal the one training
recorded in the manifest: the same binarisation rule is used everywhere.""",
    ),
    (
        "code",
        """\
oof = analysis.evaluate_oof(run, train)
by_fold = oof.by_fold().assign(**{"dice@0.5": analysis.evaluate_oof(run, train, 0.5, 0).by_fold()["dice"]})
display(by_fold)
if run.oof_dice is not None:
    assert abs(oof.dice.mean() - run.oof_dice) < 1e-6, (oof.dice.mean(), run.oof_dice)""",
    ),
    ("md", "## OOF Dice against threshold (the chosen one starred)"),
    ("code", "figures.threshold_curve(run.threshold_search, run.threshold, run.min_area)"),
    ("md", "## Per-tile Dice"),
    (
        "code",
        """\
display(figures.dice_histogram(oof.dice, "OOF per-tile Dice"))
oof.table().head(WORST)""",
    ),
    (
        "md",
        """\
## Worst tiles

Green: buildings found (TP). Red: predicted where there is none (FP). Blue: missed (FN).""",
    ),
    ("code", "figures.worst_tiles_gallery(oof, WORST)"),
    (
        "md",
        """\
## Fold agreement

Mean per-tile Dice between fold models' predictions of the same test tiles (OOF tiles differ per
fold, so only unseen tiles compare folds fairly). Low agreement means the ensemble is averaging
quite different models. Needs the checkpoints; runs every fold model on `AGREEMENT_TILES` tiles.""",
    ),
    (
        "code",
        """\
test = read_source(data_cfg, with_train=False).test
try:
    agreement = analysis.fold_test_agreement(run, test.image_paths[:AGREEMENT_TILES] if test else [])
except analysis.Unavailable as e:
    print(f"skipped: {e}")
else:
    display(agreement)
    display(figures.agreement_heatmap(agreement))""",
    ),
]

SUBMISSION_NB = [
    (
        "md",
        """\
# 03 · A submission file

Its masks drawn over the test tiles, with counts of empty and full masks (a full mask is almost always
a bug). Scored per tile when the data has ground truth for the test tiles (`test_a_mask.csv`).
`SUBMISSION = ""` takes the newest file in `submissions/`.""",
    ),
    (
        "params",
        """\
DATA = "data/demo"
SUBMISSION = ""
EXAMPLES = 6
WORST = 6""",
    ),
    ("code", SETUP),
    (
        "code",
        """\
path = latest_submission(SUBMISSION)
test = read_source(DataConfig(root=DATA), with_train=False).test
masks = analysis.load_submission(path, test)
print(path)
analysis.mask_summary(masks)""",
    ),
    (
        "code",
        """\
predicted = Split(test.names, test.image_paths, masks)
pred_fractions = analysis.tile_fractions(predicted)
display(figures.fraction_histogram(pred_fractions.to_numpy(), "predicted building fraction"))
odd = pred_fractions[pred_fractions.isin([0.0, 1.0])].rename("fraction (0 = empty, 1 = full)")
if len(odd):
    display(odd.to_frame())
else:
    print("no empty or full masks")""",
    ),
    ("md", "## Masks over the test tiles\n\nTiles at evenly spaced ranks of predicted building fraction."),
    ("code", "figures.split_grid(predicted, analysis.spread_sample(pred_fractions.to_numpy(), EXAMPLES))"),
    ("md", "## Against the ground truth (when the data has it)\n\nGreen TP, red FP, blue FN."),
    (
        "code",
        """\
if test.masks is not None:
    scores = analysis.score_tiles(test, masks)
    print(f"test mean Dice {scores.dice.mean():.4f} over {len(scores.dice)} tiles")
    display(figures.dice_histogram(scores.dice, "test per-tile Dice"))
    display(figures.worst_tiles_gallery(scores, WORST))
else:
    print(f"no {DataConfig().test_mask_csv} in {DATA}: nothing to score against")""",
    ),
    (
        "md",
        """\
## Buildings, not pixels

Buildings (8-connected components) matched one to one at IoU >= 0.5, SpaceNet's rule: precision,
recall and F1, by size. Below, the tiles with the most building errors: outlines green for matched
predictions (TP), red for predictions without a match (FP), blue dashed for missed buildings (FN).""",
    ),
    (
        "code",
        """\
if test.masks is not None:
    from pipeline.metrics import buildings
    from pipeline.report import outlines

    print(buildings.format_report(analysis.building_scores(scores)))
    display(outlines.building_outlines(analysis.building_panels(scores, WORST)))""",
    ),
]

NOTEBOOKS = {
    "01_data.ipynb": DATA_NB,
    "02_folds.ipynb": FOLDS_NB,
    "03_submission.ipynb": SUBMISSION_NB,
}


def build_notebook(stem: str, cells: list[tuple[str, str]]) -> NotebookNode:
    """A notebook without outputs; cell ids ``<stem>-<i>`` so rebuilding is deterministic."""
    nb = nbformat.v4.new_notebook()
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    for i, (kind, source) in enumerate(cells):
        cell_id = f"{stem}-{i:02d}"
        if kind == "md":
            cell = nbformat.v4.new_markdown_cell(source, id=cell_id)
        else:
            cell = nbformat.v4.new_code_cell(source, id=cell_id)
            if kind == "params":
                cell.metadata["tags"] = ["parameters"]
        nb.cells.append(cell)
    nbformat.validate(nb)
    return nb


def build() -> dict[str, NotebookNode]:
    """Every notebook by file name."""
    return {name: build_notebook(name.split("_")[0], cells) for name, cells in NOTEBOOKS.items()}


def main(argv: list[str] | None = None) -> int:
    out = Path(argv[0]) if argv else HERE
    for name, nb in build().items():
        nbformat.write(nb, out / name)
        print(out / name)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
