"""Training: schedule, one-batch overfit, end-to-end k-fold run, resume, determinism, faults."""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline import engine, train
from pipeline.config import save_config, to_dict
from pipeline.io import load_checkpoint, load_yaml
from pipeline.layouts import read_source
from pipeline.models import build_model

ROOT = Path(__file__).resolve().parents[1]


def test_end_to_end_two_folds_then_submit(tiny_cfg, tmp_path):
    cfg = tiny_cfg()
    run_dir = train.run(cfg)
    assert run_dir == Path(cfg.train.runs_dir) / "tiny"
    folds = pd.read_csv(run_dir / "folds.csv")
    names = []
    for k in (0, 1):
        fold_dir = run_dir / f"fold{k}"
        for f in ("config.yaml", "last.pt", "best.pt", "metrics.csv", "oof.npz"):
            assert (fold_dir / f).is_file(), f
        metrics = pd.read_csv(fold_dir / "metrics.csv")
        assert list(metrics["epoch"]) == [1, 2]
        assert {"train_loss", "val_loss", "val_dice", "val_iou", "lr"} <= set(metrics.columns)
        assert metrics["val_dice"].between(0, 1).all()
        with np.load(fold_dir / "oof.npz") as z:
            oof_names, probs = list(z["names"]), z["probs"]
        assert probs.dtype == np.uint8 and probs.shape == (len(oof_names), 64, 64)
        assert set(oof_names) == set(folds.loc[folds["fold"] == k, "name"])
        names += oof_names
        best = load_checkpoint(fold_dir / "best.pt")
        assert best["config"] == to_dict(cfg)
        assert "threshold" in best and "min_area" in best
    # Out-of-fold: every training tile predicted exactly once.
    assert sorted(names) == sorted(folds["name"])
    manifest = load_yaml(run_dir / "manifest.yaml")
    assert manifest["checkpoints"] == ["fold0/best.pt", "fold1/best.pt"]
    assert manifest["threshold"] in cfg.infer.thresholds and manifest["min_area"] in cfg.infer.min_areas
    search = pd.read_csv(run_dir / "threshold_search.csv")
    assert len(search) == len(cfg.infer.thresholds) * len(cfg.infer.min_areas)
    assert manifest["oof"]["oof_dice"] == pytest.approx(search["dice"].max())

    from pipeline.runs import load_manifest
    from pipeline.submit import make_submission
    from pipeline.validate import validate_submission

    result = make_submission(load_manifest(run_dir), cfg.data, tmp_path / "subs", device="cpu", num_workers=0)
    assert result.path.parent == tmp_path / "subs" and result.path.name.startswith("tiny-flip-")
    assert validate_submission(result.path, Path(cfg.data.root) / cfg.data.sample_csv, (64, 64)) == []
    assert result.score is not None and 0 <= result.score["dice"] <= 1
    assert Path(f"{result.path}.score.json").is_file()


def _interrupt_at(monkeypatch, at_call: int):
    """Make the n-th training step raise KeyboardInterrupt (as Ctrl-C would)."""
    calls = {"n": 0}
    real = engine.TrainStep.__call__

    def step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == at_call:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(engine.TrainStep, "__call__", step)


def test_interrupt_then_resume_matches_uninterrupted(tiny_cfg, monkeypatch, tmp_path):
    """Ctrl-C mid-epoch saves last.pt at that step; resuming gives the same result as never stopping."""
    cfg = tiny_cfg("train.epochs=3", "name=resumed", "train.deterministic=true")
    steps_per_epoch = 12 // 4  # 24 tiles, 2 folds, batch 4
    _interrupt_at(monkeypatch, steps_per_epoch + 2)  # epoch 2, after its first step
    with pytest.raises(SystemExit) as e:
        train.run(cfg, folds=[0])
    assert e.value.code == 130
    state = load_checkpoint(Path(cfg.train.runs_dir) / "resumed/fold0/last.pt")
    assert (state["epoch"], state["step_in_epoch"]) == (1, 1)
    monkeypatch.undo()
    train.run(cfg, folds=[0])
    resumed = pd.read_csv(Path(cfg.train.runs_dir) / "resumed/fold0/metrics.csv")
    assert list(resumed["epoch"]) == [1, 2, 3]

    straight_cfg = tiny_cfg("train.epochs=3", "name=straight", "train.deterministic=true")
    train.run(straight_cfg, folds=[0])
    straight = pd.read_csv(Path(cfg.train.runs_dir) / "straight/fold0/metrics.csv")
    cols = ["train_loss", "val_loss", "val_dice", "val_iou"]
    np.testing.assert_allclose(resumed[cols].to_numpy(), straight[cols].to_numpy(), rtol=1e-5, atol=1e-6)


