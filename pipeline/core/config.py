"""One frozen, typed configuration per run.

A run is described by :class:`Config`, a tree of frozen dataclasses. It is loaded from YAML
(``configs/*.yaml``), changed with ``section.key=value`` overrides from the command line, saved as
YAML next to every checkpoint *and* inside it (as a plain dict), so inference rebuilds the model
from the checkpoint alone.

Unknown keys are errors that name the closest valid key: a typo in a config must never be
silently ignored (``optim.lr_max=1e-3`` would otherwise train with the default rate).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from pipeline.core.errors import BuildsegError
from pipeline.core.io import atomic_write_text, yaml_problem
from pipeline.core.schedule import SCHEDULES


class ConfigError(BuildsegError, ValueError):
    """A config file or override that cannot be applied; the message says how to fix it."""


@dataclass(frozen=True)
class DataConfig:
    """Where the data is and how it is read.

    ``layout`` picks a reader from ``pipeline.data.layouts.LAYOUTS`` (competition CSV, VOC, Cityscapes).
    ``folds_csv`` empty means ``<root>/folds.csv``."""

    root: str = "data/demo"
    layout: str = "competition"
    train_dir: str = "train"
    mask_csv: str = "train_mask.csv"
    test_dir: str = "test_a"
    sample_csv: str = "test_a_samplesubmit.csv"
    test_mask_csv: str = "test_a_mask.csv"
    folds_csv: str = ""
    group_csv: str = ""  # optional CSV with columns name, group (e.g. manifest.csv); folds are grouped by it
    colormap_json: str = ""  # multi-class layouts: class id -> name and colour
    # A pseudo-label file written by `make pseudo` (pipeline.infer.pseudo): its test tiles join every fold's
    # training tiles (never a validation set), pixels labelled 255 are ignored by the loss. Empty = none.
    pseudo_labels: str = ""
    n_folds: int = 5
    image_size: int = 0  # expected tile size (check_data); 0 = every tile the size of the first one
    crop_size: int = 0  # > 0: pad + random crop (train) / centre crop (val) to this size, for VOC-like sets
    num_workers: int = -1  # DataLoader workers; -1 = the cores available, at most 8
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture from the registry in ``pipeline.model.registry``."""

    arch: str = "Unet"
    encoder: str = "resnet34"
    # A weight name ("imagenet": downloaded once, then cached), a local .pth/.safetensors (`make weights`
    # saves one on a machine with internet, for offline ones), or None (random init).
    encoder_weights: str | None = "imagenet"
    classes: int = 1
    in_channels: int = 3
    output_stride: int = 16  # DeepLabV3+ only: 8 or 16
    decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16)


@dataclass(frozen=True)
class LossConfig:
    """CE + Dice (+ Lovász hinge). Binary (classes=1): BCE-with-logits + soft Dice; multi-class: softmax CE
    + soft Dice. ``lovasz_weight`` adds the Lovász hinge (binary only) as a third term; ``lovasz_epochs``
    trains the last N epochs on the Lovász hinge alone (a fine-tuning phase)."""

    ce_weight: float = 0.5
    dice_weight: float = 0.5
    lovasz_weight: float = 0.0
    lovasz_epochs: int = 0
    # Soft Dice over each image, then the batch mean (the competition scores per image), or one Dice over
    # the batch's pixels; auto: per image for binary runs (it won on the proxy), batch for multi-class.
    dice_per_image: bool | str = "auto"
    # Mask value left out of the loss and every metric, binary or multi-class: 255 for VOC borders and for
    # the uncertain band of pseudo labels (make pseudo sets it). None: every pixel counts.
    ignore_index: int | None = None


