"""Blend runs: several runs' fold ensembles averaged with weights chosen on their out-of-fold predictions.

    python -m pipeline.infer.blend --runs runs/a,runs/b [--name NAME] [--data DIR] [infer.thresholds=[..]]
    make blend RUNS=runs/a,runs/b [NAME=...]

The runs must hold out the same tiles: the same folds (the hash of their ``folds.csv``), the same OOF
tiles in every fold, the same tile size, and OOF probabilities (binary runs). Then, on the blended OOF
probabilities ``p = sum_r k_r * q_r / (255 * G)`` (``q_r``: run r's uint8 OOF map, weights ``k_r / G``):

1. **Weights**: every non-negative weight vector on the simplex in steps of ``1/G`` is scored at every
   threshold of ``infer.thresholds`` (no component filter) in one streamed pass, and the best one kept
   (ties: the first in grid order, most weight on the first run). ``G`` is 10 for two or three runs,
   coarser beyond (at most :data:`MAX_CANDIDATES` vectors). A small grid rather than greedy forward
   selection with replacement: the cost at the competition's size is reading the OOF maps (7.9 GB per run
   at 30k tiles), and the grid scores every candidate in one pass where greedy selection needs a pass per
   step; and the grid's per-tile scores let the nested estimate choose weights on any k-1 folds from the
   same pass, where greedy selection would run again for every held-out fold.
2. **Threshold and min-area**: tuned on the blended OOF with those weights exactly as ``make tune`` does
   (:func:`pipeline.metrics.postprocess.search_extending`: the run's grid, widened at an edge).
3. **Honest OOF**: the in-sample Dice (weights and threshold chosen on the tiles they are scored on)
   flatters a blend. The nested Dice holds each fold out in turn, chooses weights (1) and threshold (2)
   on the other folds, scores the held-out fold, and averages over all tiles. Runs with OOF of one fold
   only are nested over :data:`NESTED_PARTS` parts of it (``make_folds``: stratified, by scene groups
   when the data has them).

Writes ``runs/<name>/``: ``manifest.yaml`` (members: run, weight, TTA, checkpoints; threshold, min_area;
``oof``: in-sample and nested Dice, per fold, per held-out part, each run's own OOF Dice),
``threshold_search.csv`` and ``folds.csv``. ``make submit``, ``make predict-scene`` and ``make report``
take it like a run. Memory: the OOF maps are streamed a chunk at a time from every run at once; kept are
per-tile Dice, float32 [candidates, thresholds, N] and float64 [N] per counted (threshold, min-area) cell.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.config import ConfigError, load_config
from pipeline.core.errors import cli
from pipeline.core.io import remove_stale_temps
from pipeline.data.folds import folds_hash, load_folds, save_folds
from pipeline.data.layouts import read_source
from pipeline.infer.blendsearch import (
    BlendError,
    Cells,
    RunOOF,
    choose,
    grid_steps,
    held_out_parts,
    score_weights,
    tune_blend,
    weight_grid,
)
from pipeline.metrics import postprocess
from pipeline.runs.folder import run_lock
from pipeline.runs.manifest import (
    Manifest,
    Member,
    load_manifest,
    run_data_config,
    write_manifest,
    write_search,
)
from pipeline.runs.oof import OOF_KEYS, oof_chunks, oof_files, oof_names


@dataclass
class BlendResult:
    """What :func:`blend_runs` wrote and measured.

    ``weights``: run folder name -> weight; ``oof_dice``: in-sample OOF Dice at the tuned threshold;
    ``oof_dice_nested``: weights and threshold chosen on the other folds (None with a single part);
    ``nested``: per held-out part, its tiles, Dice, weights, threshold and min-area.
    """

    path: Path
    manifest: Manifest
    weights: dict[str, float]
    threshold: float
    min_area: int
    oof_dice: float
    oof_dice_nested: float | None
    nested: dict[int, dict[str, Any]]
    notes: list[str]


# ----------------------------------------------------------------------------- the runs


def _read_run(path: Path) -> Manifest:
    if not path.is_dir():
        raise BlendError(f"run folder {path} not found; list trained runs: RUNS=runs/a,runs/b")
    manifest = load_manifest(path)
    if manifest.members:
        inner = ",".join(str(manifest.member_dir(m)) for m in manifest.members)
        raise BlendError(f"{path} is a blend, not a run; blend its runs directly: RUNS={inner},...")
    return manifest


def _oof(path: Path, manifest: Manifest) -> RunOOF:
    files = oof_files(path)
    if not files:
        raise BlendError(
            f"{path} has no out-of-fold files (fold<k>/oof.npz): no fold of it finished training; "
            "finish it (make train) or leave it out of RUNS"
        )
    folds = load_folds(path / "folds.csv", fix="retrain the run")
    names = {k: oof_names(f) for k, f in files.items()}
    first = next(iter(files.values()))
    _, arr = next(oof_chunks(first, OOF_KEYS[True], 1))
    return RunOOF(path, manifest, folds_hash(folds), files, names, (int(arr.shape[1]), int(arr.shape[2])))


def _check_classes(paths: list[Path], manifests: list[Manifest]) -> None:
    multi = [(p, m) for p, m in zip(paths, manifests) if m.classes != 1]
    if not multi:
        return
    p, m = multi[0]
    binary = [q for q, n in zip(paths, manifests) if n.classes == 1]
    if binary:
        raise BlendError(
            f"{p} is a multi-class run (classes={m.classes}) and {binary[0]} a binary one: a blend averages "
            "building probabilities; blend binary runs only"
        )
    raise BlendError(
        f"{p} is a multi-class run (classes={m.classes}): its OOF files hold class ids, not probabilities, "
        "so there is nothing to weigh; blending is for binary runs"
    )


def _check_same(first: RunOOF, run: RunOOF) -> None:
    """Raise :class:`BlendError` naming ``run`` unless it holds out exactly ``first``'s tiles."""
    if run.folds_hash != first.folds_hash:
        raise BlendError(
            f"{run.path} was trained on other folds than {first.path} (their folds.csv differ: "
            f"{run.folds_hash} vs {first.folds_hash}); a blend is chosen on out-of-fold predictions, which "
            f"must hold out the same tiles. Train it with the other's folds: make train "
            f'ARGS="data.folds_csv={first.path / "folds.csv"} name=..."'
        )
    for a, b in ((first, run), (run, first)):
        missing = sorted(set(a.oof) - set(b.oof))
        if missing:
            raise BlendError(
                f"{b.path} has no out-of-fold file for fold {missing[0]} ({b.path / f'fold{missing[0]}'}"
                f"/oof.npz), which {a.path} has: finish that fold (make train FOLDS={missing[0]}) or blend "
                "runs with the same folds trained"
            )
    if run.shape != first.shape:
        raise BlendError(
            f"{run.path}'s tiles are {run.shape[0]}x{run.shape[1]} px, {first.path}'s "
            f"{first.shape[0]}x{first.shape[1]}: a blend averages the same pixels; blend runs of one data set"
        )
    for k in first.oof:
        if run.names[k] != first.names[k]:
            order = "in another order" if sorted(run.names[k]) == sorted(first.names[k]) else "other tiles"
            raise BlendError(
                f"{run.oof[k]} holds {order} than {first.oof[k]}: the runs were trained on other data; "
                "retrain one on the other's data and folds"
            )


