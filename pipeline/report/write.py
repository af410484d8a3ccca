"""The figures of the notebooks, as PNG files, for a run (``make report``).

    python -m pipeline.report.write runs/<run> [--data DIR] [--out runs/<run>/report]

Writes into ``--out``: ``data_fractions.png``, ``data_examples.png`` (the data), ``folds.png``,
``learning_curves.png``, ``threshold_curve.png``, ``oof_dice_histogram.png``, ``worst_tiles.png`` and
``building_outlines.png`` (the run; buildings outlined by their IoU >= 0.5 match: TP, FP, FN). For a
blend (``make blend``): ``blend.png`` (each run's OOF Dice beside the blend's, and the weights) and
``threshold_curve.png`` (the blended OOF's search). Every
figure comes from :mod:`pipeline.report.figures` (or ``outlines``, ``pipeline.train.curve``), as in the
notebooks, so the
two cannot drift apart. ``--data`` defaults to the data folder in the run's config.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from matplotlib.figure import Figure

from pipeline.core.config import DataConfig
from pipeline.core.errors import cli
from pipeline.core.io import save_figure
from pipeline.data.layouts import read_source
from pipeline.report import analysis, figures, outlines
from pipeline.runs.manifest import Manifest, load_manifest, read_search, run_data_config
from pipeline.runs.run import load_run
from pipeline.train import curve

EXAMPLE_TILES = 6
WORST_TILES = 8
OUTLINE_TILES = 6


def write_report(
    run_dir: str | Path, data_cfg: DataConfig | None = None, out_dir: str | Path | None = None
) -> list[Path]:
    """Write the report's PNGs for ``run_dir``; returns their paths in the order written.

    Args:
        run_dir: a finished run folder (see :func:`pipeline.runs.run.load_run`).
        data_cfg: the data to score OOF predictions against; None = the run's own data section.
        out_dir: where the PNGs go; None = ``<run_dir>/report``.
    """
    if (Path(run_dir) / "manifest.yaml").is_file() and (blend := load_manifest(run_dir)).members:
        return write_blend_report(blend, out_dir)
    run = load_run(run_dir)
    data_cfg = data_cfg or run_data_config(run.path)
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "report"
    train = read_source(data_cfg, with_test=False).train
    fractions = analysis.tile_fractions(train)

    # Figures are made one at a time and dropped once saved: only the OOF arrays stay in memory.
    makers: list[tuple[str, Callable[[], Figure]]] = [
        ("data_fractions", lambda: figures.fraction_histogram(fractions.to_numpy())),
        (
            "data_examples",
            lambda: figures.split_grid(train, analysis.spread_sample(fractions.to_numpy(), EXAMPLE_TILES)),
        ),
        ("folds", lambda: figures.fold_summary_plot(analysis.fold_summary(run.folds, fractions))),
        ("learning_curves", lambda: curve.learning_curves(run.metrics)),
    ]
    if run.threshold_search is not None:
        ev = analysis.evaluate_oof(run, train)
        makers += [
            (
                "threshold_curve",
                lambda: figures.threshold_curve(run.threshold_search, run.threshold, run.min_area),
            ),
            ("oof_dice_histogram", lambda: figures.dice_histogram(ev.dice, "OOF per-tile Dice")),
            ("worst_tiles", lambda: figures.worst_tiles_gallery(ev, WORST_TILES)),
            (
                "building_outlines",
                lambda: outlines.building_outlines(analysis.building_panels(ev, OUTLINE_TILES)),
            ),
        ]
    return [save_figure(make(), out / f"{name}.png") for name, make in makers]


def write_blend_report(manifest: Manifest, out_dir: str | Path | None = None) -> list[Path]:
    """A blend's PNGs, from its manifest and search table alone: ``blend.png``, ``threshold_curve.png``."""
    out = Path(out_dir) if out_dir is not None else manifest.run_dir / "report"
    names = [Path(m.run).name for m in manifest.members]
    own = manifest.oof.get("runs") or {}
    summary = figures.blend_summary(
        names,
        [own.get(n) for n in names],
        [m.weight for m in manifest.members],
        float(manifest.oof.get("oof_dice", float("nan"))),
        manifest.oof.get("oof_dice_nested"),
    )
    paths = [save_figure(summary, out / "blend.png")]
    search = read_search(manifest.run_dir)
    if search is not None:
        curve = figures.threshold_curve(search, manifest.infer.threshold, manifest.infer.min_area)
        paths.append(save_figure(curve, out / "threshold_curve.png"))
    return paths


@cli
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.report", description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="run folder, e.g. runs/demo")
    p.add_argument("--data", default="", help="data folder (default: the one in the run's config.yaml)")
    p.add_argument("--out", default="", help="output folder (default: RUN/report)")
    a = p.parse_args(argv)
    data_cfg = run_data_config(a.run, a.data) if a.data else None
    paths = write_report(a.run, data_cfg, a.out or None)
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
