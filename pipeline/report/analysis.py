"""Numbers about data, folds and predictions, for the notebooks and ``make report`` (figures: ``viz``).

Pure functions of arrays, splits and run folders: statistics of the tiles (channel means, building
fractions, an overview per split), of the folds (tiles, empty tiles, mean fraction per fold), and
per-tile scoring of predictions against the truth (:class:`TileScores`), out-of-fold
(:func:`evaluate_oof`) or on the test tiles (:func:`load_submission` + :func:`score_tiles`).

Array conventions: images are uint8 RGB [H, W, 3]; masks are [H, W] (stacks [N, H, W]) of class ids,
binary 0/1 for buildings; OOF probabilities are uint8 [N, H, W] meaning ``round(p * 255)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.data import DataError, rle
from pipeline.data.dataset import Split
from pipeline.data.images import image_size, read_image
from pipeline.data.layouts import Source
from pipeline.data.masks import read_mask_csv, release_pages
from pipeline.metrics import buildings, postprocess
from pipeline.metrics.pixel import dice_per_image
from pipeline.runs import RunError
from pipeline.runs.run import Run


class Unavailable(RuntimeError):
    """An optional analysis that cannot run here (no checkpoints, no inference function); says why."""


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
    return pd.Series(split.foreground_fraction(), index=pd.Index(split.names, name="name"), name="fraction")


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
        frac = split.foreground_fraction() if split.masks is not None else None
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
            out[i, j] = out[j, i] = dice_per_image(preds[labels[i]], preds[labels[j]]).mean()
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
    raise :class:`pipeline.data.rle.RLEError` naming the row.
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


KEEP = 8  # tiles per ranking whose masks a TileScores keeps for figures (worst Dice, most building errors)


@dataclass
class TileScores:
    """Binary predictions scored against the truth, per tile (OOF tiles of a run, or a scored test set).

    Built from a stream of chunks (:func:`score_chunks`): only per-tile numbers are kept, plus the masks
    of the tiles the figures show, so scoring 30k OOF tiles needs no more memory than scoring 30.

    Attributes:
        names: str [N], sorted by name. dice: float64 [N] per-tile Dice (empty/empty = 1).
        truth_fraction, pred_fraction: float64 [N] building fractions. errors: int64 [N] unmatched
            buildings per tile (FP + FN at IoU >= 0.5). folds: int [N], the fold that predicted each
            tile (None outside OOF). image_paths: N paths.
        buildings: per-building TP/FP/FN summed over the tiles.
        kept: tile index -> (pred, truth) uint8 [H, W] for the ``KEEP`` lowest-Dice tiles and the
            ``KEEP`` with the most building errors (ties: by name).
        threshold, min_area: what made the predictions from probabilities (None when unknown).
    """

    names: np.ndarray
    dice: np.ndarray
    truth_fraction: np.ndarray
    pred_fraction: np.ndarray
    errors: np.ndarray
    image_paths: list[Path]
    buildings: buildings.BuildingCounts
    kept: dict[int, tuple[np.ndarray, np.ndarray]]
    folds: np.ndarray | None = None
    threshold: float | None = None
    min_area: int | None = None

    def table(self) -> pd.DataFrame:
        """One row per tile, worst Dice first: name, [fold,] dice, truth_fraction, pred_fraction."""
        cols: dict[str, Any] = {"name": self.names}
        if self.folds is not None:
            cols["fold"] = self.folds
        cols |= {
            "dice": self.dice,
            "truth_fraction": self.truth_fraction,
            "pred_fraction": self.pred_fraction,
        }
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

    def worst(self, k: int) -> np.ndarray:
        """Indices of the ``k`` lowest-Dice tiles (ties: by name), whose masks are kept."""
        return self._ranked(self.dice, k)

    def most_errors(self, k: int) -> np.ndarray:
        """Indices of the ``k`` tiles with the most building errors (ties: by name), masks kept."""
        return self._ranked(-self.errors, k)

    def masks(self, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(preds, truths) uint8 [k, H, W] of kept tiles."""
        return np.stack([self.kept[i][0] for i in indices]), np.stack([self.kept[i][1] for i in indices])

    def _ranked(self, key: np.ndarray, k: int) -> np.ndarray:
        if k > KEEP:
            raise ValueError(f"at most {KEEP} tiles per ranking are kept for figures, not {k}")
        return np.argsort(key, kind="stable")[:k]


