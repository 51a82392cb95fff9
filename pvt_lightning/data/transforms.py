"""albumentations 2.0.8 pipelines: RGB uint8 (H, W, 3) in, uint8 (crop_h, crop_w, 3) out.

No float conversion or normalisation here: workers ship uint8, the data module normalises on the
device (a quarter of the bytes through the worker queues, and no float maths on the CPU workers).
Resizing is bilinear: decoding already shrank large images to under 2x the target (decode.py),
so no slow anti-aliased (INTER_AREA) resize is needed here.
"""

from __future__ import annotations

import math
import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations checks PyPI for updates on import

import albumentations as A  # noqa: E402
import cv2  # noqa: E402

AUGMENT_POLICIES = ("basic", "strong")


def resize_target(img_size: tuple[int, int], crop_pct: float) -> tuple[int, int]:
    """(h, w) the eval resize must cover before the centre crop: each side of ``img_size`` / crop_pct."""
    return math.ceil(img_size[0] / crop_pct), math.ceil(img_size[1] / crop_pct)


def train_transform(
    img_size: tuple[int, int],
    augment: str = "basic",
    crop_scale: tuple[float, float] = (0.08, 1.0),
    seed: int | None = None,
) -> A.Compose:
    """RandomResizedCrop + horizontal flip; ``"strong"`` adds a TrivialAugment-like op, colour jitter and erasing.

    The crop's aspect-ratio range (3/4..4/3) is taken relative to the target's W/H, so a 384x224
    target is not squashed from square crops.
    """
    if augment not in AUGMENT_POLICIES:
        raise ValueError(f"augment must be one of {AUGMENT_POLICIES}, got {augment!r}")
    height, width = img_size
    aspect = width / height
    ops: list = [
        A.RandomResizedCrop(size=(height, width), scale=crop_scale, ratio=(0.75 * aspect, aspect / 0.75),
                            interpolation=cv2.INTER_LINEAR),
        A.HorizontalFlip(p=0.5),
    ]
    if augment == "strong":
        ops += [
            _trivial_augment(),
            A.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.0, p=0.8),
            A.Erasing(scale=(0.02, 0.33), ratio=(0.3, 3.3), fill="random", p=0.25),
        ]
    return A.Compose(ops, seed=seed)


def eval_transform(img_size: tuple[int, int], crop_pct: float = 0.875) -> A.Compose:
    """Resize (keeping the aspect ratio) until both sides cover ``img_size / crop_pct``, then centre crop."""
    if not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    height, width = img_size
    return A.Compose([
        A.SmallestMaxSize(max_size_hw=resize_target(img_size, crop_pct), interpolation=cv2.INTER_LINEAR),
        A.CenterCrop(height=height, width=width),
    ])


def _trivial_augment() -> A.OneOf:
    """One randomly chosen op at a random strength per image, in the spirit of TrivialAugment."""
    return A.OneOf([
        A.Affine(rotate=(-30, 30), p=1.0),
        A.Affine(shear={"x": (-17, 17), "y": (0, 0)}, p=1.0),
        A.Affine(shear={"x": (0, 0), "y": (-17, 17)}, p=1.0),
        A.Affine(translate_percent={"x": (-0.3, 0.3), "y": (0, 0)}, p=1.0),
        A.Affine(translate_percent={"x": (0, 0), "y": (-0.3, 0.3)}, p=1.0),
        A.RandomBrightnessContrast(brightness_limit=0.4, contrast_limit=0.0, p=1.0),
        A.RandomBrightnessContrast(brightness_limit=0.0, contrast_limit=0.4, p=1.0),
        A.ColorJitter(brightness=0, contrast=0, saturation=(0.1, 1.9), hue=0, p=1.0),
        A.Sharpen(alpha=(0.1, 0.9), p=1.0),
        A.Posterize(num_bits=(2, 8), p=1.0),
        A.Solarize(threshold_range=(0.0, 1.0), p=1.0),
        A.AutoContrast(p=1.0),
        A.Equalize(p=1.0),
    ], p=1.0)
