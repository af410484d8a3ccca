"""pipeline.model.pretrained: pretrained weights offline fail fast with both fixes; no test downloads."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.core.config import Config, ConfigError, ModelConfig, save_config
from pipeline.model import pretrained
from pipeline.model.registry import (
    build_arch,
    build_model,
    check_model,
)

OFFLINE_R34 = (
    "model.encoder_weights=imagenet: the resnet34 imagenet weights are not in the local cache and "
    "huggingface.co cannot be reached from this machine (offline?); train from scratch with "
    '`make train ARGS="model.encoder_weights=null"`, or run `make weights ENCODER=resnet34 '
    "OUT=weights/resnet34-imagenet.pth` on a machine with internet, copy weights/resnet34-imagenet.pth here "
    'and train with `make train ARGS="model.encoder_weights=weights/resnet34-imagenet.pth"`'
)


def test_default_weights_are_imagenet():
    assert ModelConfig().encoder_weights == "imagenet"


def test_offline_named_weights_fail_with_both_fixes(network):
    cfg = Config(model=ModelConfig())  # the default: Unet / resnet34 / imagenet
    with pytest.raises(ConfigError) as e:
        check_model(cfg)
    assert str(e.value) == OFFLINE_R34
    assert network == [
        "https://huggingface.co/smp-hub/resnet34.imagenet/resolve/7a57b34f723329ff020b3f8bc41771163c519d0c/"
        "model.safetensors"
    ]
    with pytest.raises(ConfigError) as e:  # building checks too: no ~30 s of retries inside smp
        build_model(cfg)
    assert str(e.value) == OFFLINE_R34


def test_offline_training_fails_before_any_run_folder(network, tiny_cfg, tmp_path, capsys):
    """`make train` offline with the default weights: one line with both fixes, no run folder, no folds."""
    from pipeline.train import trainer

    cfg = tiny_cfg("model.encoder_weights=imagenet")  # timm's MobileNetV3, from the Hugging Face Hub
    save_config(cfg, tmp_path / "cfg.yaml")
    assert trainer.main(["--config", str(tmp_path / "cfg.yaml")]) == 2
    enc = "tu-mobilenetv3_small_050"
    assert capsys.readouterr().err == (
        f"error: model.encoder_weights=imagenet: the {enc} imagenet weights are not in the local cache and "
        "huggingface.co cannot be reached from this machine (offline?); train from scratch with "
        f'`make train ARGS="model.encoder_weights=null"`, or run `make weights ENCODER={enc} '
        f"OUT=weights/{enc}-imagenet.pth` on a machine with internet, copy weights/{enc}-imagenet.pth here "
        f'and train with `make train ARGS="model.encoder_weights=weights/{enc}-imagenet.pth"`\n'
    )
    assert not Path(cfg.train.runs_dir).exists()


def test_cached_weights_need_no_network(network, tmp_path):
    from huggingface_hub import constants

    rev = "7a57b34f723329ff020b3f8bc41771163c519d0c"  # smp 0.6.0's pinned resnet34.imagenet commit
    snapshot = Path(constants.HF_HUB_CACHE) / "models--smp-hub--resnet34.imagenet" / "snapshots" / rev
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="not in the local cache"):  # half a download is not a cache
        check_model(Config())
    (snapshot / "model.safetensors").write_bytes(b"")
    network.clear()
    check_model(Config())
    assert network == []


def test_reachable_host_passes_the_check_without_downloading(network):
    network.reachable = True
    check_model(Config(model=ModelConfig(arch="FCN8s", encoder="vgg16")))  # torchvision's VGG16
    assert network == ["https://download.pytorch.org/models/vgg16-397923af.pth"]


def test_a_download_that_fails_inside_smp_is_the_same_clear_error(network, monkeypatch):
    import segmentation_models_pytorch as smp
    from huggingface_hub.errors import LocalEntryNotFoundError

    def drop(*args, **kwargs):
        raise LocalEntryNotFoundError("Connection reset by peer")

    network.reachable = True  # the check passed; the connection drops during the download
    monkeypatch.setattr(smp.encoders, "hf_hub_download", drop)
    with pytest.raises(ConfigError) as e:
        build_arch(ModelConfig())
    assert str(e.value).startswith(
        "model.encoder_weights=imagenet: downloading the resnet34 weights failed (LocalEntryNotFoundError: "
        "Connection reset by peer); train from scratch with "
        '`make train ARGS="model.encoder_weights=null"`, or run `make weights ENCODER=resnet34 '
        "OUT=weights/resnet34-imagenet.pth` on a machine with internet"
    )


def test_unknown_weight_names_fail_before_any_download(network):
    with pytest.raises(ConfigError, match="smp has no such weights for resnet34; use one of imagenet"):
        check_model(Config(model=ModelConfig(encoder_weights="imagenet21k")))
    assert network == []


def test_real_reachability_check_is_bounded(monkeypatch):
    import socket
    import time

    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    try:
        assert pretrained._weights_reachable(f"http://127.0.0.1:{port}/w.pth", timeout=2)
        monkeypatch.setenv("https_proxy", f"http://127.0.0.1:{port}")  # through the proxy, as pip would
        monkeypatch.delenv("no_proxy", raising=False)
        monkeypatch.delenv("NO_PROXY", raising=False)
        assert pretrained._weights_reachable("https://weights.invalid/w.pth", timeout=2)
    finally:
        server.close()
    monkeypatch.delenv("https_proxy")
    assert not pretrained._weights_reachable(f"http://127.0.0.1:{port}/w.pth", timeout=2)  # refused

    def hang(*args, **kwargs):  # a DNS server that answers late, and then with a failure
        time.sleep(3)
        raise socket.gaierror("Temporary failure in name resolution")

    monkeypatch.setattr(pretrained.socket, "create_connection", hang)
    start = time.monotonic()
    assert not pretrained._weights_reachable("https://huggingface.co/x", timeout=0.2)
    assert time.monotonic() - start < 1.5


def test_hf_hub_offline_mode_is_named(network, monkeypatch):
    monkeypatch.setattr(pretrained, "_hub_offline", lambda: True)
    with pytest.raises(
        ConfigError, match='HF_HUB_OFFLINE is set .*model.encoder_weights=null"`, or run `make'
    ):
        check_model(Config())
    assert network == []  # no connection tried: huggingface_hub would refuse to download anyway
