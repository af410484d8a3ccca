"""One source of defaults: every function and command-line default that a config setting also sets is the
config's (``pipeline.core.config``'s dataclasses), so a user never gets two answers to one question."""

from __future__ import annotations

import argparse
import inspect

import pytest

from pipeline.core.config import DataConfig, InferConfig, TrainConfig
from pipeline.core.device import default_workers, resolve_workers
from pipeline.geo import scene
from pipeline.infer import ensemble, predict, pseudo, submit

# parameter name -> the config default it stands for
SETTINGS = {
    "num_workers": DataConfig.num_workers,
    "batch_size": InferConfig.batch_size,
    "threshold": InferConfig.threshold,
    "min_area": InferConfig.min_area,
    "max_images": InferConfig.max_images,
    "tile": InferConfig.tile_size,
    "overlap": InferConfig.overlap,
}
FUNCTIONS = [
    ensemble.predict_batch,
    ensemble.iter_predictions,
    submit.predict_and_encode,
    submit.make_submission,
    predict.predict_labels,
    predict.predict_to_dir,
    pseudo.make_pseudo_labels,
    scene.predict_scene,
]


@pytest.mark.parametrize("fn", FUNCTIONS, ids=lambda f: f"{f.__module__}.{f.__name__}")
def test_function_defaults_are_the_configs(fn):
    params = inspect.signature(fn).parameters
    found = {
        n: p.default for n, p in params.items() if n in SETTINGS and p.default is not inspect.Parameter.empty
    }
    assert found, f"{fn.__name__} has none of the settings: drop it from this list"
    wrong = {n: v for n, v in found.items() if v is not None and v != SETTINGS[n]}
    assert wrong == {}


def _defaults(main, argv):
    """The argparse defaults a CLI ``main`` would use, without running it."""
    seen = {}
    original = argparse.ArgumentParser.parse_args

    def capture(self, args=None, namespace=None):
        seen.update(vars(original(self, argv)))
        raise SystemExit(0)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_args", capture)
        with pytest.raises(SystemExit):
            main(argv)
    return seen


def test_cli_defaults_are_the_configs():
    from pipeline.data import folds

    assert _defaults(submit.main, [])["workers"] == DataConfig.num_workers
    assert _defaults(predict.main, [])["workers"] == DataConfig.num_workers
    made = _defaults(folds.main, ["--data", "x"])
    assert (made["n_folds"], made["seed"]) == (DataConfig.n_folds, TrainConfig.seed)


def test_one_rule_for_worker_counts():
    assert resolve_workers(-1) == default_workers() and resolve_workers(0) == 0 and resolve_workers(3) == 3
