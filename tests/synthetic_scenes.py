"""Synthetic georeferenced scenes (rectangular 'buildings' on a smooth texture) for the tiling,
scene and footprint tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS

CRS_UTM = CRS.from_epsg(32631)
TRANSFORM = Affine(0.3, 0.0, 431250.0, 0.0, -0.3, 5411200.0)  # 30 cm pixels, north-up


def scene(height: int, width: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """RGB uint8 [H, W, 3] with rectangular 'buildings', and the gt mask 0/255 [H, W]."""
    rng = np.random.default_rng(seed)
    gt = np.zeros((height, width), dtype=np.uint8)
    for _ in range(height * width // 20000 + 3):
        y, x = rng.integers(0, height), rng.integers(0, width)
        gt[y : y + rng.integers(5, 60), x : x + rng.integers(5, 60)] = 255
    # Smooth texture (JPEG keeps it) with a little noise; buildings 100 levels brighter.
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([np.sin(xx / 37 + k) * np.cos(yy / 23 - k) for k in range(3)], axis=-1) * 50 + 75
    rgb = (base + rng.integers(0, 8, base.shape) + (gt[..., None] > 0) * 100).astype(np.uint8)
    return rgb, gt


def write_tif(
    path: Path, bands: np.ndarray, crs: CRS | None = CRS_UTM, transform: Affine = TRANSFORM
) -> None:
    """Write [H, W] or [H, W, C] (uint8, or another dtype a test means to refuse) as a striped GeoTIFF
    (like Inria's)."""
    data = bands[None] if bands.ndim == 2 else np.moveaxis(bands, -1, 0)
    profile = dict(
        driver="GTiff", height=data.shape[1], width=data.shape[2], count=data.shape[0], dtype=data.dtype.name
    )
    with rasterio.open(path, "w", crs=crs, transform=transform, **profile) as dst:
        dst.write(data)
