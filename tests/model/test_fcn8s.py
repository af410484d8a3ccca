"""pipeline.model.fcn8s: FCN-8s score layers, learned upsampling, a VGG16 features file."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.config import Config, ConfigError, ModelConfig
from pipeline.model.fcn8s import FCN8s, Upsample2x
from pipeline.model.registry import build_arch, build_model, load_encoder_weights


def _model(arch: str, encoder: str, classes: int):
    torch.manual_seed(0)
    model = ModelConfig(arch=arch, encoder=encoder, classes=classes, encoder_weights=None)  # random init
    return build_model(Config(model=model))


def test_fcn8s_score_layers_on_pool3_pool4_conv7():
    net = _model("FCN8s", "vgg16", 3).net
    assert isinstance(net, FCN8s)
    assert isinstance(net.encoder.features[16], nn.MaxPool2d)  # pool3
    assert isinstance(net.encoder.features[23], nn.MaxPool2d)  # pool4
    assert net.encoder.classifier[0].kernel_size == (7, 7)  # fc6 as a 7x7 convolution
    seen = {}
    hooks = [
        getattr(net, name).register_forward_hook(
            lambda m, i, o, name=name: seen.__setitem__(name, i[0].shape)
        )
        for name in ("score_pool3", "score_pool4", "score_fr")
    ]
    try:
        with torch.no_grad():
            net.eval()(torch.zeros(1, 3, 64, 64))
    finally:
        for h in hooks:
            h.remove()
    assert seen == {
        "score_pool3": (1, 256, 8, 8),  # stride 8
        "score_pool4": (1, 512, 4, 4),  # stride 16
        "score_fr": (1, 4096, 2, 2),  # conv7, stride 32
    }
    assert isinstance(net.upscore2.deconv, nn.ConvTranspose2d)
    with pytest.raises(ValueError, match="divisible by 32"):
        net(torch.zeros(1, 3, 40, 64))


def test_learned_2x_upsampling_starts_as_exact_bilinear():
    x = torch.randn(2, 3, 5, 7)
    expected = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    torch.testing.assert_close(Upsample2x(3)(x), expected, atol=1e-5, rtol=0)  # borders included


def test_fcn8s_loads_a_whole_vgg16_file_and_refuses_a_features_only_one(tmp_path):
    """fc6/fc7 come from the file's classifier (convolutionalised); a file without them would leave them
    random without a word, so it is refused, naming what is missing."""
    vgg = _model("Unet", "vgg16", 1).net.encoder  # smp's vgg16 encoder: keys features.N.*
    features_only = tmp_path / "vgg16-features.pth"
    torch.save(vgg.state_dict(), features_only)
    with pytest.raises(
        ConfigError, match=r"4 of its \d+ tensors are not in the file \(e.g. \['classifier.0.bias'"
    ):
        build_arch(ModelConfig(arch="FCN8s", encoder="vgg16", encoder_weights=str(features_only)))
    torch.manual_seed(0)
    whole = build_arch(ModelConfig(arch="FCN8s", encoder="vgg16", encoder_weights=None)).encoder.state_dict()
    path = tmp_path / "vgg16.pth"
    torch.save({**whole, "classifier.6.weight": torch.zeros(1000, 4096)}, path)  # + an ImageNet head
    net = build_arch(ModelConfig(arch="FCN8s", encoder="vgg16", encoder_weights=str(path)))
    torch.testing.assert_close(net.encoder.features[28].weight, whole["features.28.weight"], rtol=0, atol=0)
    assert load_encoder_weights(net.encoder, str(path)) == (len(whole), 1)  # every tensor; the head dropped
