"""The GPU recipe's code paths on CPU: bf16 autocast, fp16 with the loss scaler, channels_last and
torch.compile, each through train -> OOF pass -> tune -> submit on the demo-size data (issue 20).

Until these existed, every one of them was skipped on CPU (``device.type == "cuda"`` gates), so the first
GPU minute would have been their first run. Each variant trains fold 0 for 2 steps (the numbers are not
the point: the paths are), then checks numbers: finite losses, the tuned threshold in ``best.pt`` equal to
the manifest's, a valid submission predicted in the run's precision, and probabilities of the same weights
within a stated tolerance of float32.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from pipeline.core import device as device_mod
from pipeline.data.dataset import IMAGE, SegDataset
from pipeline.data.layouts import read_source
from pipeline.infer import ensemble
from pipeline.infer.submit import make_submission
from pipeline.infer.validate import validate_submission
from pipeline.runs.checkpoint import read_best, read_last
from pipeline.runs.manifest import load_manifest
from pipeline.train import trainer

# variant -> (overrides, max |p - p_fp32| of the same weights on the test tiles, the precision inference uses)
VARIANTS = {
    "bf16": (["train.amp=bf16"], 0.05, "bf16"),  # 8-bit mantissa: ~2-3 significant digits
    "fp16": (["train.amp=fp16"], 0.01, "fp16"),  # 11-bit mantissa; training goes through GradScaler
    "channels_last": (["train.channels_last=true"], 1e-4, "none"),  # same float32 math, other kernels
    "compile": (["train.compile=true"], 1e-4, "none"),  # inductor's CPU kernels, float32
}


# A stem-only ResNet-18 U-Net (one decoder block): inductor's compile time grows with the graph, and the
# recipe's paths do not depend on the model's size.
SMALL = ("model.encoder=resnet18", "model.decoder_channels=[8]")


def _compile_or_skip(monkeypatch) -> None:
    if shutil.which("gcc") is None and shutil.which("cc") is None:
        pytest.skip("torch.compile's CPU backend (inductor) needs a C compiler; none on PATH here")
    import torch._inductor.config as inductor

    monkeypatch.setattr(inductor, "compile_threads", 1)  # a pool of compile workers costs more on 2 cores


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_the_gpu_recipe_trains_tunes_and_submits_on_cpu(variant, tiny_cfg, tmp_path, monkeypatch):
    overrides, tol, amp = VARIANTS[variant]
    if variant == "compile":
        _compile_or_skip(monkeypatch)
    cfg = tiny_cfg(*SMALL, *overrides, "train.epochs=1", "train.max_steps_per_epoch=2", f"name={variant}")
    run_dir = trainer.run(cfg, folds=[0])

    metrics = pd.read_csv(run_dir / "fold0" / "metrics.csv")
    assert all(math.isfinite(v) for v in metrics[["train_loss", "val_loss", "val_dice"]].to_numpy().ravel())
    manifest = load_manifest(run_dir)
    best = read_best(run_dir / "fold0" / "best.pt")
    assert (best.threshold, best.min_area) == (manifest.infer.threshold, manifest.infer.min_area)
    scaler = read_last(run_dir / "fold0" / "last.pt").scaler  # fp16: the loss scaler stepped, and resumes
    assert (scaler is not None and scaler["scale"] > 0) if variant == "fp16" else scaler is None

    # Submit predicts in the run's precision (once always bf16 on CUDA, whatever the OOF pass used).
    asked = []
    real_autocast = ensemble.autocast_ctx
    monkeypatch.setattr(
        ensemble, "autocast_ctx", lambda dev, a="auto": asked.append(a) or real_autocast(dev, a)
    )
    result = make_submission(manifest, cfg.data, tmp_path / "subs", device="cpu", num_workers=0)
    assert {device_mod.resolve_amp(torch.device("cpu"), a) for a in asked} == {amp}
    assert validate_submission(result.path, Path(cfg.data.root) / cfg.data.sample_csv, (64, 64)) == []

    # The same weights in the variant's arithmetic and in float32: close, and for autocast not identical.
    model, _, _ = ensemble.load_model(run_dir / "fold0" / "best.pt")
    test = SegDataset(read_source(cfg.data).test)
    x = torch.stack([test[i][IMAGE] for i in range(len(test))])  # uint8 [8, 3, 64, 64]
    plain = ensemble.predict_batch([model], x, "none", amp="none")
    fast, xv = model, x
    if variant == "channels_last":
        fast, xv = (
            model.to(memory_format=torch.channels_last),
            x.contiguous(memory_format=torch.channels_last),
        )
    if variant == "compile":
        fast = torch.compile(model)
    other = ensemble.predict_batch([fast], xv, "none", amp=cfg.train.amp)
    diff = float((other - plain).abs().max())
    assert diff <= tol, f"{variant}: max |p - p_fp32| = {diff:.2e} > {tol:g}"
    if amp != "none":
        assert diff > 0  # autocast really ran
