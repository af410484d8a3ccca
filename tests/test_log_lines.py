"""The README's promise for a log file: a line at least every 60 s in every phase of every command.

A user on a 2-core CPU with output to a file saw nothing for the first 3.5 minutes of `make train`,
nothing through validation (~2.5 min), the OOF pass and tuning (22 min), and one `submit` line per 32
tiles (8-15 min apart). Here each command runs in-process with stdout and stderr going to a file and a
simulated clock: decoding a tile costs 2-3 s, a forward pass of the model 70 s (a CPU at 512 px), a pass
of the threshold search 70 s; the heartbeat is called every simulated second, as its thread would every
real one. Every line is stamped with the simulated time it was written at, and no two are further apart
than 61 s (60 s plus the heartbeat's one-second look), from the command's start to its end; each phase
is named in the lines written while it runs.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import pytest

from pipeline.core import progress
from pipeline.core.config import save_config
from pipeline.data import check, dataset
from pipeline.infer import submit
from pipeline.metrics import postprocess
from pipeline.model.registry import SegModel
from pipeline.train import trainer, tune

EVERY, LOOK = 60.0, 1.0


class SimulatedTime:
    """The clock of pipeline.core.progress; work advances it one second at a time, beating in between."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    def spend(self, seconds: float) -> None:
        for _ in range(int(seconds / LOOK)):
            self.t += LOOK
            progress.beat()


class LogFile:
    """sys.stdout / sys.stderr: every line written to ``path`` and kept with its simulated time."""

    def __init__(self, path: Path, clock: SimulatedTime, lines: list[tuple[float, str]]):
        self.file, self.clock, self.lines, self.part = path.open("a"), clock, lines, ""

    def write(self, text: str) -> int:
        self.file.write(text)
        self.part += text
        *done, self.part = self.part.split("\n")
        self.lines += [(self.clock.t, line) for line in done if line.strip()]
        return len(text)

    def flush(self) -> None:
        self.file.flush()

    def isatty(self) -> bool:
        return False


def _costly(monkeypatch, obj, name: str, clock: SimulatedTime, seconds: float) -> None:
    real = getattr(obj, name)

    def slow(*args, **kwargs):
        clock.spend(seconds)
        return real(*args, **kwargs)

    monkeypatch.setattr(obj, name, slow)


@pytest.fixture
def log(monkeypatch, tmp_path, simulated_progress):
    clock, lines = SimulatedTime(), []
    simulated_progress(clock)  # SimulatedTime.spend beats where the heartbeat thread would
    _costly(monkeypatch, check, "inspect_image", clock, 3)  # check_data decodes every tile
    _costly(monkeypatch, dataset, "read_image", clock, 2)  # training, validation, OOF and submit read tiles
    _costly(monkeypatch, SegModel, "forward", clock, 70)  # one batch through the model on a CPU
    _costly(monkeypatch, postprocess.GridCounts, "add", clock, 70)  # the threshold x min-area search
    return clock, LogFile(tmp_path / "log.txt", clock, lines)


def _run(log, command, *argv) -> list[str]:
    """Run ``command(argv)`` with stdout and stderr to the log file (set here, not in the fixture: pytest
    puts its own capture back before the test runs); check the gaps between its lines; return them."""
    clock, out = log
    lines = out.lines
    before, start = len(lines), clock.t
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        assert command(list(argv)) in (0, None)
    stamps = [start] + [t for t, _ in lines[before:]] + [clock.t]
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    text = [line for _, line in lines[before:]]
    worst = max(range(len(gaps)), key=gaps.__getitem__)
    assert gaps[worst] <= EVERY + LOOK, (
        f"{command.__module__}: {gaps[worst]:.0f} s without a line, after "
        f"{text[worst - 1] if worst else 'the start'!r}; lines: {text[:3]}"
    )
    assert not re.search(r"\b0\.0 \w+/s", "\n".join(text)), "a rate that rounds to zero"
    assert all(a != b for a, b in zip(text, text[1:])), "a line printed twice"
    return text


def _named(text: list[str], *phases: str) -> None:
    for phase in phases:
        assert any(phase in line for line in text), f"no line names {phase!r}"


def test_every_command_writes_a_line_every_minute_in_every_phase(log, tiny_cfg, tmp_path):
    cfg = tiny_cfg("train.epochs=2")
    save_config(cfg, tmp_path / "tiny.yaml")

    text = _run(log, check.main, cfg.data.root)
    _named(text, "check train/ (every tile decoded): ")  # 72 s; test_a/ takes 24 s: no line due

    text = _run(log, trainer.main, "--config", str(tmp_path / "tiny.yaml"), "--folds", "0")
    _named(text, "plan: 1 fold (0) x 2 epochs x 3 steps", "fold 0 epoch 1/2:", "fold 0 epoch 1 validation",
           "fold0 OOF pass (flip TTA)", "tune tiny: a pass over the OOF maps")  # fmt: skip
    first_epoch = [line for line in text if line.startswith("fold 0 epoch 1/2: ") and "/3 (" in line]
    assert first_epoch and not any("val" in line for line in first_epoch)  # no "val nan" before a score
    # After the first minute of steps (the first step, start-up, is not measured): the rate and the ETA.
    assert any(line.startswith("fold 0: 1 step in 1 min 18 s (78.00 s/step, 0.1 img/s)") for line in text)

    run_dir = Path(cfg.train.runs_dir) / "tiny"
    text = _run(log, tune.main, "--run", str(run_dir))
    _named(text, "tune tiny: a pass over the OOF maps")

    subs = tmp_path / "subs"
    text = _run(
        log, submit.main, "--run", str(run_dir), "--out", str(subs), "--device", "cpu", "--workers", "0"
    )
    _named(text, "submit (flip TTA): ", "submission: ")
    log[1].flush()
    assert (tmp_path / "log.txt").read_text().count("\n") >= 40
