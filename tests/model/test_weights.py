"""pipeline.model.weights (`make weights`): pretrained encoder weights saved to a file on a machine with
internet,
loaded bit for bit by training on one without. No test downloads: the builder is replaced by a random
init, the caches and the reachability check by conftest's ``network``."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import pytest
import torch

from pipeline.core.config import Config, ConfigError, ModelConfig
from pipeline.model import weights
from pipeline.model.registry import build_arch, check_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def random_builder(monkeypatch):
    """``build_encoder`` with a seeded random init instead of the download; records the configs asked for."""
    asked: list[ModelConfig] = []

    def build(cfg: ModelConfig) -> torch.nn.Module:
        asked.append(cfg)
        torch.manual_seed(1)
        return build_arch(dataclasses.replace(cfg, encoder_weights=None)).encoder

    monkeypatch.setattr(weights, "build_encoder", build)
    return asked


def test_saved_file_is_what_training_loads(random_builder, network, monkeypatch, tmp_path, capsys):
    """make weights ENCODER=resnet34 (default OUT) -> model.encoder_weights=<file>: the same tensors."""
    network.reachable = True
    monkeypatch.chdir(tmp_path)
    assert weights.main(["--encoder", "resnet34"]) == 0
    path = Path("weights/resnet34-imagenet.pth")
    assert f"model.encoder_weights={path}" in capsys.readouterr().out
    asked = [(c.encoder, c.encoder_weights, c.arch) for c in random_builder]
    assert asked == [("resnet34", "imagenet", "Unet")]
    saved = torch.load(path, map_location="cpu", weights_only=True)
    assert (saved["encoder"], saved["weights"]) == ("resnet34", "imagenet")
    assert not any(p.name.endswith(".tmp") for p in path.parent.iterdir())  # written atomically

    cfg = Config(model=ModelConfig(encoder="resnet34", encoder_weights=str(path)))
    check_model(cfg)
    torch.manual_seed(2)  # another random init: a load that did nothing would fail the comparison
    loaded = build_arch(cfg.model).encoder.state_dict()
    assert set(loaded) == set(saved["state_dict"])
    for key, value in saved["state_dict"].items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0)


def test_a_file_of_another_encoder_is_refused(random_builder, network, tmp_path):
    network.reachable = True
    out = tmp_path / "r34.pth"
    assert weights.main(["--encoder", "resnet34", "--out", str(out)]) == 0
    cfg = Config(model=ModelConfig(encoder="resnet18", encoder_weights=str(out)))
    message = (
        f"{out} holds resnet34 encoder weights but model.encoder=resnet18; set model.encoder=resnet34, or "
        "make resnet18 weights with `make weights ENCODER=resnet18 OUT=weights/resnet18-imagenet.pth` and "
        "point model.encoder_weights at that file"
    )
    with pytest.raises(ConfigError) as e:
        check_model(cfg)  # before training makes any folder
    assert str(e.value) == message
    with pytest.raises(ConfigError) as e:
        build_arch(cfg.model)  # same shapes or not, a named file never half-loads into another encoder
    assert str(e.value) == message


def test_offline_it_fails_fast_and_writes_nothing(random_builder, network, tmp_path, capsys):
    out = tmp_path / "weights" / "r34.pth"
    assert weights.main(["--encoder", "resnet34", "--out", str(out)]) == 2
    assert capsys.readouterr().err == (
        "error: the resnet34 imagenet weights are not in the local cache and huggingface.co cannot be "
        "reached from this machine (offline?); run this on a machine with internet and copy "
        f"{out} to this one\n"
    )
    assert random_builder == [] and not out.parent.exists()


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--encoder", "resnet35"], "model.encoder='resnet35' is not an smp encoder; did you mean"),
        (["--encoder", "resnet34", "--weights", "ssl"], "smp has no such weights for resnet34; use one of"),
        (["--encoder", "resnet34", "--weights", "null"], "random init needs no file"),
        (["--encoder", "resnet34", "--out", "w.txt"], "--out w.txt: give a file name ending in .pth or .pt"),
        (["--arch", "FCN8s", "--encoder", "vgg16", "--weights", "ssl"], "FCN8s encoder_weights must be null"),
    ],
)
def test_bad_requests_are_one_line_errors(
    argv, fragment, random_builder, network, monkeypatch, tmp_path, capsys
):
    network.reachable = True
    monkeypatch.chdir(tmp_path)
    assert weights.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and fragment in err, err
    assert random_builder == [] and not (tmp_path / "weights").exists()


def test_missing_encoder_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as e:
        weights.main([])
    assert e.value.code == 2
    assert "error: the following arguments are required: --encoder" in capsys.readouterr().err


def test_make_target_passes_its_variables():
    out = subprocess.run(
        ["make", "-n", "weights", "ENCODER=resnet50", "WEIGHTS=ssl", "OUT=weights/r50.pth"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    command = " ".join(out.stdout.replace("\\\n", " ").split())  # one line, single spaces
    assert "-m pipeline.model.weights --encoder resnet50 --weights ssl --out weights/r50.pth" in command
