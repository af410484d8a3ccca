"""Models: registry, shapes on CPU with random weights, FCN-8s/DeepLabV3+ structure, SegModel padding and
normalisation, local encoder weights, named weights offline (the ``network`` fixture: no test downloads).
Builds are cached: VGG16 models are large (FCN-8s 134M parameters)."""

from __future__ import annotations

import functools

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from pipeline.core.config import Config, ConfigError, DataConfig, ModelConfig
from pipeline.model.registry import (
    ARCHS,
    ASPP_RATES,
    SegModel,
    build_arch,
    build_model,
    check_model,
    count_parameters,
    load_encoder_weights,
)

CASES = [  # (arch, encoder): every registered arch, plus the tutorial's VGG16 U-Net
    ("Unet", "resnet34"),
    ("Unet", "vgg16"),
    ("UnetPlusPlus", "resnet34"),
    ("FPN", "resnet34"),
    ("DeepLabV3Plus", "resnet34"),
    ("FCN8s", "vgg16"),
]


@functools.cache
def cached_model(arch: str, encoder: str, classes: int) -> SegModel:
    torch.manual_seed(0)
    model = ModelConfig(arch=arch, encoder=encoder, classes=classes, encoder_weights=None)  # random init
    return build_model(Config(model=model))


def test_registry_covers_the_required_archs():
    assert {"Unet", "UnetPlusPlus", "FPN", "DeepLabV3Plus", "FCN8s"} <= set(ARCHS)
    assert {arch for arch, _ in CASES} == set(ARCHS)


@pytest.mark.parametrize("classes", [1, 3])
@pytest.mark.parametrize(("arch", "encoder"), CASES)
def test_forward_backward_shapes(arch, encoder, classes):
    model = cached_model(arch, encoder, classes)
    # Forward and backward on a size that needs padding (70x90 -> 96x96); batch 2 for DeepLabV3+, whose
    # image-pooling BatchNorm needs > 1 value per channel in training. Backward once only: VGG16's fc6
    # (103M weights) dominates the time on 2 cores.
    model.train().zero_grad(set_to_none=True)
    x = torch.randint(0, 256, (2 if arch == "DeepLabV3Plus" else 1, 3, 70, 90), dtype=torch.uint8)
    logits = model(x)
    assert logits.shape == (x.shape[0], classes, 70, 90)
    assert logits.dtype == torch.float32
    logits.square().mean().backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    first_conv = next(m for m in model.net.encoder.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.weight.grad is not None and first_conv.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    with torch.no_grad():  # a size that divides by 32: no padding path
        assert model.eval()(torch.zeros(1, 3, 64, 64, dtype=torch.uint8)).shape == (1, classes, 64, 64)


def test_parameter_counts_are_pinned():
    # Regressions in the builders (wrong depth, decoder, fc6 kernel) change these numbers.
    assert count_parameters(cached_model("Unet", "resnet34", 1)) == 24_436_369
    assert count_parameters(cached_model("Unet", "vgg16", 1)) == 23_748_241
    assert count_parameters(cached_model("FCN8s", "vgg16", 1)) == 134_265_443
    assert count_parameters(nn.Linear(3, 2)) == 8


@pytest.mark.parametrize("output_stride", [8, 16])
def test_deeplabv3plus_output_stride_and_aspp_rates(output_stride):
    cfg = ModelConfig(arch="DeepLabV3Plus", output_stride=output_stride, encoder_weights=None)
    net = build_arch(cfg).eval()
    dilations = {
        m.dilation[0] for m in net.decoder.modules() if isinstance(m, nn.Conv2d) and m.dilation[0] > 1
    }
    assert dilations == set(ASPP_RATES[output_stride])
    assert ASPP_RATES[output_stride] == {8: (12, 24, 36), 16: (6, 12, 18)}[output_stride]
    assert any(isinstance(m, nn.AdaptiveAvgPool2d) for m in net.decoder.modules()), "ASPP image pooling"
    with torch.no_grad():
        features = net.encoder(torch.zeros(1, 3, 64, 64))
        assert features[-1].shape[-1] == 64 // output_stride
        assert net(torch.zeros(1, 3, 64, 64)).shape == (1, 1, 64, 64)


class _FirstChannel(nn.Module):
    """A 'network' that returns its (normalised, padded) input's first channel: exposes pad and crop."""

    encoder = nn.Identity()

    def forward(self, x):
        assert x.shape[-2] % 32 == 0 and x.shape[-1] % 32 == 0
        return x[:, :1]


@pytest.mark.parametrize(("h", "w"), [(64, 64), (70, 90), (5, 7), (33, 100)])
def test_segmodel_normalises_pads_and_crops_back_exactly(h, w):
    model = SegModel(_FirstChannel(), mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5), classes=1)
    x = torch.randint(0, 256, (2, 3, h, w), dtype=torch.uint8)
    out = model(x)
    assert out.shape == (2, 1, h, w)
    expected = (x[:, :1].float() - 0.5 * 255) / (0.2 * 255)
    torch.testing.assert_close(out, expected)  # same pixels in the same places: the crop is aligned


