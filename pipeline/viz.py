"""Figures and small array helpers for the notebooks and ``make report`` (``python -m pipeline.report``).

Every figure function is pure: it takes arrays or frames and returns a new
:class:`matplotlib.figure.Figure`, built without ``pyplot``. No global figure state, no backend
switch, safe under Agg and in worker processes; Jupyter shows a returned figure after
``%matplotlib inline``, and :func:`save_figure` writes it as PNG atomically.

Array conventions: images are uint8 RGB [H, W, 3]; masks are [H, W] (stacks [N, H, W]) of class
ids, binary 0/1 for buildings; OOF probabilities are uint8 [N, H, W] meaning ``round(p * 255)``.

Error colours (prediction against truth), used by :func:`error_overlay` and the galleries:

* true positive  ``TP_COLOR`` green  (0, 200, 0)
* false positive ``FP_COLOR`` red    (230, 0, 0)    predicted building, none there
* false negative ``FN_COLOR`` blue   (0, 140, 255)  building missed

Blue rather than yellow for misses: yellow and green look alike to red-green colour-blind readers,
blue does not.

The run folder read by :func:`load_run` is what ``make train`` writes::

    runs/<run>/config.yaml  folds.csv  threshold_search.csv  manifest.yaml
    runs/<run>/fold<k>/metrics.csv  (epoch, train_loss, val_loss, val_dice, val_iou, lr, seconds)
    runs/<run>/fold<k>/oof.npz      (names str [N], probs uint8 [N, H, W])
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from pipeline import postprocess, rle
from pipeline.config import DataConfig, from_dict
from pipeline.data import DataError, Split, image_size, read_image, read_mask_csv
from pipeline.io import atomic_write_bytes, load_yaml
from pipeline.layouts import Source
from pipeline.metrics import dice_per_image

Color = tuple[int, int, int]

MASK_COLOR: Color = (255, 0, 0)
TP_COLOR: Color = (0, 200, 0)
FP_COLOR: Color = (230, 0, 0)
FN_COLOR: Color = (0, 140, 255)
IGNORE_COLOR: Color = (255, 255, 255)

PANEL_INCHES = 2.4  # one image panel; 512 px tiles stay legible at the default 100 dpi
GALLERY_INCHES = 3.2  # error panels are read for thin FP/FN edges: larger

__all__ = [
    "FN_COLOR",
    "FP_COLOR",
    "TP_COLOR",
    "Run",
    "RunError",
    "TileScores",
    "Unavailable",
    "agreement_heatmap",
    "channel_stats",
    "colorize",
    "data_overview",
    "dice_histogram",
    "error_overlay",
    "evaluate_oof",
    "example_grid",
    "fold_summary",
    "fold_summary_plot",
    "fold_test_agreement",
    "fraction_histogram",
    "learning_curves",
    "load_run",
    "load_submission",
    "mask_summary",
    "overlay",
    "pairwise_agreement",
    "per_tile_dice",
    "prediction_gallery",
    "read_images",
    "resolve_submission",
    "rle_roundtrip_mismatches",
    "run_data_config",
    "save_figure",
    "score_tiles",
    "split_grid",
    "spread_sample",
    "threshold_curve",
    "tile_fractions",
    "worst_tiles_gallery",
]


class RunError(ValueError):
    """A run folder that cannot be read; the message names the file and the command that writes it."""


class Unavailable(RuntimeError):
    """An optional analysis that cannot run here (no checkpoints, no inference function); says why."""


# ----------------------------------------------------------------------------- arrays


def _blend(image: np.ndarray, where: np.ndarray, color: np.ndarray, alpha: float) -> np.ndarray:
    """``image`` with pixels in ``where`` replaced by ``(1 - alpha) * image + alpha * color``, rounded.

    Args:
        image: uint8 [H, W, 3]. where: bool [H, W]. color: [3] or [H, W, 3] (per-pixel colours).
    """
    out = image.copy()
    color = np.asarray(color, dtype=np.float32)
    c = color[where] if color.ndim == 3 else color
    out[where] = np.rint((1.0 - alpha) * image[where].astype(np.float32) + alpha * c).astype(np.uint8)
    return out


def _check_image_mask(image: np.ndarray, *masks: np.ndarray) -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 RGB image [H, W, 3], got {image.dtype} {image.shape}")
    for m in masks:
        if m.shape != image.shape[:2]:
            raise ValueError(
                f"mask {m.shape} does not match image {image.shape[:2]}; masks must match their tiles"
            )


def overlay(image: np.ndarray, mask: np.ndarray, color: Color = MASK_COLOR, alpha: float = 0.4) -> np.ndarray:
    """The image with ``mask`` (non-zero pixels) tinted by ``color``.

    Args:
        image: uint8 [H, W, 3]. mask: [H, W], non-zero = tinted. alpha: 0 = image only, 1 = solid colour.
    Returns:
        uint8 [H, W, 3]; pixels outside the mask are unchanged.
    """
    _check_image_mask(image, mask)
    return _blend(image, np.asarray(mask) != 0, np.asarray(color), alpha)


def error_overlay(image: np.ndarray, pred: np.ndarray, truth: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """The image with true positives, false positives and false negatives in ``TP/FP/FN_COLOR``.

    Args:
        image: uint8 [H, W, 3]. pred, truth: [H, W], non-zero = building.
        alpha: opacity of the colours; 1.0 paints them exactly.
    Returns:
        uint8 [H, W, 3]; true-negative pixels are unchanged.
    """
    _check_image_mask(image, pred, truth)
    p, t = np.asarray(pred) != 0, np.asarray(truth) != 0
    colors = np.zeros((*p.shape, 3), dtype=np.float32)
    colors[p & t] = TP_COLOR
    colors[p & ~t] = FP_COLOR
    colors[~p & t] = FN_COLOR
    return _blend(image, p | t, colors, alpha)


def colorize(
    mask: np.ndarray,
    colors: Sequence[Color],
    ignore_index: int | None = 255,
    ignore_color: Color = IGNORE_COLOR,
) -> np.ndarray:
    """Class ids [H, W] -> RGB uint8 [H, W, 3]: ``colors[id]``, and ``ignore_color`` for ``ignore_index``.

    An id with no colour (>= len(colors), other than ``ignore_index``) is an error: drawing it as
    black would hide a label bug.
    """
    m = np.asarray(mask)
    if m.ndim != 2 or not np.issubdtype(m.dtype, np.integer):
        raise ValueError(f"colorize expects integer class ids [H, W], got {m.dtype} {m.shape}")
    if len(colors) > 255:
        raise ValueError(f"at most 255 colours (uint8 class ids), got {len(colors)}")
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[: len(colors)] = np.asarray(colors, dtype=np.uint8).reshape(-1, 3)
    known = np.zeros(256, dtype=bool)
    known[: len(colors)] = True
    if ignore_index is not None:
        lut[ignore_index] = ignore_color
        known[ignore_index] = True
    if m.size and (m.min() < 0 or m.max() > 255 or not known[m.astype(np.uint8)].all()):
        ids = sorted(set(np.unique(m).tolist()) - set(np.flatnonzero(known).tolist()))
        raise ValueError(
            f"class ids {ids[:10]} have no colour ({len(colors)} colours, ignore_index={ignore_index}); "
            "check the colormap or the masks"
        )
    return lut[m.astype(np.uint8)]


def per_tile_dice(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Competition Dice of each tile, float64 [N], for masks [N, H, W] (0/1 or bool); empty/empty = 1.

    The one implementation is :func:`pipeline.metrics.dice_per_image`; this name keeps the notebooks'
    vocabulary.
    """
    return dice_per_image(pred, truth)


