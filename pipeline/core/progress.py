"""Progress for every long stage: a tqdm bar on a terminal, a line at least every N seconds in a log file.

A job whose output goes to a file (nohup, a cluster scheduler, CI) gets no bar, and a 10-minute epoch
would otherwise print nothing at all. :class:`LogLines` prints ``desc: 120/361 (33%), 4.1 step/s,
1 min 30 s elapsed, ETA 2 min 59 s, loss 0.52`` when nothing was printed for ``BUILDSEG_LOG_SECONDS``
(default 60), and a heartbeat thread prints the line of the innermost phase in progress when its work
gives no chance to (one step or one forward pass that takes minutes on a CPU): while a phase is open,
a log never stays silent for longer than that. ``BUILDSEG_PROGRESS=1`` forces the bar.

Every line and every ETA reads the one clock :func:`clock` (tests replace ``progress.clock`` with a
fake one and call :func:`beat` where the heartbeat thread would).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
import weakref
from typing import Any

clock = time.monotonic  # the clock of every line, rate and ETA; replaced by tests (simulated time)

HEARTBEAT_SECONDS = 1.0  # how often (real time) the heartbeat looks whether a line is due: gaps <= N + 1 s


def format_duration(seconds: float) -> str:
    """``42 s``, ``3 min 20 s``, ``2 h 05 min``, ``3 d 4 h``: a duration a person reads at a glance."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def format_rate(count: float, seconds: float, unit: str) -> str:
    """``4.1 step/s``, or ``98.2 s/step`` when slower than one a second (never ``0.0 step/s``)."""
    if count <= 0:
        return f"no {unit} finished yet"
    rate = count / max(seconds, 1e-9)
    return f"{rate:.1f} {unit}/s" if rate >= 1 else f"{seconds / count:.1f} s/{unit}"


class _Log:
    """What every log-line bar of this process shares: when the last line was printed and which phases
    are open (innermost last), so one quiet timer covers nested phases and the heartbeat."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.reset()
        self.thread: threading.Thread | None = None

    def reset(self) -> None:
        """Start the quiet timer now, with no phase open (a process start; tests with a fake clock)."""
        self.last_line = clock()
        # Weak: a bar an exception dropped without close() leaves the list when it is collected,
        # instead of being announced by the heartbeat for the rest of the process.
        self.active: list[weakref.ref[LogLines]] = []

    def innermost(self) -> LogLines | None:
        with self.lock:
            self.active = [r for r in self.active if r() is not None]
            return self.active[-1]() if self.active else None

    def beat(self, now: float | None = None) -> None:
        """Print the innermost open phase's line if nothing was printed for its ``every`` seconds."""
        with self.lock:
            now = clock() if now is None else now
            bar = self.innermost()
            if bar is not None and now - self.last_line >= bar.every:
                bar.print_line(now)

    def start_heartbeat(self) -> None:
        with self.lock:
            if self.thread is None and HEARTBEAT_SECONDS > 0:
                self.thread = threading.Thread(target=self._heartbeat, name="buildseg-heartbeat", daemon=True)
                self.thread.start()

    def _heartbeat(self) -> None:
        while True:
            time.sleep(max(HEARTBEAT_SECONDS, 0.1))  # re-read: a test may set it to 0 (no thread)
            self.beat()


LOG = _Log()


def beat(now: float | None = None) -> None:
    """What the heartbeat thread does every few seconds (tests call it at simulated times)."""
    LOG.beat(now)


class LogLines:
    """The subset of tqdm's interface the pipeline uses (update, set_postfix, close, ``with``), as log
    lines; ``total=None`` is a phase without a count (elapsed time only)."""

    def __init__(
        self, total: int | None, initial: int = 0, desc: str = "", unit: str = "it", every: float = 60.0
    ):
        self.total, self.n, self.desc, self.unit, self.every = total, initial, desc, unit, every
        self.start = self.updated = clock()
        self.start_n = initial
        self.postfix = ""
        self.printed_n: int | None = None  # n at this bar's last line; None: it printed nothing yet
        with LOG.lock:
            LOG.active.append(weakref.ref(self))
        LOG.start_heartbeat()

    def update(self, n: int = 1) -> None:
        self.n += n
        self.updated = clock()
        LOG.beat(self.updated)

    def set_postfix(self, **kwargs: Any) -> None:
        self.postfix = ", ".join(f"{k} {v}" for k, v in kwargs.items())

    def close(self) -> None:
        """Leave the phase; say where it ended if it printed a line that is now out of date (a line
        already at the final count is not repeated)."""
        with LOG.lock:
            LOG.active = [r for r in LOG.active if r() is not None and r() is not self]
            if self.printed_n is not None and self.printed_n != self.n:
                self.print_line(clock())

    def __enter__(self) -> LogLines:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def line(self, now: float) -> str:
        """``desc: n/total (p%), rate, elapsed, ETA, postfix``; the rate is of the finished units (up to
        the last update), and the ETA counts the unit in progress as partly done."""
        done, busy = self.n - self.start_n, self.updated - self.start
        parts = [f"{self.n}/{self.total} ({self.n / self.total:.0%})" if self.total else f"{self.n}"]
        if self.total is None and self.n == 0:
            parts = []  # a phase without a count: its elapsed time says it is alive
        else:
            parts.append(format_rate(done, busy, self.unit))
        parts.append(f"{format_duration(now - self.start)} elapsed")
        if self.total and done > 0 and self.n < self.total:
            eta = (self.total - self.n) * busy / done - (now - self.updated)
            parts.append(f"ETA {format_duration(eta)}")
        if self.postfix:
            parts.append(self.postfix)
        return f"{self.desc}: {', '.join(parts)}"

    def print_line(self, now: float) -> None:
        with LOG.lock:
            print(self.line(now), file=sys.stderr, flush=True)
            LOG.last_line, self.printed_n = now, self.n


def _terminal() -> bool:
    return sys.stderr.isatty() or os.environ.get("BUILDSEG_PROGRESS") == "1"


def _every() -> float:
    return float(os.environ.get("BUILDSEG_LOG_SECONDS", "60"))


def progress(total: int | None, desc: str, initial: int = 0, unit: str = "it", leave: bool = False) -> Any:
    """A tqdm bar when stderr is a terminal (or ``BUILDSEG_PROGRESS=1``), else :class:`LogLines`."""
    if _terminal():
        from tqdm import tqdm  # not tqdm.auto: it warns in Jupyter without ipywidgets

        return tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=leave, dynamic_ncols=True)
    return LogLines(total, initial, desc, unit, _every())


def phase(desc: str) -> Any:
    """A whole command or stage as one open phase (``with phase("train demo"): ...``): in a log file its
    heartbeat speaks in the gaps no inner bar covers (start-up, loading, writing), so a line comes at
    least every ``BUILDSEG_LOG_SECONDS``; on a terminal nothing (the bars inside show progress)."""
    return contextlib.nullcontext() if _terminal() else LogLines(None, desc=desc, every=_every())
