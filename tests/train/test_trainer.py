"""pipeline.train.trainer (``make train``): the k-fold run end to end, resume after every kind of kill,
determinism, DDP on one and two nodes, the run folder's owner and config, SWA, faults. (Schedules:
tests/core/test_schedule.py; the step and the one-batch overfit: test_engine.py.)"""

from __future__ import annotations

import math
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.core.config import save_config, to_dict
from pipeline.core.device import DeviceError
from pipeline.core.io import load_checkpoint, load_yaml
from pipeline.data import DataError
from pipeline.data.layouts import read_source
from pipeline.model.registry import build_model
from pipeline.train import engine, trainer

ROOT = Path(__file__).resolve().parents[2]


def test_end_to_end_two_folds_then_submit(tiny_cfg, tmp_path):
    cfg = tiny_cfg()
    run_dir = trainer.run(cfg)
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

    from pipeline.infer.submit import make_submission
    from pipeline.infer.validate import validate_submission
    from pipeline.runs.manifest import load_manifest

    result = make_submission(load_manifest(run_dir), cfg.data, tmp_path / "subs", device="cpu", num_workers=0)
    assert result.path.parent == tmp_path / "subs" and result.path.name.startswith("tiny-flip-")
    assert validate_submission(result.path, Path(cfg.data.root) / cfg.data.sample_csv, (64, 64)) == []
    assert result.score is not None and 0 <= result.score["dice"] <= 1
    assert Path(f"{result.path}.score.json").is_file()


def _signal_inside_step(monkeypatch, at_call: int, sig: int) -> list[float]:
    """Deliver ``sig`` to this process inside the ``at_call``-th training step (0: never), right after its
    optimizer step: the worst moment (the weights have moved, the step is not yet counted). Returns the
    list that gets, per step, a draw of torch's RNG as the model's dropout would see it."""
    calls, draws = {"n": 0}, []
    real = engine.TrainStep.__call__

    def step(self, *a, **k):
        draws.append(float(torch.rand(())))
        out = real(self, *a, **k)
        calls["n"] += 1
        if calls["n"] == at_call:
            os.kill(os.getpid(), sig)
        return out

    monkeypatch.setattr(engine.TrainStep, "__call__", step)
    return draws


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_signal_mid_epoch_then_resume_matches_uninterrupted(tiny_cfg, monkeypatch, sig):
    """SIGTERM or Ctrl-C during a step saves last.pt at the end of that step; resuming gives the same
    metrics, and the same random draws, as never stopping. (A signal used to raise wherever it landed:
    last.pt then held weights a step ahead of its counters, and the resumed run repeated the batch.)"""
    extra = ("train.epochs=2", "train.max_steps_per_epoch=3", "train.deterministic=true")
    cfg = tiny_cfg("name=resumed", *extra)
    draws = _signal_inside_step(monkeypatch, 3 + 2, sig)  # epoch 2, inside its second step
    with pytest.raises(SystemExit) as e:
        trainer.run(cfg, folds=[0])
    assert e.value.code == 130
    state = load_checkpoint(Path(cfg.train.runs_dir) / "resumed/fold0/last.pt")
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (1, 2, 5)
    monkeypatch.undo()
    resumed_draws = _signal_inside_step(monkeypatch, 0, sig)
    trainer.run(cfg, folds=[0])
    resumed = pd.read_csv(Path(cfg.train.runs_dir) / "resumed/fold0/metrics.csv")
    assert list(resumed["epoch"]) == [1, 2]
    monkeypatch.undo()
    straight_draws = _signal_inside_step(monkeypatch, 0, sig)
    straight = trainer.run(tiny_cfg("name=straight", *extra), folds=[0])
    straight = pd.read_csv(straight / "fold0/metrics.csv")
    cols = ["train_loss", "val_loss", "val_dice", "val_iou"]
    np.testing.assert_allclose(resumed[cols].to_numpy(), straight[cols].to_numpy(), rtol=1e-5, atol=1e-6)
    assert draws + resumed_draws == straight_draws and len(straight_draws) == 6


