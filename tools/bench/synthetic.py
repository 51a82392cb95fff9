"""Generated photo-sized JPEG folders for data-loading benchmarks (written by ``data.demo.write_image_folder``)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from pvt_lightning.data.demo import write_image_folder

PHOTO_SIZE = (375, 500)
"""(height, width) of the generated images: a typical ImageNet photo."""


def draw_photo(label: int, rng: np.random.Generator, size: tuple[int, int] = PHOTO_SIZE) -> np.ndarray:
    """A smooth random colour field with pixel noise, RGB uint8 (H, W, 3): JPEG-decodes like a photo."""
    small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    image = cv2.resize(small, (size[1], size[0]), interpolation=cv2.INTER_CUBIC)
    return np.clip(image.astype(np.int16) + rng.integers(-20, 21, image.shape), 0, 255).astype(np.uint8)


def write_photo_folder(root: str | Path, classes: int, train_images: int, val_per_class: int,
                       seed: int = 0) -> list[Path]:
    """An ImageFolder ``root/{train,val}/class_<k>/`` of generated 500x375 JPEGs (quality 90); returns the
    train files: ``train_images // classes`` per class."""
    names = [f"class_{k}" for k in range(classes)]
    paths = write_image_folder(root, names, {"train": train_images // classes, "val": val_per_class}, draw_photo,
                               seed=seed, name="img_{index:04d}.jpg", quality=90)
    return [p for p in paths if p.parts[-3] == "train"]
