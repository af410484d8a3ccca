"""pipeline.core.progress: a log file gets a line at least every N seconds while a phase is open."""

from __future__ import annotations

import pytest

from pipeline.core import progress as progress_mod


class FakeClock:
    def __init__(self, t: float = 0.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock(simulated_progress) -> FakeClock:
    fake = FakeClock()
    simulated_progress(fake)  # the test calls beat() where the heartbeat thread would
    return fake


def test_a_line_when_nothing_was_printed_for_n_seconds_with_rate_eta_and_postfix(clock, capsys):
    bar = progress_mod.LogLines(total=100, desc="fold 0 epoch 1/3", unit="step", every=60)  # t=0
    bar.set_postfix(loss="0.5200")
    for t in (10, 30, 65, 70, 130):  # lines at 65 and 130 only
        clock.t = t
        bar.update(10)
    clock.t = 131
    bar.close()  # the last line (50/100) is up to date: not repeated
    assert capsys.readouterr().err.splitlines() == [
        "fold 0 epoch 1/3: 30/100 (30%), 2.2 s/step, 1 min 5 s elapsed, ETA 2 min 32 s, loss 0.5200",
        "fold 0 epoch 1/3: 50/100 (50%), 2.6 s/step, 2 min 10 s elapsed, ETA 2 min 10 s, loss 0.5200",
    ]


def test_fast_rates_read_per_second_and_the_final_line_is_printed_once(clock, capsys):
    bar = progress_mod.LogLines(total=200, desc="submit", unit="tile", every=60)
    clock.t = 61
    bar.update(122)  # 2.0 tile/s
    clock.t = 100
    bar.update(78)  # quiet: 39 s since the last line
    clock.t = 101
    bar.close()  # the last line said 122: say where it ended, once
    clock.t = 200
    bar.close()
    assert capsys.readouterr().err.splitlines() == [
        "submit: 122/200 (61%), 2.0 tile/s, 1 min 1 s elapsed, ETA 39 s",
        "submit: 200/200 (100%), 2.0 tile/s, 1 min 41 s elapsed",
    ]


def test_the_heartbeat_speaks_for_the_innermost_phase_during_a_long_step(clock, capsys):
    """One CPU step of 100 s: update() never runs in between, the heartbeat thread does."""
    epoch = progress_mod.LogLines(total=22, desc="fold 0 epoch 1/1", unit="step", every=60)
    for t in range(0, 241, 5):  # the heartbeat looks every 5 s; one step ends at t=100, one at 200
        clock.t = t
        if t in (100, 200):
            epoch.update(1)
        progress_mod.beat()
    clock.t = 245
    with progress_mod.LogLines(total=None, desc="fold 0 validation", unit="batch") as val:
        for t in range(250, 400, 5):
            clock.t = t
            progress_mod.beat()
        del val
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "fold 0 epoch 1/1: 0/22 (0%), no step finished yet, 1 min 0 s elapsed",
        "fold 0 epoch 1/1: 1/22 (5%), 100.0 s/step, 2 min 0 s elapsed, ETA 34 min 40 s",
        "fold 0 epoch 1/1: 1/22 (5%), 100.0 s/step, 3 min 0 s elapsed, ETA 33 min 40 s",
        "fold 0 epoch 1/1: 2/22 (9%), 100.0 s/step, 4 min 0 s elapsed, ETA 32 min 40 s",
        "fold 0 validation: 55 s elapsed",  # 60 s after the last line, whichever phase printed it
        "fold 0 validation: 1 min 55 s elapsed",
    ]


def test_a_closed_phase_is_not_announced(clock, capsys):
    bar = progress_mod.LogLines(total=3, desc="tune", every=60)
    bar.close()
    clock.t = 500
    progress_mod.beat()
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.4, "0 s"), (59.6, "1 min 0 s"), (200, "3 min 20 s"), (7500, "2 h 05 min"), (273600, "3 d 4 h")],
)
def test_format_duration(seconds, text):
    assert progress_mod.format_duration(seconds) == text


def test_without_a_terminal_progress_is_log_lines(monkeypatch):
    monkeypatch.delenv("BUILDSEG_PROGRESS", raising=False)
    monkeypatch.setattr(progress_mod.sys.stderr, "isatty", lambda: False)
    monkeypatch.setenv("BUILDSEG_LOG_SECONDS", "5")
    bar = progress_mod.progress(10, "x")
    assert isinstance(bar, progress_mod.LogLines) and bar.every == 5
    bar.close()