def test_second_signal_stops_at_once_without_saving(tiny_cfg, monkeypatch):
    cfg = tiny_cfg("train.epochs=2", "train.max_steps_per_epoch=2")
    real = engine.TrainStep.__call__
    calls = {"n": 0}

    def step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # epoch 2, first step: two Ctrl-C before the step is done
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, *a, **k)

    monkeypatch.setattr(engine.TrainStep, "__call__", step)
    with pytest.raises(SystemExit) as e:
        trainer.run(cfg, folds=[0])
    assert e.value.code == 130
    state = load_checkpoint(Path(cfg.train.runs_dir) / "tiny/fold0/last.pt")
    assert (state["epoch"], state["step_in_epoch"]) == (1, 0)  # the last consistent state: epoch 1's end


def test_same_seed_same_metrics(tiny_cfg):
    a = trainer.run(tiny_cfg("name=a", "train.deterministic=true"), folds=[1])
    b = trainer.run(tiny_cfg("name=b", "train.deterministic=true"), folds=[1])
    ma, mb = (pd.read_csv(r / "fold1/metrics.csv").drop(columns="seconds") for r in (a, b))
    pd.testing.assert_frame_equal(ma, mb)
    assert (a / "folds.csv").read_bytes() == (b / "folds.csv").read_bytes()


def test_finished_fold_is_not_retrained(tiny_cfg, capsys):
    cfg = tiny_cfg("train.epochs=1")
    trainer.run(cfg, folds=[0])
    before = (Path(cfg.train.runs_dir) / "tiny/fold0/metrics.csv").read_text()
    capsys.readouterr()
    trainer.run(cfg, folds=[0])
    out = capsys.readouterr().out
    # Once said "resuming at epoch 2, step 0" first; and its OOF file was made again (22 min on a CPU).
    assert "fold 0: already finished (1 epochs)" in out and "resuming" not in out
    assert "fold0: oof.npz is up to date (best.pt, flip TTA)" in out, out
    assert (Path(cfg.train.runs_dir) / "tiny/fold0/metrics.csv").read_text() == before


def test_resume_with_changed_config_is_refused(tiny_cfg):
    from pipeline.runs import RunError

    trainer.run(tiny_cfg("train.epochs=1"), folds=[0])
    with pytest.raises(RunError, match=r"another config \(optim.lr: 0.003 -> 0.1\)"):
        trainer.run(tiny_cfg("train.epochs=1", "optim.lr=0.1"), folds=[0])


def test_nan_loss_names_the_step(tiny_cfg, monkeypatch):
    from pipeline.model import losses

    real = losses.BCEDiceLoss.forward
    calls = {"n": 0}

    def forward(self, logits, mask):
        calls["n"] += 1
        out = real(self, logits, mask)
        return out * float("nan") if calls["n"] == 2 else out

    monkeypatch.setattr(losses.BCEDiceLoss, "forward", forward)
    with pytest.raises(engine.TrainingError, match=r"loss is nan at global step 2 \(epoch 1\)"):
        trainer.run(tiny_cfg(), folds=[0])


def test_unknown_fold_is_an_error(tiny_cfg):
    with pytest.raises(engine.TrainingError, match="do not exist"):
        trainer.run(tiny_cfg(), folds=[7])


def test_cli_reports_config_errors(capsys):
    assert trainer.main(["--config", "configs/demo.yaml", "optim.lrr=1"]) == 2
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
    trainer.run(cfg, folds=[0])
    metrics = pd.read_csv(Path(cfg.train.runs_dir) / "killed/fold0/metrics.csv")
    assert list(metrics["epoch"]) == [1, 2, 3, 4]
    build_model(cfg).load_state_dict(load_checkpoint(last)["model"])


def _train_cli(cfg, tmp_path: Path, *launcher: str) -> list[str]:
    """``python [launcher] -m pipeline.train`` on fold 0 with ``cfg``, passed as a saved config file."""
    save_config(cfg, tmp_path / "cli.yaml")
    runner = [sys.executable, *launcher] if launcher else [sys.executable]
    return [*runner, "-m", "pipeline.train.trainer", "--config", str(tmp_path / "cli.yaml"), "--folds", "0"]