class _Keeper:
    """The masks of the ``KEEP`` best candidates of two rankings over a stream (ties: by name)."""

    def __init__(self) -> None:
        self.kept: dict[str, tuple[Any, Any, np.ndarray, np.ndarray]] = {}  # name -> keys, pred, truth

    def offer(
        self, names: Sequence[str], dice: np.ndarray, errors: np.ndarray, preds: Any, truths: Any
    ) -> None:
        for i, n in enumerate(names):
            self.kept[n] = ((dice[i], n), (-errors[i], n), np.array(preds[i]), np.array(truths[i]))
        by_dice = sorted(self.kept, key=lambda n: self.kept[n][0])[:KEEP]
        by_errors = sorted(self.kept, key=lambda n: self.kept[n][1])[:KEEP]
        self.kept = {n: self.kept[n] for n in {*by_dice, *by_errors}}


def score_chunks(
    chunks: Iterable[tuple[Sequence[str], np.ndarray, Any, Any]],
    image_path_of: Mapping[str, Path],
    **extra: Any,
) -> TileScores:
    """Score a stream of ``(names [n], preds uint8 0/1 [n, H, W], truths [n, H, W], fold or None)``.

    ``image_path_of`` maps each name to its image; ``extra`` fills the optional :class:`TileScores`
    fields (threshold, min_area). Tiles come out sorted by name, whatever the order of the stream.
    """
    cols: dict[str, list[Any]] = {k: [] for k in ("names", "dice", "truth", "pred", "errors", "folds")}
    total, keeper = buildings.BuildingCounts.zeros(), _Keeper()
    for names, preds, truths, fold in chunks:
        truths = np.asarray(truths)
        if np.shape(preds) != truths.shape:
            raise RunError(
                f"predictions {np.shape(preds)} and masks {truths.shape} differ in shape; "
                "is DATA the data the predictions were made for?"
            )
        n = len(names)
        dice = dice_per_image(preds, truths)
        matches = [buildings.match_masks(p, t) for p, t in zip(preds, truths)]
        for m in matches:
            total = total + buildings.BuildingCounts.from_matches(m, buildings.PIXEL_SIZE_BINS)
        errors = np.array([(~m.pred_matched).sum() + (~m.truth_matched).sum() for m in matches], np.int64)
        keeper.offer(names, dice, errors, preds, truths)
        cols["names"] += list(names)
        cols["dice"].append(dice)
        cols["truth"].append((truths.reshape(n, -1) != 0).mean(1))
        cols["pred"].append((np.asarray(preds).reshape(n, -1) != 0).mean(1))
        cols["errors"].append(errors)
        cols["folds"] += [fold] * n
    names = np.asarray(cols["names"])
    order = np.argsort(names, kind="stable")
    cat = {
        k: (np.concatenate(cols[k]) if cols[k] else np.zeros(0))[order]
        for k in ("dice", "truth", "pred", "errors")
    }
    index_of = {str(n): i for i, n in enumerate(names[order])}
    folds = None if any(f is None for f in cols["folds"]) else np.asarray(cols["folds"], np.int64)[order]
    return TileScores(
        names=names[order],
        dice=cat["dice"].astype(np.float64),
        truth_fraction=cat["truth"],
        pred_fraction=cat["pred"],
        errors=cat["errors"].astype(np.int64),
        image_paths=[Path(image_path_of[str(n)]) for n in names[order]],
        buildings=total,
        kept={index_of[n]: (v[2], v[3]) for n, v in keeper.kept.items()},
        folds=folds,
        **extra,
    )


def score_tiles(truth: Split, preds: np.ndarray, chunk: int = 64, **extra: Any) -> TileScores:
    """Score binary predictions [N, H, W] (0/1, in ``truth`` order) against ``truth.masks``."""
    if truth.masks is None:
        raise ValueError("nothing to score against: this split has no masks (no ground truth)")
    stream = (
        (truth.names[i : i + chunk], preds[i : i + chunk], truth.masks[i : i + chunk], None)
        for i in range(0, len(truth), chunk)
    )
    return score_chunks(stream, dict(zip(truth.names, truth.image_paths)), **extra)


