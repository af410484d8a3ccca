"""pipeline.core.progress: a log file gets a progress line every N seconds instead of nothing."""

from __future__ import annotations

from pipeline.core import progress as progress_mod


def test_log_lines_every_n_seconds_with_rate_and_postfix(monkeypatch, capsys):
    clock = iter([0.0, 10.0, 30.0, 65.0, 70.0, 130.0, 131.0])
    monkeypatch.setattr(progress_mod.time, "monotonic", lambda: next(clock))
    bar = progress_mod.LogLines(total=100, desc="fold 0 epoch 1/3", unit="step", every=60)  # t=0
    bar.set_postfix(loss="0.5200")
    bar.update(10)  # t=10: quiet
    bar.update(10)  # t=30: quiet
    bar.update(10)  # t=65: a line
    bar.update(10)  # t=70: quiet
    bar.update(10)  # t=130: a line
    bar.close()  # t=131: the closing line
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "fold 0 epoch 1/3: 30/100 (30%), 0.5 step/s, loss 0.5200",
        "fold 0 epoch 1/3: 50/100 (50%), 0.4 step/s, loss 0.5200",
        "fold 0 epoch 1/3: 50/100 (50%), 0.4 step/s, loss 0.5200",
    ]


def test_without_a_terminal_progress_is_log_lines(monkeypatch):
    monkeypatch.delenv("BUILDSEG_PROGRESS", raising=False)
    monkeypatch.setattr(progress_mod.sys.stderr, "isatty", lambda: False)
    monkeypatch.setenv("BUILDSEG_LOG_SECONDS", "5")
    bar = progress_mod.progress(10, "x")
    assert isinstance(bar, progress_mod.LogLines) and bar.every == 5
