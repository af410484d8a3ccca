"""``make runs``: every run and blend in ``runs/`` in one table, from their manifests alone (fast).

    python -m pipeline.report.runs [--runs-dir runs] [--submissions submissions]

One row per folder: name, kind (run or blend), model (arch/encoder; a blend: its runs and weights),
epochs, folds, OOF Dice at the tuned threshold (and nested, for blends), threshold/min-area, the
submissions made from it (``submissions/<run>-<tta>-<time>.csv``) with their scores where known
(``.score.json``), the age of its manifest, and its status. Sorted by OOF Dice, best first. A run still
training (its ``runs/.<run>.lock``), unfinished (no manifest) or broken (a manifest or config that does
not load) is listed as such, never an error. No OOF file or checkpoint is opened.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.core.config import load_config
from pipeline.core.errors import BuildsegError, cli
from pipeline.core.progress import format_duration
from pipeline.runs.manifest import Manifest, load_manifest

COLUMNS = (
    "run", "kind", "model", "epochs", "folds", "oof_dice", "nested", "threshold", "min_area",
    "submissions", "age", "status",
)  # fmt: skip
STAMP = re.compile(r"^(?P<rest>.+)-(?P<stamp>\d{8}-\d{6})$")  # <run>-<tta>-<YYYYmmdd-HHMMSS>
SHOWN_SUBMISSIONS = 3


def submissions_by_run(folder: str | Path) -> dict[str, list[dict[str, Any]]]:
    """run name -> its submissions, newest first: ``{"file", "tta", "dice"}`` (dice None when not scored).

    The name is ``<run>-<tta>-<time>.csv`` (:mod:`pipeline.infer.submit`); TTA sets have no ``-`` but
    ``per-run`` (a blend whose runs keep their own), so a run named ``a-b`` is never taken for ``a``.
    """
    found: dict[str, list[dict[str, Any]]] = {}
    for csv in sorted(Path(folder).glob("*.csv"), key=lambda p: p.stat().st_mtime, reverse=True):
        m = STAMP.match(csv.stem)
        if not m or "-" not in m["rest"]:
            continue
        rest = m["rest"]
        run, tta = (rest[: -len("-per-run")], "per-run") if rest.endswith("-per-run") else rest.rsplit("-", 1)
        found.setdefault(run, []).append({"file": csv.name, "tta": tta, "dice": _score(csv)})
    return found


def _score(csv: Path) -> float | None:
    """The Dice ``make submit`` / ``make score`` wrote beside a submission (``<csv>.score.json``), if any."""
    path = Path(f"{csv}.score.json")
    try:
        dice = json.loads(path.read_text()).get("dice")
    except (OSError, ValueError, AttributeError):
        return None
    return float(dice) if isinstance(dice, (int, float)) else None


def _model(run_dir: Path, manifest: Manifest | None) -> tuple[str, Any]:
    """(arch/encoder or a blend's runs with weights, epochs) from config.yaml, or a blend's manifest."""
    if manifest is not None and manifest.members:
        return " + ".join(f"{Path(m.run).name} {m.weight:g}" for m in manifest.members), None
    cfg = load_config(run_dir / "config.yaml")
    return f"{cfg.model.arch}/{cfg.model.encoder}", cfg.train.epochs


def run_row(run_dir: Path, subs: list[dict[str, Any]], now: float) -> dict[str, Any]:
    """The table's row for one folder of runs/; never raises for a broken or unfinished run."""
    row: dict[str, Any] = dict.fromkeys(COLUMNS)
    row.update(run=run_dir.name, kind="run", submissions=_submissions(subs), status="ok")
    lock = run_dir.parent / f".{run_dir.name}.lock"
    path = run_dir / "manifest.yaml"
    if not path.is_file():
        row["status"] = (
            "training" if lock.is_file() else "unfinished: no manifest.yaml (make train resumes it)"
        )
        row["age"] = format_duration(now - run_dir.stat().st_mtime)
        with contextlib.suppress(BuildsegError, OSError, ValueError):  # no config yet: "-"
            row["model"], row["epochs"] = _model(run_dir, None)
        return row
    row["age"] = format_duration(now - path.stat().st_mtime)
    try:
        manifest = load_manifest(run_dir)
        row["model"], row["epochs"] = _model(run_dir, manifest)
    except (BuildsegError, OSError, ValueError) as e:
        row["status"] = f"broken: {str(e).splitlines()[0]}"
        return row
    oof = manifest.oof
    row.update(kind="blend" if manifest.members else "run", threshold=manifest.infer.threshold)
    row.update(
        min_area=manifest.infer.min_area, oof_dice=oof.get("oof_dice"), nested=oof.get("oof_dice_nested")
    )
    row["folds"] = len(oof.get("per_fold") or {}) or len(manifest.checkpoints)
    if manifest.classes > 1:
        row.update(threshold=None, min_area=None, status=f"multi-class: OOF mIoU {oof.get('oof_miou', '-')}")
    if lock.is_file():
        row["status"] = "training"  # a resume or make tune in progress: the manifest is about to change
    return row


def _submissions(subs: list[dict[str, Any]]) -> str:
    shown = [f"{s['tta']} {s['dice']:.4f}" if s["dice"] is not None else f"{s['tta']} -" for s in subs]
    more = len(shown) - SHOWN_SUBMISSIONS
    return ", ".join(shown[:SHOWN_SUBMISSIONS]) + (f" (+{more})" if more > 0 else "")


def runs_table(
    runs_dir: str | Path = "runs", submissions: str | Path = "submissions", now: float | None = None
) -> pd.DataFrame:
    """One row per folder of ``runs_dir`` (columns :data:`COLUMNS`): best OOF Dice first (multi-class runs,
    without one, after), then the runs training, unfinished or broken, by name."""
    now = time.time() if now is None else now
    subs = submissions_by_run(submissions)
    runs = Path(runs_dir)
    folders = (
        sorted(p for p in runs.iterdir() if p.is_dir() and not p.name.startswith("."))
        if runs.is_dir()
        else []
    )
    rows = [run_row(p, subs.get(p.name, []), now) for p in folders]
    table = pd.DataFrame(rows, columns=list(COLUMNS))
    if table.empty:
        return table
    usable = table["status"].map(lambda s: s == "ok" or s.startswith("multi-class"))
    dice = table["oof_dice"].map(
        lambda v: -v if isinstance(v, (int, float)) and not math.isnan(v) else math.inf
    )
    dice = dice.where(usable, math.inf)  # training or broken: by name, whatever an old manifest says
    order = table.assign(_usable=~usable, _dice=dice).sort_values(["_usable", "_dice", "run"], kind="stable")
    return order.drop(columns=["_usable", "_dice"]).reset_index(drop=True)


def format_table(table: pd.DataFrame) -> str:
    """The table as fixed-width text (``-`` for what a run does not have)."""
    if table.empty:
        return "no runs"

    def cell(v: Any, col: str) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        if col in ("oof_dice", "nested"):
            return f"{v:.4f}"
        if col == "threshold":
            return f"{v:.2f}"
        return str(int(v)) if col in ("epochs", "folds", "min_area") else str(v)

    cells = [
        [cell(v, c) for c, v in zip(COLUMNS, row)] for row in table[list(COLUMNS)].itertuples(index=False)
    ]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(COLUMNS)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in cells]
    return "\n".join(lines)


@cli
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.report.runs", description=__doc__.split("\n\n")[0])
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--submissions", default="submissions")
    a = p.parse_args(argv)
    print(format_table(runs_table(a.runs_dir, a.submissions)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