def _assert_within_one_step(a: np.ndarray, b: np.ndarray, max_share: float) -> None:
    """uint8 maps ``a`` and ``b`` are equal but for at most ``max_share`` of their values, each of which
    is one quantisation step off."""
    assert a.dtype == b.dtype == np.uint8 and a.shape == b.shape
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    assert diff.max(initial=0) <= 1, f"{int((diff > 1).sum())} values differ by more than one step"
    assert (diff > 0).mean() <= max_share, f"{int((diff > 0).sum())} of {diff.size} values differ"


@pytest.mark.skipif(
    not hasattr(torch.distributed, "is_gloo_available") or not torch.distributed.is_gloo_available(),
    reason="gloo backend not available",
)
def test_two_process_ddp_matches_single_process_outputs(tiny_cfg, tmp_path):
    """torchrun, 2 CPU processes (gloo): only rank 0 writes; the validation metrics all-reduced over the two
    ranks' shards equal one process validating the same weights on the whole fold.

    Exact: the columns and rows of metrics.csv, the run's folds, the OOF file's tile names, order, shape
    and dtype. Not exact: torchrun runs each rank on one thread (it sets OMP_NUM_THREADS=1 when unset),
    this process on all the cores, and float sums split over other thread counts round differently in
    the last bits. So the OOF maps (uint8 ``round(p * 255)``) may differ by one step where ``p * 255``
    sits that close to a half (1 of the 49,152 values on a 2-core machine; at most 1 in 1,000 allowed,
    none by two steps), and Dice, IoU and accuracy (at threshold 0.5, float32 per image) agree to 1e-6.
    """
    single = trainer.run(tiny_cfg("train.epochs=1", "name=single"), folds=[0])
    cfg = tiny_cfg("train.epochs=1", "name=ddp", "train.batch_size=2")
    cmd = _train_cli(cfg, tmp_path, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    ddp = Path(cfg.train.runs_dir) / "ddp"
    m_single = pd.read_csv(single / "fold0/metrics.csv")
    m_ddp = pd.read_csv(ddp / "fold0/metrics.csv")
    assert list(m_ddp.columns) == list(m_single.columns)
    assert list(m_ddp["epoch"]) == list(m_single["epoch"]) == [1]
    assert math.isfinite(m_ddp["train_loss"].iloc[0]) and 0 <= m_ddp["val_dice"].iloc[0] <= 1
    assert pd.read_csv(ddp / "folds.csv").equals(pd.read_csv(single / "folds.csv"))
    with np.load(single / "fold0/oof.npz") as a, np.load(ddp / "fold0/oof.npz") as b:
        assert a["probs"].shape == b["probs"].shape and a["probs"].dtype == b["probs"].dtype == np.uint8
        assert list(a["names"]) == list(b["names"])
    # The numbers: one process evaluates the DDP run's best.pt (its only epoch) on fold 0's whole
    # validation set; the sharded, all-reduced metrics of the DDP run must be the same numbers.
    from pipeline.core.device import Dist
    from pipeline.data.folds import load_folds
    from pipeline.train.engine import evaluate

    source = read_source(cfg.data, with_test=False)
    folds_df = load_folds(ddp / "folds.csv", source.train.names)
    data = engine.fold_data(cfg, source, folds_df, 0, Dist(), torch.device("cpu"))
    model = build_model(cfg)
    model.load_state_dict(load_checkpoint(ddp / "fold0/best.pt")["model"])
    metrics = evaluate(model, data.val_loader, None, cfg, torch.device("cpu"), Dist())
    for key in ("val_dice", "val_iou", "val_acc"):
        assert m_ddp[key].iloc[0] == pytest.approx(metrics[key], abs=1e-6), key  # float32 per image
    # ... and the OOF file rank 0 wrote is exactly what one process predicts with those weights and TTA.
    kept: list[np.ndarray] = []
    cpu = torch.device("cpu")
    evaluate(model, data.val_loader, None, cfg, cpu, Dist(), cfg.infer.tta, lambda _, a: kept.append(a))
    with np.load(ddp / "fold0/oof.npz") as z:
        _assert_within_one_step(z["probs"], np.concatenate(kept), max_share=1e-3)
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
    with pytest.raises(engine.TrainingError, match=r"out of memory at batch size 4: use train.batch_size=2"):
        trainer.run(tiny_cfg(), folds=[0])


def _copy_of_demo(demo_root: Path, tmp_path: Path) -> Path:
    """A private copy of the demo data: these tests write DATA/folds.csv; the shared copy must not see it."""
    import shutil

    return Path(shutil.copytree(demo_root, tmp_path / "data"))


def test_resume_keeps_the_runs_folds_when_data_folds_change(tiny_cfg, demo_root, tmp_path):
    """`make folds` between two `make train` calls must not move a run's validation tiles."""
    from pipeline.data.folds import make_folds

    root = _copy_of_demo(demo_root, tmp_path)
    cfg = tiny_cfg(f"data.root={root}", "train.epochs=1")
    run_dir = trainer.run(cfg, folds=[0])
    own = pd.read_csv(run_dir / "folds.csv")
    names = sorted(own["name"])
    # A different split written beside the data, as a later `make folds --seed 7` would.
    other = make_folds(names, np.linspace(0, 0.5, len(names)), 2, seed=7)
    assert set(other.loc[other["fold"] == 0, "name"]) != set(own.loc[own["fold"] == 0, "name"])
    other.to_csv(root / "folds.csv", index=False)
    run_dir = trainer.run(tiny_cfg(f"data.root={root}", "train.epochs=1"), folds=[0, 1])
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

    real_end_epoch = trainer.FoldTrainer.end_epoch
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer.FoldTrainer, "end_epoch", stop_after_first_epoch)
        with pytest.raises(SystemExit):
            trainer.run(cfg, folds=[0])
    folds = pd.read_csv(run_dir / "folds.csv")
    folds["fold"] = 1 - folds["fold"]  # swap the two folds by hand
    folds.to_csv(run_dir / "folds.csv", index=False)
    with pytest.raises(engine.TrainingError, match="trained on other folds .* Restore the run's folds.csv"):
        trainer.run(cfg, folds=[0])