def test_same_seed_same_metrics(tiny_cfg):
    a = train.run(tiny_cfg("name=a", "train.deterministic=true"), folds=[1])
    b = train.run(tiny_cfg("name=b", "train.deterministic=true"), folds=[1])
    ma, mb = (pd.read_csv(r / "fold1/metrics.csv").drop(columns="seconds") for r in (a, b))
    pd.testing.assert_frame_equal(ma, mb)
    assert (a / "folds.csv").read_bytes() == (b / "folds.csv").read_bytes()


def test_finished_fold_is_not_retrained(tiny_cfg, capsys):
    cfg = tiny_cfg("train.epochs=1")
    train.run(cfg, folds=[0])
    before = (Path(cfg.train.runs_dir) / "tiny/fold0/metrics.csv").read_text()
    train.run(cfg, folds=[0])
    assert "already finished" in capsys.readouterr().out
    assert (Path(cfg.train.runs_dir) / "tiny/fold0/metrics.csv").read_text() == before


def test_resume_with_changed_config_is_refused(tiny_cfg):
    train.run(tiny_cfg("train.epochs=1"), folds=[0])
    with pytest.raises(train.TrainingError, match="different config"):
        train.run(tiny_cfg("train.epochs=1", "optim.lr=0.1"), folds=[0])


def test_nan_loss_names_the_step(tiny_cfg, monkeypatch):
    from pipeline import losses

    real = losses.BCEDiceLoss.forward
    calls = {"n": 0}

    def forward(self, logits, mask):
        calls["n"] += 1
        out = real(self, logits, mask)
        return out * float("nan") if calls["n"] == 2 else out

    monkeypatch.setattr(losses.BCEDiceLoss, "forward", forward)
    with pytest.raises(train.TrainingError, match=r"loss is nan at global step 2 \(epoch 1\)"):
        train.run(tiny_cfg(), folds=[0])


def test_unknown_fold_is_an_error(tiny_cfg):
    with pytest.raises(train.TrainingError, match="do not exist"):
        train.run(tiny_cfg(), folds=[7])


def test_cli_reports_config_errors(capsys):
    assert train.main(["--config", "configs/demo.yaml", "optim.lrr=1"]) == 2
    assert "Did you mean 'lr'" in capsys.readouterr().err


def test_sigkill_mid_epoch_then_resume(tiny_cfg, tmp_path):
    """A SIGKILLed run loses at most the epoch in progress; rerunning finishes all epochs."""
    cfg = tiny_cfg("train.epochs=4", "name=killed")
    cmd = _train_cli(cfg, tmp_path)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    last = Path(cfg.train.runs_dir) / "killed/fold0/last.pt"
    deadline = time.time() + 120
    while time.time() < deadline and not last.is_file():
        time.sleep(0.05)
    assert last.is_file(), proc.communicate()[0] if proc.poll() is not None else "no last.pt after 120 s"
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = load_checkpoint(last)  # loadable despite the kill (atomic writes)
    assert 1 <= state["epoch"] < 4
    train.run(cfg, folds=[0])
    metrics = pd.read_csv(Path(cfg.train.runs_dir) / "killed/fold0/metrics.csv")
    assert list(metrics["epoch"]) == [1, 2, 3, 4]
    build_model(cfg).load_state_dict(load_checkpoint(last)["model"])


def _train_cli(cfg, tmp_path: Path, *launcher: str) -> list[str]:
    """``python [launcher] -m pipeline.train`` on fold 0 with ``cfg``, passed as a saved config file."""
    save_config(cfg, tmp_path / "cli.yaml")
    runner = [sys.executable, *launcher] if launcher else [sys.executable]
    return [*runner, "-m", "pipeline.train", "--config", str(tmp_path / "cli.yaml"), "--folds", "0"]


