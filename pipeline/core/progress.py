"""Progress for every long stage: a tqdm bar on a terminal, a plain line every N seconds in a log file.

A job whose output goes to a file (nohup, a cluster scheduler, CI) gets no bar, and a 10-minute epoch
would otherwise print nothing at all; :class:`LogLines` prints ``desc: 120/361 (33%), 4.1 it/s, loss
0.52`` at most every ``BUILDSEG_LOG_SECONDS`` (default 60). ``BUILDSEG_PROGRESS=1`` forces the bar.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any


class LogLines:
    """The subset of tqdm's interface the pipeline uses (update, set_postfix, close), as log lines."""

    def __init__(
        self, total: int | None, initial: int = 0, desc: str = "", unit: str = "it", every: float = 60.0
    ):
        self.total, self.n, self.desc, self.unit, self.every = total, initial, desc, unit, every
        self.start = self.last = time.monotonic()
        self.start_n = initial
        self.postfix = ""

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self._print(now)

    def set_postfix(self, **kwargs: Any) -> None:
        self.postfix = ", ".join(f"{k} {v}" for k, v in kwargs.items())

    def close(self) -> None:
        if self.n > self.start_n and self.last > self.start:  # something was printed: say it ended
            self._print(time.monotonic())

    def _print(self, now: float) -> None:
        rate = (self.n - self.start_n) / max(now - self.start, 1e-9)
        done = f"{self.n}/{self.total} ({self.n / self.total:.0%})" if self.total else f"{self.n}"
        extra = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {done}, {rate:.1f} {self.unit}/s{extra}", file=sys.stderr, flush=True)


def progress(total: int | None, desc: str, initial: int = 0, unit: str = "it", leave: bool = False) -> Any:
    """A tqdm bar when stderr is a terminal (or ``BUILDSEG_PROGRESS=1``), else :class:`LogLines`."""
    if sys.stderr.isatty() or os.environ.get("BUILDSEG_PROGRESS") == "1":
        from tqdm import tqdm  # not tqdm.auto: it warns in Jupyter without ipywidgets

        return tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=leave, dynamic_ncols=True)
    return LogLines(total, initial, desc, unit, float(os.environ.get("BUILDSEG_LOG_SECONDS", "60")))