@dataclass(frozen=True)
class OptimConfig:
    """AdamW (no weight decay on norms and biases), a linear warm-up over ``warmup_epochs``, then the decay
    ``schedule`` (a key of ``pipeline.core.schedule.SCHEDULES``: cosine, poly, linear or constant) from
    ``lr`` down to ``lr * min_lr_ratio`` at the last step; ``constant`` stays at ``lr``."""

    lr: float = 1e-3
    schedule: str = "cosine"
    weight_decay: float = 1e-4
    warmup_epochs: float = 2.0
    min_lr_ratio: float = 0.01
    grad_clip: float = 0.0  # 0 = off


@dataclass(frozen=True)
class AugConfig:
    """Training augmentation (albumentations). Validation and test tiles are not augmented (only padded
    and centre-cropped when ``data.crop_size`` is set); the model normalises its input itself."""

    d4: bool = True  # flips + 90 degree rotations
    shift_scale_rotate_p: float = 0.5
    shift_limit: float = 0.0625
    scale_limit: float = 0.2
    rotate_limit: int = 30
    color_p: float = 0.5
    brightness_limit: float = 0.2
    contrast_limit: float = 0.2
    hue_shift_limit: int = 10
    sat_shift_limit: int = 15


@dataclass(frozen=True)
class TrainConfig:
    """The training loop."""

    epochs: int = 200  # the epoch budget was the one lever that won on the proxy (README: Accuracy)
    batch_size: int = 16
    seed: int = 42
    deterministic: bool = False
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str = "auto"  # every forward of the run; auto: bf16 on CUDA, float32 on CPU; bf16|fp16|none anywhere
    channels_last: bool | str = "auto"  # auto: on CUDA only; true/false on any device
    compile: bool = False  # torch.compile of the training forward (inductor; on CPU too)
    # Early stopping: stop a fold after this many epochs without a better selection score (val_dice binary,
    # val_miou multi-class: pipeline.runs.history.monitor_key); 0 = off.
    patience: int = 0
    max_steps_per_epoch: int = 0  # 0 = full epoch; small values make tests and smoke runs fast
    ema: float = 0.0  # EMA decay of weights for validation/checkpoints; 0 = off
    # SWA: average the weights at the end of each of the last N epochs, recompute BatchNorm statistics,
    # and keep the average when it validates better than the best epoch. 0 = off.
    swa_epochs: int = 0
    swa_lr: float = 0.0  # > 0: a constant rate during the SWA epochs; 0: the schedule's
    runs_dir: str = "runs"


@dataclass(frozen=True)
class InferConfig:
    """Defaults for OOF post-processing search and submission."""

    tta: str = "d4"  # a key of pipeline.core.tta.TTA_SETS
    batch_size: int = 32
    threshold: float = 0.5  # replaced by the OOF-tuned value in the manifest
    min_area: int = 0  # replaced by the OOF-tuned value in the manifest
    thresholds: tuple[float, ...] = (0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7)
    min_areas: tuple[int, ...] = (0, 16, 32, 64, 128, 256)
    # Pixels in one forward, in input tiles, TTA views included (a 1.25-scale view counts 1.56): 16 tiles x
    # 8 D4 views in one forward took 18 GB at 512 px on CPU. Bounds inference memory everywhere.
    max_images: int = 32
    tile_size: int = 512  # sliding-window prediction on large scenes
    overlap: int = 128


@dataclass(frozen=True)
class Config:
    """A whole run. ``name`` empty means derived from the model and loss (see :func:`run_name`)."""

    name: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    infer: InferConfig = field(default_factory=InferConfig)


def run_name(cfg: Config) -> str:
    """The run folder's name: ``cfg.name`` or ``<arch>-<encoder>-<loss>`` (e.g. ``unet-resnet34-ce_dice``)."""
    if cfg.name:
        return cfg.name
    parts = []
    if cfg.loss.ce_weight:
        parts.append("ce")
    if cfg.loss.dice_weight:
        parts.append("dice")
    if cfg.loss.lovasz_weight:
        parts.append("lovasz")
    return f"{cfg.model.arch.lower()}-{cfg.model.encoder}-{'_'.join(parts) or 'noloss'}"


