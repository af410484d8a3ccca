"""Model registry: architecture name -> builder, and :class:`SegModel`, the wrapper every stage uses.

``ARCHS[name](model_cfg)`` returns a bare network mapping normalised [B, in_channels, H, W] (H, W
divisible by 32) to logits [B, classes, H, W]. :func:`build_model` wraps it in :class:`SegModel`,
which takes raw uint8/float pixels 0..255, normalises on the device, pads to a multiple of 32 and crops
the logits back, so the data loader ships uint8 (4x less host->device traffic) and any tile size works.

Encoders and weights (``model.encoder``, ``model.encoder_weights``):

* smp architectures accept any smp encoder name (``segmentation_models_pytorch.encoders.
  get_encoder_names()``: resnet34, vgg16, vgg16_bn, efficientnet-b0, ...) or ``tu-<timm model>``.
  FCN8s accepts only ``vgg16``.
* ``encoder_weights``: None -> random init; a name (``imagenet``, the default, ...) -> downloaded once by
  smp or timm (FCN8s: torchvision's VGG16 ImageNet weights) and cached; :func:`check_model` fails in
  seconds, naming both fixes, when they are neither cached nor downloadable (:mod:`.pretrained`); a path
  to a local ``.pth``/``.pt``/``.bin``/``.safetensors`` file -> the model is built with random weights and
  the file is loaded into ``net.encoder`` by :func:`load_encoder_weights` (offline machines: ``make
  weights`` saves a file that names its encoder, checked against ``model.encoder``; or an encoder from
  another run).

``model.decoder_channels`` sets the U-Net / U-Net++ decoder (its length is the encoder depth, as smp
requires); FPN and DeepLabV3+ use smp's decoder defaults (FPN 256/128, ASPP 256 channels).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.core.config import Config, ConfigError, ModelConfig
from pipeline.core.io import CheckpointError
from pipeline.model.fcn8s import FCN8s
from pipeline.model.pretrained import download_errors, require_pretrained

__all__ = [
    "ARCHS",
    "ASPP_RATES",
    "FCN8s",
    "PAD_MULTIPLE",
    "SegModel",
    "build_arch",
    "build_model",
    "check_model",
    "count_parameters",
    "load_encoder_weights",
]

log = logging.getLogger(__name__)

PAD_MULTIPLE = 32  # every registered architecture down-samples by 32 (encoder depth 5)
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
HEAD_PREFIXES = ("fc.", "classifier.", "head.", "last_linear.")  # ImageNet classification heads
# DeepLabV3+ ASPP dilation rates per output stride (Chen et al. 2018): doubled when the stride halves,
# so the receptive fields stay the same in input pixels.
ASPP_RATES: dict[int, tuple[int, int, int]] = {8: (12, 24, 36), 16: (6, 12, 18)}


# ----------------------------------------------------------------------------- encoders and weights


def _is_local_weights(weights: str | None) -> bool:
    """True if ``encoder_weights`` names a file (rather than an smp weight name like 'imagenet')."""
    if weights is None:
        return False
    p = Path(weights).expanduser()
    looks_like_path = p.suffix.lower() in WEIGHT_SUFFIXES or "/" in weights or "\\" in weights
    if looks_like_path and not p.is_file():
        raise FileNotFoundError(
            f"model.encoder_weights={weights!r} looks like a file but does not exist; give an existing "
            f"{'/'.join(WEIGHT_SUFFIXES)} file, a weight name such as 'imagenet', or null for random init"
        )
    return looks_like_path or p.is_file()


def _check_encoder(cfg: ModelConfig) -> None:
    """Fail early, with a suggestion, on an encoder smp does not know (smp's KeyError lists 76 names)."""
    name = cfg.encoder
    if name.startswith("tu-"):
        import timm

        if not timm.is_model(name[3:]):
            close = difflib.get_close_matches(name[3:], timm.list_models(), n=3)
            raise ConfigError(
                f"model.encoder={name!r}: timm has no model {name[3:]!r}"
                + (f"; did you mean {', '.join('tu-' + c for c in close)}?" if close else "")
                + " (see timm.list_models())"
            )
        return
    names = smp.encoders.get_encoder_names()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3)
        raise ConfigError(
            f"model.encoder={name!r} is not an smp encoder"
            + (f"; did you mean {', '.join(close)}?" if close else "")
            + " (see segmentation_models_pytorch.encoders.get_encoder_names(), or use 'tu-<timm model name>')"
        )


