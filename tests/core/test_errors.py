"""pipeline.core.errors: every entry point turns bad input into one line `error: ...`, exit 2, no traceback.

One bad input per entry point (and per kind of fault the issue 12 survey found), run in-process through
``main(argv)``; one run through the interpreter as `make` runs it.
"""

from __future__ import annotations

import errno
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import yaml

from pipeline.core import launch
from pipeline.core.config import ConfigError, save_config
from pipeline.core.errors import cli, os_error_message
from pipeline.data import check, demo, folds
from pipeline.geo import tiling
from pipeline.infer import footprints, predict, pseudo, scenes, score, submit
from pipeline.infer import validate as validate_mod
from pipeline.model import weights
from pipeline.report import write
from pipeline.train import trainer, tune

ROOT = Path(__file__).resolve().parents[2]


def test_cli_maps_project_and_os_errors_to_one_line(capsys):
    def raising(exc: BaseException) -> Callable:
        @cli
        def main(argv=None) -> int:
            raise exc

        return main

    assert raising(ConfigError("train.epochs must be >= 1"))([]) == 2
    assert capsys.readouterr().err == "error: train.epochs must be >= 1\n"
    assert raising(OSError(errno.ENOSPC, "No space left on device", "subs/x.csv"))([]) == 2
    assert (
        capsys.readouterr().err
        == "error: subs/x.csv: No space left on device; free space on that disk, or write somewhere else\n"
    )
    assert raising(KeyboardInterrupt())([]) == 130
    with pytest.raises(ZeroDivisionError):  # a bug in buildseg keeps its traceback
        raising(ZeroDivisionError())([])
    assert (
        os_error_message(FileNotFoundError("no submission in submissions/"))
        == "no submission in submissions/"
    )


# ----------------------------------------------------------------------------- every entry point, a bad input


def _data(demo_root: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(demo_root, tmp_path / "data"))


def _train(tiny_cfg, tmp_path: Path, *extra: str, root: Path | None = None) -> list[str]:
    cfg = tiny_cfg(*([f"data.root={root}"] if root else []))
    save_config(cfg, tmp_path / "cfg.yaml")
    return ["--config", str(tmp_path / "cfg.yaml"), *extra]


def _run_made_before_tiles_were_added(tiny_cfg, demo_root, tmp_path):
    root = _data(demo_root, tmp_path)
    cfg = tiny_cfg(f"data.root={root}")
    run_dir = Path(cfg.train.runs_dir) / "tiny"
    run_dir.mkdir(parents=True)
    save_config(cfg, run_dir / "config.yaml")
    names = sorted(p.name for p in (root / "train").iterdir())
    pd.DataFrame({"name": names[:-1], "fold": [i % 2 for i in range(len(names) - 1)]}).to_csv(
        run_dir / "folds.csv", index=False
    )
    return (
        trainer.main,
        _train(tiny_cfg, tmp_path, root=root),
        "training tiles changed since this run was made",
    )


def _manifest_missing_rows(tiny_cfg, demo_root, tmp_path):
    root = _data(demo_root, tmp_path)
    lines = (root / "manifest.csv").read_text().splitlines()
    (root / "manifest.csv").write_text("\n".join(lines[:-2]) + "\n")
    return trainer.main, _train(tiny_cfg, tmp_path, root=root), "make folds ARGS=--no-groups"


def _stale_data_folds(tiny_cfg, demo_root, tmp_path):
    root = _data(demo_root, tmp_path)
    names = sorted(p.name for p in (root / "train").iterdir())[:-1]
    pd.DataFrame({"name": names, "fold": [i % 2 for i in range(len(names))]}).to_csv(
        root / "folds.csv", index=False
    )
    return trainer.main, _train(tiny_cfg, tmp_path, root=root), "lacks 1 training tiles .* re-run make folds"


def _bad_yaml_config(tiny_cfg, demo_root, tmp_path):
    (tmp_path / "bad.yaml").write_text("train: {epochs: 3\n")
    return trainer.main, ["--config", str(tmp_path / "bad.yaml")], "not valid YAML"


def _runs_dir_is_a_file(tiny_cfg, demo_root, tmp_path):
    (tmp_path / "file").write_text("x")
    return (
        trainer.main,
        _train(tiny_cfg, tmp_path, f"train.runs_dir={tmp_path / 'file' / 'runs'}"),
        "Not a directory",
    )


