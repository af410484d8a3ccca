"""The run folder: what ``make train`` and ``make tune`` leave, and every reader of it.

Each file of a run has one module that writes and reads it: ``manifest`` (manifest.yaml), ``oof``
(fold<k>/oof.npz), ``history`` (fold<k>/metrics.csv), ``folder`` (the folder itself: lock, fresh or
resumed, the newest run or submission) and ``run`` (a finished run, read for reports and notebooks).
"""

from __future__ import annotations

from pipeline.core.errors import BuildsegError

TRAIN_HINT = "run `make train` first (or RUN=runs/<run> to pick another run)"


class RunError(BuildsegError, ValueError):
    """A run folder that cannot be read; the message names the file and the command that writes it."""