def _file_encoder(state: Any) -> str | None:
    """The encoder a weights file names: ``make weights`` files carry ``encoder``, buildseg checkpoints
    their run's config; plain state dicts name none."""
    if not isinstance(state, Mapping):
        return None
    name = state.get("encoder")
    if isinstance(name, str):
        return name
    config = state.get("config")
    model = config.get("model") if isinstance(config, Mapping) else None
    name = model.get("encoder") if isinstance(model, Mapping) else None
    return name if isinstance(name, str) else None


def _read_state_dict(path: Path, encoder: str | None = None) -> dict[str, Tensor]:
    """Tensors from a .safetensors or torch file (``weights_only=True``: no code runs on load).

    A file holding ``{"state_dict": ...}`` or ``{"model": ...}`` (a training checkpoint) is unwrapped.
    ``encoder`` (``model.encoder``): a file that names another encoder is an error saying so.
    """
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        state: Any = load_file(str(path), device="cpu")
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # any failure here means the same to the user: not a readable state dict
            raise ConfigError(
                f"cannot read encoder weights {path} ({type(e).__name__}: {str(e).splitlines()[0]}); "
                "save a plain state dict with torch.save(encoder.state_dict(), path)"
            ) from None
    named = _file_encoder(state)
    if encoder is not None and named is not None and named != encoder:
        raise ConfigError(
            f"{path} holds {named} encoder weights but model.encoder={encoder}; set model.encoder={named}, "
            f"or make {encoder} weights with `make weights ENCODER={encoder} "
            f"OUT=weights/{encoder}-imagenet.pth` and point model.encoder_weights at that file"
        )
    for key in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ConfigError(f"{path} does not hold a state dict (name -> tensor)")
    return dict(state)


def _align_keys(state: dict[str, Tensor], target_keys: set[str]) -> dict[str, Tensor]:
    """Drop wrapper prefixes so the keys match the encoder's.

    Handles DDP (``module.``), torch.compile (``_orig_mod.``) and whole-model state dicts, whose encoder
    keys are ``encoder.<key>`` (smp) or ``net.encoder.<key>`` (a buildseg checkpoint).
    """
    state = {k.replace("module.", "", 1) if k.startswith("module.") else k: v for k, v in state.items()}
    state = {k.replace("_orig_mod.", ""): v for k, v in state.items()}
    if not target_keys.intersection(state):
        inner = {k.split("encoder.", 1)[1]: v for k, v in state.items() if "encoder." in k}
        if target_keys.intersection(inner):
            return inner
    return state


def load_encoder_weights(
    encoder: nn.Module, state: dict[str, Tensor] | str | Path, name: str | None = None
) -> tuple[int, int]:
    """Load a state dict (or a file holding one) into ``encoder``; returns (tensors loaded, head tensors
    dropped).

    ``name``: the encoder's name (``model.encoder``); a file that names another encoder (``make weights``
    files and buildseg checkpoints do) is a :class:`ConfigError`: a resnet50 file never half-loads into
    a resnet34. Plain state dicts name no encoder and are matched by key and shape alone.

    Linear weights whose target is a convolution of the same size are reshaped (FCN "convolutionalised"
    fc6/fc7: torchvision VGG16's [4096, 25088] ``classifier.0.weight`` becomes the [4096, 512, 7, 7]
    fc6 convolution). Every tensor of the encoder must come from the file and every tensor of the file
    must go to the encoder, apart from an ImageNet classification head (:data:`HEAD_PREFIXES`, dropped):
    a missing or unexpected tensor (a resnet34 file into a resnet18 shares every resnet18 key), a shape
    that does not match, or a file sharing no key with the encoder is an error naming counts and keys.
    """
    source = str(state) if isinstance(state, (str, Path)) else "state dict"
    if isinstance(state, (str, Path)):
        state = _read_state_dict(Path(state).expanduser(), name)
    matched, dropped = _fit_state(encoder.state_dict(), state, source, name)
    encoder.load_state_dict(matched, strict=False)
    log.info("loaded %d encoder tensors from %s (%d head tensors dropped)", len(matched), source, dropped)
    return len(matched), dropped