def test_segmodel_uint8_and_float_inputs_agree():
    model = cached_model("Unet", "resnet34", 1).eval()
    x = torch.randint(0, 256, (1, 3, 70, 90), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x.float()), atol=0, rtol=0)


def test_segmodel_buffers_follow_data_config():
    cfg = Config(
        data=DataConfig(mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6)),
        model=ModelConfig(arch="FPN", encoder_weights=None),
    )
    model = build_model(cfg)
    torch.testing.assert_close(model.mean.flatten(), torch.tensor([0.1, 0.2, 0.3]) * 255)
    torch.testing.assert_close(model.std.flatten(), torch.tensor([0.4, 0.5, 0.6]) * 255)
    assert "mean" in model.state_dict()
    with pytest.raises(ValueError, match="channels-first"):
        model(torch.zeros(1, 64, 64, 3))


def test_unknown_arch_encoder_and_fcn_encoder_errors():
    with pytest.raises(ValueError, match="Registered: Unet, UnetPlusPlus, FPN, DeepLabV3Plus, FCN8s"):
        build_arch(ModelConfig(arch="Unet3", encoder_weights=None))
    with pytest.raises(ValueError, match="did you mean .*resnet34"):
        build_arch(ModelConfig(encoder="resnet35", encoder_weights=None))
    with pytest.raises(ValueError, match="tu-resnet34"):
        build_arch(ModelConfig(encoder="tu-resnet35", encoder_weights=None))
    with pytest.raises(ValueError, match="model.encoder=vgg16"):
        build_arch(ModelConfig(arch="FCN8s", encoder="resnet34", encoder_weights=None))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_arch(ModelConfig(encoder_weights="missing/encoder.pth"))


# ----------------------------------------------------------------------------- local encoder weights


def _random_encoder_state(arch="Unet", encoder="resnet34", seed=1) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    encoder = build_arch(ModelConfig(arch=arch, encoder=encoder, encoder_weights=None)).encoder
    return {k: v.clone() for k, v in encoder.state_dict().items()}


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_encoder_weights_from_local_file(tmp_path, suffix):
    state = _random_encoder_state()
    path = tmp_path / f"encoder{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    torch.manual_seed(2)  # a different random init, so a no-op load would fail the comparison
    net = build_arch(ModelConfig(arch="FPN", encoder_weights=str(path)))  # same encoder, another arch
    loaded = net.encoder.state_dict()
    for key, value in state.items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0)


def test_encoder_weights_from_a_whole_model_checkpoint(tmp_path):
    torch.manual_seed(3)
    source = build_model(Config(model=ModelConfig(arch="Unet", encoder_weights=None)))
    path = tmp_path / "fold0.pt"
    torch.save({"model": source.state_dict(), "config": {}}, path)  # keys "net.encoder.*"
    net = build_arch(ModelConfig(arch="DeepLabV3Plus", output_stride=16, encoder_weights=str(path)))
    torch.testing.assert_close(net.encoder.conv1.weight, source.net.encoder.conv1.weight, rtol=0, atol=0)


def test_encoder_weights_mismatch_errors(tmp_path):
    state = _random_encoder_state()
    path = tmp_path / "resnet34.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match="shape mismatches.*in_channels"):
        build_arch(ModelConfig(in_channels=4, encoder_weights=str(path)))
    other = tmp_path / "foreign.pth"
    torch.save({"backbone.stem.weight": torch.zeros(3)}, other)
    with pytest.raises(ValueError, match="none of its 1 tensors"):
        build_arch(ModelConfig(encoder_weights=str(other)))