def _manifest(tmp_path: Path, **edit) -> Path:
    """A run folder whose manifest is what make tune writes, with ``edit`` applied by hand."""
    from pipeline.core.config import InferConfig
    from pipeline.runs.manifest import Manifest, write_manifest

    (tmp_path / "run").mkdir(exist_ok=True)
    write_manifest(Manifest(tmp_path / "run", ("fold0/best.pt",), InferConfig(tta="none")))
    data = {**yaml.safe_load((tmp_path / "run" / "manifest.yaml").read_text()), **edit}
    (tmp_path / "run" / "manifest.yaml").write_text(yaml.safe_dump(data))
    return tmp_path / "run"


def _broken_manifest(tmp_path: Path) -> Path:
    run = _manifest(tmp_path)
    (run / "manifest.yaml").write_text("checkpoints: [a\n")
    return run


def _weights_of_another_model(tiny_cfg, demo_root, tmp_path):
    """A checkpoint whose config (resnet18) does not match its weights (the tiny mobilenet)."""
    from pipeline.core.config import to_dict
    from pipeline.model.registry import build_model
    from pipeline.runs.checkpoint import BestCheckpoint, write_checkpoint

    weights = build_model(tiny_cfg(), pretrained=False).state_dict()
    config = to_dict(tiny_cfg("model.encoder=resnet18"))
    run = _manifest(tmp_path)
    write_checkpoint(
        run / "fold0" / "best.pt", BestCheckpoint(weights, config, 0, 1, "val_dice", 0.5, 0.5, 0)
    )
    argv = [
        "--run",
        str(run),
        "--data",
        str(demo_root),
        "--device",
        "cpu",
        "--workers",
        "0",
        "--out",
        str(tmp_path / "s"),
    ]
    return submit.main, argv, "weights do not fit the model their config describes"