def test_patience_stops_when_the_score_stalls(tiny_cfg, monkeypatch):
    flat = {"val_loss": 1.0, "val_dice": 0.5, "val_iou": 0.4, "val_acc": 0.9}
    monkeypatch.setattr(trainer, "evaluate", lambda *a, **k: dict(flat))
    monkeypatch.setattr(trainer, "write_oof", lambda *a, **k: None)
    monkeypatch.setattr(trainer.tune, "tune_run", lambda *a, **k: {"n_oof": 0})
    monkeypatch.setattr(trainer.tune, "format_table", lambda t: "")
    cfg = tiny_cfg("train.epochs=6", "train.patience=2", "train.max_steps_per_epoch=1")
    run_dir = trainer.run(cfg, folds=[0])
    # epoch 1 sets the best; 2 and 3 do not improve it -> stop after 3 of 6
    assert list(pd.read_csv(run_dir / "fold0/metrics.csv")["epoch"]) == [1, 2, 3]
    free = trainer.run(tiny_cfg("name=free", "train.epochs=4", "train.max_steps_per_epoch=1"), folds=[0])
    assert list(pd.read_csv(free / "fold0/metrics.csv")["epoch"]) == [1, 2, 3, 4]


def test_ema_weights_are_what_best_pt_holds(tiny_cfg):
    cfg = tiny_cfg("train.epochs=1", "train.ema=0.9")
    run_dir = trainer.run(cfg, folds=[0])
    best = load_checkpoint(run_dir / "fold0/best.pt")["model"]
    last = load_checkpoint(run_dir / "fold0/last.pt")
    ema = {k.removeprefix("module."): v for k, v in last["ema"].items() if k.startswith("module.")}
    assert set(best) == set(ema)
    assert all(torch.equal(best[k], ema[k]) for k in best)
    floats = [k for k, v in best.items() if v.is_floating_point() and "running" not in k]
    assert any(not torch.equal(best[k], last["model"][k]) for k in floats), "EMA equals the raw weights"


