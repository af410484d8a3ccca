"""The out-of-fold pass: a fold's validation tiles predicted with its best weights and the submission's
TTA set and precision, into ``fold<k>/oof.npz`` (what :mod:`pipeline.train.tune` searches the threshold on).

It is resumable as training is: maps are saved in chunks as they come
(:func:`pipeline.runs.oof.resumable_oof_writer`), so a kill loses at most one chunk, and a file already
made from the same ``best.pt``, TTA set and precision (its stamp) is not made again when a run resumes.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from pipeline.core.config import Config
from pipeline.core.device import Dist, resolve_amp
from pipeline.data.dataset import SegDataset
from pipeline.runs.checkpoint import read_best
from pipeline.runs.oof import OOF_KEYS, oof_stamp, resumable_oof_writer
from pipeline.train.engine import TrainingError, evaluate, make_loader


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-1 of a state dict's names and tensor bytes. Not of the ``best.pt`` file: tuning writes the
    chosen threshold into it, which would make every finished fold's OOF pass run again on a resume."""
    h = hashlib.sha1()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def write_oof(
    cfg: Config,
    model: torch.nn.Module,
    val_ds: SegDataset,
    fold_dir: Path,
    device: torch.device,
    chunk: int = 64,
) -> Path:
    """Predict the fold's validation tiles with its best weights (``fold_dir/best.pt``) and the submission's
    TTA -> ``fold_dir/oof.npz``.

    ``oof.npz`` holds ``names`` str [N] and, for binary runs, ``probs`` uint8 [N, H, W]
    (``round(p * 255)``); for multi-class runs ``labels`` uint8 [N, H, W] (argmax class ids). The pass
    is resumable (:func:`pipeline.runs.oof.resumable_oof_writer`): a killed one continues after its last
    saved chunk (of ``chunk`` tiles), and a file already made from this ``best.pt``, TTA set and precision
    is kept as it is.
    """
    best_path, out = fold_dir / "best.pt", fold_dir / "oof.npz"
    if not best_path.is_file():
        raise TrainingError(f"{best_path} was never written (no epoch ran?)")
    names, tta = val_ds.split.names, cfg.infer.tta
    weights = read_best(best_path, map_location="cpu").model
    stamp = f"sha1:{weights_digest(weights)} tta:{tta} amp:{resolve_amp(device, cfg.train.amp)}"
    fold = fold_dir.name
    if oof_stamp(out) == stamp:
        print(f"{fold}: {out.name} is up to date ({best_path.name}, {tta} TTA)", flush=True)
        return out
    model.load_state_dict(weights)
    with resumable_oof_writer(out, names, OOF_KEYS[cfg.model.classes == 1], stamp, chunk) as parts:
        start = parts.done
        if start:
            print(f"{fold}: resuming the OOF pass at tile {start + 1} of {len(names)}", flush=True)
        rest = SegDataset(val_ds.split.subset(range(start, len(names))), val_ds.transform)

        def sink(indices: list[int], arrays: np.ndarray) -> None:
            parts.write([start + i for i in indices], arrays)

        if start < len(names):
            desc = f"{fold} OOF pass ({tta} TTA)"
            loader = make_loader(rest, cfg, device)
            evaluate(model, loader, None, cfg, device, Dist(), tta_name=tta, sink=sink, desc=desc)
    return out
