"""pipeline.runs.folder: one owner per run folder, one config per run, the newest submission."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.runs import RunError, folder


def test_resolve_submission_newest_or_explicit(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="make submit"):
        folder.latest_submission("", tmp_path)
    old, new = tmp_path / "old.csv", tmp_path / "new.csv"
    old.write_text("")
    new.write_text("")
    (tmp_path / "new.csv.score.json").write_text("{}")
    os.utime(old, (1_000, 1_000))
    assert folder.latest_submission("", tmp_path) == new
    assert folder.latest_submission(old, tmp_path) == old
    with pytest.raises(FileNotFoundError):
        folder.latest_submission(tmp_path / "missing.csv")


@pytest.mark.parametrize("channels_last", [True, False])
def test_a_run_saved_before_auto_resumes_with_todays_defaults_and_says_what_changed(
    tmp_path: Path, capsys, channels_last: bool
) -> None:
    """A run's config.yaml from before train.amp / train.channels_last became "auto" says bf16 and true (the
    old defaults, then meaning "on a GPU only") or false: resuming it with today's defaults is the same run,
    not "another config", and a note says which setting changed; its best.pt is still its run's."""
    import yaml

    from pipeline.core.config import Config, to_dict
    from pipeline.runs.checkpoint import BestCheckpoint, check_run_config

    old = to_dict(Config())
    old["train"].update(amp="bf16", channels_last=channels_last)
    run_dir = tmp_path / "r"
    (run_dir / "fold0").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
    assert folder.prepare_run_dir(run_dir, to_dict(Config())) is None
    err = capsys.readouterr().err
    assert f"note: resuming {run_dir} with train.amp: 'bf16' -> 'auto'; train.channels_last: " in err
    assert f"{channels_last!r} -> 'auto'" in err and "weights, optimiser state and folds carry over" in err
    best = BestCheckpoint({}, old, 0, 1, "val_dice", 0.5, 0.5, 0)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(Config()), sort_keys=False))
    check_run_config(run_dir / "fold0" / "best.pt", best)  # not "trained with another config"


def test_run_lock_refuses_a_live_owner_takes_over_a_gone_one_and_releases(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    from pipeline.core.io import HOST

    run_dir = tmp_path / "runs" / "r"
    with folder.run_lock(run_dir) as lock:
        assert lock == tmp_path / "runs" / ".r.lock"
        held = json.loads(lock.read_text())
        assert (held["pid"], held["host"]) == (os.getpid(), HOST)
        in_use = rf"{run_dir} is in use by process {os.getpid()}"
        with pytest.raises(RunError, match=in_use), folder.run_lock(run_dir):
            pass
    assert not lock.exists()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    lock.write_text(json.dumps({"pid": int(gone.stdout), "host": HOST, "since": "yesterday"}))
    with folder.run_lock(run_dir):  # a kill -9 left it: taken over
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere", "since": "now", "command": "make train"}))
    other_machine = r"machine elsewhere .*delete .*\.r\.lock"
    with pytest.raises(RunError, match=other_machine), folder.run_lock(run_dir):
        pass


def test_prepare_run_dir_keeps_a_run_one_run(tmp_path: Path) -> None:
    from pipeline.core.config import Config, load_config, save_config, to_dict

    run_dir = tmp_path / "r"
    assert folder.prepare_run_dir(run_dir, to_dict(Config()), resume=False) is None  # nothing there yet
    run_dir.mkdir()
    save_config(Config(), run_dir / "config.yaml")
    (run_dir / "fold0").mkdir()
    folder.prepare_run_dir(run_dir, to_dict(load_config(None, ["infer.threshold=0.3"])))  # infer.* is free
    with pytest.raises(RunError, match=r"another config \(train.epochs: 200 -> 3\)"):
        folder.prepare_run_dir(run_dir, to_dict(load_config(None, ["train.epochs=3"])))
    with pytest.raises(RunError, match=r"already holds a run.*--force"):
        folder.prepare_run_dir(run_dir, to_dict(Config()), resume=False)
    aside = folder.prepare_run_dir(run_dir, to_dict(Config()), resume=False, force=True)
    assert aside is not None and aside.name.startswith("r.old-") and (aside / "fold0").is_dir()
    assert not run_dir.exists()


def test_a_run_saved_before_dice_per_image_trained_with_batch_dice_and_is_not_resumed_per_image(
    tmp_path: Path,
) -> None:
    """A key added later is completed with its default, except loss.dice_per_image, whose default ("auto":
    per image for binary runs) is not what such a run trained with (batch Dice)."""
    import yaml

    from pipeline.core.config import Config, LossConfig, to_dict
    from pipeline.runs import RunError

    old = to_dict(Config())
    old["loss"].pop("dice_per_image")
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
    with pytest.raises(RunError, match=r"loss.dice_per_image: False -> 'auto'"):
        folder.prepare_run_dir(run_dir, to_dict(Config()))
    assert folder.prepare_run_dir(run_dir, to_dict(Config(loss=LossConfig(dice_per_image=False)))) is None