def read_runs(run_dirs: Sequence[str | Path]) -> list[RunOOF]:
    """The runs to blend, checked: every refusal names the run that differs and the fix."""
    paths = [Path(d) for d in run_dirs]
    if not paths:
        raise BlendError("no runs to blend: RUNS=runs/a,runs/b")
    twice = [p for i, p in enumerate(paths) if p.resolve() in [q.resolve() for q in paths[:i]]]
    if twice:
        raise BlendError(f"{twice[0]} is listed twice in RUNS; list each run once (the blend weighs them)")
    manifests = [_read_run(p) for p in paths]
    _check_classes(paths, manifests)
    runs = [_oof(p, m) for p, m in zip(paths, manifests)]
    for run in runs[1:]:
        _check_same(runs[0], run)
    return runs


# ----------------------------------------------------------------------------- the stage


def blend_runs(
    run_dirs: Sequence[str | Path],
    out_dir: str | Path,
    data: str | Path = "",
    overrides: Sequence[str] = (),
    steps: int | None = None,
) -> BlendResult:
    """Blend ``run_dirs`` into the folder ``out_dir`` (see the module docstring); returns what it measured.

    Args:
        data: the data folder (default: the first run's). overrides: ``infer.*`` settings for the search
            grids, as ``make tune`` takes them. steps: weights in steps of ``1/steps``, 1..100 (default
            :func:`pipeline.infer.blendsearch.grid_steps`).
    """
    out = Path(out_dir)
    runs = read_runs(run_dirs)
    if (out / "config.yaml").is_file() or any(out.resolve() == r.path.resolve() for r in runs):
        raise BlendError(f"{out} holds a trained run; give the blend another name (NAME=...)")
    bad = [o for o in overrides if not o.startswith("infer.")]
    if bad:
        raise ConfigError(f"make blend changes only infer.* settings, not {bad}; retrain for those")
    if steps is not None and not 1 <= steps <= 100:
        raise ConfigError(f"--steps must be between 1 and 100 (weights in steps of 1/steps), not {steps}")
    cfg = load_config(runs[0].path / "config.yaml", list(overrides))
    data_cfg = run_data_config(runs[0].path, data)
    source = read_source(data_cfg, with_test=False)
    steps = steps or grid_steps(len(runs))
    candidates = weight_grid(len(runs), steps)
    dice, folds = score_weights(runs, source, candidates, steps, cfg.infer.thresholds)
    names = [n for k in runs[0].oof for n in runs[0].names[k]]
    everything = np.ones(len(names), bool)
    chosen = tuple(int(k) for k in candidates[choose(dice, everything)])
    parts, nested_over = held_out_parts(folds, names, source, data_cfg, cfg.train.seed)
    groups = [] if parts is None else [int(g) for g in np.unique(parts)]
    per_part = {g: tuple(int(k) for k in candidates[choose(dice, parts != g)]) for g in groups}
    del dice
    cells = Cells(runs, source, steps)
    base = postprocess.first_grid(cfg.infer.thresholds, cfg.infer.min_areas, postprocess.UNTUNED)
    cells.count({w: [base] for w in {chosen, *per_part.values()}})  # one pass for every blend to tune
    tile_area = runs[0].shape[0] * runs[0].shape[1]
    result, notes = tune_blend(cells, chosen, everything, cfg.infer, tile_area)
    nested, held = _nested(cells, per_part, parts, cfg.infer, tile_area, steps)
    tuned, at_half = cells.cells[chosen][result.threshold, result.min_area], cells.cells[chosen][0.5, 0]
    oof = {
        "oof_dice": float(result.dice),
        "oof_dice@0.5": float(at_half.mean()),
        "oof_dice_nested": float(held.mean()) if nested else None,
        "nested_over": nested_over,
        "nested": nested,
        "per_fold": {
            int(k): {
                "n": int((folds == k).sum()),
                "dice@0.5": float(at_half[folds == k].mean()),
                "dice@tuned": float(tuned[folds == k].mean()),
            }
            for k in runs[0].oof
        },
        "n_oof": len(names),
        "runs": {r.path.name: r.manifest.oof.get("oof_dice") for r in runs},
        "weight_steps": steps,
        "widened": notes,
    }
    manifest = _write(out, runs, chosen, steps, result, oof)
    weights = {Path(m.run).name: m.weight for m in manifest.members}
    nested_dice = oof["oof_dice_nested"]
    return BlendResult(
        out, manifest, weights, result.threshold, result.min_area, result.dice, nested_dice, nested, notes
    )