def read_images(paths: Sequence[str | Path]) -> np.ndarray:
    """Read tiles of one size into uint8 [N, H, W, 3]."""
    return np.stack([read_image(p) for p in paths]) if len(paths) else np.zeros((0, 0, 0, 3), np.uint8)


def channel_stats(image_paths: Sequence[str | Path]) -> pd.DataFrame:
    """Per-channel mean and standard deviation of pixel values scaled to 0..1, over all pixels of all images.

    Streaming: one image in memory at a time; images are combined with Chan et al.'s pairwise update
    of (count, mean, sum of squared deviations), which stays exact where ``E[x^2] - E[x]^2`` would
    lose digits. Images may differ in size (each pixel weighs the same).

    Returns:
        DataFrame indexed by channel ``R, G, B`` with columns ``mean``, ``std`` (population std).
    """
    if not len(image_paths):
        raise ValueError("channel_stats needs at least one image")
    n = 0
    mean = np.zeros(3)
    m2 = np.zeros(3)
    for p in image_paths:
        x = read_image(p).reshape(-1, 3).astype(np.float64) / 255.0
        nb = x.shape[0]
        mb = x.mean(0)
        m2b = ((x - mb) ** 2).sum(0)
        delta = mb - mean
        total = n + nb
        mean = mean + delta * (nb / total)
        m2 = m2 + m2b + delta**2 * (n * nb / total)
        n = total
    return pd.DataFrame(
        {"mean": mean, "std": np.sqrt(m2 / n)}, index=pd.Index(["R", "G", "B"], name="channel")
    )


def tile_fractions(split: Split) -> pd.Series:
    """Building (class 1) pixel fraction per tile, float, indexed by tile name."""
    return pd.Series(split.building_fraction(), index=pd.Index(split.names, name="name"), name="fraction")


def spread_sample(values: Sequence[float] | np.ndarray, k: int) -> np.ndarray:
    """Indices of ``k`` items at evenly spaced ranks of ``values`` (lowest and highest included).

    For example tiles that span empty, sparse and dense masks rather than k random (mostly typical) ones.
    Returns int [min(k, N)], ordered by value.
    """
    v = np.asarray(values)
    if k <= 0 or v.size == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.argsort(v, kind="stable")
    ranks = np.unique(np.linspace(0, v.size - 1, min(k, v.size)).round().astype(np.int64))
    return order[ranks]


