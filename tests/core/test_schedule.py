"""Learning-rate schedules: known values of every shape, warm-up, and the registry in the config check."""

from __future__ import annotations

import pytest

from pipeline.core.config import ConfigError, load_config
from pipeline.core.schedule import SCHEDULES, lr_at


def test_cosine_known_values():
    # warm-up: linear from base/warmup to base; then cosine to base*min_ratio at the last step.
    assert lr_at(0, 100, 10, 1.0, 0.0) == pytest.approx(0.1)
    assert lr_at(9, 100, 10, 1.0, 0.0) == pytest.approx(1.0)
    assert lr_at(10, 100, 10, 1.0, 0.0) == pytest.approx(1.0)
    assert lr_at(55, 100, 10, 1.0, 0.0) == pytest.approx(0.5)
    assert lr_at(100, 100, 10, 1.0, 0.1) == pytest.approx(0.1)
    assert lr_at(0, 100, 0, 2.0, 0.0) == pytest.approx(2.0)


@pytest.mark.parametrize(
    ("schedule", "half"),  # the rate halfway through the decay, base 1, min_ratio 0
    [("cosine", 0.5), ("poly", 0.5**0.9), ("linear", 0.5), ("constant", 1.0)],
)
def test_every_schedule_known_values(schedule, half):
    assert lr_at(10, 110, 10, 1.0, 0.0, schedule) == pytest.approx(1.0)  # end of warm-up: the base
    assert lr_at(60, 110, 10, 1.0, 0.0, schedule) == pytest.approx(half)
    end = 1.0 if schedule == "constant" else 0.2
    assert lr_at(110, 110, 10, 1.0, 0.2, schedule) == pytest.approx(end)  # never below base * min_ratio


def test_every_schedule_is_monotone_after_warm_up():
    for name in SCHEDULES:
        rates = [lr_at(s, 50, 5, 1e-3, 0.01, name) for s in range(5, 51)]
        assert all(a >= b for a, b in zip(rates, rates[1:])), name


def test_unknown_schedule_is_a_config_error():
    with pytest.raises(ConfigError, match="optim.schedule must be one of cosine, poly"):
        load_config(None, ["optim.schedule=cosin"])