def _nested(
    cells: Cells,
    per_part: dict[int, tuple[int, ...]],
    parts: np.ndarray | None,
    infer: Any,
    tile_area: int,
    steps: int,
) -> tuple[dict[int, dict[str, Any]], np.ndarray]:
    """Per held-out part: the threshold and min-area of its blend (weights ``per_part[g]``, chosen on the
    other parts) tuned on the other parts, and its tiles' Dice at them. Returns the record per part and
    every tile's held-out Dice float64 [N] (zeros without parts)."""
    nested: dict[int, dict[str, Any]] = {}
    held = np.zeros(0 if parts is None else len(parts))
    for g, w in per_part.items():
        tiles = parts == g
        r, _ = tune_blend(cells, w, ~tiles, infer, tile_area)
        held[tiles] = cells.cells[w][r.threshold, r.min_area][tiles]
        nested[g] = {
            "n": int(tiles.sum()),
            "dice": float(held[tiles].mean()),
            "weights": [k / steps for k in w],
            "threshold": r.threshold,
            "min_area": r.min_area,
        }
    return nested, held


def _write(
    out: Path,
    runs: list[RunOOF],
    weights: tuple[int, ...],
    steps: int,
    result: postprocess.SearchResult,
    oof: dict[str, Any],
) -> Manifest:
    """The blend folder: manifest.yaml, threshold_search.csv and the runs' folds.csv."""
    members = tuple(
        Member(os.path.relpath(r.path, out), k / steps, r.manifest.infer.tta, r.manifest.checkpoints)
        for r, k in zip(runs, weights)
    )
    ttas = [m.tta for m in members if m.weight > 0]
    first = runs[0].manifest
    infer = dataclasses.replace(
        first.infer, tta=ttas[0], threshold=result.threshold, min_area=result.min_area
    )
    manifest = Manifest(out, (), infer, 1, first.data_root, oof, members)
    out.mkdir(parents=True, exist_ok=True)
    with run_lock(out):
        remove_stale_temps(out)
        save_folds(out / "folds.csv", load_folds(runs[0].path / "folds.csv"))
        write_search(out, result.table)
        write_manifest(manifest)
    return manifest