def data_overview(source: Source) -> pd.DataFrame:
    """One row per split (train, test): tiles, tile size, empty masks and mean building fraction.

    Tile size is read from the first image's header; ``empty`` and ``mean_fraction`` are NaN for a
    split without masks.
    """
    rows = {}
    for name, split in (("train", source.train), ("test", source.test)):
        if split is None or not len(split):
            continue
        h, w = image_size(split.image_paths[0])
        frac = split.building_fraction() if split.masks is not None else None
        rows[name] = {
            "tiles": len(split),
            "height": h,
            "width": w,
            "empty": int((frac == 0).sum()) if frac is not None else np.nan,
            "mean_fraction": float(frac.mean()) if frac is not None else np.nan,
        }
    return pd.DataFrame.from_dict(rows, orient="index")


def fold_summary(folds_df: pd.DataFrame, fractions: pd.Series | Mapping[str, float]) -> pd.DataFrame:
    """Tiles, empty tiles and mean building fraction per fold.

    Args:
        folds_df: columns ``name``, ``fold`` (folds.csv).
        fractions: building fraction per tile name (e.g. :func:`tile_fractions`).
    Returns:
        DataFrame indexed by fold with columns ``tiles``, ``empty``, ``mean_fraction``.
    """
    frac = pd.Series(fractions, dtype=float)
    missing = [n for n in folds_df["name"] if n not in frac.index]
    if missing:
        raise ValueError(
            f"{len(missing)} tiles of folds.csv have no mask ({', '.join(missing[:5])}); "
            "are the folds from this data set?"
        )
    df = pd.DataFrame(
        {"fold": folds_df["fold"].to_numpy(), "fraction": frac.loc[folds_df["name"]].to_numpy()}
    )
    out = df.groupby("fold").agg(
        tiles=("fraction", "size"),
        empty=("fraction", lambda f: int((f == 0).sum())),
        mean_fraction=("fraction", "mean"),
    )
    return out.astype({"tiles": int, "empty": int})


def pairwise_agreement(preds: Mapping[str, np.ndarray]) -> pd.DataFrame:
    """Mean per-tile Dice between every pair of models' binary predictions of the same tiles.

    Args:
        preds: model label (e.g. ``"fold 0"``) -> masks [N, H, W] (bool or 0/1), same tiles in the same
            order for every model.
    Returns:
        Symmetric DataFrame [K, K] indexed and columned by label; 1.0 on the diagonal. Dice with
        empty/empty = 1 as in the competition, so two models that agree a tile is empty agree fully.
    """
    labels = list(preds)
    shapes = {k: np.shape(v) for k, v in preds.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"predictions must cover the same tiles with the same shape, got {shapes}")
    out = np.eye(len(labels))
    for i in range(len(labels)):
        for j in range(i + 1, len(labels)):
            out[i, j] = out[j, i] = per_tile_dice(preds[labels[i]], preds[labels[j]]).mean()
    return pd.DataFrame(out, index=labels, columns=labels)


def mask_summary(masks: np.ndarray) -> pd.DataFrame:
    """Counts for binary masks [N, H, W] as one row: tiles, empty, full (every pixel set), mean_fraction.

    A full mask is almost always a bug (inverted threshold, wrong RLE order), hence its own count.
    """
    m = np.asarray(masks).reshape(len(masks), -1) != 0
    frac = m.mean(1) if m.size else np.zeros(len(m))
    row = {
        "tiles": len(m),
        "empty": int((frac == 0).sum()),
        "full": int((frac == 1).sum()),
        "mean_fraction": float(frac.mean()) if len(m) else float("nan"),
    }
    return pd.DataFrame([row], index=["masks"])


def rle_roundtrip_mismatches(csv_path: str | Path, shape: tuple[int, int]) -> list[str]:
    """Names of rows whose RLE does not survive ``encode(decode(rle)) == rle``.

    A mismatch means a non-canonical string (unsorted or touching runs, stray spaces): valid for
    some readers, but a sign the file was not written by the competition's encoder. Malformed strings
    raise :class:`pipeline.rle.RLEError` naming the row.
    """
    df = read_mask_csv(csv_path)
    masks = rle.decode_many(df["rle"].tolist(), shape, source=str(csv_path), names=df["name"].tolist())
    return [n for n, s, m in zip(df["name"], df["rle"], masks) if rle.encode(m) != s]


def _binarize_stack(probs: np.ndarray, threshold: float, min_area: int) -> np.ndarray:
    """uint8 0/1 [N, H, W] from probabilities [N, H, W] (uint8 0..255 or float), as submissions do it."""
    if probs.ndim != 3:
        raise ValueError(f"expected probabilities [N, H, W] (binary), got shape {probs.shape}")
    out = np.empty(probs.shape, dtype=np.uint8)
    for i, p in enumerate(probs):
        out[i] = postprocess.binarize(p, threshold, min_area)
    return out


# ----------------------------------------------------------------------------- run folders


