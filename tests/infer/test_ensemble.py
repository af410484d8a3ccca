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

from pipeline.core.config import load_config, save_config, to_dict
from pipeline.core.io import CheckpointError
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


def test_a_best_pt_of_another_recipe_in_the_run_folder_is_refused_by_every_loader(two_models):
    """make tune refused it while make submit used it without a word: the check is now in load_model."""
    run, _ = two_models
    cfg = load_config(None, [*TINY_OVERRIDES, "name=ens"])
    save_config(cfg, run / "config.yaml")
    load_ensemble(load_manifest(run), CPU)  # both folds are the run's
    other = load_config(None, [*TINY_OVERRIDES, "name=ens", "model.decoder_channels=[16,16,8,8,8]"])
    model = build_model(other, pretrained=False)
    write_checkpoint(
        run / "fold1/best.pt", BestCheckpoint(model.state_dict(), to_dict(other), 1, 1, "val_dice", 0, 0.5, 0)
    )
    with pytest.raises(
        CheckpointError, match=r"fold1/best.pt was trained with another config .*decoder_channels"
    ):
        load_ensemble(load_manifest(run), CPU)


# ----------------------------------------------------------------------------- blends (make blend)


@pytest.fixture
def blend_of_two_runs(two_models, tmp_path: Path):
    """Run ``..`` (two folds, weight 0.7, TTA flip), run ``../b`` (one model, weight 0.3, no TTA) and run
    ``../c`` (weight 0: never loaded) in a blend whose own ``tta`` key is d4."""
    from pipeline.runs.manifest import Member

    run, models = two_models
    cfg = load_config(None, [*TINY_OVERRIDES, "name=b"])
    torch.manual_seed(3)
    third = build_model(cfg, pretrained=False).eval()
    ckpt = BestCheckpoint(third.state_dict(), to_dict(cfg), 0, 1, "val_dice", 0.0, 0.5, 0)
    write_checkpoint(tmp_path / "b/fold0/best.pt", ckpt)
    (tmp_path / "c").mkdir()
    members = (
        Member("..", 0.7, "flip", ("fold0/best.pt", "fold1/best.pt")),
        Member("../b", 0.3, "none", ("fold0/best.pt",)),
        Member("../c", 0.0, "none", ("fold0/best.pt",)),  # weight 0: its missing checkpoint is not read
    )
    infer = dataclasses.replace(cfg.infer, tta="d4")
    write_manifest(Manifest(tmp_path / "blend", (), infer, 1, "", {}, members))
    return load_manifest(tmp_path / "blend"), [*models, third]


def test_a_blend_weighs_each_runs_fold_mean_with_its_own_tta(blend_of_two_runs):
    from pipeline.infer.ensemble import BlendMember

    manifest, (m1, m2, m3) = blend_of_two_runs
    loaded, _ = load_ensemble(manifest, CPU)
    assert [(m.member, m.weight, m.tta) for m in loaded] == [
        (0, 0.7, "flip"),
        (0, 0.7, "flip"),
        (1, 0.3, "none"),
    ]
    assert all(isinstance(m, BlendMember) for m in loaded)
    x = _images()
    a = (predict_batch([m1], x, "flip") + predict_batch([m2], x, "flip")) / 2
    want = (0.7 * a + 0.3 * predict_batch([m3], x, "none")) / (0.7 + 0.3)
    torch.testing.assert_close(predict_batch(loaded, x, "d4"), want, rtol=0, atol=1e-6)  # d4: the blend's own
    # Another TTA set than the blend's applies to every run (make submit TTA=none).
    a = (predict_batch([m1], x, "none") + predict_batch([m2], x, "none")) / 2
    want = 0.7 * a + 0.3 * predict_batch([m3], x, "none")
    torch.testing.assert_close(predict_batch(loaded, x, "none"), want, rtol=0, atol=1e-6)


def test_a_blend_of_one_run_predicts_that_run_bit_for_bit(two_models, tmp_path):
    from pipeline.runs.manifest import Member

    run, _ = two_models
    own = load_manifest(run)
    member = Member("..", 1.0, own.infer.tta, own.checkpoints)
    write_manifest(Manifest(tmp_path / "blend", (), own.infer, 1, "", {}, (member,)))
    plain, _ = load_ensemble(own, CPU)
    blended, _ = load_ensemble(load_manifest(tmp_path / "blend"), CPU)
    x = _images()
    assert torch.equal(predict_batch(blended, x, own.infer.tta), predict_batch(plain, x, own.infer.tta))


def test_with_tta_gives_every_run_of_a_blend_the_set_asked_for(blend_of_two_runs):
    from pipeline.infer.ensemble import with_tta

    manifest, _ = blend_of_two_runs
    asked = with_tta(manifest, "flip")
    assert asked.infer.tta == "flip" and [m.tta for m in asked.members] == ["flip"] * 3
    assert asked.checkpoints == manifest.checkpoints and [m.weight for m in asked.members] == [0.7, 0.3, 0.0]
    assert [m.tta for m in manifest.members] == ["flip", "none", "none"]  # the blend itself is unchanged


def test_every_prediction_from_a_run_is_in_the_runs_precision_and_memory_layout(tmp_path):
    """predict, pseudo, predict-scene and submit pass no precision: the models load_ensemble rebuilt
    bring their run's train.amp (bf16 here, on CPU too) and train.channels_last, as the OOF pass used
    them; once they predicted in float32 whatever the run's OOF pass and tuned threshold had used."""
    cfg = load_config(None, [*TINY_OVERRIDES, "name=bf16", "train.amp=bf16", "train.channels_last=true"])
    torch.manual_seed(0)
    model = build_model(cfg, pretrained=False).eval()
    ckpt = BestCheckpoint(model.state_dict(), to_dict(cfg), 0, 1, "val_dice", 0.0, 0.5, 0)
    write_checkpoint(tmp_path / "fold0/best.pt", ckpt)
    write_manifest(Manifest(tmp_path, ("fold0/best.pt",), dataclasses.replace(cfg.infer, tta="none")))
    models, _ = load_ensemble(load_manifest(tmp_path), CPU)
    conv = next(p for p in models[0].parameters() if p.dim() == 4)
    assert conv.is_contiguous(memory_format=torch.channels_last)
    x = _images()
    own = predict_batch(models, x, "none")
    torch.testing.assert_close(own, predict_batch(models, x, "none", amp="bf16"), rtol=0, atol=0)
    assert not torch.equal(own, predict_batch(models, x, "none", amp="none"))