# ----------------------------------------------------------------------------- dict <-> dataclass


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of builtins (tuples become lists): safe for YAML and ``weights_only`` loading."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in fields(v)}
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        return v

    return plain(cfg)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML/override value to the annotated type ``tp`` or raise ConfigError naming ``where``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: cannot use {value!r}")
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.strip("()[] ").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], where) for v in value)
        if len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}: {value!r}")
        return tuple(_coerce(v, a, where) for v, a in zip(value, args))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
        if not f.is_integer():
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(f)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        if value is None:
            raise ConfigError(f"{where}: expected a string, got null")
        return str(value)
    raise ConfigError(f"{where}: unsupported type {tp}")  # pragma: no cover - config types are fixed


def _unknown_key(key: str, valid: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"{where}: unknown key '{key}'.{hint} Valid keys: {', '.join(valid)}")


def from_dict(cls: type, data: dict[str, Any] | None, where: str = "config") -> Any:
    """Build dataclass ``cls`` from a (partial) nested dict; missing keys take defaults, unknown keys fail."""
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in valid:
            raise _unknown_key(key, valid, where)
        tp = hints[key]
        sub = f"{where}.{key}" if where != "config" else key
        if dataclasses.is_dataclass(tp):
            kwargs[key] = from_dict(tp, value, sub)
        else:
            kwargs[key] = _coerce(value, tp, sub)
    return cls(**kwargs)