@dataclass
class Run:
    """A finished training run, as written by ``make train``.

    Attributes:
        path: the run folder. config: the resolved config (plain dict of ``config.yaml``).
        folds: folds.csv (columns ``name``, ``fold``). metrics: fold -> metrics.csv frame.
        oof_names: str [N], every OOF tile sorted by name. oof_folds: int [N], the fold that held it out.
        oof_probs: uint8 [N, H, W], ``round(p * 255)`` of the fold model that did not see the tile.
        threshold_search: columns ``threshold``, ``min_area``, ``dice`` (None for multi-class runs).
        manifest: manifest.yaml as a dict.
    """

    path: Path
    config: dict[str, Any]
    folds: pd.DataFrame
    metrics: dict[int, pd.DataFrame]
    oof_names: np.ndarray
    oof_folds: np.ndarray
    oof_probs: np.ndarray
    threshold_search: pd.DataFrame | None
    manifest: dict[str, Any]

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def threshold(self) -> float:
        return float(self.manifest.get("threshold", 0.5))

    @property
    def min_area(self) -> int:
        return int(self.manifest.get("min_area", 0) or 0)

    @property
    def oof_dice(self) -> float | None:
        """The OOF Dice at the tuned threshold as recorded by training (top level or under ``oof:``)."""
        value = self.manifest.get("oof_dice", (self.manifest.get("oof") or {}).get("oof_dice"))
        return None if value is None else float(value)


_TRAIN_HINT = "run `make train` first (or RUN=runs/<run> to pick another run)"
_METRIC_COLUMNS = ("epoch", "train_loss", "val_loss", "val_dice")


def _need(path: Path, what: str) -> Path:
    if not path.is_file():
        raise RunError(f"{path} not found ({what}); {_TRAIN_HINT}")
    return path


def load_run(run_dir: str | Path) -> Run:
    """Read a run folder (see the module docstring) with checks that name the file at fault.

    Folds are the ``fold<k>/`` folders that hold ``metrics.csv``; each must also hold ``oof.npz``
    (a fold without it has not finished). OOF tiles are checked against folds.csv: a tile predicted
    by the model of another fold than its own would be a leak, and is an error.
    """
    path = Path(run_dir)
    if not path.is_dir():
        raise RunError(f"run folder {path} not found; {_TRAIN_HINT}")
    config = load_yaml(_need(path / "config.yaml", "the resolved config")) or {}
    manifest = load_yaml(_need(path / "manifest.yaml", "written after the last fold")) or {}
    folds = pd.read_csv(_need(path / "folds.csv", "the fold of every tile"), dtype={"name": str})
    if not {"name", "fold"} <= set(folds.columns):
        raise RunError(f"{path / 'folds.csv'} needs columns name,fold; got {list(folds.columns)}")
    fold_of = dict(zip(folds["name"], folds["fold"].astype(int)))

    fold_dirs = sorted(
        (int(d.name.removeprefix("fold")), d)
        for d in path.glob("fold*")
        if d.is_dir() and d.name.removeprefix("fold").isdigit() and (d / "metrics.csv").is_file()
    )
    if not fold_dirs:
        raise RunError(f"{path} has no fold<k>/metrics.csv; {_TRAIN_HINT}")

    metrics, names, fold_ids, probs = {}, [], [], []
    for k, d in fold_dirs:
        df = pd.read_csv(d / "metrics.csv")
        missing = [c for c in _METRIC_COLUMNS if c not in df.columns]
        if missing:
            raise RunError(f"{d / 'metrics.csv'} lacks columns {missing}; it has {list(df.columns)}")
        metrics[k] = df
        oof = _need(d / "oof.npz", f"fold {k} has not finished: validation probabilities are written last")
        with np.load(oof) as z:
            if "names" not in z or "probs" not in z:
                raise RunError(f"{oof} must hold arrays 'names' and 'probs'; it has {list(z.keys())}")
            n, p = [str(x) for x in z["names"]], z["probs"]
        if len(n) != len(p):
            raise RunError(f"{oof}: {len(n)} names but {len(p)} probability maps")
        wrong = [x for x in n if fold_of.get(x) != k]
        if wrong:
            where = ", ".join(f"{x} (fold {fold_of.get(x, 'none')})" for x in wrong[:5])
            raise RunError(
                f"{oof}: {len(wrong)} tiles are not in fold {k} of folds.csv: {where}. The OOF file and "
                "folds.csv disagree (folds re-made after training?); retrain the run"
            )
        names += n
        fold_ids += [k] * len(n)
        probs.append(p)
    if len(set(names)) != len(names):
        raise RunError(f"{path}: some tiles appear in more than one fold's oof.npz; retrain the run")

    search = None
    if (path / "threshold_search.csv").is_file():
        search = pd.read_csv(path / "threshold_search.csv")
    elif int(manifest.get("classes", 1)) == 1:
        _need(path / "threshold_search.csv", "the OOF threshold / min-area search")

    order = np.argsort(np.asarray(names), kind="stable")
    return Run(
        path=path,
        config=config,
        folds=folds,
        metrics=metrics,
        oof_names=np.asarray(names)[order],
        oof_folds=np.asarray(fold_ids, dtype=np.int64)[order],
        oof_probs=np.concatenate(probs)[order],
        threshold_search=search,
        manifest=manifest,
    )


def run_data_config(run: Run | str | Path, root: str | Path | None = None) -> DataConfig:
    """The data section of a run's config (a :class:`Run` or a run folder) with ``root`` replaced when given.

    The data may live elsewhere than where the run was trained (another machine, a mounted copy).
    A run folder is read for its ``config.yaml`` only, without loading the OOF arrays.
    """
    if isinstance(run, Run):
        config = run.config
    else:
        config = load_yaml(_need(Path(run) / "config.yaml", "the resolved config")) or {}
    data = dict(config.get("data") or {})
    if root:
        data["root"] = str(root)
    return from_dict(DataConfig, data, "data")