@pytest.mark.skipif(
    not hasattr(torch.distributed, "is_gloo_available") or not torch.distributed.is_gloo_available(),
    reason="gloo backend not available",
)
def test_two_process_ddp_matches_single_process_outputs(tiny_cfg, tmp_path):
    """torchrun, 2 CPU processes (gloo): only rank 0 writes; the validation metrics all-reduced over the two
    ranks' shards equal one process validating the same weights on the whole fold."""
    single = train.run(tiny_cfg("train.epochs=1", "name=single"), folds=[0])
    cfg = tiny_cfg("train.epochs=1", "name=ddp", "train.batch_size=2")
    cmd = _train_cli(cfg, tmp_path, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    ddp = Path(cfg.train.runs_dir) / "ddp"
    m_single = pd.read_csv(single / "fold0/metrics.csv")
    m_ddp = pd.read_csv(ddp / "fold0/metrics.csv")
    assert list(m_ddp.columns) == list(m_single.columns) and len(m_ddp) == len(m_single) == 1
    assert math.isfinite(m_ddp["train_loss"].iloc[0]) and 0 <= m_ddp["val_dice"].iloc[0] <= 1
    with np.load(single / "fold0/oof.npz") as a, np.load(ddp / "fold0/oof.npz") as b:
        assert a["probs"].shape == b["probs"].shape
        assert list(a["names"]) == list(b["names"])
    # The numbers: one process evaluates the DDP run's best.pt (its only epoch) on fold 0's whole
    # validation set; the sharded, all-reduced metrics of the DDP run must be the same numbers.
    from pipeline.device import Dist
    from pipeline.engine import evaluate
    from pipeline.folds import load_folds

    source = read_source(cfg.data, with_test=False)
    folds_df = load_folds(ddp / "folds.csv", source.train.names)
    data = engine.fold_data(cfg, source, folds_df, 0, Dist(), torch.device("cpu"))
    model = build_model(cfg)
    model.load_state_dict(load_checkpoint(ddp / "fold0/best.pt")["model"])
    metrics, _ = evaluate(model, data.val_loader, None, cfg, torch.device("cpu"), Dist())
    for key in ("val_dice", "val_iou", "val_acc"):
        assert m_ddp[key].iloc[0] == pytest.approx(metrics[key], abs=1e-6), key  # float32 per image
    # ... and the OOF file rank 0 wrote is exactly what one process predicts with those weights and TTA.
    _, kept = evaluate(model, data.val_loader, None, cfg, torch.device("cpu"), Dist(), cfg.infer.tta, True)
    with np.load(ddp / "fold0/oof.npz") as z:
        np.testing.assert_array_equal(z["probs"], np.stack([kept[i] for i in range(len(kept))]))
    # Trained: the weights moved away from the initialisation (both ranks start from seed + fold).
    torch.manual_seed(cfg.train.seed + 0)
    init = build_model(cfg).state_dict()
    sd = load_checkpoint(ddp / "fold0/last.pt")["model"]
    moved = [k for k, v in sd.items() if v.dtype.is_floating_point and not torch.equal(v, init[k])]
    assert len(moved) > len(sd) // 2


def test_out_of_memory_suggests_a_smaller_batch(tiny_cfg, monkeypatch):
    def oom(self, *a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(engine.TrainStep, "__call__", oom)
    with pytest.raises(train.TrainingError, match=r"out of memory at batch size 4: use train.batch_size=2"):
        train.run(tiny_cfg(), folds=[0])


def _copy_of_demo(demo_root: Path, tmp_path: Path) -> Path:
    """A private copy of the demo data: these tests write DATA/folds.csv; the shared copy must not see it."""
    import shutil

    return Path(shutil.copytree(demo_root, tmp_path / "data"))


def test_resume_keeps_the_runs_folds_when_data_folds_change(tiny_cfg, demo_root, tmp_path):
    """`make folds` between two `make train` calls must not move a run's validation tiles."""
    from pipeline.folds import make_folds

    root = _copy_of_demo(demo_root, tmp_path)
    cfg = tiny_cfg(f"data.root={root}", "train.epochs=1")
    run_dir = train.run(cfg, folds=[0])
    own = pd.read_csv(run_dir / "folds.csv")
    names = sorted(own["name"])
    # A different split written beside the data, as a later `make folds --seed 7` would.
    other = make_folds(names, np.linspace(0, 0.5, len(names)), 2, seed=7)
    assert set(other.loc[other["fold"] == 0, "name"]) != set(own.loc[own["fold"] == 0, "name"])
    other.to_csv(root / "folds.csv", index=False)
    run_dir = train.run(tiny_cfg(f"data.root={root}", "train.epochs=1"), folds=[0, 1])
    assert pd.read_csv(run_dir / "folds.csv").equals(own), "the run's folds.csv was overwritten"
    with np.load(run_dir / "fold0/oof.npz") as z:
        assert set(z["names"]) == set(own.loc[own["fold"] == 0, "name"])


def test_resume_on_edited_run_folds_is_refused(tiny_cfg, demo_root, tmp_path):
    root = _copy_of_demo(demo_root, tmp_path)
    cfg = tiny_cfg(f"data.root={root}", "train.epochs=2", "train.max_steps_per_epoch=1")
    run_dir = Path(cfg.train.runs_dir) / "tiny"
    _interrupt = {"n": 0}

    def stop_after_first_epoch(self, epoch, t0):  # a run killed after its first epoch
        real_end_epoch(self, epoch, t0)
        _interrupt["n"] += 1
        raise KeyboardInterrupt

    real_end_epoch = train.FoldTrainer.end_epoch
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train.FoldTrainer, "end_epoch", stop_after_first_epoch)
        with pytest.raises(SystemExit):
            train.run(cfg, folds=[0])
    folds = pd.read_csv(run_dir / "folds.csv")
    folds["fold"] = 1 - folds["fold"]  # swap the two folds by hand
    folds.to_csv(run_dir / "folds.csv", index=False)
    with pytest.raises(train.TrainingError, match="trained on other folds .* Restore the run's folds.csv"):
        train.run(cfg, folds=[0])


def test_patience_stops_when_the_score_stalls(tiny_cfg, monkeypatch):
    flat = {"val_loss": 1.0, "val_dice": 0.5, "val_iou": 0.4, "val_acc": 0.9}
    monkeypatch.setattr(train, "evaluate", lambda *a, **k: (dict(flat), {}))
    monkeypatch.setattr(train, "write_oof", lambda *a, **k: None)
    monkeypatch.setattr(train.tune, "tune_run", lambda *a, **k: {"n_oof": 0})
    monkeypatch.setattr(train.tune, "format_table", lambda t: "")
    cfg = tiny_cfg("train.epochs=6", "train.patience=2", "train.max_steps_per_epoch=1")
    run_dir = train.run(cfg, folds=[0])
    # epoch 1 sets the best; 2 and 3 do not improve it -> stop after 3 of 6
    assert list(pd.read_csv(run_dir / "fold0/metrics.csv")["epoch"]) == [1, 2, 3]
    free = train.run(tiny_cfg("name=free", "train.epochs=4", "train.max_steps_per_epoch=1"), folds=[0])
    assert list(pd.read_csv(free / "fold0/metrics.csv")["epoch"]) == [1, 2, 3, 4]


def test_ema_weights_are_what_best_pt_holds(tiny_cfg):
    cfg = tiny_cfg("train.epochs=1", "train.ema=0.9")
    run_dir = train.run(cfg, folds=[0])
    best = load_checkpoint(run_dir / "fold0/best.pt")["model"]
    last = load_checkpoint(run_dir / "fold0/last.pt")
    ema = {k.removeprefix("module."): v for k, v in last["ema"].items() if k.startswith("module.")}
    assert set(best) == set(ema)
    assert all(torch.equal(best[k], ema[k]) for k in best)
    floats = [k for k, v in best.items() if v.is_floating_point() and "running" not in k]
    assert any(not torch.equal(best[k], last["model"][k]) for k in floats), "EMA equals the raw weights"
