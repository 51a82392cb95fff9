"""Shared fixtures: tiny real image folders written to tmp_path."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Sequence

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
# Index caches of the tests' datasets go to a temporary folder (inherited by subprocesses), not ~/.cache.
if "PVT_LIGHTNING_INDEX_CACHE" not in os.environ:
    os.environ["PVT_LIGHTNING_INDEX_CACHE"] = tempfile.mkdtemp(prefix="pvt_lightning_index_cache_")
    atexit.register(shutil.rmtree, os.environ["PVT_LIGHTNING_INDEX_CACHE"], ignore_errors=True)
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:  # pytest -n N: share the cores between the workers, do not oversubscribe
    _THREADS = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    os.environ.setdefault("OMP_NUM_THREADS", _THREADS)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from pvt_lightning.data.demo import write_image, write_image_folder  # noqa: E402

# Distinct, easily learnt colours: class i of a generated folder is mostly this colour.
_PALETTE = [(220, 40, 40), (40, 200, 60), (50, 70, 230), (230, 210, 40), (200, 60, 210), (40, 210, 220),
            (240, 140, 30), (120, 120, 120)]


def write_jpeg(path: Path, rgb: np.ndarray, quality: int = 95) -> Path:
    """Write an RGB uint8 (H, W, 3) array as a real JPEG file."""
    return write_image(path, rgb, quality)


def make_image_folder(
    root: str | Path,
    classes: Sequence[str] = ("a", "b"),
    per_class: int = 8,
    size: tuple[int, int] = (40, 40),
    split: bool = True,
    seed: int = 0,
) -> Path:
    """Write an ImageFolder of real JPEGs: ``root/{train,val}/<class>/NNN.jpg`` (or ``root/<class>/`` with split=False).

    Class i is a noisy image around a distinct colour, so tiny models can learn it. ``size`` is
    (height, width); each split gets ``per_class`` images per class. Returns ``root``.
    """
    def draw(label: int, rng: np.random.Generator) -> np.ndarray:
        colour = np.array(_PALETTE[label % len(_PALETTE)], dtype=np.float32)
        return np.clip(colour + rng.normal(0, 25, (*size, 3)), 0, 255).astype(np.uint8)

    per_split = {"train": per_class, "val": per_class} if split else {"": per_class}
    write_image_folder(root, classes, per_split, draw, seed=seed, name="{index:03d}.jpg", quality=95)
    return Path(root)


def error_from(loader: Iterable, error: type[BaseException]) -> BaseException:
    """The ``error`` that iterating ``loader`` raises, traceback dropped.

    A failed DataLoader iterator sits in its error's traceback, a reference cycle; left to the garbage
    collector it is finalised after its queues and then waits 5 s per worker process for a stop message
    that never comes (in whichever later test the collector happens to run).
    """
    try:
        for _ in loader:
            pass
    except error as raised:
        raised.__traceback__ = None
        return raised
    raise AssertionError(f"iterating the loader raised no {error.__name__}")


@pytest.fixture(name="make_image_folder")
def make_image_folder_fixture() -> Callable[..., Path]:
    """The ``make_image_folder(root, classes, per_class, size, split)`` factory."""
    return make_image_folder


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """A 2-class train/val folder of 8 + 8 small JPEGs per class."""
    return make_image_folder(tmp_path / "data")
