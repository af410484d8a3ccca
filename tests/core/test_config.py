"""Config: YAML round trip, overrides, strict keys, checkpoint-safe dicts, range checks, and the shipped
recipes: each builds its model and holds what its comments promise."""

from pathlib import Path

import pytest
import yaml

from pipeline.core.config import (
    Config,
    ConfigError,
    config_from_dict,
    load_config,
    run_name,
    save_config,
    to_dict,
)

CONFIGS = sorted(Path(__file__).resolve().parents[2].joinpath("configs").glob("*.yaml"))


def test_round_trip_yaml(tmp_path):
    cfg = load_config(
        None, ["train.epochs=3", "model.arch=FPN", "data.mean=[0.1,0.2,0.3]", "loss.ignore_index=255"]
    )
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again == cfg
    assert again.train.epochs == 3 and again.model.arch == "FPN" and again.data.mean == (0.1, 0.2, 0.3)


def test_to_dict_is_plain_builtins():
    d = to_dict(Config())

    def walk(v):
        if isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)
        else:
            assert v is None or isinstance(v, (str, int, float, bool)), type(v)

    walk(d)
    assert config_from_dict(d) == Config()


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)


# What each recipe's comments (and the README) promise, as ``section.key: value``.
PROMISES: dict[str, dict[str, object]] = {
    "default.yaml": {  # U-Net/ResNet34, BCE+Dice, AdamW + warm-up + cosine, D4, 5 folds, D4 TTA, 200 epochs
        "model.arch": "Unet",
        "model.encoder": "resnet34",
        "model.encoder_weights": "imagenet",
        "model.classes": 1,
        "loss.ce_weight": 0.5,
        "loss.dice_weight": 0.5,
        "optim.schedule": "cosine",
        "aug.d4": True,
        "data.n_folds": 5,
        "infer.tta": "d4",
        "train.epochs": 200,
    },
    "demo.yaml": {  # README: U-Net/ResNet18, 2 folds, 6 epochs, flip TTA, on CPU, no download
        "model.arch": "Unet",
        "model.encoder": "resnet18",
        "model.encoder_weights": None,
        "train.device": "cpu",
        "data.n_folds": 2,
        "train.epochs": 6,
        "infer.tta": "flip",
    },
    "unet-vgg16.yaml": {  # binary U-Net with a VGG16 encoder, CE + Dice
        "model.arch": "Unet",
        "model.encoder": "vgg16",
        "model.classes": 1,
        "loss.ce_weight": 0.5,
        "loss.dice_weight": 0.5,
    },
    "fcn8s-voc.yaml": {  # VOC: 21 classes, 255 borders ignored, crops of 320, softmax CE only, no D4
        "model.arch": "FCN8s",
        "model.encoder": "vgg16",
        "model.encoder_weights": None,
        "model.classes": 21,
        "loss.ignore_index": 255,
        "loss.ce_weight": 1.0,
        "loss.dice_weight": 0.0,
        "data.layout": "voc",
        "data.crop_size": 320,
        "aug.d4": False,
        "infer.tta": "none",
    },
    "deeplabv3plus-cityscapes.yaml": {  # 19 evaluated classes, void 255, OS 16, ResNet50, no vertical flips
        "model.arch": "DeepLabV3Plus",
        "model.encoder": "resnet50",
        "model.output_stride": 16,
        "model.classes": 19,
        "loss.ignore_index": 255,
        "data.layout": "cityscapes",
        "data.colormap_json": "colormap.json",
        "aug.d4": False,
        "infer.tta": "none",
    },
    "baseline-fcn.yaml": {  # 0.8 BCE + 0.2 Dice, AdamW 1e-4, 20 epochs, threshold 0.5, no TTA, no search
        "model.arch": "FCN8s",
        "model.encoder": "vgg16",
        "model.classes": 1,
        "loss.ce_weight": 0.8,
        "loss.dice_weight": 0.2,
        "optim.lr": 1e-4,
        "train.epochs": 20,
        "infer.tta": "none",
        "infer.threshold": 0.5,
        "infer.thresholds": (0.5,),
        "infer.min_areas": (0,),
    },
}


def test_every_shipped_recipe_states_its_promises():
    assert sorted(PROMISES) == [p.name for p in CONFIGS]


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_build_their_model_and_keep_their_promises(path, network):
    """``check_model`` builds each recipe's network on the meta device (no memory, no download); named
    weights are looked up in the (empty) caches and their host asked once, here through the ``network``
    stub, which answers. Weights of null ask nothing."""
    from pipeline.model.registry import check_model

    network.reachable = True
    cfg = load_config(path)
    check_model(cfg)
    assert len(network) == (cfg.model.encoder_weights is not None), list(network)
    got = {key: getattr(getattr(cfg, key.split(".")[0]), key.split(".")[1]) for key in PROMISES[path.name]}
    assert got == PROMISES[path.name]


def test_unet_vgg16_differs_from_the_default_recipe_only_where_it_says():
    """Its comment: the same folds, loss, augmentation, OOF search and TTA as default.yaml."""
    from pipeline.core.config import config_changes

    root = Path(__file__).resolve().parents[2] / "configs"
    default, vgg = (to_dict(load_config(root / name)) for name in ("default.yaml", "unet-vgg16.yaml"))
    changed = config_changes(default, vgg, ignore=())  # infer.* included
    keys = sorted(c.split(":")[0] for c in changed)
    assert keys == [
        "data.num_workers",
        "model.encoder",
        "model.encoder_weights",
        "name",
        "optim.lr",
        "train.epochs",
    ], changed