def format_summary(result: BlendResult) -> str:
    """The table ``make blend`` ends with: each run's weight, TTA and own OOF Dice, then the blend's."""
    m = result.manifest
    own = m.oof.get("runs", {})
    lines = [f"{'run':<32} {'weight':>6}  {'tta':<6} {'OOF Dice (own)':>14}"]
    for member in m.members:
        name = Path(member.run).name
        value = own.get(name)
        shown = f"{value:14.4f}" if isinstance(value, (int, float)) else f"{'-':>14}"
        lines.append(f"{name:<32} {member.weight:6.2f}  {member.tta:<6} {shown}")
    lines.append(
        f"blend OOF Dice in-sample (weights and threshold chosen on these tiles): {result.oof_dice:.4f}"
    )
    nested = result.oof_dice_nested
    how = m.oof.get("nested_over", "")
    lines.append(
        f"blend OOF Dice nested (chosen on the rest, scored held out; {how}): "
        + (f"{nested:.4f}" if nested is not None else "-")
    )
    lines.append(f"threshold {result.threshold:.2f}, min_area {result.min_area}")
    lines += [f"note: {n}" for n in result.notes]
    return "\n".join(lines)


@cli
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.infer.blend", description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", required=True, help="run folders, comma-separated: runs/a,runs/b")
    p.add_argument("--name", default="", help="the blend's folder name (default: blend-<run>+<run>...)")
    p.add_argument("--data", default="", help="data folder (default: the first run's data.root)")
    p.add_argument(
        "--steps", type=int, default=None, help="weights in steps of 1/STEPS (default: 10 for 2-3 runs)"
    )
    p.add_argument("overrides", nargs="*", help="infer.key=value, e.g. infer.thresholds=[0.4,0.5,0.6]")
    a = p.parse_args(argv)
    runs = [Path(r) for r in a.runs.split(",") if r.strip()]
    name = a.name or "blend-" + "+".join(r.name for r in runs)
    out = (runs[0].parent if runs else Path("runs")) / name
    result = blend_runs(runs, out, a.data, a.overrides, a.steps)
    print(format_summary(result))
    print(f"manifest: {out / 'manifest.yaml'}  ->  make submit RUN={out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