def _fit_state(
    own: dict[str, Tensor], state: dict[str, Tensor], source: str, name: str | None
) -> tuple[dict[str, Tensor], int]:
    """The file's tensors keyed and shaped for the encoder whose state dict is ``own`` (real or on the meta
    device), and the count of head tensors dropped; every mismatch of :func:`load_encoder_weights` raised."""
    state = _align_keys(state, set(own))
    matched: dict[str, Tensor] = {}
    mismatched = []
    for key, value in state.items():
        if key not in own:
            continue
        target = own[key]
        if (
            value.shape != target.shape
            and value.ndim == 2
            and target.ndim == 4
            and value.numel() == target.numel()
        ):
            value = value.reshape(target.shape)  # Linear -> conv with the same receptive field
        if value.shape != target.shape:
            mismatched.append(f"{key}: file {tuple(value.shape)} vs model {tuple(target.shape)}")
        else:
            matched[key] = value
    if mismatched:
        raise ConfigError(
            f"encoder weights {source} do not fit the encoder ({len(mismatched)} shape mismatches, e.g. "
            + "; ".join(mismatched[:3])
            + "). Check model.encoder and model.in_channels match the encoder the file was saved from"
        )
    if not matched:
        raise ConfigError(
            f"encoder weights {source}: none of its {len(state)} tensors has a key of this encoder "
            f"(file keys look like {list(state)[:3]}, encoder keys like {list(own)[:3]}); "
            "save it with torch.save(model.encoder.state_dict(), path)"
        )
    # num_batches_tracked is a counter, not a learned value: files saved by other libraries often lack it.
    missing = sorted(k for k in set(own) - set(matched) if not k.endswith("num_batches_tracked"))
    # A classification head (fc, classifier, head) is in every ImageNet file and in no encoder: dropped.
    unexpected = sorted(k for k in set(state) - set(own) if not k.startswith(HEAD_PREFIXES))
    if missing or unexpected:
        parts = (
            [f"{len(missing)} of its {len(own)} tensors are not in the file (e.g. {missing[:3]})"]
            if missing
            else []
        )
        parts += (
            [f"{len(unexpected)} tensors of the file are not in it (e.g. {unexpected[:3]})"]
            if unexpected
            else []
        )
        raise ConfigError(
            f"encoder weights {source} do not fit the {name or 'model'} encoder: {' and '.join(parts)}; "
            f"a file of another encoder? Save one with `make weights ENCODER={name or '<encoder>'}` (or "
            "set model.encoder to the file's encoder)"
        )
    return matched, len(set(state) - set(own))


# ----------------------------------------------------------------------------- architecture builders


def _smp_common(cfg: ModelConfig) -> dict[str, Any]:
    _check_encoder(cfg)
    weights = None if _is_local_weights(cfg.encoder_weights) else cfg.encoder_weights
    if weights is not None:
        require_pretrained(cfg)  # cached or reachable: offline, one clear error instead of ~30 s of retries
    return {
        "encoder_name": cfg.encoder,
        "encoder_weights": weights,
        "in_channels": cfg.in_channels,
        "classes": cfg.classes,
    }


def _unet(cfg: ModelConfig) -> nn.Module:
    depth = len(cfg.decoder_channels)
    return smp.Unet(encoder_depth=depth, decoder_channels=cfg.decoder_channels, **_smp_common(cfg))


