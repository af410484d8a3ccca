"""Data set layouts, by name: each reader turns a folder into labelled train and (optional) test splits.

``read_source(cfg.data) -> Source`` reads with ``layout(cfg.data.layout).read``; a :class:`Layout` in
the registry ``LAYOUTS`` also says what callers may assume (``checkable``, ``rle_masks``,
``fixed_tile_size``), so no caller switches on a layout's name. Three layouts:

``competition`` (binary buildings; see :mod:`pipeline.data.dataset`)::

    <root>/train/*.jpg  train_mask.csv  test_a/*.jpg  test_a_samplesubmit.csv  [test_a_mask.csv]

``voc`` (PASCAL VOC segmentation)::

    <root>/JPEGImages/<id>.jpg
    <root>/SegmentationClass/<id>.png          palette PNG: the palette *index* of a pixel is its class id,
                                               255 = the "void" border (ignored by loss and metrics)
    <root>/ImageSets/Segmentation/train.txt    one <id> per line: the training split (k-fold)
    <root>/ImageSets/Segmentation/val.txt      optional: the test split, scored against its masks

  Classes are VOC's 21 (background + 20) with the standard VOC palette, unless ``data.colormap_json``
  is given (then its classes, in the format below).

``cityscapes`` (a simple Cityscapes-style layout: label-id PNGs plus a colormap)::

    <root>/images/{train,val}/[<city>/]<name>.png|.jpg
    <root>/labels/{train,val}/[<city>/]<stem>.png   8-bit (mode L or P) PNG of label ids, same stem
                                                    (Cityscapes' ``*_leftImg8bit`` images also find
                                                    their ``*_gtFine_labelIds.png``)
    data.colormap_json                              required, e.g.
        {"classes": [{"id": 0, "name": "road", "color": [128, 64, 128]}, ...], "ignore_index": 255}

Colormap JSON. ``classes`` lists ``id`` (the value stored in the PNG), ``name`` and ``color`` (RGB).
Without ``train_id`` the ids are the class ids and must be 0..K-1. With ``train_id`` (Cityscapes'
labelIds -> trainIds) the PNG value ``id`` is mapped to class ``train_id`` on reading; entries whose
``train_id`` is the ``ignore_index`` are void. A mask pixel whose value is neither a listed id nor
``ignore_index`` (default 255; null for none) is an error naming the file: a silent wrong label is
the worst kind of bug.
A relative ``colormap_json`` path is looked up in the data folder first, then the working directory.

Masks of the ``voc`` and ``cityscapes`` layouts are read lazily, one PNG per ``masks[i]``, at their
native size (never resized here: augmentation crops/pads them with nearest-neighbour only).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.config import DataConfig
from pipeline.data import DataError
from pipeline.data.dataset import Split, load_labelled, load_unlabelled
from pipeline.data.images import image_size
from pipeline.data.labels import LabelPngs
from pipeline.data.maskcsv import IMAGE_SUFFIXES

Color = tuple[int, int, int]


@dataclass
class Source:
    """What a layout reader returns.

    ``train``: labelled tiles for k-fold training. ``test``: tiles to predict, in submission order
    (``test.masks`` set when ground truth exists). ``class_names``/``colors`` index by class id.
    ``ignore_index``: the mask value that means "not labelled" in this layout (VOC: 255), or None.
    """

    train: Split
    test: Split | None
    class_names: list[str]
    colors: list[Color] = field(default_factory=list)
    ignore_index: int | None = None
    # Teacher-labelled test tiles (data.pseudo_labels), read once per run by pipeline.train.trainer; every
    # fold trains on them, none validates on them (pipeline.train.engine.fold_data).
    pseudo: Split | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


BUILDING_CLASSES = ["background", "building"]
BUILDING_COLORS: list[Color] = [(0, 0, 0), (255, 255, 255)]

VOC_CLASSES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
]  # fmt: skip
VOC_IGNORE = 255


def voc_colors(n: int = 256) -> list[Color]:
    """The standard VOC palette: colour of class ``c`` from the bits of ``c`` spread over R, G, B.

    ``voc_colors()[0] == (0, 0, 0)``, ``[1] == (128, 0, 0)``, ``[15] == (192, 128, 128)`` (person),
    ``[255] == (224, 224, 192)`` (the void border).
    """
    colors = []
    for c in range(n):
        r = g = b = 0
        cid = c
        for j in range(8):
            r |= ((cid >> 0) & 1) << (7 - j)
            g |= ((cid >> 1) & 1) << (7 - j)
            b |= ((cid >> 2) & 1) << (7 - j)
            cid >>= 3
        colors.append((r, g, b))
    return colors


# ----------------------------------------------------------------------------- colormaps and masks


@dataclass(frozen=True)
class Colormap:
    """Classes of a multi-class layout.

    ``names``/``colors`` [K] index by class id; ``lut`` int16 [256] maps a PNG value to its class id
    (or ``ignore_index``), -1 where the value is not allowed.
    """

    names: list[str]
    colors: list[Color]
    ignore_index: int | None
    lut: np.ndarray
    source: str = ""

    @classmethod
    def identity(
        cls, names: Sequence[str], colors: Sequence[Color], ignore_index: int | None, source: str
    ) -> Colormap:
        """PNG value = class id for 0..K-1, plus ``ignore_index``."""
        lut = np.full(256, -1, dtype=np.int16)
        lut[: len(names)] = np.arange(len(names))
        if ignore_index is not None:
            lut[ignore_index] = ignore_index
        return cls(list(names), [tuple(c) for c in colors], ignore_index, lut, source)


def _fail(path: Path, what: str) -> DataError:
    example = '{"classes": [{"id": 0, "name": "road", "color": [128, 64, 128]}, ...], "ignore_index": 255}'
    return DataError(f"colormap {path}: {what}. Expected JSON like {example}")


def read_colormap(path: str | Path) -> Colormap:
    """Read a colormap JSON (format in the module docstring) into a :class:`Colormap`."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"colormap {path} not found; set data.colormap_json to the colormap file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _fail(path, f"not valid JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("classes"), list) or not data["classes"]:
        raise _fail(path, "needs a non-empty list 'classes'")
    ignore = data.get("ignore_index", VOC_IGNORE)
    if ignore is not None and (not isinstance(ignore, int) or not 0 <= ignore <= 255):
        raise _fail(path, f"ignore_index must be an integer 0..255 or null, got {ignore!r}")
    entries = []
    for i, c in enumerate(data["classes"]):
        if not isinstance(c, dict) or not {"id", "name", "color"} <= set(c):
            raise _fail(path, f"classes[{i}] must have keys id, name, color; got {c!r}")
        pid, tid, color = c["id"], c.get("train_id", c["id"]), c["color"]
        if not (isinstance(pid, int) and 0 <= pid <= 255 and isinstance(tid, int) and 0 <= tid <= 255):
            raise _fail(path, f"classes[{i}] ({c['name']}): id and train_id must be integers 0..255")
        if not (
            isinstance(color, list)
            and len(color) == 3
            and all(isinstance(v, int) and 0 <= v <= 255 for v in color)
        ):
            raise _fail(path, f"classes[{i}] ({c['name']}): color must be [r, g, b] with 0..255 integers")
        entries.append((pid, tid, str(c["name"]), (color[0], color[1], color[2])))
    ids = [e[0] for e in entries]
    dup = sorted({x for x in ids if ids.count(x) > 1})
    if dup:
        raise _fail(path, f"ids {dup} are listed twice or more; list each PNG value once")
    if ignore is not None and ignore in ids and not any(e[0] == ignore and e[1] == ignore for e in entries):
        raise _fail(path, f"id {ignore} is both a class and the ignore_index; change one of them")
    classes = sorted((e for e in entries if e[1] != ignore), key=lambda e: e[1])
    tids = [e[1] for e in classes]
    if tids != list(range(len(tids))):
        raise _fail(
            path,
            f"class ids (train_id, or id when train_id is absent) must be 0..K-1, each once; got {tids}. "
            "Renumber them, or map the PNG values with train_id",
        )
    lut = np.full(256, -1, dtype=np.int16)
    for pid, tid, _, _ in entries:
        lut[pid] = tid
    if ignore is not None:
        lut[ignore] = ignore
    return Colormap([e[2] for e in classes], [e[3] for e in classes], ignore, lut, str(path))


def _resolve(root: Path, path: str) -> Path:
    """A relative path is looked up in the data folder first, then the working directory."""
    p = Path(path).expanduser()
    if p.is_absolute() or not (root / p).is_file():
        return p
    return root / p


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DataError(f"{path}/ not found: {what}")
    return path


def _problems(items: list[str], what: str, fix: str) -> DataError:
    shown = ", ".join(items[:10]) + (f", ... ({len(items)} in all)" if len(items) > 10 else "")
    return DataError(f"{what}: {shown}. {fix}")


# ----------------------------------------------------------------------------- readers


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
            test = truth.select(
                test.names, f"{root / cfg.test_mask_csv} must list every tile of the sample submission"
            )
    return Source(train, test, BUILDING_CLASSES, BUILDING_COLORS)


def _voc_split(root: Path, list_path: Path, colormap: Colormap) -> Split:
    lines = [ln.strip() for ln in list_path.read_text().splitlines()]
    ids = [ln.split()[0] for ln in lines if ln]
    if not ids:
        raise DataError(f"{list_path} lists no images; write one image id per line (e.g. 2007_000032)")
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise _problems(dup, f"ids listed twice in {list_path}", "Keep one line per image")
    img_dir, mask_dir = root / "JPEGImages", root / "SegmentationClass"
    images, masks, missing_img, missing_mask = [], [], [], []
    for i in ids:
        found = next((img_dir / f"{i}{s}" for s in IMAGE_SUFFIXES if (img_dir / f"{i}{s}").is_file()), None)
        if found is None:
            missing_img.append(i)
        images.append(found)
        masks.append(mask_dir / f"{i}.png")
        if not masks[-1].is_file():
            missing_mask.append(i)
    if missing_img:
        raise _problems(
            missing_img,
            f"ids in {list_path} have no image in {img_dir}/ (<id>.jpg)",
            "Restore the images or remove the lines",
        )
    if missing_mask:
        raise _problems(
            missing_mask,
            f"ids in {list_path} have no mask in {mask_dir}/ (<id>.png)",
            "Restore the masks or remove the lines",
        )
    return Split([p.name for p in images], images, LabelPngs(masks, colormap))


def read_voc(cfg: DataConfig, with_train: bool = True, with_test: bool = True) -> Source:
    """PASCAL VOC: train = ``ImageSets/Segmentation/train.txt``; test = ``val.txt``, its masks the truth."""
    root = Path(cfg.root)
    _require_dir(root, "the VOC folder (the one holding JPEGImages/, SegmentationClass/, ImageSets/)")
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        _require_dir(
            root / sub,
            "a VOC folder has JPEGImages/, SegmentationClass/ and ImageSets/Segmentation/; "
            f"is data.root={root} the VOC2012 folder itself?",
        )
    if cfg.colormap_json:
        cmap = read_colormap(_resolve(root, cfg.colormap_json))
    else:
        cmap = Colormap.identity(VOC_CLASSES, voc_colors(len(VOC_CLASSES)), VOC_IGNORE, "the VOC classes")
    lists = root / "ImageSets" / "Segmentation"
    train = Split([], [], None)
    if with_train:
        if not (lists / "train.txt").is_file():
            raise DataError(f"{lists / 'train.txt'} not found: list the training image ids in it, one a line")
        train = _voc_split(root, lists / "train.txt", cmap)
    test = _voc_split(root, lists / "val.txt", cmap) if with_test and (lists / "val.txt").is_file() else None
    return Source(train, test, cmap.names, cmap.colors, cmap.ignore_index)


def _cityscapes_label(label_dir: Path, rel: Path) -> Path:
    """``<stem>.png`` beside the image's relative path, or Cityscapes' ``*_gtFine_labelIds.png``."""
    plain = label_dir / rel.with_suffix(".png")
    if plain.is_file() or not rel.stem.endswith("_leftImg8bit"):
        return plain
    cs = label_dir / rel.parent / (rel.stem.removesuffix("_leftImg8bit") + "_gtFine_labelIds.png")
    return cs if cs.is_file() else plain


def _cityscapes_split(root: Path, split: str, cmap: Colormap, need_labels: bool) -> Split | None:
    img_dir, label_dir = root / "images" / split, root / "labels" / split
    if not img_dir.is_dir():
        if need_labels:
            raise DataError(f"{img_dir}/ not found: the cityscapes layout keeps images in images/{split}/")
        return None
    rels = sorted(
        p.relative_to(img_dir)
        for p in img_dir.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not rels:
        raise DataError(f"{img_dir}/ holds no images (.png/.jpg)")
    images = [img_dir / r for r in rels]
    names = [r.as_posix() for r in rels]
    if not label_dir.is_dir():
        if need_labels:
            raise DataError(f"{label_dir}/ not found: training needs a label PNG for each image there")
        return Split(names, images, None)
    labels = [_cityscapes_label(label_dir, r) for r in rels]
    missing = [str(p.relative_to(root)) for p in labels if not p.is_file()]
    if missing:
        raise _problems(
            missing,
            f"images in {img_dir}/ have no label PNG",
            f"Add them (same relative path and stem, .png) to {label_dir}/ or remove the images",
        )
    return Split(names, images, LabelPngs(labels, cmap))


def read_cityscapes(cfg: DataConfig, with_train: bool = True, with_test: bool = True) -> Source:
    """Cityscapes-style: ``images/{train,val}`` + ``labels/{train,val}`` label-id PNGs + a colormap JSON."""
    root = Path(cfg.root)
    _require_dir(root, "the data folder (holding images/ and labels/)")
    if not cfg.colormap_json:
        raise DataError(
            "layout cityscapes needs data.colormap_json: a JSON file mapping label ids to names and colours, "
            'e.g. {"classes": [{"id": 0, "name": "road", "color": [128, 64, 128]}], "ignore_index": 255}'
        )
    cmap = read_colormap(_resolve(root, cfg.colormap_json))
    train = _cityscapes_split(root, "train", cmap, need_labels=True) if with_train else Split([], [], None)
    test = _cityscapes_split(root, "val", cmap, need_labels=False) if with_test else None
    return Source(train, test, cmap.names, cmap.colors, cmap.ignore_index)


# ----------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class Layout:
    """A layout: its reader and what the rest of the pipeline may assume about it.

    Callers ask for a capability (``layout(cfg.data.layout).checkable``), never for a layout's name.
    """

    read: Callable[..., Source]  # (cfg: DataConfig, with_train=True, with_test=True) -> Source
    rle_masks: bool = False  # masks are competition CSVs (name<TAB>rle) and so are submissions
    fixed_tile_size: bool = False  # every tile has one size (check_data checks it): no crop_size needed
    checkable: bool = False  # python -m pipeline.data.check (and require_clean) can check the folder


LAYOUTS: dict[str, Layout] = {
    "competition": Layout(read_competition, rle_masks=True, fixed_tile_size=True, checkable=True),
    "voc": Layout(read_voc),
    "cityscapes": Layout(read_cityscapes),
}


def layout(name: str) -> Layout:
    """The registered layout ``name`` (``data.layout``); a DataError naming the choices if unknown."""
    try:
        return LAYOUTS[name]
    except KeyError:
        raise DataError(f"unknown data.layout '{name}'; choose one of {sorted(LAYOUTS)}") from None


def read_source(cfg: DataConfig, with_train: bool = True, with_test: bool = True) -> Source:
    """Read ``cfg.root`` with the layout named by ``cfg.layout``."""
    return layout(cfg.layout).read(cfg, with_train=with_train, with_test=with_test)


def check_source(cfg: Any, source: Source) -> None:
    """The data must fit the run's config (a :class:`pipeline.core.config.Config`): class count, ignore value,
    and one image size unless ``data.crop_size`` pads and crops them."""
    k = max(2, cfg.model.classes)
    if source.num_classes != k:
        raise DataError(
            f"data.layout={cfg.data.layout} at {cfg.data.root} has {source.num_classes} classes "
            f"({', '.join(source.class_names[:4])}, ...) but model.classes={cfg.model.classes}; set "
            f"model.classes={source.num_classes if source.num_classes > 2 else 1}"
        )
    ignore = source.ignore_index
    if cfg.model.classes > 1 and ignore is not None and cfg.loss.ignore_index != ignore:
        raise DataError(
            f"the {cfg.data.layout} masks use {source.ignore_index} for unlabelled pixels; set "
            f"loss.ignore_index={source.ignore_index} (now {cfg.loss.ignore_index})"
        )
    if not layout(cfg.data.layout).fixed_tile_size and not cfg.data.crop_size:
        sizes = {image_size(p) for p in source.train.image_paths}
        if len(sizes) > 1:
            raise DataError(
                f"the training images have {len(sizes)} different sizes (e.g. {sorted(sizes)[:3]}); set "
                "data.crop_size (e.g. 320) so batches pad and crop them to one size"
            )