def _make_train_command(cfg_path: Path, data: str, **make_vars: str) -> list[str]:
    """The command `make train` runs for these variables (make -n): the launcher, which becomes torchrun."""
    args = [f"{k}={v}" for k, v in {"CONFIG": str(cfg_path), "FOLDS": "0", "DATA": data, **make_vars}.items()]
    # Under `make test` the outer make's MAKELEVEL/MAKEFLAGS would add "make[1]: ..." lines: drop them.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    cmd = ["make", "--no-print-directory", "-n", "train", *args]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True, env=env)
    lines = [ln for ln in out.stdout.replace("\\\n", " ").splitlines() if "-m pipeline.train" in ln]
    line = shlex.split(lines[-1])
    assert line[0].endswith(".venv/bin/python") and line[1:3] == ["-m", "pipeline.core.launch"], line
    return [sys.executable, *line[1:]]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(
    not hasattr(torch.distributed, "is_gloo_available") or not torch.distributed.is_gloo_available(),
    reason="gloo backend not available",
)
def test_two_nodes_over_loopback_train_what_one_node_trains(tiny_cfg, tmp_path):
    """`make train NODES=2 NODE_RANK=k MASTER=host:port` (two local "nodes", one process each, gloo over
    loopback) trains exactly the model `make train GPUS=2` trains on one machine."""
    runs = {}
    for name, nodes in (("one-node", 1), ("two-nodes", 2)):
        cfg = tiny_cfg("train.epochs=1", f"name={name}", "train.batch_size=2")
        save_config(cfg, tmp_path / f"{name}.yaml")
        if nodes == 1:
            cmds = [_make_train_command(tmp_path / f"{name}.yaml", cfg.data.root, GPUS="2")]
        else:
            master = f"127.0.0.1:{_free_port()}"
            node = {"NODES": "2", "MASTER": master}
            cmds = [
                _make_train_command(tmp_path / f"{name}.yaml", cfg.data.root, NODE_RANK=str(k), **node)
                for k in (0, 1)
            ]
        # torchrun sets OMP_NUM_THREADS=1 only when it starts several processes on a machine; with one
        # per "node" each would use every core, and threaded CPU kernels sum in another order.
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        pipe = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True, "env": env}
        procs = [subprocess.Popen(c, cwd=ROOT, **pipe) for c in cmds]
        for p in procs:
            out = p.communicate(timeout=300)[0]
            assert p.returncode == 0, out[-3000:]
        runs[name] = Path(cfg.train.runs_dir) / name
    one = load_checkpoint(runs["one-node"] / "fold0/last.pt")["model"]
    two = load_checkpoint(runs["two-nodes"] / "fold0/last.pt")["model"]
    assert set(one) == set(two) and all(torch.equal(one[k], two[k]) for k in one)
    m1, m2 = (pd.read_csv(r / "fold0/metrics.csv").drop(columns="seconds") for r in runs.values())
    pd.testing.assert_frame_equal(m1, m2)


# ----------------------------------------------------------------------------- one run, one owner, one config
ONE_STEP = ("train.epochs=1", "train.max_steps_per_epoch=1")


def test_a_run_in_use_is_refused_and_a_dead_owners_lock_taken_over(tiny_cfg):
    """Two `make train` of one run at once would put one run's checkpoints beside the other's config:
    the second is refused while the first lives; a lock left by a killed run is taken over (issue 12)."""
    import json

    from pipeline.core.io import HOST
    from pipeline.runs import RunError

    cfg = tiny_cfg(*ONE_STEP)
    runs = Path(cfg.train.runs_dir)
    runs.mkdir(parents=True)
    lock = runs / ".tiny.lock"
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        lock.write_text(json.dumps({"pid": owner.pid, "host": HOST, "since": "now", "command": "make train"}))
        with pytest.raises(RunError, match=rf"in use by process {owner.pid} on this machine.*name=\.\.\."):
            trainer.run(cfg, folds=[0])
        assert not (runs / "tiny").exists()
    finally:
        owner.kill()
        owner.wait()
    trainer.run(cfg, folds=[0])  # the owner is gone: taken over
    assert not lock.exists(), "the lock is released at exit"