def test_missing_and_unexpected_counts_and_fc_convolutionalisation():
    """A Linear weight loads into a same-size conv so that conv(x) == linear(flatten(x)) (FCN fc6)."""

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.classifier = nn.Sequential(nn.Conv2d(2, 3, kernel_size=2))
            self.extra = nn.Conv2d(1, 1, 1)

    linear = nn.Linear(2 * 2 * 2, 3)
    state = {
        "classifier.0.weight": linear.weight.detach(),
        "classifier.0.bias": linear.bias.detach(),
        "classifier.6.weight": torch.zeros(5, 3),
    }
    tiny = Tiny()
    with pytest.raises(ConfigError, match=r"2 of its 4 tensors are not in the file \(e.g. \['extra.bias'"):
        load_encoder_weights(tiny, state)  # extra.weight/bias missing
    tiny.extra = nn.Identity()
    assert load_encoder_weights(tiny, state) == (2, 1)  # 2 loaded; classifier.6, an ImageNet head, dropped
    x = torch.randn(4, 2, 2, 2)
    torch.testing.assert_close(tiny.classifier(x).flatten(1), linear(x.flatten(1)))


def test_pretrained_false_ignores_encoder_weights_for_checkpoint_rebuilds():
    # Inference rebuilds from the checkpoint's config, whose weight file may not exist on this machine.
    cfg = Config(model=ModelConfig(encoder_weights="/training/machine/encoder.pth"))
    with pytest.raises(FileNotFoundError):
        build_model(cfg)
    model = build_model(cfg, pretrained=False).eval()
    assert model(torch.zeros(1, 3, 32, 32, dtype=torch.uint8)).shape == (1, 1, 32, 32)


# ----------------------------------------------------------------------------- named weights, offline


def test_a_plain_resnet34_state_dict_into_a_resnet18_is_refused_naming_the_extra_tensors(tmp_path):
    """Every resnet18 key is in a resnet34 file with the same shape: it used to load with dozens of
    tensors silently unused."""
    import segmentation_models_pytorch as smp

    path = tmp_path / "r34.pth"
    torch.save(smp.encoders.get_encoder("resnet34", weights=None).state_dict(), path)  # a plain state dict
    with pytest.raises(ConfigError, match=r"resnet18 encoder: \d+ tensors of the file are not in it"):
        build_arch(ModelConfig(encoder="resnet18", encoder_weights=str(path)))


def test_resnet50_file_into_resnet34_fails_clearly(tmp_path):
    import segmentation_models_pytorch as smp

    state = smp.encoders.get_encoder("resnet50", weights=None).state_dict()
    path = tmp_path / "resnet50-imagenet.pth"
    torch.save({"encoder": "resnet50", "weights": "imagenet", "state_dict": state}, path)
    cfg = Config(model=ModelConfig(encoder="resnet34", encoder_weights=str(path)))
    with pytest.raises(ConfigError) as e:
        check_model(cfg)  # before training makes any folder
    assert str(e.value).startswith(f"{path} holds resnet50 encoder weights but model.encoder=resnet34; ")
    with pytest.raises(ConfigError, match="set model.encoder=resnet50, or make resnet34 weights with `make"):
        build_arch(cfg.model)


def test_a_local_weights_file_that_does_not_fit_is_refused_by_check_model_before_any_folder(tmp_path):
    """check_model now fits the file to the encoder on the meta device: a wrong file stops make train before
    it writes config.yaml and folds.csv (which then made the corrected rerun look like another config)."""
    import segmentation_models_pytorch as smp

    path = tmp_path / "r34.pth"
    torch.save(smp.encoders.get_encoder("resnet34", weights=None).state_dict(), path)
    check_model(Config(model=ModelConfig(encoder="resnet34", encoder_weights=str(path))))  # fits
    with pytest.raises(ConfigError, match="do not fit the resnet18 encoder"):
        check_model(Config(model=ModelConfig(encoder="resnet18", encoder_weights=str(path))))
    with pytest.raises(ConfigError, match="shape mismatches"):
        check_model(
            Config(
                model=ModelConfig(encoder="resnet34", in_channels=4, encoder_weights=str(path)),
                data=DataConfig(mean=(0.5,) * 4, std=(0.2,) * 4),
            )
        )