def _unet_plus_plus(cfg: ModelConfig) -> nn.Module:
    depth = len(cfg.decoder_channels)
    return smp.UnetPlusPlus(encoder_depth=depth, decoder_channels=cfg.decoder_channels, **_smp_common(cfg))


def _fpn(cfg: ModelConfig) -> nn.Module:
    return smp.FPN(**_smp_common(cfg))


def _deeplabv3plus(cfg: ModelConfig) -> nn.Module:
    if cfg.output_stride not in ASPP_RATES:
        raise ConfigError(f"model.output_stride must be one of {sorted(ASPP_RATES)}, got {cfg.output_stride}")
    # smp's ASPP = 1x1 conv + three atrous convs (depthwise-separable by default, as in the paper's
    # Xception variant) + image pooling branch, projected to 256 channels.
    return smp.DeepLabV3Plus(
        encoder_output_stride=cfg.output_stride,
        decoder_atrous_rates=ASPP_RATES[cfg.output_stride],
        **_smp_common(cfg),
    )


def _fcn8s(cfg: ModelConfig) -> nn.Module:
    if cfg.encoder != "vgg16":
        raise ConfigError(f"FCN8s is built on VGG16: set model.encoder=vgg16 (got {cfg.encoder!r})")
    net = FCN8s(classes=cfg.classes, in_channels=cfg.in_channels)
    weights = cfg.encoder_weights
    if weights is not None and not _is_local_weights(weights):
        require_pretrained(cfg)  # also refuses names other than 'imagenet'
        from torchvision.models import VGG16_Weights

        # torchvision's VGG16 includes fc6/fc7, which load_encoder_weights convolutionalises.
        load_encoder_weights(net.encoder, VGG16_Weights.IMAGENET1K_V1.get_state_dict(progress=True))
    return net


ARCHS: dict[str, Callable[[ModelConfig], nn.Module]] = {
    "Unet": _unet,
    "UnetPlusPlus": _unet_plus_plus,
    "FPN": _fpn,
    "DeepLabV3Plus": _deeplabv3plus,
    "FCN8s": _fcn8s,
}


def build_arch(cfg: ModelConfig, pretrained: bool = True) -> nn.Module:
    """The bare network for ``cfg`` (normalised input, H and W divisible by 32).

    ``pretrained=False`` ignores ``cfg.encoder_weights`` (random init): use it when a checkpoint's state
    dict is loaded next, so inference needs neither the internet nor the training machine's weight file.
    """
    if not pretrained:
        cfg = dataclasses.replace(cfg, encoder_weights=None)
    if cfg.arch not in ARCHS:
        close = difflib.get_close_matches(cfg.arch, list(ARCHS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown model.arch {cfg.arch!r}.{hint} Registered: {', '.join(ARCHS)}")
    local = _is_local_weights(cfg.encoder_weights)
    with download_errors(cfg) if cfg.encoder_weights is not None and not local else contextlib.nullcontext():
        net = ARCHS[cfg.arch](cfg)
    if local:
        load_encoder_weights(net.encoder, cfg.encoder_weights, cfg.encoder)
    return net


# ----------------------------------------------------------------------------- the wrapper


class SegModel(nn.Module):
    """Raw pixels in, logits out: ``forward(x [B, C_in, H, W] uint8 or float 0..255) -> [B, classes, H, W]``.

    * Normalisation ``(x - mean) / std`` happens here, on the device, in float32 (``mean``/``std`` are
      buffers in 0..255 scale, saved in the state dict with the weights).
    * H and W are padded up to a multiple of 32, split evenly between the two sides so a flipped
      input gets the mirrored padding (flip TTA stays consistent), then the logits are cropped back to
      H x W: sizes are never resized. Padding is ``reflect``: it continues roofs and roads across the
      edge instead of drawing an artificial border (which zero padding would, and which resembles a
      building outline); images smaller than the pad fall back to ``replicate`` (reflect needs pad < size).
    * The logits are float32, or the autocast dtype under autocast (losses cast to float32 themselves).
    """

    def __init__(self, net: nn.Module, mean: tuple[float, ...], std: tuple[float, ...], classes: int) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"mean {mean} and std {std} must have the same length (one per channel)")
        self.net = net
        self.classes = classes
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255.0)

    @property
    def encoder(self) -> nn.Module:
        return self.net.encoder

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        """``nn.Module.load_state_dict``; weights that do not fit this architecture are a
        :class:`CheckpointError` saying so (a checkpoint whose config was edited, or mixed up)."""
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        except RuntimeError as e:
            lines = [x.strip() for x in str(e).splitlines()[1:] if x.strip()]
            detail = "; ".join(lines)[:400] or str(e)[:400]
            raise CheckpointError(
                f"the weights do not fit the model their config describes ({type(self.net).__name__}, "
                f"{count_parameters(self)} parameters): {detail}. The checkpoint's config and weights do not "
                "belong together (edited by hand, or copied from another run): use the checkpoint as "
                "buildseg wrote it, or retrain"
            ) from None

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.mean.shape[1]:
            raise ValueError(
                f"SegModel expects images [B, {self.mean.shape[1]}, H, W] (uint8 or float 0..255), got "
                f"{tuple(x.shape)}; channels-first: img.permute(0, 3, 1, 2)"
            )
        h, w = x.shape[-2:]
        x = (x.float() - self.mean) / self.std
        pad_h, pad_w = -h % PAD_MULTIPLE, -w % PAD_MULTIPLE
        if not (pad_h or pad_w):
            return self.net(x)
        top, left = pad_h // 2, pad_w // 2
        bottom, right = pad_h - top, pad_w - left
        mode = "reflect" if max(top, bottom) < h and max(left, right) < w else "replicate"
        x = F.pad(x, (left, right, top, bottom), mode=mode)
        return self.net(x)[..., top : top + h, left : left + w]