def building_scores(scores: TileScores) -> dict[str, Any]:
    """Per-building precision, recall and F1 (:func:`pipeline.metrics.buildings.score_masks`'s report)."""
    return scores.buildings.report(buildings.PIXEL_SIZE_BINS, "px", buildings.IOU_THRESHOLD)


def building_panels(scores: TileScores, k: int = 6) -> list[Any]:
    """Outline panels (:class:`pipeline.report.outlines.OutlinePanel`) of the ``k`` tiles with the most
    building errors (FP + FN; ties by name), for :func:`pipeline.report.outlines.building_outlines`."""
    from pipeline.geo.vectorize import tile_polygons
    from pipeline.report.outlines import OutlinePanel

    panels = []
    for i in scores.most_errors(k):
        pred, truth = scores.kept[int(i)]
        m = buildings.match_masks(pred, truth)
        panels.append(
            OutlinePanel(
                str(scores.names[i]),
                read_image(scores.image_paths[i]),
                tile_polygons(pred),
                m.pred_matched,
                tile_polygons(truth),
                m.truth_matched,
            )
        )
    return panels


def evaluate_oof(
    run: Run, train: Split, threshold: float | None = None, min_area: int | None = None
) -> TileScores:
    """Score the run's OOF probabilities against the masks of ``train``, streamed chunk by chunk.

    ``threshold`` and ``min_area`` default to the manifest's tuned values. Binarisation is
    :func:`pipeline.metrics.postprocess.binarize`, the rule submissions use, so the mean Dice here equals
    the manifest's ``oof_dice`` when the tuned values are used.
    """
    if train.masks is None:
        raise ValueError("the train split has no masks; pass source.train of the data the run was trained on")
    t = run.threshold if threshold is None else float(threshold)
    m = run.min_area if min_area is None else int(min_area)

    def chunks() -> Iterator[tuple[list[str], np.ndarray, Any, int]]:
        for fold, names, probs in run.oof_chunks():
            try:
                truths = train.select(
                    names, f"OOF tiles of {run.path}: point DATA at the data it was trained on"
                )
            except DataError as e:
                raise RunError(str(e)) from None
            yield names, _binarize_stack(probs, t, m), truths.masks, fold
            release_pages(train.masks)

    return score_chunks(chunks(), dict(zip(train.names, train.image_paths)), threshold=t, min_area=m)


def fold_test_agreement(run: Run, image_paths: Sequence[str | Path], tta: str = "none") -> pd.DataFrame:
    """Pairwise agreement (:func:`pairwise_agreement`) of the fold models on the same (test) tiles.

    OOF tiles differ per fold, so folds can only be compared on tiles none of them trained on: the
    test tiles. Each fold model predicts them (``pipeline.infer.ensemble.predict_folds``), binarised with the
    manifest's threshold and min-area.

    Raises:
        Unavailable: the run's checkpoints are missing.
    """
    if not len(image_paths):
        raise Unavailable("fold agreement needs test tiles; DATA has none")
    ckpts = list(run.manifest.checkpoints)
    missing = [c for c in ckpts if not (run.path / c).is_file()]
    if len(ckpts) < 2 or missing:
        raise Unavailable(
            f"fold agreement needs at least two fold checkpoints in {run.path}; "
            f"manifest lists {len(ckpts)}, missing: {missing[:4] or 'none'}"
        )
    try:
        from pipeline.infer.ensemble import predict_folds
    except ImportError as e:
        raise Unavailable(f"fold agreement needs pipeline.infer.ensemble.predict_folds ({e})") from None
    probs = predict_folds(run.path / "manifest.yaml", list(image_paths), tta=tta)
    preds = {
        f"fold {k}": _binarize_stack(np.asarray(p), run.threshold, run.min_area)
        for k, p in sorted(probs.items())
    }
    return pairwise_agreement(preds)


# ----------------------------------------------------------------------------- submissions


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
