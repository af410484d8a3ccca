"""A CPU proxy of the accuracy benchmark: ranks recipes on the real tiles shrunk to 128 px, in minutes.

    python -m bench.proxy                          # the default recipe, seeds 0 and 1
    python -m bench.proxy --recipe lovasz --recipe swa
    python -m bench.proxy --plain                  # the plain reference loop on the same tiles and split
    python -m bench.proxy --table                  # the summary only: mean, seed spread, gain over default
    make bench-proxy RECIPES="default lovasz"

The real tiles (``../shared/data/buildings-real``) are shrunk once to ``--size`` px (images
area-averaged, masks nearest-neighbour, RLE re-encoded with :mod:`pipeline.data.rle`) into
``~/.cache/buildseg-proxy/data-<size>`` (``$BUILDSEG_PROXY_HOME``; outside the checkout), with one
fixed fold split grouped by scene (``folds.csv``, seed 42).
Every recipe trains U-Net/ResNet18 from random weights for a fixed epoch budget on fold 0's training
tiles, then reports OOF Dice on fold 0's validation tiles (at 0.5 and tuned) and test_a Dice with no TTA
and with D4 (plus the recipe's own TTA set). Each (recipe, seed) is one row of
``bench/results/proxy.json``; a rerun replaces it. The summary calls a gain smaller than the seed
spread noise.

This is a proxy: it ranks recipes on CPU. The real figures are the GPU run at 512 px
(``bench.accuracy``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.common import RESULTS, device_info, real_data_dir, write_result
from pipeline.data import rle
from pipeline.data.folds import write_folds
from pipeline.data.images import read_image
from pipeline.data.masks import read_mask_csv

RESULT = "proxy.json"
# Outside the checkout: the shrunk tiles are derived from the real data and must never be committed.
HOME = Path(os.environ.get("BUILDSEG_PROXY_HOME", Path.home() / ".cache" / "buildseg-proxy"))
FOLDS_SEED = 42
# The CPU scale of the default recipe (configs/default.yaml): a smaller encoder and a fixed budget.
PROXY_OVERRIDES = [
    "model.encoder=resnet18",
    "model.encoder_weights=null",
    "train.epochs=15",
    "train.device=cpu",
    "data.n_folds=5",
]


@dataclass(frozen=True)
class Recipe:
    """A recipe: config overrides on top of the proxy default, extra TTA sets to score, and an optional
    second stage (``pseudo``: a pseudo-label round on the trained run)."""

    overrides: tuple[str, ...] = ()
    tta: tuple[str, ...] = ()
    stage: str = ""
    note: str = ""


# Each lever alone on top of the default; "ms-tta" and "pseudo" start from the default's own runs.
RECIPES: dict[str, Recipe] = {
    "default": Recipe(note="configs/default.yaml at CPU scale"),
    "lovasz": Recipe(("loss.lovasz_weight=0.5",), note="Lovász hinge as a third loss term"),
    "lovasz-finetune": Recipe(("loss.lovasz_epochs=3",), note="the last 3 epochs on the Lovász hinge alone"),
    "swa": Recipe(("train.swa_epochs=5", "train.swa_lr=0.0003"), note="SWA of the last 5 epochs"),
    "ms-tta": Recipe(tta=("d4_ms",), note="D4 at scales 0.75/1/1.25 on the default's models"),
    "pseudo": Recipe(stage="pseudo", note="a second round on train + confident test_a pixels"),
    "lr-3e-3": Recipe(("optim.lr=0.003",), note="a 3x higher peak learning rate"),
    "poly": Recipe(("optim.schedule=poly",), note="poly decay instead of cosine"),
    "epochs-30": Recipe(("train.epochs=30",), note="twice the epoch budget"),
    # The training levers of issue 25, each alone, compared at equal post-processing (threshold 0.5).
    "aug-flips": Recipe(
        ("aug.shift_scale_rotate_p=0", "aug.color_p=0"), note="flips/rot90 only (no affine, colour)"
    ),
    "dice-per-image": Recipe(("loss.dice_per_image=true",), note="soft Dice per image, then the batch mean"),
    "wd-1e-2": Recipe(("optim.weight_decay=0.01",), note="weight decay 1e-2 (default 1e-4)"),
    "constant-lr": Recipe(
        ("optim.schedule=constant", "optim.warmup_epochs=0"), note="constant rate, no warm-up"
    ),
    "batch-8": Recipe(("train.batch_size=8",), note="batch 8 (twice the steps)"),
    # A second architecture at the same cost for blends (issue 22): FPN trained a fold in 4.9 min against the
    # U-Net's 6-8, and scored OOF 0.455 on seed 0 where U-Net/EfficientNet-B0 scored 0.417.
    "fpn": Recipe(("model.arch=FPN",), note="FPN/ResNet18: a second architecture at the same cost"),
}


# ----------------------------------------------------------------------------- the shrunk data


def shrink(src: Path, dst: Path, size: int) -> Path:
    """Write ``src`` (competition layout) shrunk to ``size`` px into ``dst``, once; returns ``dst``.

    Built in a temporary sibling folder and renamed, so an interrupted build leaves nothing half-made.
    """
    import cv2

    if (dst / "folds.csv").is_file():
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}-", dir=dst.parent))
    try:
        for folder, csv in (("train", "train_mask.csv"), ("test_a", "test_a_mask.csv")):
            (tmp / folder).mkdir()
            df = read_mask_csv(src / csv)
            rows = []
            for name, code in zip(df["name"], df["rle"]):
                img = read_image(src / folder / name)
                small = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
                cv2.imwrite(str(tmp / folder / name), small[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
                mask = rle.decode(code, img.shape[:2])
                small_mask = cv2.resize(mask, (size, size), interpolation=cv2.INTER_NEAREST)
                rows.append(f"{name}\t{rle.encode(small_mask)}\n")
            (tmp / csv).write_text("".join(rows))
        shutil.copy(src / "test_a_samplesubmit.csv", tmp / "test_a_samplesubmit.csv")
        shutil.copy(src / "manifest.csv", tmp / "manifest.csv")
        # One split for every recipe and seed (and the plain loop): 5 folds grouped by scene (manifest.csv).
        write_folds(tmp, n_folds=5, seed=FOLDS_SEED)
        tmp.rename(dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst


def proxy_data(size: int) -> Path:
    return shrink(real_data_dir(), HOME / f"data-{size}", size)


# ----------------------------------------------------------------------------- one recipe, one seed


def applied(seed: int, overrides: Sequence[str]) -> list[str]:
    """Every override a proxy run applies to configs/default.yaml (paths aside: data.root is the
    real tiles shrunk to the row's ``size``, train.runs_dir the cache)."""
    return [*PROXY_OVERRIDES, f"train.seed={seed}", *overrides]


def _train_config(
    root: Path, recipe: Recipe, seed: int, runs: Path, extra: Sequence[str] = (), name_suffix: str = ""
) -> Any:
    from pipeline.core.config import load_config

    over = [*PROXY_OVERRIDES, f"data.root={root}", f"train.seed={seed}", f"train.runs_dir={runs}"]
    key = "-".join(o.replace("=", "_").replace("/", "_") for o in (*recipe.overrides, *extra)) or "default"
    name = f"name={key}{name_suffix}-s{seed}"
    return load_config("configs/default.yaml", [*over, *recipe.overrides, *extra, name])


def _trained(cfg: Any, folds: Sequence[int] = (0,)) -> Path:
    """The run of ``cfg`` on ``folds``, trained unless a finished one is already there (recipes that only
    add TTA sets share the default's runs)."""
    from pipeline.core.config import run_name
    from pipeline.train import trainer

    run_dir = Path(cfg.train.runs_dir) / run_name(cfg)
    if (run_dir / "manifest.yaml").is_file() and all((run_dir / f"fold{k}/oof.npz").is_file() for k in folds):
        return run_dir
    return trainer.run(cfg, folds=list(folds))


def _test_dice(
    run_dir: Path, data: Any, ttas: Sequence[str], out: Path, post: tuple[float, int] | None = None
) -> dict[str, float]:
    """test_a Dice per TTA set with the run's tuned post-processing, or ``post`` = (threshold, min_area)."""
    from pipeline.infer.submit import make_submission
    from pipeline.runs.manifest import load_manifest

    manifest = load_manifest(run_dir)
    scores = {}
    for tta in ttas:
        infer = dataclasses.replace(manifest.infer, tta=tta)
        if post is not None:
            infer = dataclasses.replace(infer, threshold=post[0], min_area=post[1])
        res = make_submission(
            dataclasses.replace(manifest, infer=infer), data, out, tta, "cpu", num_workers=0
        )
        scores[tta] = round(res.score["dice"], 4)
    return scores


def _retuned(cfg: Any, run_dir: Path) -> Any:
    """The run tuned again with today's search (a cached run may predate it; tuning is seconds here)."""
    from pipeline.data.layouts import read_source
    from pipeline.runs.manifest import load_manifest
    from pipeline.train.tune import tune_run

    tune_run(cfg, read_source(cfg.data, with_test=False), run_dir)
    return load_manifest(run_dir)


def _train_minutes(run_dir: Path) -> float:
    """Training time of the run's folds as its metrics.csv recorded it (epochs' seconds)."""
    from pipeline.runs.history import read_metrics

    folds = sorted(p.parent for p in run_dir.glob("fold*/metrics.csv"))  # not folds.csv
    return round(sum(float(read_metrics(d)["seconds"].sum()) for d in folds) / 60, 2)


def run_recipe(name: str, seed: int, size: int) -> dict[str, Any]:
    """Train (or reuse) and score one (recipe, seed) on the proxy; the row of ``proxy.json``.

    Scores: OOF Dice at 0.5 / min-area 0 and tuned; test_a Dice with no TTA and D4 (plus the recipe's
    TTA sets) at the tuned post-processing and at 0.5 / 0, so training and post-processing gains show apart.
    """
    import torch

    from pipeline.runs.manifest import load_manifest

    recipe = RECIPES[name]
    root = proxy_data(size)
    runs = HOME / f"runs-{size}"
    t0 = time.time()
    cfg = _train_config(root, recipe, seed, runs)
    run_dir = _trained(cfg)
    if recipe.stage:
        run_dir = STAGES[recipe.stage](run_dir, cfg)
        manifest = load_manifest(run_dir)
    else:
        manifest = _retuned(cfg, run_dir)
    with tempfile.TemporaryDirectory() as tmp:
        test = _test_dice(run_dir, cfg.data, ["none", "d4", *recipe.tta], Path(tmp))
        test_half = _test_dice(run_dir, cfg.data, ["none", "d4"], Path(tmp), post=(0.5, 0))
    oof = manifest.oof
    return {
        "recipe": name,
        "seed": seed,
        "overrides": list(recipe.overrides),
        "applied": applied(seed, recipe.overrides),
        "stage": recipe.stage or None,
        "size": size,
        "epochs": cfg.train.epochs,
        "folds": [0],
        "oof_dice@0.5": round(oof["oof_dice@0.5"], 4),
        "oof_dice": round(oof["oof_dice"], 4),
        "threshold": manifest.infer.threshold,
        "min_area": manifest.infer.min_area,
        "widened": oof.get("widened", []),
        "test_a_dice": test,
        "test_a_dice@0.5": test_half,
        "train_minutes": _train_minutes(run_dir),
        "wall_minutes": round((time.time() - t0) / 60, 2),
        **device_info(torch.device("cpu")),
    }


# The blend of issue 22: the default and a second architecture at the same cost, one blend per seed. Both
# runs train fold 0 only, so the nested estimate holds parts of fold 0's tiles out (grouped by scene).
BLEND = ("default", "fpn")


def run_blend(seed: int, size: int) -> dict[str, Any]:
    """Blend the :data:`BLEND` runs of one seed (trained unless cached) and score it: a proxy.json row."""
    import torch

    from pipeline.infer.blend import blend_runs
    from pipeline.runs.manifest import run_data_config

    root, runs = proxy_data(size), HOME / f"runs-{size}"
    t0 = time.time()
    members = []
    for name in BLEND:
        cfg = _train_config(root, RECIPES[name], seed, runs)
        members.append(_trained(cfg))
        _retuned(cfg, members[-1])  # as their own rows: tuned by today's search
    out = runs / f"blend-{'-'.join(BLEND)}-s{seed}"
    shutil.rmtree(out, ignore_errors=True)  # a blend is remade from its runs in seconds
    res = blend_runs(members, out)
    with tempfile.TemporaryDirectory() as tmp:
        test = _test_dice(res.path, run_data_config(res.path), ["none", "d4"], Path(tmp))
    return {
        "recipe": "blend",
        "seed": seed,
        "overrides": [f"members={','.join(BLEND)}"],
        "applied": {m: applied(seed, RECIPES[m].overrides) for m in BLEND},
        "stage": None,
        "size": size,
        "epochs": cfg.train.epochs,
        "folds": [0],
        "weights": {k: round(v, 3) for k, v in res.weights.items()},
        "oof_dice@0.5": None,
        "oof_dice": round(res.oof_dice, 4),
        "oof_dice_nested": None if res.oof_dice_nested is None else round(res.oof_dice_nested, 4),
        "threshold": res.threshold,
        "min_area": res.min_area,
        "widened": res.notes,
        "test_a_dice": test,
        "test_a_dice@0.5": None,
        "wall_minutes": round((time.time() - t0) / 60, 2),
        **device_info(torch.device("cpu")),
    }


def _pseudo(run_dir: Path, cfg: Any) -> Path:
    """A pseudo-label round on fold 0 (the teacher saw no fold-0 validation tile: OOF stays honest)."""
    from pipeline.infer.pseudo import pseudo_round

    return pseudo_round(run_dir, folds=[0])


STAGES: dict[str, Any] = {"pseudo": _pseudo}


# ----------------------------------------------------------------------------- the plain reference loop


@dataclass
class PlainSettings:
    """The obvious loop a competitor writes first, from the competition's conventions."""

    epochs: int = 15
    batch_size: int = 16
    lr: float = 1e-3
    encoder: str = "resnet18"
    folds: list[int] = field(default_factory=lambda: [0])


def _plain_decode(code: Any, shape: tuple[int, int]) -> np.ndarray:
    """The competition's RLE: 1-based ``start length`` pairs over the column-major flattened mask."""
    flat = np.zeros(shape[0] * shape[1], dtype=np.uint8)
    if isinstance(code, str) and code.strip():
        s = np.asarray(code.split(), dtype=np.int64)
        for start, length in zip(s[0::2] - 1, s[1::2]):
            flat[start : start + length] = 1
    return flat.reshape(shape, order="F")


def _plain_load(root: Path, folder: str, csv: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    import cv2

    df = pd.read_csv(root / csv, sep="\t", names=["name", "rle"], header=None, keep_default_na=False)
    imgs = np.stack([cv2.imread(str(root / folder / n))[..., ::-1] for n in df["name"]])
    masks = np.stack([_plain_decode(c, imgs.shape[1:3]) for c in df["rle"]])
    return df["name"].tolist(), imgs, masks


def _plain_norm() -> tuple[Any, Any]:
    """ImageNet mean and std on the 0..255 scale, shaped [1, 3, 1, 1]."""
    import torch

    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255
    return mean, torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255


def _plain_predict(model: Any, imgs: np.ndarray, d4: bool) -> np.ndarray:
    """Probabilities [N, H, W]; with ``d4`` the mean over the 8 flips/rotations, each undone."""
    import torch

    mean, std = _plain_norm()
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(imgs), 32):
            x = (torch.from_numpy(imgs[i : i + 32].copy()).permute(0, 3, 1, 2).float() - mean) / std
            views = [(k, f) for k in range(4) for f in (False, True)] if d4 else [(0, False)]
            acc = 0
            for k, f in views:
                v = torch.rot90(x.flip(-1) if f else x, k, (-2, -1))
                p = torch.sigmoid(model(v))
                p = torch.rot90(p, -k, (-2, -1))
                acc = acc + (p.flip(-1) if f else p)
            out.append((acc / len(views))[:, 0].numpy())
    return np.concatenate(out)


def _plain_dice(prob: np.ndarray, truth: np.ndarray) -> float:
    from pipeline.metrics.pixel import mean_dice

    return round(float(mean_dice(prob > 0.5, truth.astype(bool))), 4)


def plain_loop(seed: int, size: int, s: PlainSettings | None = None) -> dict[str, Any]:
    """Train smp's U-Net with Adam, BCE + soft Dice and flips/rot90, keep the best epoch on fold 0's
    validation Dice, predict test_a at threshold 0.5. Shares only the tiles, the split and the scorer."""
    import segmentation_models_pytorch as smp
    import torch

    s = s or PlainSettings()
    root = proxy_data(size)
    t0 = time.time()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    names, imgs, masks = _plain_load(root, "train", "train_mask.csv")
    fold = dict(pd.read_csv(root / "folds.csv").values)
    val = np.array([fold[n] in s.folds for n in names])
    model = smp.Unet(s.encoder, encoder_weights=None, classes=1)
    opt = torch.optim.Adam(model.parameters(), lr=s.lr)
    mean, std = _plain_norm()
    tr_x, tr_y = imgs[~val], masks[~val]
    best, best_state = -1.0, None
    for _ in range(s.epochs):
        model.train()
        order = rng.permutation(len(tr_x))
        for i in range(0, len(order) - s.batch_size + 1, s.batch_size):
            idx = order[i : i + s.batch_size]
            x = torch.from_numpy(tr_x[idx].copy()).permute(0, 3, 1, 2).float()
            y = torch.from_numpy(tr_y[idx].copy()).float().unsqueeze(1)
            if rng.random() < 0.5:
                x, y = x.flip(-1), y.flip(-1)
            if rng.random() < 0.5:
                x, y = x.flip(-2), y.flip(-2)
            k = int(rng.integers(4))
            x, y = torch.rot90(x, k, (-2, -1)), torch.rot90(y, k, (-2, -1))
            logits = model((x - mean) / std)
            p = torch.sigmoid(logits)
            dice = 1 - (2 * (p * y).sum() + 1) / (p.sum() + y.sum() + 1)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y) + dice
            opt.zero_grad()
            loss.backward()
            opt.step()
        score = _plain_dice(_plain_predict(model, imgs[val], False), masks[val])
        if score > best:
            best, best_state = score, {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    _, test_x, test_y = _plain_load(root, "test_a", "test_a_mask.csv")
    test = {tta: _plain_dice(_plain_predict(model, test_x, tta == "d4"), test_y) for tta in ("none", "d4")}
    return {
        "recipe": "plain",
        "seed": seed,
        "overrides": [f"{k}={v}" for k, v in dataclasses.asdict(s).items()],
        "stage": None,
        "size": size,
        "epochs": s.epochs,
        "folds": s.folds,
        # Not an OOF score of a fixed model: the best epoch's validation Dice, the epoch chosen on these
        # very tiles (optimistic). There is no tuned post-processing: test_a is scored at 0.5 only.
        "oof_dice@0.5": best,
        "oof_dice": None,
        "oof_note": "best epoch's validation Dice at 0.5, chosen on the same tiles",
        "threshold": 0.5,
        "min_area": 0,
        "test_a_dice": None,
        "test_a_dice@0.5": test,
        "wall_minutes": round((time.time() - t0) / 60, 2),
        **device_info(torch.device("cpu")),
    }


# ----------------------------------------------------------------------------- results


def _load() -> dict[str, Any]:
    path = RESULTS / RESULT
    return json.loads(path.read_text()) if path.is_file() else {"rows": []}


def save_row(row: dict[str, Any]) -> None:
    table = _load()
    key = (row["recipe"], row["seed"], row["size"])
    table["rows"] = [r for r in table["rows"] if (r["recipe"], r["seed"], r["size"]) != key] + [row]
    table["summary"] = summarise(table["rows"])
    write_result(RESULT, table)


# The summary's scores, in the README's column order: (row key, TTA set or None).
SCORES = [
    ("oof_dice@0.5", None),
    ("oof_dice", None),
    ("oof_dice_nested", None),
    ("test_a_dice@0.5", "none"),
    ("test_a_dice@0.5", "d4"),
    ("test_a_dice", "none"),
    ("test_a_dice", "d4"),
]


def _score(row: dict[str, Any], key: str) -> float | None:
    """A row's score by summary key (``oof_dice``, ``test_a_dice/d4``...); None when the row has none."""
    name, _, tta = key.partition("/")
    value = row.get(name)
    if tta:
        value = value.get(tta) if isinstance(value, dict) else None
    return None if value is None else float(value)


def _keys(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The summary keys every row of a recipe has: the fixed scores, then extra TTA sets (tuned)."""
    keys = [f"{k}/{t}" if t else k for k, t in SCORES]
    extra = set.intersection(*(set(r.get("test_a_dice") or {}) for r in rows)) - {"none", "d4"}
    keys += [f"test_a_dice/{t}" for t in sorted(extra)]
    return [k for k in keys if all(_score(r, k) is not None for r in rows)]


def summarise(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per recipe: mean of each score over seeds, the seed spread (max - min), and the gain over the
    default's mean; a gain is ``significant`` only when larger than both recipes' spreads."""
    by: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault(r["recipe"], []).append(r)

    def stats(rs: list[dict[str, Any]], key: str) -> tuple[float, float]:
        v = [_score(r, key) for r in rs]
        return float(np.mean(v)), float(np.max(v) - np.min(v))

    out = []
    for name, rs in by.items():
        entry: dict[str, Any] = {"recipe": name, "seeds": sorted(r["seed"] for r in rs)}
        base = by.get("default", [])
        for key in _keys(rs):
            mean, spread = stats(rs, key)
            entry[key] = {"mean": round(mean, 4), "spread": round(spread, 4)}
            if name != "default" and base and key in _keys(base):
                base_mean, base_spread = stats(base, key)
                gain = mean - base_mean
                entry[key]["gain"] = round(gain, 4)
                entry[key]["significant"] = bool(abs(gain) > max(spread, base_spread))
        out.append(entry)
    return sorted(out, key=lambda e: e["recipe"] != "default")  # the reference first, the rest as run


OTHERS = {"plain": "bench/proxy.py --plain", "blend": "bench/proxy.py --blend: " + " + ".join(BLEND)}
COLUMNS = [
    ("OOF Dice @0.5", "oof_dice@0.5"),
    ("OOF Dice tuned", "oof_dice"),
    ("OOF nested (blends)", "oof_dice_nested"),
    ("test_a @0.5, no TTA", "test_a_dice@0.5/none"),
    ("test_a @0.5, D4", "test_a_dice@0.5/d4"),
    ("test_a tuned, no TTA", "test_a_dice/none"),
    ("test_a tuned, D4", "test_a_dice/d4"),
]


def markdown(summary: Sequence[dict[str, Any]]) -> str:
    """The README table: mean ± seed spread per recipe, and the gain over the default where it is more
    than the noise (both recipes' spreads). "@0.5" is threshold 0.5 / min-area 0: training alone;
    "tuned" adds the OOF-tuned post-processing. The plain loop's "@0.5" OOF value is its best epoch's
    validation Dice, chosen on those same tiles (marked †)."""

    def cell(entry: dict[str, Any], key: str) -> str:
        if key not in entry:
            return "—"
        v = entry[key]
        text = f"{v['mean']:.3f} ± {v['spread']:.3f}"
        if "gain" in v:
            text += f" ({v['gain']:+.3f}{'' if v['significant'] else ', noise'})"
        return text + (" †" if entry["recipe"] == "plain" and key == "oof_dice@0.5" else "")

    lines = [
        "| recipe | what | seeds | " + " | ".join(title for title, _ in COLUMNS) + " |",
        "|---|---|---|" + "---|" * len(COLUMNS),
    ]
    for e in summary:
        what = RECIPES[e["recipe"]].note if e["recipe"] in RECIPES else OTHERS.get(e["recipe"], "")
        extra = "".join(f"; {k.split('/')[1]}: {cell(e, k)}" for k in e if k.startswith("test_a_dice/d4_"))
        cells = " | ".join(cell(e, key) for _, key in COLUMNS)
        lines.append(f"| {e['recipe']} | {what} | {len(e['seeds'])} | {cells}{extra} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.proxy", description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", action="append", choices=sorted(RECIPES), help="repeatable; default: default")
    p.add_argument("--plain", action="store_true", help="the plain reference loop")
    p.add_argument("--blend", action="store_true", help=f"the blend of {' and '.join(BLEND)} (issue 22)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--table", action="store_true", help="print the summary only")
    p.add_argument("--markdown", action="store_true", help="print the summary as the README's table")
    a = p.parse_args(argv)
    if a.markdown:
        print(markdown(summarise(_load()["rows"])))
        return 0
    if not a.table:
        jobs = [("plain", s) for s in a.seeds] if a.plain else []
        jobs += [("blend", s) for s in a.seeds] if a.blend else []
        jobs += [(r, s) for r in (a.recipe or ([] if a.plain or a.blend else ["default"])) for s in a.seeds]
        special = {"plain": plain_loop, "blend": run_blend}
        for name, seed in jobs:
            row = special[name](seed, a.size) if name in special else run_recipe(name, seed, a.size)
            save_row(row)
            print(json.dumps(row), flush=True)
    print(json.dumps(summarise(_load()["rows"]), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
