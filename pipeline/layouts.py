"""Data set layouts, by name: each reader turns a folder into labelled train and (optional) test splits.

``LAYOUTS[cfg.data.layout](cfg.data) -> Source``. The competition layout is binary; other layouts
(VOC, Cityscapes-style) register here with their class names and colours.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import DataConfig
from pipeline.data import DataError, Split, load_labelled, load_unlabelled

Color = tuple[int, int, int]


@dataclass
class Source:
    """What a layout reader returns.

    ``train``: labelled tiles for k-fold training. ``test``: tiles to predict, in submission order
    (``test.masks`` set when ground truth exists). ``class_names``/``colors`` index by class id.
    """

    train: Split
    test: Split | None
    class_names: list[str]
    colors: list[Color] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


BUILDING_CLASSES = ["background", "building"]
BUILDING_COLORS: list[Color] = [(0, 0, 0), (255, 255, 255)]


def read_competition(cfg: DataConfig, with_train: bool = True, with_test: bool = True) -> Source:
    """The Tianchi layout (``train/`` + ``train_mask.csv``, ``test_a/`` + sample submission)."""
    root = Path(cfg.root)
    if not root.is_dir():
        raise DataError(
            f"data folder {root} not found; run `make demo` to generate the demo data, or pass DATA=<folder>"
        )
    train = load_labelled(root, cfg.train_dir, cfg.mask_csv) if with_train else Split([], [], None)
    test = None
    if with_test and ((root / cfg.test_dir).is_dir() or (root / cfg.sample_csv).is_file()):
        test = load_unlabelled(root, cfg.test_dir, cfg.sample_csv)
        if (root / cfg.test_mask_csv).is_file():
            truth = load_labelled(root, cfg.test_dir, cfg.test_mask_csv)
            order = {n: i for i, n in enumerate(truth.names)}
            missing = [n for n in test.names if n not in order]
            if missing:
                raise DataError(
                    f"{root / cfg.test_mask_csv} lacks {len(missing)} test tiles ({', '.join(missing[:5])}); "
                    "ground truth must list every tile of the sample submission"
                )
            test = truth.subset([order[n] for n in test.names])
    return Source(train, test, BUILDING_CLASSES, BUILDING_COLORS)


LAYOUTS: dict[str, Callable[..., Source]] = {
    "competition": read_competition,
}


def read_source(cfg: DataConfig, with_train: bool = True, with_test: bool = True) -> Source:
    """Read ``cfg.root`` with the layout named by ``cfg.layout``."""
    try:
        reader = LAYOUTS[cfg.layout]
    except KeyError:
        raise DataError(f"unknown data.layout '{cfg.layout}'; choose one of {sorted(LAYOUTS)}") from None
    return reader(cfg, with_train=with_train, with_test=with_test)
