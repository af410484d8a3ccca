"""A small synthetic aerial data set in the competition layout, byte-identical for a given seed.

    python -m pipeline.data.demo --out data/demo [--n-train 64 --n-test 16 --size 512 --seed 0]

Writes ``<out>/train/*.jpg``, ``train_mask.csv``, ``test_a/*.jpg``, ``test_a_samplesubmit.csv``,
``test_a_mask.csv`` (the truth, for scoring) and ``manifest.csv`` (``name,split,group``), like the
real data. It exists so that ``make demo`` and the tests run anywhere, without downloads.

Tiles are cut from larger synthetic *scenes* (up to 2x2 adjacent tiles each, one scene = one
``group``); a scene has one look (ground palette, street orientation, roof colours, density), so
neighbouring tiles are alike, as in real imagery, and a fold split that ignores the groups leaks.
Scenes never straddle train and test. Scene kinds: urban, suburban, rural (few buildings) and
field (none, so some masks are empty).

What is drawn (sizes are fractions of the tile, so smaller tiles look zoomed out):

* ground: a scene colour with low-frequency colour variation and pixel noise;
* roads: straight bands along the scene's street grid;
* trees: dark green blobs in clusters;
* buildings (the mask): rotated rectangles and L shapes; gable roofs in two tones with a ridge,
  or flat roofs with a gradient and a darker rim; each casts a shadow in one sun direction.

Roofs contrast with the ground but some are as grey as the roads and some sit beside trees, so a
small U-Net learns them in minutes on CPU without the task being trivial.

Re-running with the same parameters does nothing (``<out>/.demo_stamp`` records them); other
parameters regenerate the folder. The folder is built beside ``<out>`` and renamed into place, so
an interrupted run never leaves a half-written data set.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from pipeline.core.errors import cli
from pipeline.data import DataError, rle
from pipeline.data.maskcsv import format_csv, scan_csv

STAMP = ".demo_stamp"
GENERATOR_VERSION = 1  # bump when the drawing changes, so stamped folders are regenerated
TILES_PER_SCENE = 4  # 2x2 adjacent tiles per scene
# Assigned in turn to the scenes of each split: one scene in six is an empty field.
KINDS = ("urban", "suburban", "rural", "urban", "field", "suburban")
JPEG_QUALITY = 90


@dataclass(frozen=True)
class SceneStyle:
    """How one kind of scene looks. Densities are buildings per tile area."""

    ground: tuple[float, float, float]
    buildings_per_tile: float
    roads: tuple[int, int]  # min, max number of roads across the scene
    trees_per_tile: float


STYLES = {
    "urban": SceneStyle((138, 134, 124), 40.0, (2, 3), 4.0),
    "suburban": SceneStyle((104, 122, 78), 18.0, (1, 2), 14.0),
    "rural": SceneStyle((132, 128, 88), 3.0, (0, 1), 22.0),
    "field": SceneStyle((118, 126, 74), 0.0, (0, 1), 18.0),
}
ROOF_COLOURS = np.array(
    [(196, 196, 190), (172, 84, 62), (92, 112, 164), (222, 210, 178), (124, 124, 128), (150, 60, 50)],
    dtype=np.float32,
)
ROAD_COLOUR = (112, 112, 114)
TREE_COLOUR = (44, 72, 38)
SHADOW_DIRECTION = np.array([0.55, 0.83])  # unit vector (x right, y down): sun in the upper left
SHADOW_FACTOR = 0.55


# ----------------------------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Scene:
    """One scene: ``rows x cols`` tiles of ``split``, cut in row-major order, drawn in style ``kind``."""

    index: int
    split: str
    kind: str
    rows: int
    cols: int

    @property
    def group(self) -> str:
        return f"scene_{self.index:03d}"

    @property
    def n_tiles(self) -> int:
        return self.rows * self.cols


def plan_scenes(n_train: int, n_test: int) -> list[Scene]:
    """Chunks of up to ``TILES_PER_SCENE`` tiles per split; each chunk is one scene (2x2, 1x3, 1x2, 1x1)."""
    grids = {1: (1, 1), 2: (1, 2), 3: (1, 3), 4: (2, 2)}
    scenes: list[Scene] = []
    for split, n in (("train", n_train), ("test", n_test)):
        sizes = [TILES_PER_SCENE] * (n // TILES_PER_SCENE) + (
            [n % TILES_PER_SCENE] if n % TILES_PER_SCENE else []
        )
        for i, k in enumerate(sizes):
            scenes.append(Scene(len(scenes), split, KINDS[i % len(KINDS)], *grids[k]))
    return scenes


# ----------------------------------------------------------------------------------------------- drawing


def _rect(cx: float, cy: float, length: float, width: float, angle: float) -> np.ndarray:
    """Corners float [4, 2] (x, y) of a rectangle centred at (cx, cy), long side along ``angle``."""
    u = np.array([math.cos(angle), math.sin(angle)])
    v = np.array([-u[1], u[0]])
    half_l, half_w = u * length / 2, v * width / 2
    c = np.array([cx, cy])
    return np.stack([c - half_l - half_w, c + half_l - half_w, c + half_l + half_w, c - half_l + half_w])


def _l_shape(
    cx: float, cy: float, length: float, width: float, angle: float, rng: np.random.Generator
) -> np.ndarray:
    """Corners float [6, 2] of an L: a length x width box with one corner block removed."""
    cut_l = length * rng.uniform(0.35, 0.6)
    cut_w = width * rng.uniform(0.4, 0.6)
    # In the building's own frame, origin at its centre, x along the long side.
    x0, x1, y0, y1 = -length / 2, length / 2, -width / 2, width / 2
    local = np.array(
        [(x0, y0), (x1, y0), (x1, y1 - cut_w), (x1 - cut_l, y1 - cut_w), (x1 - cut_l, y1), (x0, y1)]
    )
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    return local @ rot.T + np.array([cx, cy])


def _ipoly(points: np.ndarray) -> np.ndarray:
    return np.round(points).astype(np.int32).reshape(-1, 1, 2)


def _ground(h: int, w: int, style: SceneStyle, unit: float, rng: np.random.Generator) -> np.ndarray:
    """Textured ground float32 [H, W, 3]: scene colour + smooth colour blotches + pixel noise."""
    cell = max(4, int(unit / 3))  # blotches about a third of a tile across
    coarse = rng.normal(0.0, 5.0, size=(h // cell + 2, w // cell + 2, 3)).astype(np.float32)  # hue
    coarse += rng.normal(0.0, 12.0, size=(h // cell + 2, w // cell + 2, 1)).astype(np.float32)  # brightness
    field = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
    img = field + np.asarray(style.ground, dtype=np.float32)
    img += rng.standard_normal((h, w, 1), dtype=np.float32) * 7.0  # grain, the same in all channels
    return img


def _draw_roads(
    img: np.ndarray,
    blocked: np.ndarray,
    theta: float,
    style: SceneStyle,
    unit: float,
    rng: np.random.Generator,
) -> None:
    h, w = blocked.shape
    diag = math.hypot(h, w)
    for _ in range(int(rng.integers(style.roads[0], style.roads[1] + 1))):
        angle = theta + (math.pi / 2 if rng.random() < 0.5 else 0.0)
        d = np.array([math.cos(angle), math.sin(angle)])
        c = np.array([rng.uniform(0.15, 0.85) * w, rng.uniform(0.15, 0.85) * h])
        p0, p1 = tuple(np.round(c - d * diag).astype(int)), tuple(np.round(c + d * diag).astype(int))
        width = max(2, int(unit * rng.uniform(0.04, 0.07)))
        shade = rng.uniform(-12, 12)
        cv2.line(img, p0, p1, tuple(float(x + shade) for x in ROAD_COLOUR), width)
        cv2.line(blocked, p0, p1, 1, width + max(2, int(unit * 0.03)))  # keep buildings off the kerb
        if width >= 6:  # a faint centre line on wide roads
            cv2.line(img, p0, p1, (168.0, 168.0, 160.0), 1)


def _draw_trees(
    img: np.ndarray,
    blocked: np.ndarray,
    style: SceneStyle,
    unit: float,
    tiles: float,
    rng: np.random.Generator,
) -> None:
    h, w = blocked.shape
    n_clusters = rng.poisson(style.trees_per_tile * tiles / 4)
    for _ in range(n_clusters):
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        for _ in range(int(rng.integers(1, 8))):
            x = int(cx + rng.normal(0, unit * 0.05))
            y = int(cy + rng.normal(0, unit * 0.05))
            if not (0 <= x < w and 0 <= y < h) or blocked[y, x]:
                continue
            r = max(1, int(unit * rng.uniform(0.015, 0.035)))
            tone = rng.uniform(0.8, 1.15)
            cv2.circle(img, (x, y), r, tuple(float(c * tone) for c in TREE_COLOUR), -1)
            # A lighter crown highlight towards the sun makes trees round, unlike flat roofs.
            cv2.circle(
                img,
                (x - r // 3, y - r // 3),
                max(1, r // 2),
                tuple(float(c * tone * 1.35) for c in TREE_COLOUR),
                -1,
            )


def _draw_buildings(
    img: np.ndarray,
    mask: np.ndarray,
    blocked: np.ndarray,
    theta: float,
    style: SceneStyle,
    unit: float,
    tiles: float,
    rng: np.random.Generator,
) -> None:
    """Place non-overlapping buildings off the roads; paint shadows, then roofs; fill ``mask``."""
    h, w = mask.shape
    shadows = np.zeros((h, w), np.uint8)
    roofs: list[tuple[np.ndarray, np.ndarray, bool]] = []  # polygon, colour, gable
    margin = max(1, int(unit * 0.02))  # the gap kept between buildings
    target = rng.poisson(style.buildings_per_tile * tiles)
    placed = 0
    for _ in range(6 * target):  # attempts: a dense scene rejects many overlapping candidates
        if placed == target:
            break
        length = unit * rng.uniform(0.08, 0.22)
        width = max(3.0, length * rng.uniform(0.4, 0.8))
        length = max(length, width + 1)
        angle = theta + rng.normal(0, 0.05) + (math.pi / 2 if rng.random() < 0.3 else 0.0)
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        l_shaped = rng.random() < 0.3
        poly = (
            _l_shape(cx, cy, length, width, angle, rng) if l_shaped else _rect(cx, cy, length, width, angle)
        )
        # Rasterise into the bounding box only and reject any overlap with roads or other buildings.
        x0, y0 = np.floor(poly.min(axis=0)).astype(int) - margin
        x1, y1 = np.ceil(poly.max(axis=0)).astype(int) + margin + 1
        if x0 < 0 or y0 < 0 or x1 > w or y1 > h:
            continue  # whole buildings only; tiles cut the scene, so some are still cut at tile edges
        local = np.zeros((y1 - y0, x1 - x0), np.uint8)
        cv2.fillPoly(local, [_ipoly(poly - (x0, y0))], 1)
        if (blocked[y0:y1, x0:x1] & cv2.dilate(local, np.ones((2 * margin + 1,) * 2, np.uint8))).any():
            continue
        blocked[y0:y1, x0:x1] |= local
        placed += 1
        colour = ROOF_COLOURS[rng.integers(len(ROOF_COLOURS))] * rng.uniform(0.9, 1.1)
        roofs.append((poly, colour, not l_shaped and rng.random() < 0.5))
        offset = SHADOW_DIRECTION * unit * rng.uniform(0.015, 0.035)  # taller buildings, longer shadows
        cv2.fillPoly(shadows, [_ipoly(poly + offset)], 1)
    img[shadows.astype(bool)] *= SHADOW_FACTOR
    for poly, colour, gable in roofs:
        cv2.fillPoly(mask, [_ipoly(poly)], 1)
        if gable:
            _gable_roof(img, poly, colour)
        else:
            _flat_roof(img, poly, colour)


def _gable_roof(img: np.ndarray, rect: np.ndarray, colour: np.ndarray) -> None:
    """Two tones split along the ridge (the long axis of ``rect`` [4, 2]): one side lit, one shaded."""
    mid_a, mid_b = (rect[0] + rect[3]) / 2, (rect[1] + rect[2]) / 2
    lit = np.stack([rect[0], rect[1], mid_b, mid_a])
    if np.dot(rect[3] - rect[0], SHADOW_DIRECTION) < 0:  # the side facing the sun is the lit one
        lit = np.stack([mid_a, mid_b, rect[2], rect[3]])
    # The whole rectangle first (exactly the pixels of the mask), then the lit half over it.
    cv2.fillPoly(img, [_ipoly(rect)], tuple(float(c) for c in colour * 0.72))
    cv2.fillPoly(img, [_ipoly(lit)], tuple(float(c) for c in np.minimum(colour * 1.12, 255)))
    cv2.line(
        img,
        tuple(np.round(mid_a).astype(int)),
        tuple(np.round(mid_b).astype(int)),
        tuple(float(c) for c in np.minimum(colour * 1.25, 255)),
        1,
    )


def _flat_roof(img: np.ndarray, poly: np.ndarray, colour: np.ndarray) -> None:
    """A linear brightness gradient across the roof and a darker rim (the parapet)."""
    x0, y0 = np.floor(poly.min(axis=0)).astype(int)
    x1, y1 = np.ceil(poly.max(axis=0)).astype(int) + 1
    local = np.zeros((y1 - y0, x1 - x0), np.uint8)
    cv2.fillPoly(local, [_ipoly(poly - (x0, y0))], 1)
    yy, xx = np.mgrid[0 : y1 - y0, 0 : x1 - x0].astype(np.float32)
    span = max(x1 - x0 + y1 - y0, 1)
    ramp = 0.9 + 0.2 * (xx + yy) / span  # brighter towards the lower right, float32 [h, w]
    patch = img[y0:y1, x0:x1]
    inside = local.astype(bool)
    patch[inside] = (ramp[..., None] * colour)[inside]
    rim = inside & ~cv2.erode(local, np.ones((3, 3), np.uint8)).astype(bool)
    patch[rim] *= 0.8


def render_scene(scene: Scene, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Draw one scene: image uint8 [R*size, C*size, 3], mask uint8 [R*size, C*size] (1 = roof)."""
    rng = np.random.default_rng([seed, scene.index])  # one stream per scene: scenes are independent
    style = STYLES[scene.kind]
    h, w = scene.rows * size, scene.cols * size
    unit, tiles = float(size), float(scene.n_tiles)
    theta = rng.uniform(0, math.pi / 2)  # street-grid orientation of the scene
    img = _ground(h, w, style, unit, rng)
    blocked = np.zeros((h, w), np.uint8)  # roads and buildings (keeps new buildings off them)
    mask = np.zeros((h, w), np.uint8)
    _draw_roads(img, blocked, theta, style, unit, rng)
    _draw_trees(img, blocked, style, unit, tiles, rng)
    _draw_buildings(img, mask, blocked, theta, style, unit, tiles, rng)
    img = cv2.GaussianBlur(img, (0, 0), 0.7)  # optics: nothing real is pixel-sharp
    return np.clip(img + 0.5, 0, 255).astype(np.uint8), mask