def test_fresh_start_on_an_existing_run_is_refused_or_moves_it_aside(tiny_cfg):
    """RESUME=0 on an existing run used to overwrite its checkpoints without a word (issue 12)."""
    from pipeline.runs import RunError

    run_dir = trainer.run(tiny_cfg(*ONE_STEP), folds=[0])
    before = (run_dir / "fold0/last.pt").read_bytes()
    with pytest.raises(RunError, match=r"already holds a run.*name=\.\.\..*--force"):
        trainer.run(tiny_cfg(*ONE_STEP, "optim.lr=0.01"), folds=[0], resume=False)
    assert (run_dir / "fold0/last.pt").read_bytes() == before
    trainer.run(tiny_cfg(*ONE_STEP, "optim.lr=0.01"), folds=[0], resume=False, force=True)
    aside = [p for p in run_dir.parent.iterdir() if p.name.startswith("tiny.old-")]
    assert len(aside) == 1 and (aside[0] / "fold0/last.pt").read_bytes() == before
    assert load_yaml(run_dir / "config.yaml")["optim"]["lr"] == 0.01
    assert load_checkpoint(run_dir / "fold0/last.pt")["config"]["optim"]["lr"] == 0.01


def test_another_config_cannot_join_a_run_but_inference_settings_may_change(tiny_cfg):
    """FOLDS=1 with another config used to train beside fold 0 into one ensemble; and a change of an
    inference-only setting (infer.*) used to make resume refuse, forcing a retrain (issue 12)."""
    from pipeline.runs import RunError

    run_dir = trainer.run(tiny_cfg(*ONE_STEP), folds=[0])
    with pytest.raises(RunError, match=r"another config \(optim.lr: 0.003 -> 0.01\)"):
        trainer.run(tiny_cfg(*ONE_STEP, "optim.lr=0.01"), folds=[1])
    assert not (run_dir / "fold1").exists()
    trainer.run(tiny_cfg(*ONE_STEP, "infer.thresholds=[0.4,0.6]"), folds=[0, 1])
    searched = set(pd.read_csv(run_dir / "threshold_search.csv")["threshold"].round(6))
    # the new grid, not the default's 0.45..0.55 (widened past an edge when the optimum sits there)
    assert {t for t in searched if 0.4 <= t <= 0.6} == {0.4, 0.6}
    assert load_yaml(run_dir / "config.yaml")["infer"]["thresholds"] == [0.4, 0.6]


def test_model_typos_are_refused_before_any_folder(tiny_cfg):
    """An unknown arch or encoder was found after the data check, leaving a half-made run folder."""
    from pipeline.core.config import ConfigError

    with pytest.raises(ConfigError, match=r"unknown model.arch 'Unett'.*Did you mean 'Unet'"):
        trainer.run(tiny_cfg("model.arch=Unett"))
    with pytest.raises(ConfigError, match=r"model.encoder='resnet43'.*resnet34"):
        trainer.run(tiny_cfg("model.encoder=resnet43"))
    assert not Path(tiny_cfg().train.runs_dir).exists()


def test_run_start_removes_temp_files_of_killed_writes(tiny_cfg):
    """kill -9 during a checkpoint write leaves a hidden temp file; the next run removes it, and only
    ours whose writer is gone (issue 12)."""
    from pipeline.core.io import HOST

    cfg = tiny_cfg(*ONE_STEP)
    run_dir = trainer.run(cfg, folds=[0])
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    stale = run_dir / "fold0" / f".last.pt.{int(gone.stdout)}@{HOST}.a1b2c3d4.tmp"
    legacy = run_dir / ".manifest.yaml.k3j9x0qa.tmp"  # named before the pid was recorded, two days old
    live = run_dir / "fold0" / f".best.pt.{os.getpid()}@{HOST}.e5f6g7h8.tmp"
    other = run_dir / "notes.tmp"
    for p in (stale, legacy, live, other):
        p.write_bytes(b"x" * 1000)
    os.utime(legacy, (time.time() - 2 * 86400,) * 2)
    trainer.run(cfg, folds=[0])
    assert [p.exists() for p in (stale, legacy, live, other)] == [False, False, True, True]