@dataclass
class TileScores:
    """Binary predictions scored against the truth, per tile (OOF tiles of a run, or a scored test set).

    Attributes:
        names: str [N]. dice: float64 [N] per-tile Dice (empty/empty = 1).
        preds: uint8 0/1 [N, H, W] (after threshold and min-area). truths: uint8 [N, H, W].
        image_paths: N paths. folds: int [N], the fold that predicted each tile (None outside OOF).
        threshold, min_area: what made ``preds`` from probabilities (None when unknown).
    """

    names: np.ndarray
    dice: np.ndarray
    preds: np.ndarray
    truths: np.ndarray
    image_paths: list[Path]
    folds: np.ndarray | None = None
    threshold: float | None = None
    min_area: int | None = None

    def table(self) -> pd.DataFrame:
        """One row per tile, worst Dice first: name, [fold,] dice, truth_fraction, pred_fraction."""
        n = len(self.names)
        cols: dict[str, Any] = {"name": self.names}
        if self.folds is not None:
            cols["fold"] = self.folds
        cols["dice"] = self.dice
        cols["truth_fraction"] = (self.truths.reshape(n, -1) != 0).mean(1)
        cols["pred_fraction"] = (self.preds.reshape(n, -1) != 0).mean(1)
        return pd.DataFrame(cols).sort_values("dice", kind="stable", ignore_index=True)

    def by_fold(self) -> pd.DataFrame:
        """Tiles and mean Dice per fold, plus an ``all`` row (the OOF score)."""
        if self.folds is None:
            raise ValueError("these scores have no folds (not OOF predictions)")
        df = pd.DataFrame({"fold": self.folds, "dice": self.dice})
        out = df.groupby("fold").agg(tiles=("dice", "size"), dice=("dice", "mean"))
        out.index = out.index.astype(str)
        out.loc["all"] = [len(df), float(df["dice"].mean())]
        return out.astype({"tiles": int})


def score_tiles(truth: Split, preds: np.ndarray, **extra: Any) -> TileScores:
    """Score binary predictions [N, H, W] (0/1, in ``truth`` order) against ``truth.masks``.

    ``extra`` fills the optional :class:`TileScores` fields (folds, threshold, min_area).
    """
    if truth.masks is None:
        raise ValueError("nothing to score against: this split has no masks (no ground truth)")
    truths = np.asarray(truth.masks)
    return TileScores(
        names=np.asarray(truth.names),
        dice=per_tile_dice(preds, truths),
        preds=np.asarray(preds),
        truths=truths,
        image_paths=list(truth.image_paths),
        **extra,
    )


def evaluate_oof(
    run: Run, train: Split, threshold: float | None = None, min_area: int | None = None
) -> TileScores:
    """Score the run's OOF probabilities against the masks of ``train`` (tiles in ``run.oof_names`` order).

    ``threshold`` and ``min_area`` default to the manifest's tuned values. Binarisation is
    :func:`pipeline.postprocess.binarize`, the rule submissions use, so the mean Dice here equals the
    manifest's ``oof_dice`` when the tuned values are used.
    """
    if train.masks is None:
        raise ValueError("the train split has no masks; pass source.train of the data the run was trained on")
    try:
        oof = train.select(
            run.oof_names, f"OOF tiles of {run.path}: point DATA at the data the run was trained on"
        )
    except DataError as e:
        raise RunError(str(e)) from None
    if np.shape(oof.masks) != run.oof_probs.shape:
        raise RunError(
            f"OOF probabilities {run.oof_probs.shape} and masks {np.shape(oof.masks)} differ in shape; "
            "is DATA the data the run was trained on?"
        )
    t = run.threshold if threshold is None else float(threshold)
    m = run.min_area if min_area is None else int(min_area)
    preds = _binarize_stack(run.oof_probs, t, m)
    return score_tiles(oof, preds, folds=run.oof_folds, threshold=t, min_area=m)


def fold_test_agreement(run: Run, image_paths: Sequence[str | Path], tta: str = "none") -> pd.DataFrame:
    """Pairwise agreement (:func:`pairwise_agreement`) of the fold models on the same (test) tiles.

    OOF tiles differ per fold, so folds can only be compared on tiles none of them trained on: the
    test tiles. Each fold model predicts them (``pipeline.infer.predict_folds``), binarised with the
    manifest's threshold and min-area.

    Raises:
        Unavailable: the run's checkpoints are missing, or ``pipeline.infer.predict_folds`` is absent.
    """
    if not len(image_paths):
        raise Unavailable("fold agreement needs test tiles; DATA has none")
    ckpts = [str(c) for c in run.manifest.get("checkpoints") or []]
    missing = [c for c in ckpts if not (run.path / c).is_file()]
    if len(ckpts) < 2 or missing:
        raise Unavailable(
            f"fold agreement needs at least two fold checkpoints in {run.path}; "
            f"manifest lists {len(ckpts)}, missing: {missing[:4] or 'none'}"
        )
    try:
        from pipeline.infer import predict_folds
    except ImportError as e:
        raise Unavailable(f"fold agreement needs pipeline.infer.predict_folds ({e})") from None
    probs = predict_folds(run.path / "manifest.yaml", list(image_paths), tta=tta)
    preds = {
        f"fold {k}": _binarize_stack(np.asarray(p), run.threshold, run.min_area)
        for k, p in sorted(probs.items())
    }
    return pairwise_agreement(preds)


