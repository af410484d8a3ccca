"""A fake finished run folder in ``make train``'s layout (and small tiles), shared by the tests of
``runs``, ``analysis``, ``viz`` and ``report``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from pipeline.core.config import Config, DataConfig, InferConfig, save_config
from pipeline.data import rle
from pipeline.data.dataset import Split
from pipeline.data.folds import save_folds
from pipeline.data.layouts import Source, read_source
from pipeline.metrics import postprocess
from pipeline.runs.history import write_metrics
from pipeline.runs.manifest import Manifest, write_manifest, write_search
from pipeline.runs.oof import OOF_KEYS, oof_writer

H = W = 8


def png(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array).save(path)  # PNG: lossless, so the statistics are exact
    return path


def metrics_frame(k: int, epochs: int = 4) -> pd.DataFrame:
    e = np.arange(1, epochs + 1)
    return pd.DataFrame(
        {
            "epoch": e,
            "train_loss": 1 / e,
            "val_loss": 1.2 / e,
            "val_dice": 0.5 + 0.1 * e - 0.01 * k,
            "val_iou": 0.4 + 0.1 * e,
            "lr": 1e-3,
            "seconds": 1.0,
        }
    )


def masks(n: int) -> np.ndarray:
    m = np.zeros((n, H, W), np.uint8)
    for i in range(n):
        m[i, : i + 1, :4] = 1  # tile i: (i + 1) x 4 building
    m[0] = 0  # tile 0 empty
    return m


def write_oof(fold_dir: Path, names: list[str], probs: np.ndarray) -> None:
    """A fold's OOF file through the one writer, in the order given."""
    with oof_writer(fold_dir / "oof.npz", names, OOF_KEYS[True]) as write:
        write(range(len(names)), probs)


def write_run(
    root: Path, names: list[str], folds: list[int], probs: np.ndarray, threshold: float = 0.5
) -> Path:
    """A run folder in make train's layout, written with the run folder's own writers; OOF files in
    reverse order so load_run's sorting is tested."""
    root.mkdir(parents=True)
    save_config(Config(name=root.name, data=DataConfig(root=str(root / "data"))), root / "config.yaml")
    save_folds(root / "folds.csv", pd.DataFrame({"name": names, "fold": folds}))
    for k in sorted(set(folds)):
        d = root / f"fold{k}"
        d.mkdir()
        write_metrics(d, metrics_frame(k).to_dict("records"))
        idx = [i for i, f in enumerate(folds) if f == k][::-1]
        write_oof(d, [names[i] for i in idx], probs[idx])
    write_search(root, pd.DataFrame({"threshold": [0.5], "min_area": [0], "dice": [0.9]}))
    infer = dataclasses.replace(InferConfig(), threshold=threshold, min_area=0)
    write_manifest(Manifest(root, ("fold0/best.pt",), infer, 1, str(root / "data"), {"oof_dice": 0.5}))
    return root


def source(tmp_path: Path) -> Source:
    truth = masks(4)
    folder = tmp_path / "imgs"
    folder.mkdir()
    names = [f"s{i}.png" for i in range(4)]
    paths = [png(folder / n, np.full((H, W, 3), 9, np.uint8)) for n in names]
    train = Split(names[:3], paths[:3], truth[:3])
    test = Split(names[3:], paths[3:], None)
    return Source(train, test, ["background", "building"])


# ----------------------------------------------------------------------------- a run over the demo data


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


def _fold_metrics(fold: int) -> pd.DataFrame:
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
    save_folds(run_dir / "folds.csv", folds)
    probs, truths = [], []
    for k in (0, 1):
        fold_dir = run_dir / f"fold{k}"
        fold_dir.mkdir()
        write_metrics(fold_dir, _fold_metrics(k).to_dict("records"))
        names = folds.loc[folds["fold"] == k, "name"].tolist()[::-1]  # not sorted: load_run must sort
        p = np.stack([_fake_probs(masks[n], rng, shift=i % 3) for i, n in enumerate(names)])
        write_oof(fold_dir, names, p)
        probs.append(p)
        truths.append(np.stack([masks[n] for n in names]))
    result = postprocess.search_threshold(
        np.concatenate(probs), np.concatenate(truths), (0.3, 0.4, 0.5, 0.6, 0.7), (0, 16, 32)
    )
    write_search(run_dir, result.table)
    infer = dataclasses.replace(
        InferConfig(), tta="none", threshold=result.threshold, min_area=result.min_area
    )
    checkpoints = ("fold0/best.pt", "fold1/best.pt")  # not written: fold agreement is skipped
    oof = {"oof_dice": result.dice, "n_oof": len(train)}
    write_manifest(Manifest(run_dir, checkpoints, infer, 1, str(data_root), oof))
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


# ----------------------------------------------------------------------------- runs to blend


def tile_data(root: Path, masks: np.ndarray, names: list[str]) -> Path:
    """The competition layout at ``root``: flat grey JPEG tiles ``names`` and ``train_mask.csv`` of
    ``masks`` uint8 [N, H, W] (0/1), for stages that score OOF maps against truth (make blend)."""
    from pipeline.data.maskcsv import format_csv

    (root / "train").mkdir(parents=True)
    for name, mask in zip(names, masks):
        Image.fromarray(np.full((*mask.shape, 3), 99, np.uint8)).save(root / "train" / name)
    (root / "train_mask.csv").write_text(format_csv((n, rle.encode(m)) for n, m in zip(names, masks)))
    return root


def oof_run(
    path: Path,
    data: Path,
    names: list[str],
    folds: list[int],
    probs: np.ndarray,
    tta: str = "flip",
    oof_dice: float = 0.5,
    **config: object,
) -> Path:
    """A finished binary run over ``data`` in make train's layout (no checkpoints) whose OOF maps are
    ``probs`` uint8 [N, H, W], tile i in fold ``folds[i]``; ``config``: Config fields (e.g. model=...)."""
    path.mkdir(parents=True)
    cfg = Config(name=path.name, data=DataConfig(root=str(data)), **config)  # type: ignore[arg-type]
    save_config(cfg, path / "config.yaml")
    save_folds(path / "folds.csv", pd.DataFrame({"name": names, "fold": folds}))
    for k in sorted(set(folds)):
        (path / f"fold{k}").mkdir()
        write_metrics(path / f"fold{k}", metrics_frame(k).to_dict("records"))
        idx = [i for i, f in enumerate(folds) if f == k]
        write_oof(path / f"fold{k}", [names[i] for i in idx], probs[idx])
    write_search(path, pd.DataFrame({"threshold": [0.5], "min_area": [0], "dice": [oof_dice]}))
    infer = dataclasses.replace(InferConfig(), tta=tta)
    ckpts = tuple(f"fold{k}/best.pt" for k in sorted(set(folds)))
    write_manifest(Manifest(path, ckpts, infer, 1, str(data), {"oof_dice": oof_dice}))
    return path
