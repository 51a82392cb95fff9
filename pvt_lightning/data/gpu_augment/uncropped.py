"""The worker side of device augmentation: shrink decoded images to fit, and collate them uncropped into one
padded uint8 batch that carries every image's true size."""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import get_worker_info


class ShrinkToFit:
    """Worker-side transform of the device path, called like an albumentations Compose: RGB uint8 (H, W, 3) in,
    the same image out, downscaled (INTER_AREA, aspect ratio kept) only if its longer side exceeds ``max_side``."""

    def __init__(self, max_side: int):
        if max_side < 1:
            raise ValueError(f"max_side must be >= 1, got {max_side}")
        self.max_side = max_side

    def __call__(self, *, image: np.ndarray) -> dict[str, np.ndarray]:
        height, width = image.shape[:2]
        if max(height, width) <= self.max_side:
            return {"image": image}
        scale = self.max_side / max(height, width)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))  # cv2 takes (width, height)
        return {"image": cv2.resize(image, size, interpolation=cv2.INTER_AREA)}


class UncroppedImages(NamedTuple):
    """A training batch before augmentation: each image top-left aligned in one zero-padded canvas."""

    pixels: torch.Tensor  # uint8 (B, 3, H_max, W_max)
    sizes: tuple[tuple[int, int], ...]  # each image's (height, width) in the canvas: plain ints, so moving the
    # batch to the GPU leaves them on the CPU, where crop boxes are drawn (reading them back would wait for the GPU)

    def __len__(self) -> int:  # the number of images, like the tensor batches of the CPU path
        return self.pixels.shape[0]


def collate_uncropped(batch: Sequence[tuple[torch.Tensor, int]]) -> tuple[UncroppedImages, torch.Tensor]:
    """[(uint8 (3, h_i, w_i), label), ...] -> (UncroppedImages padded to the largest h and w, int64 labels (B,)).

    In a worker the canvas is allocated in shared memory, as ``default_collate`` does, so it reaches the main
    process without another copy.
    """
    images = [image for image, _ in batch]
    sizes = tuple((int(image.shape[1]), int(image.shape[2])) for image in images)
    height, width = max(h for h, _ in sizes), max(w for _, w in sizes)
    shape = (len(images), 3, height, width)
    if get_worker_info() is not None:
        storage = images[0]._typed_storage()._new_shared(math.prod(shape), device=images[0].device)
        pixels = images[0].new(storage).resize_(shape)
    else:
        pixels = torch.empty(shape, dtype=torch.uint8)
    for canvas, image in zip(pixels, images):
        h, w = image.shape[1:]
        canvas[:, :h, :w] = image
        canvas[:, h:, :] = 0
        canvas[:, :h, w:] = 0
    if isinstance(batch[0][1], torch.Tensor):  # multi-label: float multi-hot rows -> (B, C)
        labels = torch.stack([label for _, label in batch])
    else:
        labels = torch.tensor([label for _, label in batch], dtype=torch.int64)
    return UncroppedImages(pixels, sizes), labels
