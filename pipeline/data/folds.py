"""K-fold split of the training tiles, stratified by building fraction and grouped by scene.

    python -m pipeline.data.folds --data DIR [--n-folds 5 --seed 42 --group-csv PATH --out DIR/folds.csv]

Folds are data: ``folds.csv`` (``name,fold``, sorted by name) is made once from a seed, kept beside
the data, and every run reads it with :func:`load_folds`, so runs and their out-of-fold predictions
are comparable.

* Stratified: tiles are binned by building-pixel fraction (empty tiles are a bin of their own, the
  others quantile bins), and every fold gets its share of every bin, so no fold is all dense
  downtown or all empty fields, and validation Dice is comparable across folds.
* Grouped: adjacent tiles cut from one scene share buildings across their borders and one look;
  with them split over folds, validation leaks. With ``groups`` (a ``name,group`` CSV such as the
  real data's ``manifest.csv``, used by default when ``DIR/manifest.csv`` exists: see :func:`group_csv_of`),
  whole groups are assigned to folds, greedily, largest first, each to the fold where it best
  evens out fold sizes and bin counts.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.core.config import DataConfig, TrainConfig
from pipeline.core.errors import BuildsegError, cli
from pipeline.core.io import atomic_write_text
from pipeline.data.layouts import read_source

MAX_BINS = 10  # quantile bins of the non-empty tiles (deciles), fewer when there are few tiles


class FoldsError(BuildsegError, ValueError):
    """Folds that cannot be made or used; the message says how to fix it."""


def _listing(items: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(map(str, items[:limit]))
    return shown + (", ..." if len(items) > limit else "")


def fraction_bins(masks_fraction: np.ndarray, n_folds: int) -> np.ndarray:
    """Stratification bin per tile, int [N]: 0 = empty, 1..B = quantile bins of the non-empty tiles.

    B = min(MAX_BINS, n_non_empty // n_folds), at least 1, so each bin can reach every fold.
    Ties are broken by position, so equal inputs always give equal bins.
    """
    bins = np.zeros(len(masks_fraction), dtype=np.int64)
    nonempty = np.flatnonzero(masks_fraction > 0)
    if nonempty.size:
        n_bins = max(1, min(MAX_BINS, nonempty.size // n_folds))
        order = nonempty[np.argsort(masks_fraction[nonempty], kind="stable")]
        bins[order] = 1 + np.arange(nonempty.size) * n_bins // nonempty.size
    return bins


def make_folds(
    names: Sequence[str],
    masks_fraction: np.ndarray,
    n_folds: int = 5,
    seed: int = 42,
    groups: Sequence | None = None,
) -> pd.DataFrame:
    """Assign every tile to one of ``n_folds`` folds, stratified by building fraction, grouped if asked.

    Args:
        names: tile names [N], unique.
        masks_fraction: float [N] in [0, 1], building pixels / all pixels per tile.
        n_folds: k >= 2.
        seed: the split is a pure function of the inputs and this seed.
        groups: optional group label per tile [N], compared as strings; a group never spans two folds.

    Returns:
        DataFrame with columns ``name`` (str) and ``fold`` (int64 in 0..k-1), sorted by name.
    """
    names = [str(n) for n in names]
    fractions = np.asarray(masks_fraction, dtype=np.float64)
    _check_inputs(names, fractions, n_folds, groups)
    bins = fraction_bins(fractions, n_folds)
    n_bins = int(bins.max()) + 1
    # Units that move together: one per group, or one per tile.
    if groups is None:
        unit_of = np.arange(len(names))
    else:
        _, unit_of = np.unique(np.asarray([str(g) for g in groups]), return_inverse=True)
    n_units = int(unit_of.max()) + 1
    if n_units < n_folds:
        what = "groups" if groups is not None else "tiles"
        raise FoldsError(
            f"only {n_units} {what} for {n_folds} folds: use {max(2, n_units)} folds or fewer "
            f"(make train: data.n_folds={max(2, n_units)}; make folds: --n-folds {max(2, n_units)})"
            + (", or finer groups" if groups is not None else "")
        )
    counts = np.zeros((n_units, n_bins), dtype=np.int64)  # tiles of each bin in each unit
    np.add.at(counts, (unit_of, bins), 1)
    sizes = counts.sum(axis=1)

    rng = np.random.default_rng(seed)
    tie = rng.permutation(n_units)  # seeded tie-break among equal units
    fold_rank = rng.permutation(n_folds)  # seeded tie-break among equally good folds
    # Placement order: largest units first (the hardest to place); among equal sizes, groups of one
    # kind of tile before mixed ones (the mixed ones then even out what is left, as sklearn's
    # StratifiedGroupKFold does), then by main bin, so that single tiles are dealt bin by bin, which
    # keeps every bin within one tile across folds.
    purity = counts.max(axis=1) / sizes
    order = np.lexsort((tie, counts.argmax(axis=1), -purity, -sizes))

    target_bin = counts.sum(axis=0) / n_folds  # float [B]
    target_size = len(names) / n_folds
    fold_bins = np.zeros((n_folds, n_bins))
    fold_size = np.zeros(n_folds)
    fold_of_unit = np.empty(n_units, dtype=np.int64)
    for u in order:
        # Increase in squared relative imbalance if unit u joined each fold, float [K]. Bins are
        # smaller than folds, so for single tiles a tile too many in a bin costs more than one too
        # many in a fold; the size term is weighted by the number of bins so that with whole groups
        # it still counts as much as all bins together (else sizes give way: 56 vs 32 tiles seen).
        grow = (fold_bins + counts[u] - target_bin) ** 2 - (fold_bins - target_bin) ** 2  # [K, B]
        bin_cost = (grow / np.maximum(target_bin, 1)).sum(axis=1)
        size_cost = ((fold_size + sizes[u] - target_size) ** 2 - (fold_size - target_size) ** 2) / target_size
        cost = np.round(bin_cost + n_bins * size_cost, 9)  # rounded: float noise must not outrank the ties
        best = np.lexsort((fold_rank, fold_size, cost))[0]
        fold_of_unit[u] = best
        fold_bins[best] += counts[u]
        fold_size[best] += sizes[u]
    if (fold_size == 0).any():  # possible only with a few huge groups
        raise FoldsError(
            f"fold(s) {np.flatnonzero(fold_size == 0).tolist()} got no tiles: the groups are too uneven "
            f"for {n_folds} folds; use fewer folds"
        )
    df = pd.DataFrame({"name": names, "fold": fold_of_unit[unit_of]})
    return df.sort_values("name", ignore_index=True)


def _check_inputs(names: list[str], fractions: np.ndarray, n_folds: int, groups: Sequence | None) -> None:
    if n_folds < 2:
        raise FoldsError(f"n_folds must be >= 2, got {n_folds}")
    if len(names) < n_folds:
        n = max(2, len(names))
        raise FoldsError(
            f"only {len(names)} tiles for {n_folds} folds: use {n} folds or fewer "
            f"(make train: data.n_folds={n}; make folds: --n-folds {n})"
        )
    if fractions.shape != (len(names),):
        raise FoldsError(
            f"masks_fraction has shape {fractions.shape}; expected one value per name ({len(names)})"
        )
    if not np.all((fractions >= 0) & (fractions <= 1)):  # also catches NaN
        bad = [names[i] for i in np.flatnonzero(~((fractions >= 0) & (fractions <= 1)))]
        raise FoldsError(
            f"building fractions must be in [0, 1]; not so for {len(bad)} tiles ({_listing(bad)})"
        )
    if len(set(names)) != len(names):
        dup = sorted(pd.Series(names)[pd.Series(names).duplicated()].unique())
        raise FoldsError(
            f"{len(dup)} tile names occur more than once ({_listing(dup)}); names must be unique"
        )
    if groups is not None:
        if len(groups) != len(names):
            raise FoldsError(f"groups has {len(groups)} labels; expected one per name ({len(names)})")
        missing = [
            n
            for n, g in zip(names, groups)
            if g is None or g is pd.NA or (isinstance(g, float) and np.isnan(g))
        ]
        if missing:
            raise FoldsError(
                f"{len(missing)} tiles have no group ({_listing(missing)}); give every tile a group"
            )


def save_folds(path: str | Path, folds: pd.DataFrame) -> Path:
    """Write a fold split (columns ``name``, ``fold``) as ``folds.csv``, atomically: the one writer."""
    atomic_write_text(path, folds[["name", "fold"]].to_csv(index=False))
    return Path(path)


def load_folds(path: str | Path, names: Sequence[str] | None = None, fix: str = "") -> pd.DataFrame:
    """Read ``folds.csv`` (the one reader) and check it against the training tiles ``names`` [N].

    Returns a frame with columns ``name``, ``fold`` (int64), one row per name, in the order of
    ``names`` (so ``.fold.to_numpy()[i]`` is the fold of ``names[i]``); with ``names`` None, every row
    in file order, the tile check skipped. Raises FoldsError, saying how to fix it, if a tile is
    missing, listed twice or unknown, or folds are not 0..k-1.
    """
    path = Path(path)
    fix = fix or f"re-run make folds (python -m pipeline.data.folds --data {path.parent})"
    if not path.is_file():
        raise FoldsError(f"{path} not found: {fix}")
    try:
        df = pd.read_csv(path, dtype={"name": str}, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise FoldsError(f"{path} is not a readable CSV ({e}): {fix}") from None
    if not {"name", "fold"} <= set(df.columns):
        raise FoldsError(f"{path} needs columns name,fold; it has {list(df.columns)}: {fix}")
    folds = pd.to_numeric(df["fold"], errors="coerce")
    bad = df["name"][folds.isna() | (folds != folds.round())].tolist()
    if bad:
        raise FoldsError(
            f"{path}: {len(bad)} tiles have a fold that is not an integer ({_listing(bad)}): {fix}"
        )
    df = pd.DataFrame({"name": df["name"].astype(str), "fold": folds.astype(np.int64)})
    problems = []
    dup = sorted(df["name"][df["name"].duplicated()].unique())
    if dup:
        problems.append(f"lists {len(dup)} tiles more than once ({_listing(dup)})")
    wanted = [str(n) for n in names] if names is not None else df["name"].tolist()
    known = set(df["name"])
    missing = [n for n in wanted if n not in known]
    if missing:
        problems.append(f"lacks {len(missing)} training tiles ({_listing(missing)})")
    extra = sorted(known - set(wanted))
    if extra:
        problems.append(
            f"has {len(extra)} tiles that are not training tiles ({_listing(extra)}), from another data set?"
        )
    ks = sorted(set(df["fold"]))
    if ks and ks != list(range(len(ks))):
        problems.append(f"has folds {ks}; folds must be numbered 0..k-1 with none empty")
    if problems:
        raise FoldsError(f"{path} " + "; ".join(problems) + f": {fix}")
    return df.set_index("name").loc[wanted].reset_index()


# ----------------------------------------------------------------------------------------------- CLI


def read_groups(path: str | Path, names: Sequence[str]) -> list[str]:
    """Group label per name [N] from a CSV with columns ``name`` and ``group`` (other columns ignored)."""
    path = Path(path)
    if not path.is_file():
        raise FoldsError(f"group CSV {path} not found; pass --group-csv PATH or --no-groups")
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    if not {"name", "group"} <= set(table.columns):
        raise FoldsError(
            f"group CSV {path} needs columns name and group (it has {list(table.columns)}); rename its "
            "scene column to group, point at another CSV (make folds ARGS='--group-csv PATH' or "
            "data.group_csv=PATH), or split without groups (make folds ARGS=--no-groups, whose "
            "DATA/folds.csv make train then uses)"
        )
    group_of = dict(zip(table["name"], table["group"]))
    missing = [n for n in names if not group_of.get(n)]
    if missing:
        raise FoldsError(
            f"{len(missing)} training tiles have no group in {path} ({_listing(missing)}): "
            "add them, or split without groups: make folds ARGS=--no-groups (python -m pipeline.data.folds "
            "--no-groups), whose DATA/folds.csv make train then uses"
        )
    return [group_of[n] for n in names]


def group_csv_of(root: Path, explicit: str | Path | None = None, no_groups: bool = False) -> Path | None:
    """The one rule for which CSV groups the folds: ``explicit`` (``--group-csv``, ``data.group_csv``),
    else ``<root>/manifest.csv`` when it exists, else none (or none with ``no_groups``). The CSV found
    is then read by :func:`read_groups`, which refuses one without a ``group`` column: an ungrouped,
    leaky split is never made because of a column's name."""
    if no_groups:
        return None
    if explicit:
        return Path(explicit)
    default = Path(root) / "manifest.csv"
    return default if default.is_file() else None


@cli
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.data.folds", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="data folder with train_mask.csv and train/")
    p.add_argument("--n-folds", type=int, default=DataConfig.n_folds, help="default: data.n_folds")
    p.add_argument("--seed", type=int, default=TrainConfig.seed, help="default: train.seed")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--group-csv", type=Path, help="CSV with columns name, group (default: DATA/manifest.csv)")
    g.add_argument("--no-groups", action="store_true", help="ignore DATA/manifest.csv; stratify only")
    p.add_argument("--out", type=Path, help="output CSV (default: DATA/folds.csv)")
    a = p.parse_args(argv)
    print(write_folds(a.data, a.n_folds, a.seed, a.group_csv, a.no_groups, a.out))
    return 0


def write_folds(
    data: Path,
    n_folds: int = DataConfig.n_folds,
    seed: int = TrainConfig.seed,
    group_csv: Path | None = None,
    no_groups: bool = False,
    out: Path | None = None,
) -> str:
    """The CLI's work: read ``data``, make folds, write them atomically; returns a printable summary.

    ``data`` is read as training reads it (:func:`pipeline.data.layouts.read_source`, competition layout),
    so a folder that trains makes folds, and one that does not fails here with the same message.
    """
    train = read_source(DataConfig(root=str(data)), with_test=False).train
    names = train.names
    fractions = train.foreground_fraction()
    group_csv = group_csv_of(data, group_csv, no_groups)
    groups = read_groups(group_csv, names) if group_csv is not None else None
    folds = make_folds(names, fractions, n_folds, seed, groups)
    out = save_folds(out or data / "folds.csv", folds)

    frac_of = dict(zip(names, fractions))
    group_of = dict(zip(names, groups)) if groups is not None else {}
    lines = [
        f"wrote {out}: {len(folds)} tiles, {n_folds} folds, seed {seed}, "
        + (f"grouped by {group_csv} ({len(set(groups))} groups)" if groups is not None else "not grouped")
    ]
    for k, part in folds.groupby("fold"):
        f = np.array([frac_of[n] for n in part["name"]])
        n_groups = f", {len({group_of[n] for n in part['name']})} groups" if group_of else ""
        empty = int((f == 0).sum())
        lines.append(
            f"  fold {k}: {len(part):5d} tiles, mean fraction {f.mean():.4f}, {empty} empty{n_groups}"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ a run's folds


def folds_hash(df: pd.DataFrame) -> str:
    """A fingerprint of a fold split (order-free): a run's ``last.pt`` records it, and a resume on other
    folds is refused."""
    lines = sorted(f"{n},{int(k)}" for n, k in zip(df["name"], df["fold"]))
    return hashlib.sha1("\n".join(lines).encode()).hexdigest()[:16]


def resolve_folds(cfg: Any, source: Any, run_dir: Path, announce: bool = True) -> pd.DataFrame:
    """The fold split a run trains on, one row per training tile of ``source`` (columns name, fold).

    Once a run has folds (``runs/<run>/folds.csv``), they are the run's: a ``make folds`` or a new
    ``DATA/folds.csv`` made later never changes the validation tiles of a run being resumed. A run
    without folds takes ``data.folds_csv``, else ``DATA/folds.csv``, else makes them from the seed,
    stratified by the foreground fraction and grouped by ``data.group_csv`` (default
    ``DATA/manifest.csv`` when present).
    """
    root = Path(cfg.data.root)
    own = run_dir / "folds.csv"
    if own.is_file():
        fix = (
            "the training tiles changed since this run was made, and a run's folds are its own: restore the "
            "data it was made with, or train the new tiles as a new run (name=...)"
        )
        df = load_folds(own, source.train.names, fix)
        other = Path(cfg.data.folds_csv) if cfg.data.folds_csv else root / "folds.csv"
        try:
            changed = other.is_file() and folds_hash(load_folds(other, source.train.names)) != folds_hash(df)
        except FoldsError:  # a stale DATA/folds.csv does not concern a run that has its own
            changed = True
        if announce and changed:
            print(
                f"note: {other} differs from this run's {own}; the run keeps its own folds "
                "(to train on the new ones, start a new run with name=...)"
            )
        return df
    explicit = Path(cfg.data.folds_csv) if cfg.data.folds_csv else None
    if explicit is not None and not explicit.is_file():
        raise FoldsError(f"data.folds_csv={cfg.data.folds_csv} not found; make it with `make folds`")
    path = explicit or root / "folds.csv"
    if path.is_file():
        df = load_folds(path, source.train.names)
    else:
        group_csv = group_csv_of(root, cfg.data.group_csv)
        groups = read_groups(group_csv, source.train.names) if group_csv is not None else None
        # Stratify by the labelled non-background fraction (for binary runs: the building fraction).
        fractions = source.train.foreground_fraction(cfg.loss.ignore_index)
        df = make_folds(source.train.names, fractions, cfg.data.n_folds, cfg.train.seed, groups)
    n = int(df["fold"].max()) + 1
    if n != cfg.data.n_folds and announce:
        print(f"note: {path} has {n} folds; data.n_folds={cfg.data.n_folds} is ignored")
    return df


if __name__ == "__main__":
    sys.exit(main())