def test_unknown_key_suggests_the_closest():
    with pytest.raises(ConfigError, match="Did you mean 'lr'"):
        load_config(None, ["optim.lrr=0.1"])
    with pytest.raises(ConfigError, match="unknown key 'modle'"):
        load_config(None, ["modle.arch=Unet"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.epochs=abc", "expected an integer"),
        ("train.epochs=1.5", "expected an integer"),
        ("train.compile=maybe", "true/false"),
        ("train.amp=fp8", "bf16, fp16 or none"),
        ("infer.tta=d8", "none, flip, d4, ms or d4_ms"),
        ("model.output_stride=4", "8 or 16"),
        ("data.mean=[1,2]", "expected 3 values"),
        ("train.epochs", "not key=value"),
    ],
)
def test_bad_values_say_what_is_wrong(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_infer_tta_accepts_exactly_the_registered_sets():
    from pipeline.core.tta import TTA_SETS

    for name in TTA_SETS:
        assert load_config(None, [f"infer.tta={name}"]).infer.tta == name
    with pytest.raises(ConfigError, match=", ".join(list(TTA_SETS)[:-1])):
        load_config(None, ["infer.tta=D4"])


def test_bad_yaml_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
    p.write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(ConfigError, match="mapping"):
        load_config(p)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_frozen():
    cfg = Config()
    with pytest.raises(AttributeError):
        cfg.train.epochs = 3  # type: ignore[misc]


def test_run_name_is_derived():
    assert run_name(Config()) == "unet-resnet34-ce_dice"
    assert run_name(load_config(None, ["loss.ce_weight=0"])) == "unet-resnet34-dice"
    assert run_name(load_config(None, ["name=mine"])) == "mine"


def test_null_encoder_weights_and_nullable_ignore_index():
    cfg = load_config(None, ["model.encoder_weights=null", "loss.ignore_index=null"])
    assert cfg.model.encoder_weights is None and cfg.loss.ignore_index is None
    cfg = load_config(None, ["model.encoder_weights=imagenet"])
    assert cfg.model.encoder_weights == "imagenet"


def test_default_yaml_is_the_dataclass_defaults():
    """One source of defaults: configs/default.yaml spells out exactly what load_config(None) builds."""

    root = Path(__file__).resolve().parents[2]
    assert load_config(root / "configs" / "default.yaml") == Config() == load_config(None)


@pytest.mark.parametrize(
    "override, message",
    [
        ("infer.threshold=2.0", "infer.threshold must be between 0 and 1"),
        ("infer.threshold=.nan", "infer.threshold must be between 0 and 1"),
        ("infer.min_area=-1", "infer.min_area must be >= 0"),
        ("infer.thresholds=[]", "infer.thresholds must be a non-empty list"),
        ("infer.min_areas=[0,-4]", "infer.min_areas must be a non-empty list of areas >= 0"),
        ("infer.batch_size=0", "infer.batch_size must be >= 1"),
        ("infer.overlap=512", "0 <= overlap < tile_size"),
    ],
)
def test_inference_values_out_of_range_are_refused_before_any_work(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lr=-1", r"optim.lr must be > 0 \(e.g. 1e-3\), not -1.0"),
        ("optim.lr=.nan", "optim.lr must be > 0"),
        ("optim.lr=.inf", "optim.lr must be > 0"),
        ("data.num_workers=-5", "data.num_workers must be >= 0, or -1 for the cores available, not -5"),
        ("aug.color_p=1.5", "aug.color_p must be a probability"),
        ("train.ema=1", r"train.ema must be >= 0 and < 1"),
        ("train.patience=-1", "train.patience must be >= 0"),
        ("train.device=gpu", "train.device must be auto, cpu, cuda or cuda:N, not 'gpu'"),
        ("loss.ignore_index=300", "loss.ignore_index must be null or 0..255"),
        ("name=../elsewhere", "name must be a plain folder name"),
    ],
)
def test_every_value_is_range_checked_before_any_work(override, message):
    """A negative rate or worker count was accepted, and failed (or trained) hours later (issue 12)."""
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_all_problems_at_once_and_inference_changes_are_free():
    from pipeline.core.config import config_changes, to_dict

    with pytest.raises(ConfigError) as e:
        load_config(None, ["optim.lr=0", "train.epochs=0", "infer.threshold=3"])
    assert str(e.value).count("\n  ") == 3
    base = to_dict(Config())
    other = to_dict(load_config(None, ["infer.thresholds=[0.5]", "model.encoder=resnet18"]))
    assert config_changes(base, other) == ["model.encoder: 'resnet34' -> 'resnet18'"]
    assert config_changes(base, other, ignore=()) == [
        "infer.thresholds: [0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7] -> [0.5]",
        "model.encoder: 'resnet34' -> 'resnet18'",
    ]
    base["train"].pop("runs_dir")  # a key added after a run was saved is no change
    assert config_changes(base, to_dict(Config()), ignore=()) == []
    # How the model is computed is free too (a dotted key in RESUME_FREE), the rest of train.* is not.
    fast = to_dict(load_config(None, ["train.amp=fp16", "train.channels_last=true", "train.compile=true"]))
    assert config_changes(base, fast) == []
    assert config_changes(base, fast, ignore=("infer",)) == [
        "train.amp: 'auto' -> 'fp16'",
        "train.channels_last: 'auto' -> True",
        "train.compile: False -> True",
    ]