# ----------------------------------------------------------------------------------------------- files


def _stamp(n_train: int, n_test: int, size: int, seed: int) -> str:
    params = {
        "generator": "pipeline.data.demo",
        "version": GENERATOR_VERSION,
        "n_train": n_train,
        "n_test": n_test,
        "size": size,
        "seed": seed,
    }
    return json.dumps(params, sort_keys=True) + "\n"


def is_current(
    out_dir: str | Path, n_train: int = 64, n_test: int = 16, size: int = 512, seed: int = 0
) -> bool:
    """True if ``out_dir`` holds a complete demo data set made with these parameters."""
    out = Path(out_dir)
    stamp = out / STAMP
    return (
        stamp.is_file()
        and stamp.read_text() == _stamp(n_train, n_test, size, seed)
        and (out / "train_mask.csv").is_file()
        and (out / "manifest.csv").is_file()
    )


def _jpeg(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def _write_folder(tmp: Path, n_train: int, n_test: int, size: int, seed: int) -> None:
    """Render every scene and write the whole layout into ``tmp``."""
    scenes = plan_scenes(n_train, n_test)
    # Tile names are shuffled across scenes: sorted names must not reveal the groups.
    numbers = np.random.default_rng([seed, 1_000_003]).permutation(n_train + n_test) + 1
    split_dir = {"train": tmp / "train", "test": tmp / "test_a"}
    for d in split_dir.values():
        d.mkdir(parents=True)
    rows: dict[str, list[tuple[str, str, str]]] = {"train": [], "test": []}  # name, rle, group
    k = 0
    for scene in scenes:
        image, mask = render_scene(scene, size, seed)
        for r in range(scene.rows):
            for c in range(scene.cols):
                name = f"demo_{numbers[k]:04d}.jpg"
                k += 1
                window = np.s_[r * size : (r + 1) * size, c * size : (c + 1) * size]
                (split_dir[scene.split] / name).write_bytes(_jpeg(image[window]))
                rows[scene.split].append((name, rle.encode(mask[window]), scene.group))
    train, test = sorted(rows["train"]), sorted(rows["test"])
    (tmp / "train_mask.csv").write_text(format_csv((n, s) for n, s, _ in train))
    (tmp / "test_a_mask.csv").write_text(format_csv((n, s) for n, s, _ in test))
    (tmp / "test_a_samplesubmit.csv").write_text(format_csv((n, "") for n, _, _ in test))
    manifest = sorted([(n, "train", g) for n, _, g in train] + [(n, "test_a", g) for n, _, g in test])
    (tmp / "manifest.csv").write_text(
        "name,split,group\n" + "".join(f"{n},{s},{g}\n" for n, s, g in manifest)
    )
    (tmp / STAMP).write_text(_stamp(n_train, n_test, size, seed))  # last: marks the folder complete


def generate(
    out_dir: str | Path, n_train: int = 64, n_test: int = 16, size: int = 512, seed: int = 0
) -> Path:
    """Write the demo data set to ``out_dir`` (see the module docstring) and return its path.

    Does nothing if ``out_dir`` already holds this data set (same parameters, per ``.demo_stamp``).
    A different demo data set there is replaced; a folder that is not a demo data set is an error.
    """
    if n_train < 1 or n_test < 0 or size < 32:
        raise DataError(
            "the demo data needs --n-train >= 1, --n-test >= 0 and --size >= 32; "
            f"got {n_train}, {n_test}, {size}"
        )
    out = Path(out_dir)
    if is_current(out, n_train, n_test, size, seed):
        return out
    if out.exists() and not (out / STAMP).is_file() and any(out.iterdir()):
        raise FileExistsError(
            f"{out} exists and is not a demo data set (no {STAMP}); pick another --out or delete it"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        _write_folder(tmp, n_train, n_test, size, seed)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700 folders
        if is_current(out, n_train, n_test, size, seed):  # another process finished first
            shutil.rmtree(tmp)
            return out
        if out.exists():  # an older demo set: move it aside, swap the new one in, then delete it
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old / "data")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def summary(out_dir: str | Path, size: int) -> str:
    """One line about a generated folder: tiles, scenes, building fraction and empty masks of train."""
    out = Path(out_dir)
    scan = scan_csv(out / "train_mask.csv")
    if scan.errors:
        raise DataError(scan.error_text())
    rles = [r.rle for r in scan.rows]
    masks = rle.decode_many(rles, (size, size), source=str(out / "train_mask.csv"))
    fractions = masks.reshape(len(masks), -1).mean(axis=1)
    manifest = (out / "manifest.csv").read_text().splitlines()[1:]
    n_groups = len({line.rsplit(",", 1)[1] for line in manifest})
    return (
        f"{len(rles)} train + {len(manifest) - len(rles)} test tiles of {size}x{size}, {n_groups} scenes; "
        f"train building fraction {fractions.mean():.3f}, {int((fractions == 0).sum())} empty masks"
    )


@cli
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.data.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("data/demo"), help="output folder (default data/demo)")
    p.add_argument("--n-train", type=int, default=64, help="training tiles (default 64)")
    p.add_argument("--n-test", type=int, default=16, help="test tiles (default 16)")
    p.add_argument("--size", type=int, default=512, help="tile size in pixels (default 512)")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed, same bytes (default 0)")
    a = p.parse_args(argv)
    if is_current(a.out, a.n_train, a.n_test, a.size, a.seed):
        print(f"{a.out} is up to date ({STAMP} matches); nothing to do")
        return 0
    generate(a.out, a.n_train, a.n_test, a.size, a.seed)
    print(f"wrote {a.out}: {summary(a.out, a.size)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
