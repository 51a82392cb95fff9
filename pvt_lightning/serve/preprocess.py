"""Image bytes -> the normalised tensor predict feeds the model: the same decoder, checks and eval transform.

Prediction reads a file with ``data.decode.read_image`` (pixel budget, corrupt files refused), applies
``data.transforms.eval_transform`` (resize until both sides cover ``img_size / crop_pct``, centre crop) and
normalises on the device as ``ImageFolderDataModule.normalize`` does. ``ImagePipeline`` does the first two on
uploaded bytes (in the HTTP server's processes), ``normalize`` the last (in the inference worker), with the
same arithmetic, so a served image gets the probabilities ``predict`` writes for the same file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from pvt_lightning.data.decode import DEFAULT_MAX_IMAGE_PIXELS, decode_image, image_size
from pvt_lightning.data.transforms import eval_transform, resize_target
from pvt_lightning.errors import BadImageError
from pvt_lightning.models.registry import Preprocessing


class ImageRejected(Exception):
    """An upload that is not a usable image; ``status`` is the HTTP status to answer with (400 or 413)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class ImagePipeline:
    """Encoded image bytes -> uint8 (3, H, W) crop, as the prediction data loader makes it from a file."""

    preprocessing: Preprocessing
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS

    def __post_init__(self) -> None:
        size = tuple(int(s) for s in self.preprocessing.img_size)
        self.transform = eval_transform(size, self.preprocessing.crop_pct)
        self.min_side = max(resize_target(size, self.preprocessing.crop_pct))

    def __call__(self, data: bytes, name: str = "upload") -> np.ndarray:
        """Raises ``ImageRejected``: 413 for an image over the pixel budget, 400 for anything undecodable."""
        declared = image_size(data) if data else None
        if self.max_pixels and declared is not None and declared[0] * declared[1] > self.max_pixels:
            height, width = declared
            raise ImageRejected(f"{name}: the image declares {width}x{height} = {width * height:,} pixels, over the "
                                f"server's pixel budget of {self.max_pixels:,} (--max-image-pixels)", 413)
        try:
            image = decode_image(data, min_side=self.min_side, name=name, max_pixels=self.max_pixels)
        except BadImageError as err:
            raise ImageRejected(f"{name}: {err.reason}", 400) from None
        crop = self.transform(image=image)["image"]  # uint8 (H, W, 3)
        return np.ascontiguousarray(crop.transpose(2, 0, 1))


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 ``(x - 255 mean) / (255 std)``: ``ImageFolderDataModule.normalize``'s arithmetic."""
    mean_t = torch.tensor(tuple(mean), device=images.device).view(1, 3, 1, 1) * 255.0
    std_t = torch.tensor(tuple(std), device=images.device).view(1, 3, 1, 1) * 255.0
    return images.float().sub_(mean_t).div_(std_t)