def _non_square_copy(demo_root: Path, tmp_path: Path, h: int = 48) -> Path:
    """The demo data cropped to h x 64 (HxW) tiles, masks re-encoded: a set of 640x480-like exports."""
    from PIL import Image

    from pipeline.data import rle
    from pipeline.data.masks import read_mask_csv

    root = _copy_of_demo(demo_root, tmp_path)
    for folder, csv in (("train", "train_mask.csv"), ("test_a", "test_a_mask.csv")):
        df = read_mask_csv(root / csv)
        for name in df["name"]:
            path = root / folder / name
            Image.fromarray(np.asarray(Image.open(path))[:h]).save(path, quality=95)
        masks = [rle.encode(rle.decode(r, (64, 64))[:h]) for r in df["rle"]]
        (root / csv).write_text("".join(f"{n}\t{m}\n" for n, m in zip(df["name"], masks)))
    return root


def test_non_square_tiles_train_and_submit(tiny_cfg, demo_root, tmp_path):
    """48x64 tiles (a 640x480-like export) train with D4 augmentation, tune and submit; check_data said
    "expected 0x0" for them (issue 12)."""
    from pipeline.data.check import check_dataset
    from pipeline.infer.submit import make_submission
    from pipeline.infer.validate import validate_submission
    from pipeline.runs.manifest import load_manifest

    root = _non_square_copy(demo_root, tmp_path)
    assert check_dataset(root).ok
    cfg = tiny_cfg(f"data.root={root}", "train.epochs=1", "train.max_steps_per_epoch=2", "infer.tta=d4")
    run_dir = trainer.run(cfg, folds=[0])
    with np.load(run_dir / "fold0/oof.npz") as z:
        assert z["probs"].shape[1:] == (48, 64)
    result = make_submission(load_manifest(run_dir), cfg.data, tmp_path / "subs", device="cpu", num_workers=0)
    assert validate_submission(result.path, root / "test_a_samplesubmit.csv", (48, 64)) == []


# ----------------------------------------------------------------------------- SWA and the Lovász phase


def _scripted_scores(monkeypatch, scores):
    """Validation returns the next of ``scores`` as val_dice (the OOF pass, with a sink, is real)."""
    real = engine.evaluate
    seen = []

    def fake(model, *a, **k):
        out = real(model, *a, **k)
        if k.get("sink") is None:
            out["val_dice"] = scores[len(seen)]
            seen.append({n: v.detach().clone() for n, v in model.state_dict().items()})
        return out

    monkeypatch.setattr(trainer, "evaluate", fake)
    return seen


def _weights_at_epoch_ends(monkeypatch):
    ends = []
    real = trainer.FoldTrainer.train_epoch

    def spy(self, epoch):
        out = real(self, epoch)
        ends.append({n: v.detach().clone() for n, v in self.step.model.state_dict().items()})
        return out

    monkeypatch.setattr(trainer.FoldTrainer, "train_epoch", spy)
    return ends