# ----------------------------------------------------------------------------- submissions


def resolve_submission(path: str | Path = "", folder: str | Path = "submissions") -> Path:
    """``path`` if given, else the newest ``*.csv`` in ``folder`` (what ``make submit`` last wrote)."""
    if path:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"submission {p} not found")
        return p
    found = sorted(Path(folder).glob("*.csv"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no submission (*.csv) in {folder}/; run `make submit` first")
    return found[-1]


def load_submission(path: str | Path, test: Split | None) -> np.ndarray:
    """Decode a submission into uint8 0/1 masks [N, H, W] in ``test`` order.

    The submission must list exactly the test tiles, in sample-submission order (the order the
    competition reads rows in). Tile size comes from the first test image.
    """
    if test is None:
        raise ValueError("the data has no test split (test_a/ or its sample submission); check DATA")
    df = read_mask_csv(path, require_rle=False)
    names = df["name"].tolist()
    if names != list(test.names):
        extra = sorted(set(names) - set(test.names))
        lacking = sorted(set(test.names) - set(names))
        if extra or lacking:
            raise ValueError(
                f"{path} does not list the test tiles: {len(lacking)} missing ({', '.join(lacking[:3])}), "
                f"{len(extra)} unknown ({', '.join(extra[:3])}); is it for this data set?"
            )
        first = next(i for i, (a, b) in enumerate(zip(names, test.names)) if a != b)
        raise ValueError(
            f"{path}: row {first + 1} is {names[first]} but the sample submission has "
            f"{test.names[first]} there; rows must follow the sample submission's order"
        )
    shape = image_size(test.image_paths[0]) if len(test) else rle.DEFAULT_SHAPE
    return rle.decode_many(df["rle"].tolist(), shape, source=str(path), names=names)


# ----------------------------------------------------------------------------- figures


def _figure(
    nrows: int, ncols: int, panel: tuple[float, float] = (PANEL_INCHES, PANEL_INCHES)
) -> tuple[Figure, Any]:
    fig = Figure(figsize=(panel[0] * ncols, panel[1] * nrows), layout="constrained")
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def _show(ax: Any, img: np.ndarray, title: str = "", cmap: str | None = None) -> None:
    """An image panel without ticks; ``cmap`` (with a 0..1 range) for single-channel masks.

    Antialiased resampling: a 512 px tile drawn in ~300 px would lose 1-2 px error edges to
    nearest-neighbour sampling; antialiasing keeps them visible as fainter lines.
    """
    if cmap:
        ax.imshow(img, cmap=cmap, vmin=0, vmax=1, interpolation="antialiased")
    else:
        ax.imshow(img, interpolation="antialiased")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=8)


def save_figure(fig: Figure, path: str | Path, dpi: int = 100) -> Path:
    """Write ``fig`` as PNG atomically (a reader never sees half a file); returns the path."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def fraction_histogram(
    fractions: Sequence[float] | np.ndarray, title: str = "building fraction per tile"
) -> Figure:
    """Histogram of per-tile building fractions (40 bins over 0..1); the title counts empty tiles."""
    f = np.asarray(fractions, dtype=float)
    fig, axes = _figure(1, 1, (6.0, 3.0))
    ax = axes[0, 0]
    ax.hist(f, bins=np.linspace(0.0, 1.0, 41), color="tab:blue")
    ax.set_xlabel("fraction of pixels that are building")
    ax.set_ylabel("tiles")
    mean = f"{f.mean():.3f}" if f.size else "n/a"
    ax.set_title(f"{title}: {f.size} tiles, {int((f == 0).sum())} empty, mean {mean}", fontsize=9)
    return fig


def example_grid(
    images: Sequence[np.ndarray] | np.ndarray,
    masks: Sequence[np.ndarray] | np.ndarray,
    names: Sequence[str],
    colors: Sequence[Color] | None = None,
    tiles_per_row: int = 2,
) -> Figure:
    """Tiles as image | overlay | mask, ``tiles_per_row`` tiles (3 panels each) side by side.

    Args:
        images: N uint8 [H, W, 3]. masks: N [H, W] class ids. names: N titles.
        colors: a class palette for multi-class masks (more than two colours): drawn with
            :func:`colorize`. Binary masks are drawn red over the image and white on black.
    """
    n = len(images)
    per_row = max(1, min(tiles_per_row, n))
    rows = max(1, -(-n // per_row))
    fig, axes = _figure(rows, 3 * per_row)
    multi = colors is not None and len(colors) > 2
    for i in range(rows * per_row):
        trio = axes[i // per_row, 3 * (i % per_row) : 3 * (i % per_row) + 3]
        if i >= n:
            for ax in trio:
                ax.axis("off")
            continue
        img, m = np.asarray(images[i]), np.asarray(masks[i])
        if multi:
            rgb = colorize(m, colors)
            shown = _blend(img, (m != 0) & (m != 255), rgb, 0.5)
            _show(trio[2], rgb, "classes")
        else:
            shown = overlay(img, m)
            _show(trio[2], (m != 0).astype(np.float32), f"mask ({(m == 1).mean():.1%})", cmap="gray")
        _show(trio[0], img, str(names[i]))
        _show(trio[1], shown, "overlay")
    return fig


def _error_legend(fig: Figure) -> None:
    fig.legend(
        handles=[
            Patch(color=np.array(TP_COLOR) / 255, label="TP"),
            Patch(color=np.array(FP_COLOR) / 255, label="FP (predicted, not there)"),
            Patch(color=np.array(FN_COLOR) / 255, label="FN (missed)"),
        ],
        loc="outside upper center",
        ncols=3,
        fontsize=8,
        frameon=False,
    )


def prediction_gallery(
    images: Sequence[np.ndarray] | np.ndarray,
    preds: Sequence[np.ndarray] | np.ndarray,
    truths: Sequence[np.ndarray] | np.ndarray,
    names: Sequence[str],
    scores: Sequence[float] | np.ndarray,
) -> Figure:
    """One row per tile: image (titled name and Dice) | error overlay (TP/FP/FN colours) | true mask.

    Args:
        images: N uint8 [H, W, 3]. preds, truths: N binary [H, W]. names: N. scores: N per-tile Dice.
    """
    n = len(images)
    fig, axes = _figure(max(n, 1), 3, (GALLERY_INCHES, GALLERY_INCHES))
    if n == 0:
        for ax in axes.ravel():
            ax.axis("off")
        return fig
    _error_legend(fig)
    for i in range(n):
        img, p, t = np.asarray(images[i]), np.asarray(preds[i]), np.asarray(truths[i])
        _show(axes[i, 0], img, f"{names[i]}  Dice {float(scores[i]):.3f}")
        _show(axes[i, 1], error_overlay(img, p, t), f"prediction ({(p != 0).mean():.1%})")
        _show(axes[i, 2], (t != 0).astype(np.float32), f"truth ({(t != 0).mean():.1%})", cmap="gray")
    return fig


def worst_tiles_gallery(scores: TileScores, k: int = 8) -> Figure:
    """:func:`prediction_gallery` of the ``k`` tiles with the lowest Dice (ties: in tile order)."""
    worst = np.argsort(scores.dice, kind="stable")[:k]
    fold = (lambda i: f" (fold {scores.folds[i]})") if scores.folds is not None else (lambda i: "")
    return prediction_gallery(
        read_images([scores.image_paths[i] for i in worst]),
        scores.preds[worst],
        scores.truths[worst],
        [f"{scores.names[i]}{fold(i)}" for i in worst],
        scores.dice[worst],
    )


def split_grid(
    split: Split,
    indices: Sequence[int] | np.ndarray,
    colors: Sequence[Color] | None = None,
    tiles_per_row: int = 2,
) -> Figure:
    """:func:`example_grid` of the tiles of ``split`` (which must have masks) at ``indices``."""
    if split.masks is None:
        raise ValueError("split_grid draws masks; this split has none")
    idx = [int(i) for i in indices]
    return example_grid(
        read_images([split.image_paths[i] for i in idx]),
        [split.masks[i] for i in idx],
        [split.names[i] for i in idx],
        colors,
        tiles_per_row,
    )


def fold_summary_plot(summary: pd.DataFrame) -> Figure:
    """Bars per fold from :func:`fold_summary`: tiles (empty ones darker) and mean building fraction."""
    fig, axes = _figure(1, 2, (4.0, 3.0))
    x = np.arange(len(summary))
    labels = [str(f) for f in summary.index]
    a0, a1 = axes[0]
    a0.bar(x, summary["tiles"] - summary["empty"], color="tab:blue", label="with buildings")
    a0.bar(x, summary["empty"], bottom=summary["tiles"] - summary["empty"], color="tab:gray", label="empty")
    a0.set_title("tiles per fold", fontsize=9)
    a0.set_ylim(0, 1.3 * max(int(summary["tiles"].max()), 1))  # headroom so the legend covers no bar
    a0.legend(fontsize=7, loc="upper center", ncols=2)
    a1.bar(x, summary["mean_fraction"], color="tab:orange")
    a1.axhline(
        float(np.average(summary["mean_fraction"], weights=summary["tiles"])), color="k", lw=0.8, ls=":"
    )
    a1.set_title("mean building fraction (dotted: all)", fontsize=9)
    for ax in (a0, a1):
        ax.set_xticks(x, labels)
        ax.set_xlabel("fold")
    return fig


def _fold_color(k: int) -> Any:
    from matplotlib import colormaps

    return colormaps["tab10"](k % 10)


def learning_curves(metrics_by_fold: Mapping[int, pd.DataFrame]) -> Figure:
    """Every fold on one figure: losses (train solid, validation dashed) and validation Dice.

    Args:
        metrics_by_fold: fold -> metrics.csv frame (columns epoch, train_loss, val_loss, val_dice).
    Returns:
        Figure with 2 axes: 2 lines per fold on the first, 1 per fold on the second (the best epoch
        of each fold is a marker, not a line).
    """
    fig, axes = _figure(1, 2, (5.0, 3.4))
    a0, a1 = axes[0]
    for k, df in sorted(metrics_by_fold.items()):
        c = _fold_color(k)
        a0.plot(df["epoch"], df["train_loss"], color=c, ls="-")
        a0.plot(df["epoch"], df["val_loss"], color=c, ls="--")
        a1.plot(df["epoch"], df["val_dice"], color=c, label=f"fold {k}")
        if len(df):
            best = int(df["val_dice"].to_numpy().argmax())
            a1.scatter(
                [df["epoch"].iloc[best]], [df["val_dice"].iloc[best]], color=c, marker="*", s=80, zorder=3
            )
    losses = [df[c].to_numpy() for df in metrics_by_fold.values() for c in ("train_loss", "val_loss")]
    if losses and all((v > 0).all() for v in losses):
        a0.set_yscale("log")  # an early validation spike (8 vs 0.4) would flatten the rest on a linear axis
    a0.set_title("loss", fontsize=9)
    a0.legend(
        handles=[
            Line2D([], [], color="k", ls="-", label="train"),
            Line2D([], [], color="k", ls="--", label="val"),
        ],
        fontsize=7,
    )
    a1.set_title("validation Dice (* best epoch)", fontsize=9)
    a1.legend(fontsize=7)
    for ax in (a0, a1):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    return fig


def threshold_curve(
    search_df: pd.DataFrame, chosen_threshold: float | None = None, chosen_min_area: int | None = None
) -> Figure:
    """OOF Dice against threshold, one line per min_area, the chosen (threshold, min_area) starred.

    Args:
        search_df: threshold_search.csv (columns threshold, min_area, dice).
        chosen_threshold, chosen_min_area: the manifest's values; the chosen min_area's line is drawn thicker.
    Returns:
        Figure with 1 axes and one line per distinct min_area.
    """
    fig, axes = _figure(1, 1, (6.0, 3.6))
    ax = axes[0, 0]
    areas = sorted(search_df["min_area"].unique())
    for i, a in enumerate(areas):
        d = search_df[search_df["min_area"] == a].sort_values("threshold")
        chosen = chosen_min_area is not None and int(a) == int(chosen_min_area)
        ax.plot(
            d["threshold"],
            d["dice"],
            marker=".",
            lw=2.4 if chosen else 1.0,
            label=f"min_area {a}",
            color=_fold_color(i),
            alpha=1.0 if chosen else 0.7,
        )
    title = "OOF Dice against threshold"
    if chosen_threshold is not None and chosen_min_area is not None:
        row = search_df[
            np.isclose(search_df["threshold"], chosen_threshold)
            & (search_df["min_area"] == int(chosen_min_area))
        ]
        if len(row):
            y = float(row["dice"].iloc[0])
            ax.scatter([chosen_threshold], [y], marker="*", s=200, color="k", zorder=4)
            # In the title, not beside the star: a label there collides with the curves.
            title += (
                f"; chosen (star): threshold {chosen_threshold:.2f}, min_area {chosen_min_area}, Dice {y:.4f}"
            )
    ax.set_xlabel("threshold")
    ax.set_ylabel("OOF mean Dice")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncols=2)
    return fig


def dice_histogram(per_tile: Sequence[float] | np.ndarray, title: str = "per-tile Dice") -> Figure:
    """Histogram of per-tile Dice (20 bins over 0..1) with the mean as a vertical line."""
    d = np.asarray(per_tile, dtype=float)
    fig, axes = _figure(1, 1, (6.0, 3.0))
    ax = axes[0, 0]
    ax.hist(d, bins=np.linspace(0.0, 1.0, 21), color="tab:green")
    if d.size:
        ax.axvline(d.mean(), color="k", ls="--", lw=1)
    mean = f"{d.mean():.4f}" if d.size else "n/a"
    ax.set_title(f"{title}: {d.size} tiles, mean {mean}, {int((d < 0.5).sum())} below 0.5", fontsize=9)
    ax.set_xlabel("Dice")
    ax.set_ylabel("tiles")
    return fig


def agreement_heatmap(agreement: pd.DataFrame) -> Figure:
    """Heatmap of :func:`pairwise_agreement` with the values written in; 2 axes (map and colour bar)."""
    k = len(agreement)
    fig, axes = _figure(1, 1, (1.2 * k + 2.0, 1.0 * k + 1.2))
    ax = axes[0, 0]
    values = agreement.to_numpy(dtype=float)
    lo = float(values.min()) if values.size else 0.0
    im = ax.imshow(values, vmin=min(lo, 0.9), vmax=1.0, cmap="viridis")
    for i in range(k):
        for j in range(k):
            ax.text(
                j,
                i,
                f"{values[i, j]:.3f}",
                ha="center",
                va="center",
                fontsize=8,
                color="w" if values[i, j] < (lo + 1) / 2 else "k",
            )
    ax.set_xticks(range(k), agreement.columns, rotation=45, fontsize=8)
    ax.set_yticks(range(k), agreement.index, fontsize=8)
    ax.set_title("agreement between folds (mean per-tile Dice)", fontsize=9)
    fig.colorbar(im, ax=ax)
    return fig
