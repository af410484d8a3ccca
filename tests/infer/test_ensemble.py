"""pipeline.infer.ensemble: models rebuilt from their checkpoints alone; an ensemble of one is that model,
an ensemble of several the mean of its members' probabilities, whatever the forward's size bound."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_OVERRIDES
from PIL import Image

from pipeline.core.config import load_config, to_dict
from pipeline.data.dataset import Split
from pipeline.infer.ensemble import iter_predictions, load_ensemble, load_model, predict_batch
from pipeline.model.registry import build_model
from pipeline.runs.checkpoint import BestCheckpoint, write_checkpoint
from pipeline.runs.manifest import Manifest, load_manifest, write_manifest

CPU = torch.device("cpu")


@pytest.fixture
def two_models(tmp_path: Path):
    """A run folder of two random tiny models (different seeds) with a manifest, and the models."""
    cfg = load_config(None, [*TINY_OVERRIDES, "name=ens"])
    models = []
    for fold, seed in enumerate((1, 2)):
        torch.manual_seed(seed)
        model = build_model(cfg, pretrained=False).eval()
        ckpt = BestCheckpoint(model.state_dict(), to_dict(cfg), fold, 1, "val_dice", 0.0, 0.5, 0)
        write_checkpoint(tmp_path / f"fold{fold}/best.pt", ckpt)
        models.append(model)
    infer = dataclasses.replace(cfg.infer, tta="none", batch_size=3)
    write_manifest(Manifest(tmp_path, ("fold0/best.pt", "fold1/best.pt"), infer))
    return tmp_path, models


def _images(n: int = 5, size: int = 32) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(0).integers(0, 256, (n, 3, size, size), dtype=np.uint8))


def test_a_model_rebuilt_from_its_checkpoint_predicts_what_it_predicted(two_models):
    run, models = two_models
    rebuilt, cfg, state = load_model(run / "fold1/best.pt")
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), models[1](x), rtol=0, atol=0)
    assert state.fold == 1 and cfg.name == "ens"


def test_an_ensemble_of_one_is_that_model(two_models):
    run, models = two_models
    x = _images()
    with torch.no_grad():
        own = torch.sigmoid(models[0](x))
        own_flip = (
            own
            + torch.sigmoid(models[0](x.flip(-1))).flip(-1)
            + torch.sigmoid(models[0](x.flip(-2))).flip(-2)
        ) / 3
    torch.testing.assert_close(predict_batch([models[0]], x, "none"), own, rtol=0, atol=1e-6)
    torch.testing.assert_close(predict_batch([models[0]], x, "flip"), own_flip, rtol=0, atol=1e-6)


def test_an_ensemble_is_the_mean_of_its_members_at_any_forward_size(two_models):
    run, models = two_models
    x = _images()
    each = [predict_batch([m], x, "d4") for m in models]
    mean = (each[0] + each[1]) / 2
    torch.testing.assert_close(predict_batch(models, x, "d4"), mean, rtol=0, atol=1e-6)
    for max_images in (1, 3, 8):  # the bound on one forward changes the batching, never the result
        torch.testing.assert_close(
            predict_batch(models, x, "d4", max_images=max_images), mean, rtol=0, atol=1e-5
        )


def test_iter_predictions_streams_the_split_in_order_with_the_manifest_models(two_models, tmp_path):
    run, models = two_models
    x = _images()
    paths = []
    for i, img in enumerate(x.numpy().transpose(0, 2, 3, 1)):
        paths.append(tmp_path / f"t{i}.png")
        Image.fromarray(img).save(paths[-1])
    split = Split([p.name for p in paths], paths, None)
    loaded, _ = load_ensemble(load_manifest(run), CPU)
    batches = list(iter_predictions(loaded, split, "none", CPU, batch_size=2, num_workers=0))
    assert [n for names, _ in batches for n in names] == split.names and [len(n) for n, _ in batches] == [
        2,
        2,
        1,
    ]
    expected = predict_batch(models, x, "none")[:, 0].numpy()
    np.testing.assert_allclose(np.concatenate([p for _, p in batches]), expected, rtol=0, atol=1e-6)
    masks = np.concatenate([m for _, m in iter_predictions(loaded, split, "none", CPU, 2, 0, threshold=0.5)])
    np.testing.assert_array_equal(masks, (expected > 0.5).astype(np.uint8))