@pytest.mark.parametrize(("swa_score", "kept"), [(0.9, True), (0.05, False)])
def test_swa_averages_the_last_epochs_and_is_kept_only_when_better(tiny_cfg, monkeypatch, swa_score, kept):
    ends = _weights_at_epoch_ends(monkeypatch)
    _scripted_scores(monkeypatch, [0.1, 0.2, 0.3, swa_score])
    cfg = tiny_cfg("train.epochs=3", "train.swa_epochs=2", "train.max_steps_per_epoch=2", "train.swa_lr=5e-4")
    run_dir = trainer.run(cfg, folds=[0])
    last = load_checkpoint(run_dir / "fold0/last.pt")
    best = load_checkpoint(run_dir / "fold0/best.pt")
    swa = {k.removeprefix("module."): v for k, v in last["swa"].items() if k.startswith("module.")}
    assert int(last["swa"]["n_averaged"]) == 2 and last["swa_score"] == pytest.approx(swa_score)
    weights = [k for k, v in swa.items() if v.is_floating_point() and "running" not in k]
    for k in weights:  # the plain mean of the weights at the end of epochs 2 and 3
        torch.testing.assert_close(swa[k], (ends[1][k] + ends[2][k]) / 2)
    # BN statistics were recomputed for the average, not averaged: they differ from both epochs'
    stats = [k for k in swa if k.endswith("running_mean")]
    assert stats and all(not torch.equal(swa[k], ends[2][k]) for k in stats)
    want = swa if kept else ends[2]
    assert all(torch.equal(best["model"][k], want[k]) for k in weights)
    assert best["score"] == pytest.approx(swa_score if kept else 0.3)
    lrs = pd.read_csv(run_dir / "fold0/metrics.csv")["lr"].tolist()
    assert lrs[1:] == [0.0005, 0.0005] and lrs[0] != 0.0005  # the constant SWA rate in the SWA epochs


def test_swa_is_validated_once_even_when_the_run_is_resumed(tiny_cfg, monkeypatch, capsys):
    cfg = tiny_cfg("train.epochs=2", "train.swa_epochs=1", "train.max_steps_per_epoch=1")
    trainer.run(cfg, folds=[0])
    assert capsys.readouterr().out.count("SWA of the last 1 epochs") == 1
    trainer.run(cfg, folds=[0])  # finished: nothing is redone
    assert "SWA of the last" not in capsys.readouterr().out


def test_lovasz_epochs_switch_the_loss_for_the_last_epochs(tiny_cfg, monkeypatch):
    used = []
    real = trainer.FoldTrainer.end_epoch

    def spy(self, epoch, t0):
        fn = self.step.loss_fn
        used.append((fn.ce_weight, fn.dice_weight, fn.lovasz_weight))
        return real(self, epoch, t0)

    monkeypatch.setattr(trainer.FoldTrainer, "end_epoch", spy)
    cfg = tiny_cfg("train.epochs=3", "loss.lovasz_epochs=1", "train.max_steps_per_epoch=1")
    trainer.run(cfg, folds=[0])
    assert used == [(0.5, 0.5, 0.0), (0.5, 0.5, 0.0), (0.0, 0.0, 1.0)]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.device=cuda"], "no CUDA GPU is visible"),
        (["train.batch_size=40"], r"fold 0: \d+ training tiles per process is less than one batch of 40"),
    ],
    ids=["no-such-device", "batch-above-a-fold"],
)
def test_a_refused_train_writes_nothing_so_the_corrected_rerun_is_not_another_config(
    tiny_cfg, overrides, message
):
    """It used to leave config.yaml and folds.csv, and the corrected command was then refused as a run
    made with another config."""
    cfg = tiny_cfg(*overrides)
    with pytest.raises((engine.TrainingError, DeviceError), match=message):
        trainer.run(cfg)
    run_dir = Path(cfg.train.runs_dir) / "tiny"
    assert not run_dir.exists() or not any(run_dir.iterdir())
    trainer.run(tiny_cfg("train.max_steps_per_epoch=1", "train.epochs=1"), folds=[0])  # the corrected rerun


def test_force_with_bad_data_keeps_the_old_run_where_it_is(tiny_cfg, tmp_path, demo_root):
    """FORCE=1 used to move the run aside, then fail on the data check, leaving no run at all."""
    import shutil

    cfg = tiny_cfg("train.max_steps_per_epoch=1", "train.epochs=1")
    run_dir = trainer.run(cfg, folds=[0])
    broken = tmp_path / "broken"
    shutil.copytree(demo_root, broken)
    (broken / "train" / sorted(p.name for p in (broken / "train").iterdir())[0]).unlink()
    with pytest.raises(DataError):
        trainer.run(
            tiny_cfg("train.max_steps_per_epoch=1", "train.epochs=1", f"data.root={broken}"), force=True
        )
    assert (run_dir / "config.yaml").is_file() and not list(run_dir.parent.glob("tiny.old-*"))