CASES: dict[str, Callable] = {
    "train FOLDS=a": lambda c, d, t: (
        trainer.main,
        _train(c, t, "--folds", "a"),
        "not a list of fold numbers",
    ),
    "train unknown arch": lambda c, d, t: (
        trainer.main,
        _train(c, t, "model.arch=Unett"),
        "unknown model.arch",
    ),
    "train unknown encoder": lambda c, d, t: (
        trainer.main,
        _train(c, t, "model.encoder=resnet43"),
        "resnet34",
    ),
    "train negative lr": lambda c, d, t: (trainer.main, _train(c, t, "optim.lr=-1"), "optim.lr must be > 0"),
    "train negative workers": lambda c, d, t: (
        trainer.main,
        _train(c, t, "data.num_workers=-5"),
        "num_workers",
    ),
    "train more folds than groups": lambda c, d, t: (
        trainer.main,
        _train(c, t, "data.n_folds=30"),
        "data.n_folds=",
    ),
    "train manifest.csv missing rows": _manifest_missing_rows,
    "train stale DATA/folds.csv": _stale_data_folds,
    "train tiles added after a run": _run_made_before_tiles_were_added,
    "train config with a YAML error": _bad_yaml_config,
    "train runs folder not writable": _runs_dir_is_a_file,
    "tune no run": lambda c, d, t: (tune.main, ["--run", str(t / "nowhere")], "not found"),
    "submit manifest YAML error": lambda c, d, t: (
        submit.main,
        ["--run", str(_broken_manifest(t))],
        "not valid YAML",
    ),
    "submit manifest batch_size 0": lambda c, d, t: (
        submit.main,
        ["--run", str(_manifest(t, batch_size=0))],
        "batch_size must be >= 1",
    ),
    "submit weights of another model": _weights_of_another_model,
    "predict no run": lambda c, d, t: (predict.main, ["--run", str(t / "nowhere")], "not found"),
    "score no submission": lambda c, d, t: (score.main, [str(t / "nope.csv")], "not found"),
    "validate no size": lambda c, d, t: (validate_mod.main, [str(t / "sub.csv")], "--size"),
    "folds no data": lambda c, d, t: (folds.main, ["--data", str(t / "nowhere")], "not found"),
    "scene no run": lambda c, d, t: (
        scenes.main,
        ["--run", str(t / "nowhere"), "--scene", "x.tif", "--out", "y.tif"],
        "not found",
    ),
    "make-tiles no scenes": lambda c, d, t: (
        tiling.main,
        ["make-tiles", "--images", str(t / "a"), "--gt", str(t / "b"), "--out", str(t / "c")],
        "images folder .* not found",
    ),
    "demo_data out is a file": lambda c, d, t: (
        demo.main,
        ["--out", str(Path(shutil.copy(d / "train_mask.csv", t / "f")) / "demo")],
        "File exists; a file is in the way",
    ),
    "report no run": lambda c, d, t: (write.main, [str(t / "nowhere")], "not found"),
    "weights unknown encoder": lambda c, d, t: (weights.main, ["--encoder", "resnet43"], "did you mean"),
    "pseudo no run": lambda c, d, t: (pseudo.main, ["--run", str(t / "nowhere")], "not found"),
    "score PNGs without data": lambda c, d, t: (
        score.main,
        ["--pred-dir", str(t)],
        "--pred-dir needs --data",
    ),
    "score footprints against a CSV": lambda c, d, t: (
        score.main,
        ["--footprints", str(t / "b.gpkg"), "--truth", str(d / "test_a_mask.csv")],
        "--footprints needs --truth",
    ),
    "footprints unknown output suffix": lambda c, d, t: (
        footprints.main,
        ["--mask", str(t / "mask.tif"), "--out", str(t / "b.shp")],
        r"\.shp",
    ),
    "launch node rank past the nodes": lambda c, d, t: (
        launch.main,
        ["--nodes", "2", "--node-rank", "5", "--", "-m", "pipeline.train"],
        "NODE_RANK='5' with NODES=2",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_entry_point_turns_a_bad_input_into_one_message(case, tiny_cfg, demo_root, tmp_path, capsys):
    main, argv, fragment = CASES[case](tiny_cfg, demo_root, tmp_path)
    try:
        code = main(argv)
    except SystemExit as e:  # argparse: a usage line and exit 2
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and "error: " in err, err
    assert pd.Series([err]).str.contains(fragment).all(), err
    # One message: one "error:" line (notes may come before it; a list of problems follows it, indented).
    lines = err.splitlines()
    first = next(i for i, line in enumerate(lines) if "error: " in line)
    assert all(line.startswith(" ") for line in lines[first + 1 :]) and "error: " not in " ".join(
        lines[first + 1 :]
    ), err


def test_check_data_reports_instead_of_raising(tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    assert check.main([str(tmp_path / "file")]) == 1
    assert "data folder not found" in capsys.readouterr().out


def test_a_real_interpreter_prints_one_line(tiny_cfg, tmp_path):
    """As `make train ARGS=model.arch=Unett` runs it: the exit code and stderr a user sees."""
    out = subprocess.run(
        [sys.executable, "-m", "pipeline.train.trainer", *_train(tiny_cfg, tmp_path, "model.arch=Unett")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().startswith("error: unknown model.arch 'Unett'. Did you mean 'Unet'?")


def test_no_main_catches_errors_itself():
    """Every entry point's errors reach the user through the one boundary (``cli``): a ``main`` that catches
    ``ValueError`` itself would also swallow bugs as "bad input", and print its own format."""
    import ast

    local = []
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and node.name == "main":
                decorated = any(getattr(d, "id", None) == "cli" for d in node.decorator_list)
                handlers = [h for h in ast.walk(node) if isinstance(h, ast.ExceptHandler)]
                if not decorated or handlers:
                    local.append(
                        f"{path.relative_to(ROOT)}: {'no @cli' if not decorated else 'catches itself'}"
                    )
    assert local == []


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--out", "{t}/d", "--size", "8"],
            "error: the demo data needs --n-train >= 1, --n-test >= 0 and --size >= 32",
        ),
    ],
)
def test_demo_data_bad_arguments_are_one_line(tmp_path, capsys, argv, message):
    assert demo.main([a.format(t=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1


def test_make_tiles_of_a_single_band_scene_is_one_line(tmp_path, capsys):
    import numpy as np
    from rasterio.transform import from_origin
    from synthetic_scenes import write_tif

    for folder in ("images", "gt"):
        (tmp_path / folder).mkdir()
        band = np.zeros((64, 64), np.uint8)
        write_tif(tmp_path / folder / "s.tif", band, transform=from_origin(0, 64, 1, 1))
    argv = [
        "make-tiles",
        "--images",
        str(tmp_path / "images"),
        "--gt",
        str(tmp_path / "gt"),
        "--out",
        str(tmp_path / "o"),
    ]
    assert tiling.main(argv) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith(f"error: {tmp_path / 'images' / 's.tif'}: expected an 8-bit RGB image")
        and err.count("\n") == 1
    )