# ----------------------------------------------------------------------------- YAML + overrides


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["train.epochs=3", "model.arch=FPN"]`` -> nested dict; values parsed as YAML scalars."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not key=value (e.g. train.epochs=3)")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        node = nested
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{p}' is a value, not a section")
        node[parts[-1]] = value
    return nested


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load ``path`` (YAML; None = defaults), apply ``section.key=value`` overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} not found; pick one of configs/*.yaml")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML ({yaml_problem(e)}); fix the file") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections (data:, model:, ...)")
    return config_from_dict(_merge(data, parse_overrides(list(overrides))))


def _ge0(v: Any) -> bool:
    return v >= 0


def _prob(v: Any) -> bool:
    return 0 <= v <= 1


# Every setting's valid range, checked before any work (a negative rate would fail, or worse train,
# hours later): (dotted key, test, what is allowed). A test is written so that NaN fails it.
_RANGES: list[tuple[str, Callable[[Any], bool], str]] = [
    ("model.classes", lambda v: v >= 1, ">= 1 (1 = binary buildings)"),
    ("model.in_channels", lambda v: v >= 1, ">= 1"),
    ("model.output_stride", lambda v: v in (8, 16), "8 or 16"),
    ("model.decoder_channels", lambda v: 1 <= len(v) <= 5 and min(v) >= 1, "1 to 5 channel counts >= 1"),
    ("data.n_folds", lambda v: v >= 2, ">= 2"),
    ("data.num_workers", lambda v: v >= -1, ">= 0, or -1 for the cores available"),
    ("data.image_size", _ge0, ">= 0 (0: every tile the size of the first)"),
    ("data.crop_size", _ge0, ">= 0 (0: no crop)"),
    ("data.std", lambda v: all(x > 0 for x in v), "> 0 for every channel"),
    ("loss.ce_weight", _ge0, ">= 0"),
    ("loss.dice_weight", _ge0, ">= 0"),
    ("loss.lovasz_weight", _ge0, ">= 0"),
    ("loss.lovasz_epochs", _ge0, ">= 0 (0: no Lovász fine-tuning phase)"),
    ("loss.ignore_index", lambda v: v is None or 0 <= v <= 255, "null or 0..255 (masks are 8-bit)"),
    ("optim.lr", lambda v: 0 < v < math.inf, "> 0 (e.g. 1e-3)"),
    ("optim.weight_decay", _ge0, ">= 0"),
    ("optim.warmup_epochs", _ge0, ">= 0"),
    ("optim.min_lr_ratio", _prob, "between 0 and 1"),
    ("optim.grad_clip", _ge0, ">= 0 (0: off)"),
    ("aug.shift_scale_rotate_p", _prob, "a probability, 0..1"),
    ("aug.color_p", _prob, "a probability, 0..1"),
    ("aug.shift_limit", _prob, "between 0 and 1 (a fraction of the tile)"),
    ("aug.scale_limit", lambda v: 0 <= v < 1, ">= 0 and < 1"),
    ("aug.rotate_limit", lambda v: 0 <= v <= 180, "0..180 degrees"),
    ("aug.brightness_limit", _ge0, ">= 0"),
    ("aug.contrast_limit", _ge0, ">= 0"),
    ("aug.hue_shift_limit", _ge0, ">= 0"),
    ("aug.sat_shift_limit", _ge0, ">= 0"),
    ("train.epochs", lambda v: v >= 1, ">= 1"),
    ("train.batch_size", lambda v: v >= 1, ">= 1"),
    ("train.patience", _ge0, ">= 0 (0: off)"),
    ("train.max_steps_per_epoch", _ge0, ">= 0 (0: the whole epoch)"),
    ("train.ema", lambda v: 0 <= v < 1, ">= 0 and < 1 (0: off; e.g. 0.999)"),
    ("train.swa_epochs", _ge0, ">= 0 (0: off)"),
    ("train.swa_lr", _ge0, ">= 0 (0: the schedule's rate)"),
    ("train.amp", lambda v: v in ("auto", "bf16", "fp16", "none"), "auto, bf16, fp16 or none"),
    ("train.channels_last", lambda v: v in (True, False, "auto"), "true, false or auto"),
    ("loss.dice_per_image", lambda v: v in (True, False, "auto"), "true, false or auto"),
    ("train.device", lambda v: bool(re.fullmatch(r"auto|cpu|cuda(:\d+)?", v)), "auto, cpu, cuda or cuda:N"),
]


def validate(cfg: Config) -> None:
    """Every value's range (:data:`_RANGES`), cross-field checks and the inference settings, all at once.

    Called by :func:`load_config`, so a bad value stops a command before any folder is made. The model
    registry (arch, encoder) is checked by :func:`pipeline.model.registry.check_model`, which needs torch."""
    problems = []
    for key, ok, allowed in _RANGES:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if not ok(value):
            problems.append(f"{key} must be {allowed}, not {value!r}")
    problems += infer_problems(cfg.infer, "infer.")
    if cfg.optim.schedule not in SCHEDULES:
        problems.append(f"optim.schedule must be one of {', '.join(SCHEDULES)}, not {cfg.optim.schedule!r}")
    if cfg.loss.ce_weight + cfg.loss.dice_weight + cfg.loss.lovasz_weight == 0:
        problems.append("loss.ce_weight, loss.dice_weight and loss.lovasz_weight must not all be 0")
    if cfg.loss.dice_per_image is True and cfg.model.classes != 1:
        problems.append("loss.dice_per_image is for binary runs (model.classes=1)")
    if (cfg.loss.lovasz_weight or cfg.loss.lovasz_epochs) and cfg.model.classes != 1:
        problems.append("loss.lovasz_weight and loss.lovasz_epochs are for binary runs (model.classes=1)")
    phases = (("loss.lovasz_epochs", cfg.loss.lovasz_epochs), ("train.swa_epochs", cfg.train.swa_epochs))
    for key, n in phases:
        if n and n >= cfg.train.epochs:
            problems.append(f"{key}={n} must be less than train.epochs={cfg.train.epochs}")
    if cfg.train.swa_epochs and cfg.train.ema:
        problems.append("train.swa_epochs and train.ema average the weights two ways; set one of them to 0")
    if not len(cfg.data.mean) == len(cfg.data.std) == cfg.model.in_channels:
        problems.append(
            "data.mean and data.std need one value per input channel "
            f"(model.in_channels={cfg.model.in_channels})"
        )
    if cfg.name in (".", "..") or cfg.name.startswith(".") or any(c in cfg.name for c in "/\\"):
        problems.append(f"name must be a plain folder name (no '/', not starting with '.'), not {cfg.name!r}")
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))


# What a resume may change: infer.* acts after training only; precision, layout and compile say how the same
# model is computed (a run saved before "auto" existed says bf16 / true, then meaning "on a GPU only").
RESUME_FREE = ("infer", "train.amp", "train.channels_last", "train.compile")


def config_changes(
    old: dict[str, Any], new: dict[str, Any], ignore: Sequence[str] = RESUME_FREE
) -> list[str]:
    """The settings that differ between two configs saved by :func:`to_dict`, as ``key: old -> new``.

    Sections and dotted keys in ``ignore`` are skipped. Both sides are completed with the defaults first,
    so a key added after a run was saved is not a change (``loss.dice_per_image`` aside: batch then)."""

    def full(d: dict[str, Any]) -> dict[str, Any]:
        d = {**d, "loss": {"dice_per_image": False, **(d.get("loss") or {})}}  # saved before "auto": batch
        try:
            return to_dict(from_dict(Config, d))
        except (ConfigError, TypeError):
            return d

    def walk(a: Any, b: Any, key: tuple[str, ...]) -> list[str]:
        if ".".join(key) in ignore:  # a section or a dotted key
            return []
        if not (isinstance(a, dict) and isinstance(b, dict)):
            return [] if a == b else [f"{'.'.join(key)}: {a!r} -> {b!r}"]
        return [c for k in sorted(set(a) | set(b)) for c in walk(a.get(k), b.get(k), (*key, k))]

    return walk(full(old or {}), full(new or {}), ())


def infer_problems(infer: InferConfig, prefix: str = "infer.") -> list[str]:
    """Range checks of the inference settings, shared by the config and the hand-editable manifest
    (``prefix`` names the keys as the user wrote them). A threshold of 2 or a negative area would give
    an all-empty or all-building submission that still validates: refuse them here."""
    # Imported here, not at the top: the TTA registry needs torch, this module does not.
    from pipeline.core.tta import TTA_SETS

    problems = []
    if infer.tta not in TTA_SETS:
        *rest, last = TTA_SETS
        problems.append(f"{prefix}tta must be one of {', '.join(rest)} or {last}, not {infer.tta!r}")
    if not 0.0 < infer.threshold < 1.0:  # also refuses NaN
        problems.append(f"{prefix}threshold must be between 0 and 1 (exclusive), not {infer.threshold}")
    if infer.min_area < 0:
        problems.append(f"{prefix}min_area must be >= 0 pixels, not {infer.min_area}")
    if not infer.thresholds or not all(0.0 < t < 1.0 for t in infer.thresholds):
        problems.append(f"{prefix}thresholds must be a non-empty list of values between 0 and 1")
    if not infer.min_areas or min(infer.min_areas) < 0:
        problems.append(f"{prefix}min_areas must be a non-empty list of areas >= 0")
    if infer.batch_size < 1:
        problems.append(f"{prefix}batch_size must be >= 1, not {infer.batch_size}")
    if infer.max_images < 1:
        problems.append(f"{prefix}max_images must be >= 1 (tiles per forward), not {infer.max_images}")
    if infer.tile_size < 32 or not 0 <= infer.overlap < infer.tile_size:
        problems.append(
            f"{prefix}tile_size must be >= 32 and 0 <= overlap < tile_size "
            f"(now {infer.tile_size} and {infer.overlap})"
        )
    return problems


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config saved by :func:`to_dict` (e.g. from inside a checkpoint)."""
    validate(cfg := from_dict(Config, data))
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically."""
    atomic_write_text(Path(path), yaml.safe_dump(to_dict(cfg), sort_keys=False))
