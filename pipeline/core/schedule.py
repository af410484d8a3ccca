"""Learning-rate schedules: pure functions of the global step, so a resumed run needs no scheduler state.

Every schedule warms up linearly for ``warmup`` steps, then decays from ``base`` to ``base * min_ratio``
at step ``total`` by the shape named in ``optim.schedule``:

* ``cosine``: half a cosine (the default);
* ``poly``: ``(1 - progress) ** 0.9``, DeepLab's "poly" policy, common in segmentation;
* ``linear``: a straight line;
* ``constant``: no decay (the plain loop's Adam at a fixed rate, for comparison).
"""

from __future__ import annotations

import math
from collections.abc import Callable

# Shape of the decay after warm-up: progress in [0, 1] -> factor in [0, 1] (1 at the start, 0 at the end).
SCHEDULES: dict[str, Callable[[float], float]] = {
    "cosine": lambda p: 0.5 * (1 + math.cos(math.pi * p)),
    "poly": lambda p: (1 - p) ** 0.9,
    "linear": lambda p: 1 - p,
    "constant": lambda p: 1.0,
}


def lr_at(
    step: int, total: int, warmup: int, base: float, min_ratio: float, schedule: str = "cosine"
) -> float:
    """The rate of global ``step`` (0-based) of ``total``: linear warm-up, then ``SCHEDULES[schedule]``
    from ``base`` down to ``base * min_ratio``."""
    if warmup > 0 and step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (min_ratio + (1 - min_ratio) * SCHEDULES[schedule](progress))