def build_model(cfg: Config, pretrained: bool = True) -> SegModel:
    """The run's model: ``ARCHS[cfg.model.arch]`` wrapped in :class:`SegModel` with ``cfg.data`` mean/std.

    ``pretrained=False``: skip ``model.encoder_weights`` (see :func:`build_arch`); for rebuilding a model
    whose checkpoint is loaded right after (inference, resume).
    """
    if len(cfg.data.mean) != cfg.model.in_channels:
        raise ConfigError(
            f"data.mean/std have {len(cfg.data.mean)} values but model.in_channels={cfg.model.in_channels}; "
            "give one mean and std per input channel"
        )
    return SegModel(build_arch(cfg.model, pretrained), cfg.data.mean, cfg.data.std, cfg.model.classes)


def check_model(cfg: Config) -> None:
    """Raise :class:`ConfigError` unless ``cfg``'s model can be built: a registered ``model.arch``, an
    encoder smp or timm knows, settings the architecture accepts, and encoder weights that can be had:
    a local file that is readable and names no other encoder, or named weights that are cached or whose
    download host answers now (a few seconds at most; offline, the error names both fixes).

    Builds the network on the meta device (no memory, no download, ~0.1 s), so a typo in the config
    fails before the data check and before any run folder is made, not after them.
    """
    weights = cfg.model.encoder_weights
    try:
        local = _is_local_weights(weights)
        with torch.device("meta"):
            build_model(cfg, pretrained=False)
    except ConfigError:
        raise
    except Exception as e:  # whatever smp or timm raise for settings they refuse
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(
            f"model.arch={cfg.model.arch} model.encoder={cfg.model.encoder} cannot be built: {first}"
        ) from None
    if local:  # the file against the encoder's keys and shapes, still on the meta device
        path = Path(str(weights)).expanduser()
        with torch.device("meta"):
            own = build_arch(cfg.model, pretrained=False).encoder.state_dict()
        _fit_state(own, _read_state_dict(path, cfg.model.encoder), str(path), cfg.model.encoder)
    elif weights is not None:
        require_pretrained(cfg.model)


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters (trainable or not); buffers such as BN statistics are not counted."""
    return sum(p.numel() for p in model.parameters())
