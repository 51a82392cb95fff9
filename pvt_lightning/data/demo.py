"""A built-in demo dataset: procedurally drawn texture classes, saved once as real JPEG files.

The classes differ in global structure (stripe orientation, checkerboard, rings, dots, smooth
blobs) while colours, frequencies, phases and noise are random, so colour alone never tells
the class, horizontal flips and random crops keep every label, and a PVTv2 trained from scratch
separates them within a few epochs on a CPU.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Mapping, Sequence

import cv2
import numpy as np

from pvt_lightning.errors import DataError

DEMO_VERSION = "demo-v1"
DEMO_CLASSES = ("horizontal_stripes", "vertical_stripes", "checkerboard", "rings", "dots", "blobs")
DEMO_IMG_SIZE = (48, 48)
"""(height, width) the demo is designed to train at."""
DEMO_EPOCHS = 6
"""Epochs that take b2_li past 0.85 val accuracy within the 10-minute CPU budget."""
DEMO_FILE_SIZE = 64
DEMO_TRAIN_PER_CLASS = 240
DEMO_VAL_PER_CLASS = 60
_JPEG_QUALITY = 90


def default_cache_dir() -> Path:
    """``$PVT_LIGHTNING_CACHE`` or ``~/.cache/pvt_lightning``."""
    return Path(os.environ.get("PVT_LIGHTNING_CACHE", Path.home() / ".cache" / "pvt_lightning")).expanduser()


def ensure_demo_dataset(
    root: str | Path | None = None,
    train_per_class: int = DEMO_TRAIN_PER_CLASS,
    val_per_class: int = DEMO_VAL_PER_CLASS,
    seed: int = 0,
) -> Path:
    """Return the demo ImageFolder (``train/`` and ``val/``), generating it first if it is not there yet.

    Generation writes into a temporary sibling folder and renames it into place, so an interrupted
    run never leaves a half dataset behind; the same arguments always give the same bytes.
    ``root`` defaults to ``<cache>/demo-v1``.
    """
    target = Path(root).expanduser() if root is not None else default_cache_dir() / DEMO_VERSION
    if (target / "train").is_dir() and (target / "val").is_dir():
        return target
    if target.exists() and any(target.iterdir()):
        raise DataError(f"demo folder {target} exists but is incomplete (it needs train/ and val/); "
                        "delete it and run again to regenerate it")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        write_image_folder(staging, DEMO_CLASSES, {"train": train_per_class, "val": val_per_class}, draw_demo_image,
                           seed=seed, quality=_JPEG_QUALITY)
        try:
            if target.exists():
                target.rmdir()  # an empty leftover folder, which rename cannot replace
            staging.rename(target)
        except OSError:  # another process finished the same dataset first: keep theirs
            if not (target / "val").is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def write_image(path: str | Path, image: np.ndarray, quality: int = 90) -> Path:
    """Write an RGB (H, W, 3) or grey (H, W) uint8 array as a real image file; the suffix picks the format
    (``quality`` applies to JPEG)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = cv2.cvtColor(image, cv2.COLOR_RGB2BGR) if image.ndim == 3 else image
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if path.suffix.lower() in (".jpg", ".jpeg") else []
    ok, encoded = cv2.imencode(path.suffix, pixels, params)
    if not ok:
        raise RuntimeError(f"OpenCV could not encode {path}")
    path.write_bytes(encoded.tobytes())
    return path


def write_image_folder(
    root: str | Path,
    classes: Sequence[str],
    per_split: Mapping[str, int],
    draw: Callable[[int, np.random.Generator], np.ndarray],
    *,
    seed: int = 0,
    name: str = "{index:04d}.jpg",
    quality: int = 90,
) -> list[Path]:
    """Write a generated ImageFolder, ``root/<split>/<class>/<name>``, ``per_split[split]`` images per class.

    Image ``index`` of class ``label`` in the ``s``-th split is ``draw(label, default_rng([seed + s, label,
    index]))``, so the same arguments always give the same bytes. The split ``""`` writes ``root/<class>/``.
    Returns the files written.
    """
    paths = []
    for s, (split, count) in enumerate(per_split.items()):
        for label, class_name in enumerate(classes):
            for index in range(count):
                image = draw(label, np.random.default_rng([seed + s, label, index]))
                paths.append(write_image(Path(root) / split / class_name / name.format(index=index), image, quality))
    return paths


def draw_demo_image(label: int, rng: np.random.Generator, size: int = DEMO_FILE_SIZE) -> np.ndarray:
    """One RGB uint8 (size, size, 3) image of class ``DEMO_CLASSES[label]``."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    period = rng.uniform(8.0, 16.0)
    phase = rng.uniform(0.0, 2 * np.pi)
    tilt = np.deg2rad(rng.uniform(-12.0, 12.0))  # small enough that orientation classes stay apart
    u = xs * np.cos(tilt) + ys * np.sin(tilt)  # tilted x
    v = -xs * np.sin(tilt) + ys * np.cos(tilt)  # tilted y
    name = DEMO_CLASSES[label]
    if name == "horizontal_stripes":
        mask = np.sin(2 * np.pi * v / period + phase) > 0
    elif name == "vertical_stripes":
        mask = np.sin(2 * np.pi * u / period + phase) > 0
    elif name == "checkerboard":
        mask = (np.sin(2 * np.pi * u / period + phase) > 0) ^ (np.sin(2 * np.pi * v / period + phase) > 0)
    elif name == "rings":
        cy, cx = rng.uniform(0.25 * size, 0.75 * size, 2)
        mask = np.sin(2 * np.pi * np.hypot(ys - cy, xs - cx) / period + phase) > 0
    elif name == "dots":
        radius = period * rng.uniform(0.18, 0.3)
        du = (u + phase * period) % period - period / 2
        dv = (v + phase * period) % period - period / 2
        mask = np.hypot(du, dv) < radius
    else:  # blobs: thresholded smooth noise, irregular shapes with no period or orientation
        noise = cv2.GaussianBlur(rng.standard_normal((size, size)).astype(np.float32), (0, 0), rng.uniform(3.0, 6.0))
        mask = noise > np.median(noise)
    background, foreground = _two_colours(rng)
    image = np.where(mask[..., None], foreground, background).astype(np.float32)
    image += rng.normal(0.0, rng.uniform(2.0, 12.0), image.shape)  # sensor-like noise
    return np.clip(image, 0, 255).astype(np.uint8)


def _two_colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two random RGB colours far enough apart (>= 100 in Euclidean RGB) for the pattern to show."""
    while True:
        a, b = rng.uniform(0, 255, (2, 3))
        if np.linalg.norm(a - b) >= 100:
            return a, b
