"""Training augmentation on the device: workers only decode, and each batch is cropped, flipped, coloured and
normalised on the GPU.

Why: on one H200, b0 trains at ~5000 img/s on synthetic batches, but 8 CPU workers running the whole
albumentations pipeline (``transforms.train_transform``) fed it ~2000 img/s. On this path the workers decode
(at reduced resolution, decode.py), shrink images whose longer side exceeds ``max_side`` (isotropically) and pad
them into one uint8 batch that carries every image's true size (``UncroppedImages``). The device then runs the
CPU pipeline op for op, with the same random laws, batched:

    RandomResizedCrop -> HorizontalFlip [-> one TrivialAugment-like op -> ColorJitter -> Erasing] -> normalise

``DeviceAugment`` reads every op and range from the albumentations ``Compose`` the CPU path would run (the single
source of truth) and refuses, naming it, any op it has no batched version of. Matching albumentations 2.0.8:

- Crop boxes are drawn in each image's own pixels (its true size travels with the batch), so area fractions,
  aspect ratios, placement and the centre-crop fallback follow RandomResizedCrop exactly; the isotropic shrink to
  ``max_side`` changes only the resolution of what is cropped, never which region.
- Resizing follows cv2's INTER_LINEAR conventions (half-pixel centres, edge pixels replicated). The crop, the flip
  and the affine TrivialAugment ops (rotate, shear, translate: cv2.warpAffine with a zero border) compose into one
  sampling grid, so those images are interpolated once where the CPU path interpolates twice.
- Pixel values are rounded (or truncated, where albucore's lookup tables truncate) and clipped to 0..255 after
  every op, as uint8 images are on the CPU.

MixUp/CutMix stay in the LightningModule. Random draws come from a CPU ``torch.Generator`` (a few numbers per
image; the same seed gives the same draws on any device); only Erasing's noise fill is drawn on the device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import albumentations as A
import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import get_worker_info

AUGMENT_DEVICES = ("auto", "cpu", "gpu")
"""Where training augmentation runs: ``auto`` = on the GPU when training runs on CUDA, else in CPU workers."""

CROP_ATTEMPTS = 10
"""RandomResizedCrop's tries per image before its centre-crop fallback (albumentations 2.0.8)."""


def resolve_augment_device(choice: str, device: torch.device | str | None = None) -> str:
    """``"cpu"`` or ``"gpu"`` for ``choice``; ``auto`` picks the GPU path when ``device`` (default: any visible GPU)
    is CUDA."""
    if choice not in AUGMENT_DEVICES:
        raise ValueError(f"augment_device must be one of {AUGMENT_DEVICES}, got {choice!r}")
    if choice != "auto":
        return choice
    device_type = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    return "gpu" if device_type == "cuda" else "cpu"


# ------------------------------------------------------------------------------------------- worker side

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
    labels = torch.tensor([label for _, label in batch], dtype=torch.int64)
    return UncroppedImages(pixels, sizes), labels


# ----------------------------------------------------------------------------------------- random laws

def uniform(n: int, low: float, high: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` draws of U(low, high) as float64 (the law of Python's ``random.uniform``)."""
    return low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64)


def randint(n: int, low: int, high: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` integers uniform in [low, high], both ends included (Python's ``random.randint``)."""
    return torch.randint(int(low), int(high) + 1, (n,), generator=generator)


def sample_crop_boxes(sizes: torch.Tensor, scale: tuple[float, float], ratio: tuple[float, float],
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """RandomResizedCrop's boxes for a batch: image sizes (B, 2) as (h, w) -> int64 (B, 4) as (x0, y0, w, h).

    Per image, up to 10 tries: an area uniform in ``scale`` times the image's, an aspect ratio (w / h) log-uniform
    in ``ratio``, sides rounded; the first box that fits is placed uniformly. If none fits: the centre crop of
    the whole image, narrowed to the nearest ratio in ``ratio``.
    """
    n = sizes.shape[0]
    height, width = sizes[:, 0:1].double(), sizes[:, 1:2].double()
    area = height * width * (scale[0] + (scale[1] - scale[0]) * torch.rand(n, CROP_ATTEMPTS, generator=generator,
                                                                             dtype=torch.float64))
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_low + (log_high - log_low) * torch.rand(n, CROP_ATTEMPTS, generator=generator,
                                                                   dtype=torch.float64))
    crop_w, crop_h = torch.sqrt(area * aspect).round(), torch.sqrt(area / aspect).round()  # half to even, as round()
    fits = (crop_w > 0) & (crop_w <= width) & (crop_h > 0) & (crop_h <= height)
    first = fits.to(torch.uint8).argmax(1, keepdim=True)  # index of the first fitting try
    found = fits.any(1)
    crop_w, crop_h = crop_w.gather(1, first).squeeze(1), crop_h.gather(1, first).squeeze(1)
    height, width = height.squeeze(1), width.squeeze(1)
    start = torch.rand(n, 2, generator=generator, dtype=torch.float64)
    y0 = torch.floor((height - crop_h + 1) * start[:, 0])
    x0 = torch.floor((width - crop_w + 1) * start[:, 1])

    in_ratio = width / height  # the fallback: the whole image, or its centre at the nearest allowed ratio
    fallback_w = torch.where(in_ratio > ratio[1], (height * ratio[1]).round(), width)
    fallback_h = torch.where(in_ratio < ratio[0], (width / ratio[0]).round(), height)
    crop_w, crop_h = torch.where(found, crop_w, fallback_w), torch.where(found, crop_h, fallback_h)
    x0 = torch.where(found, x0, torch.div(width - crop_w, 2, rounding_mode="floor"))
    y0 = torch.where(found, y0, torch.div(height - crop_h, 2, rounding_mode="floor"))
    return torch.stack([x0, y0, crop_w, crop_h], 1).long()


# -------------------------------------------------------------------------------- ops read from the policy

def _range(value) -> tuple[float, float]:
    low, high = value
    return float(low), float(high)


@dataclass(frozen=True)
class AffineOp:
    """albumentations ``Affine`` (linear interpolation, zero border, output size kept): ranges of its draws."""

    rotate: tuple[float, float]
    shear_x: tuple[float, float]
    shear_y: tuple[float, float]
    scale_x: tuple[float, float]
    scale_y: tuple[float, float]
    translate_x: tuple[float, float]  # fraction of the width (translate_percent) ...
    translate_y: tuple[float, float]
    translate_in_pixels: bool = False  # ... or pixels (translate_px)

    def draw(self, n: int, out_hw: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
        """(n, 3, 3) float64 matrices mapping input to output pixels, as cv2.warpAffine uses them."""
        height, width = out_hw
        if self.translate_in_pixels:
            tx = randint(n, *self.translate_x, generator=generator).double()
            ty = randint(n, *self.translate_y, generator=generator).double()
        else:  # int() of the fraction times the side: truncation towards zero
            tx = torch.trunc(uniform(n, *self.translate_x, generator) * width)
            ty = torch.trunc(uniform(n, *self.translate_y, generator) * height)
        shear_x = -torch.deg2rad(uniform(n, *self.shear_x, generator))  # albumentations negates its shear draws
        shear_y = -torch.deg2rad(uniform(n, *self.shear_y, generator))
        scale_x, scale_y = uniform(n, *self.scale_x, generator), uniform(n, *self.scale_y, generator)
        angle = torch.deg2rad(uniform(n, *self.rotate, generator) % 360)
        return affine_matrices(out_hw, angle, shear_x, shear_y, scale_x, scale_y, tx, ty)


def affine_matrices(out_hw: tuple[int, int], angle: torch.Tensor, shear_x: torch.Tensor, shear_y: torch.Tensor,
                    scale_x: torch.Tensor, scale_y: torch.Tensor, tx: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
    """albumentations' ``create_affine_transformation_matrix`` for a batch (angles in radians): (n, 3, 3) float64,
    centre @ translate @ shear @ rotate @ scale @ centre^-1 about the pixel centre of the image."""
    n = angle.shape[0]
    cx, cy = out_hw[1] / 2 - 0.5, out_hw[0] / 2 - 0.5

    def matrix(a, b, c, d, e, f) -> torch.Tensor:
        m = torch.zeros(n, 3, 3, dtype=torch.float64)
        m[:, 0, 0], m[:, 0, 1], m[:, 0, 2], m[:, 1, 0], m[:, 1, 1], m[:, 1, 2] = a, b, c, d, e, f
        m[:, 2, 2] = 1
        return m

    zero, one = torch.zeros(n, dtype=torch.float64), torch.ones(n, dtype=torch.float64)
    to_origin = matrix(one, zero, -cx * one, zero, one, -cy * one)
    back = matrix(one, zero, cx * one, zero, one, cy * one)
    scale = matrix(scale_x, zero, zero, zero, scale_y, zero)
    rotate = matrix(torch.cos(angle), torch.sin(angle), zero, -torch.sin(angle), torch.cos(angle), zero)
    shear = matrix(one, torch.tan(shear_x), zero, torch.tan(shear_y), one, zero)
    translate = matrix(one, zero, tx, zero, one, ty)
    return back @ translate @ shear @ rotate @ scale @ to_origin


@dataclass(frozen=True)
class MultiplyAddOp:
    """``RandomBrightnessContrast`` (brightness by the maximum): x * (1 + contrast) + 255 * brightness, truncated."""

    contrast: tuple[float, float]
    brightness: tuple[float, float]

    def draw(self, n: int, out_hw: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
        alpha = 1.0 + uniform(n, *self.contrast, generator)
        beta = 255.0 * uniform(n, *self.brightness, generator)
        return torch.stack([alpha, beta], 1)

    def apply(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        return multiply_add(x, params[:, 0], params[:, 1])


@dataclass(frozen=True)
class ColorJitterOp:
    """``ColorJitter`` without hue: brightness, contrast and saturation factors, applied in a random order."""

    brightness: tuple[float, float]
    contrast: tuple[float, float]
    saturation: tuple[float, float]

    def draw(self, n: int, out_hw: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
        factors = [uniform(n, *r, generator) for r in (self.brightness, self.contrast, self.saturation)]
        order = torch.rand(n, 3, generator=generator).argsort(1).double()  # a uniformly random permutation
        return torch.cat([torch.stack(factors, 1), order], 1)  # (n, 6): 3 factors, then the order

    def apply(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        return color_jitter(x, params[:, :3], params[:, 3:].long())


@dataclass(frozen=True)
class SharpenOp:
    """``Sharpen(method="kernel")``: a 3x3 kernel (1 - alpha) * identity + alpha * [-1 ... 8 + lightness ...]."""

    alpha: tuple[float, float]
    lightness: tuple[float, float]

    def draw(self, n: int, out_hw: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
        return torch.stack([uniform(n, *self.alpha, generator), uniform(n, *self.lightness, generator)], 1)

    def apply(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        return sharpen(x, params[:, 0], params[:, 1])


@dataclass(frozen=True)
class PosterizeOp:
    """``Posterize``: keep the top ``bits`` bits (drawn as an integer in the inclusive range)."""

    bits: tuple[int, int]

    def draw(self, n: int, out_hw: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
        return randint(n, *self.bits, generator=generator).double()[:, None]

    def apply(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        return posterize(x, params[:, 0])


@dataclass(frozen=True)
class SolarizeOp:
    """``Solarize``: invert values >= threshold * 255."""

    threshold: tuple[float, float]

    def draw(self, n: int, out_hw: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
        return uniform(n, *self.threshold, generator)[:, None]

    def apply(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        return solarize(x, params[:, 0])


@dataclass(frozen=True)
class EqualizeOp:
    """``Equalize(mode="cv", by_channels=True)``: histogram equalisation per channel."""

    def draw(self, n: int, out_hw: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
        return torch.zeros(n, 0, dtype=torch.float64)

    def apply(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        return equalize(x)


@dataclass(frozen=True)
class AutoContrastOp(EqualizeOp):
    """``AutoContrast(cutoff=0, method="cdf")``: equalisation between the lowest and highest histogram bins."""

    def apply(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        return autocontrast(x)


@dataclass(frozen=True)
class ErasingOp:
    """``Erasing(fill="random")``: one box of area ``scale`` x the image and ratio w/h in ``ratio``, filled with
    uniform noise."""

    scale: tuple[float, float]
    ratio: tuple[float, float]

    def draw(self, n: int, out_hw: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
        """(n, 4) boxes (x0, y0, w, h); w = 0 where albumentations finds no valid box."""
        height, width = out_hw
        total = height * width
        min_area = total * self.scale[0]
        r_low, r_high = self.ratio
        max_area = min(total * self.scale[1], min(r_low, r_high) * height * height, width * width / max(r_low, r_high))
        if max_area < min_area:
            return torch.zeros(n, 4, dtype=torch.float64)
        area = uniform(n, min_area, max_area, generator)
        ratio_high = torch.clamp(width * width / area, max=r_high)
        ratio_low = torch.clamp(area / (height * height), min=r_low)
        valid = ratio_low <= ratio_high
        aspect = ratio_low + (ratio_high - ratio_low) * torch.rand(n, generator=generator, dtype=torch.float64)
        box_h, box_w = torch.sqrt(area / aspect).round(), torch.sqrt(area * aspect).round()
        top = torch.floor((height - box_h + 1) * torch.rand(n, generator=generator, dtype=torch.float64))
        left = torch.floor((width - box_w + 1) * torch.rand(n, generator=generator, dtype=torch.float64))
        return torch.stack([left, top, box_w, box_h], 1) * valid[:, None]

    def apply(self, x: torch.Tensor, params: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return erase(x, params, generator)


def read_op(transform: A.BasicTransform):
    """The device op equivalent to one albumentations pixel or affine transform; ValueError when there is none."""
    name = type(transform).__name__
    if isinstance(transform, A.Affine):
        flat = transform.interpolation == cv2.INTER_LINEAR and transform.border_mode == cv2.BORDER_CONSTANT
        if not flat or np.any(np.asarray(transform.fill) != 0) or transform.fit_output or transform.keep_ratio \
                or transform.balanced_scale:
            raise ValueError("the device path supports Affine with linear interpolation, a zero constant border "
                             "and no fit_output / keep_ratio / balanced_scale")
        by_percent = transform.translate_percent is not None
        translate = transform.translate_percent if by_percent else transform.translate_px
        return AffineOp(rotate=_range(transform.rotate), shear_x=_range(transform.shear["x"]),
                        shear_y=_range(transform.shear["y"]), scale_x=_range(transform.scale["x"]),
                        scale_y=_range(transform.scale["y"]), translate_x=_range(translate["x"]),
                        translate_y=_range(translate["y"]), translate_in_pixels=not by_percent)
    if isinstance(transform, A.RandomBrightnessContrast) and transform.brightness_by_max \
            and not transform.ensure_safe_range:
        return MultiplyAddOp(contrast=_range(transform.contrast_limit), brightness=_range(transform.brightness_limit))
    if isinstance(transform, A.ColorJitter) and tuple(transform.hue) == (0.0, 0.0):
        return ColorJitterOp(_range(transform.brightness), _range(transform.contrast), _range(transform.saturation))
    if isinstance(transform, A.Sharpen) and transform.method == "kernel":
        return SharpenOp(_range(transform.alpha), _range(transform.lightness))
    if isinstance(transform, A.Posterize) and not isinstance(transform.num_bits, list):
        return PosterizeOp(tuple(int(b) for b in transform.num_bits))
    if isinstance(transform, A.Solarize):
        return SolarizeOp(_range(transform.threshold_range))
    if isinstance(transform, A.AutoContrast) and transform.cutoff == 0 and transform.ignore is None \
            and transform.method == "cdf":
        return AutoContrastOp()
    if isinstance(transform, A.Equalize) and transform.mode == "cv" and transform.by_channels \
            and transform.mask is None:
        return EqualizeOp()
    if isinstance(transform, A.Erasing) and transform.fill == "random":
        return ErasingOp(_range(transform.scale), _range(transform.ratio))
    raise ValueError(f"no device version of albumentations {name} with these settings ({transform!r}); "
                     "use augment_device='cpu' for this policy")


@dataclass(frozen=True)
class DevicePolicy:
    """An albumentations training pipeline, read into the steps the device path runs."""

    size: tuple[int, int]  # output (height, width)
    crop_scale: tuple[float, float]
    crop_ratio: tuple[float, float]
    flip_p: float
    choice: tuple  # ops of a OneOf (empty: none) ...
    choice_weights: tuple[float, ...]  # ... their probabilities
    choice_p: float  # and the OneOf's own probability
    steps: tuple[tuple[object, float], ...]  # pixel ops after it, with their probabilities

    @classmethod
    def read(cls, compose: A.Compose) -> "DevicePolicy":
        """Read ``RandomResizedCrop, [HorizontalFlip], [OneOf([...])], [pixel ops...]`` (see ``read_op``)."""
        transforms = list(compose.transforms)
        if not transforms or not isinstance(transforms[0], A.RandomResizedCrop):
            raise ValueError("the device path needs a pipeline that starts with RandomResizedCrop")
        crop = transforms.pop(0)
        if crop.p != 1 or crop.interpolation != cv2.INTER_LINEAR:
            raise ValueError("the device path supports RandomResizedCrop with p=1 and linear interpolation only")
        flip_p = transforms.pop(0).p if transforms and isinstance(transforms[0], A.HorizontalFlip) else 0.0
        choice, weights, choice_p = (), (), 0.0
        if transforms and isinstance(transforms[0], A.OneOf):
            one_of = transforms.pop(0)
            if any(t.p != 1 for t in one_of.transforms):
                raise ValueError("the device path supports OneOf members with p=1 only")
            choice = tuple(read_op(t) for t in one_of.transforms)
            weights, choice_p = tuple(one_of.transforms_ps), one_of.p
        steps = tuple((read_op(t), float(t.p)) for t in transforms)
        if any(isinstance(op, AffineOp) for op, _ in steps):
            raise ValueError("the device path supports Affine only inside the OneOf that follows the flip")
        return cls(tuple(int(s) for s in crop.size), _range(crop.scale), _range(crop.ratio), float(flip_p),
                   choice, weights, float(choice_p), steps)


# --------------------------------------------------------------------------------------- batched ops

def resample(pixels: torch.Tensor, boxes: torch.Tensor, out_hw: tuple[int, int], flip: torch.Tensor,
             warp: torch.Tensor | None = None, inverse_warp: torch.Tensor | None = None) -> torch.Tensor:
    """Crop, resize, mirror and warp in one bilinear sampling: uint8 canvas (B, 3, Hc, Wc) -> float (B, 3, H, W)
    of integers 0..255.

    Per image: the ``boxes`` (x0, y0, w, h) region resized to ``out_hw`` (cv2.resize INTER_LINEAR: half-pixel
    centres, edges replicated), mirrored where ``flip``, then warped by the (3, 3) ``warp`` as cv2.warpAffine
    does (output pixel p samples M^-1 p; beyond the image the value blends into zero). ``inverse_warp`` may be
    given instead of ``warp`` (neither: no warp). Every tensor should be on ``pixels``' device.
    """
    batch, device = pixels.shape[0], pixels.device
    height, width = out_hw
    ys, xs = torch.meshgrid(torch.arange(height, device=device, dtype=torch.float32),
                            torch.arange(width, device=device, dtype=torch.float32), indexing="ij")
    points = torch.stack([xs, ys, torch.ones_like(xs)], -1)  # (H, W, 3) output pixel centres
    if inverse_warp is None:
        inverse_warp = torch.eye(3, dtype=torch.float64).repeat(batch, 1, 1) if warp is None else \
            torch.linalg.inv(warp.double())
    inverse = inverse_warp[:, :2].to(device=device, dtype=torch.float32)  # (B, 2, 3)
    q = torch.einsum("bij,hwj->bhwi", inverse, points)  # (B, H, W, 2): where each pixel comes from, before the warp
    qx, qy = q[..., 0], q[..., 1]
    # Bilinear weight left for the image where the warp reaches past its edge (cv2's zero border).
    cover = ((1 - (-qx).clamp(min=0) - (qx - (width - 1)).clamp(min=0)).clamp(0, 1)
             * (1 - (-qy).clamp(min=0) - (qy - (height - 1)).clamp(min=0)).clamp(0, 1))
    qx, qy = qx.clamp(0, width - 1), qy.clamp(0, height - 1)
    qx = torch.where(flip.to(device)[:, None, None], (width - 1) - qx, qx)
    x0, y0, crop_w, crop_h = (v.to(device=device, dtype=torch.float32)[:, None, None] for v in boxes.unbind(1))
    sx = ((qx + 0.5) * (crop_w / width) - 0.5).clamp(min=0) + x0  # cv2.resize's source pixel, inside the box
    sy = ((qy + 0.5) * (crop_h / height) - 0.5).clamp(min=0) + y0
    sx, sy = torch.minimum(sx, x0 + crop_w - 1), torch.minimum(sy, y0 + crop_h - 1)
    canvas_h, canvas_w = pixels.shape[-2:]
    grid = torch.stack([(2 * sx + 1) / canvas_w - 1, (2 * sy + 1) / canvas_h - 1], -1)  # align_corners=False units
    out = F.grid_sample(pixels.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return (out * cover[:, None]).round_().clamp_(0, 255)


def _per_image(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, 1) float32 on ``x``'s device."""
    return values.to(device=x.device, dtype=torch.float32).view(-1, 1, 1, 1)


def gray(x: torch.Tensor) -> torch.Tensor:
    """cv2's RGB2GRAY of uint8 images, rounded: (B, 3, H, W) -> (B, 1, H, W)."""
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).round()


def multiply_add(x: torch.Tensor, factor: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """x * factor + offset per image, clipped and truncated to integers (albucore's uint8 lookup tables)."""
    return (x * _per_image(factor, x) + _per_image(offset, x)).clamp_(0, 255).floor_()


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return multiply_add(x, factor, torch.zeros_like(factor))


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the image's mean gray level: x * f + mean * (1 - f)."""
    mean = gray(x).mean(dim=(1, 2, 3))
    factor = factor.to(device=x.device, dtype=torch.float32)
    return multiply_add(x, factor, mean * (1 - factor))


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the gray image: x * f + gray * (1 - f), rounded (cv2.addWeighted)."""
    f = _per_image(factor, x)
    return (x * f + gray(x) * (1 - f)).round_().clamp_(0, 255)


def color_jitter(x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast and saturation factors (B, 3), applied per image in ``order`` (B, 3) (0, 1, 2 =
    brightness, contrast, saturation)."""
    ops = (adjust_brightness, adjust_contrast, adjust_saturation)
    order = order.to(x.device)
    for position in range(3):
        for index, op in enumerate(ops):
            chosen = (order[:, position] == index).view(-1, 1, 1, 1)
            x = torch.where(chosen, op(x, factors[:, index]), x)
    return x


def sharpen(x: torch.Tensor, alpha: torch.Tensor, lightness: torch.Tensor) -> torch.Tensor:
    """cv2.filter2D (reflect-101 border) with each image's kernel (1 - a) * identity + a * [-1.. 8 + l ..-1]."""
    batch, channels, height, width = x.shape
    alpha = alpha.to(device=x.device, dtype=torch.float32).view(-1, 1, 1)
    effect = torch.full((batch, 3, 3), -1.0, device=x.device)
    effect[:, 1, 1] = 8 + lightness.to(device=x.device, dtype=torch.float32)
    identity = torch.zeros(3, 3, device=x.device)
    identity[1, 1] = 1
    kernels = (1 - alpha) * identity + alpha * effect  # (B, 3, 3)
    weight = kernels.repeat_interleave(channels, 0)[:, None]  # (B * C, 1, 3, 3): one kernel per image's channel
    padded = F.pad(x.reshape(1, batch * channels, height, width), (1, 1, 1, 1), mode="reflect")
    out = F.conv2d(padded, weight, groups=batch * channels).view(batch, channels, height, width)
    return out.round_().clamp_(0, 255)


def posterize(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Keep each image's top ``bits`` bits of every 8-bit value."""
    step = torch.exp2(8 - _per_image(bits, x))
    return torch.floor(x / step) * step


def solarize(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """255 - x where x >= threshold * 255 (threshold per image, in 0..1)."""
    return torch.where(x >= _per_image(threshold, x) * 255, 255 - x, x)


def equalize(x: torch.Tensor) -> torch.Tensor:
    """cv2.equalizeHist on each channel of each image (a constant channel stays as it is)."""
    batch, channels, height, width = x.shape
    values = x.reshape(batch * channels, height * width).long()
    ones = torch.ones_like(values, dtype=torch.float32)
    hist = torch.zeros(batch * channels, 256, device=x.device).scatter_add_(1, values, ones)
    cdf = hist.cumsum(1)
    first = (hist > 0).to(torch.uint8).argmax(1, keepdim=True)  # the lowest value present
    below = cdf.gather(1, first)  # pixels at that value
    spread = cdf[:, -1:] - below
    lut = ((cdf - below) * (255.0 / spread.clamp(min=1))).round_().clamp_(0, 255)
    lut = torch.where(spread > 0, lut, torch.arange(256, device=x.device, dtype=lut.dtype))
    return lut.gather(1, values).view(batch, channels, height, width)


def autocontrast(x: torch.Tensor) -> torch.Tensor:
    """albumentations' AutoContrast(cutoff=0, method="cdf") on each channel of each image.

    Its histogram is cv2.calcHist's: 256 bins over [0, 255), so value v lands in bin v * 256 // 255 and 255 is
    not counted. Values between the lowest and the highest non-empty bin are equalised over that span, values
    below map to 0, above to 255; a channel with one non-empty bin stays as it is.
    """
    batch, channels, height, width = x.shape
    values = x.reshape(batch * channels, height * width).long()
    hist = torch.zeros(batch * channels, 257, device=x.device).scatter_add_(
        1, values * 256 // 255, torch.ones_like(values, dtype=torch.float32))[:, :256]
    present = hist > 0
    low = present.to(torch.uint8).argmax(1, keepdim=True)
    high = 255 - present.flip(1).to(torch.uint8).argmax(1, keepdim=True)
    cdf = hist.cumsum(1)
    below, top = cdf.gather(1, low), cdf.gather(1, high)
    lut = ((cdf - below) * (255.0 / (top - below).clamp(min=1))).round_().clamp_(0, 255)
    level = torch.arange(256, device=x.device, dtype=lut.dtype).expand_as(lut)
    lut = torch.where(level < low, 0.0, torch.where(level > high, 255.0, lut))
    lut = torch.where(high > low, lut, level)
    return lut.gather(1, values).view(batch, channels, height, width)


def erase(x: torch.Tensor, boxes: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Fill each image's box (x0, y0, w, h) with uniform integer noise 0..255 (w = 0: nothing erased)."""
    height, width = x.shape[-2:]
    boxes = boxes.to(device=x.device, dtype=torch.float32)
    ys = torch.arange(height, device=x.device, dtype=torch.float32).view(1, height, 1)
    xs = torch.arange(width, device=x.device, dtype=torch.float32).view(1, 1, width)
    x0, y0, box_w, box_h = (v.view(-1, 1, 1) for v in boxes.unbind(1))
    inside = (xs >= x0) & (xs < x0 + box_w) & (ys >= y0) & (ys < y0 + box_h)  # (B, H, W)
    noise = torch.randint(0, 256, x.shape, generator=generator, device=x.device).to(x.dtype)
    return torch.where(inside[:, None], noise, x)


# ----------------------------------------------------------------------------------------- the pipeline

class DeviceAugment:
    """The training augmentation of ``policy`` (an albumentations Compose; see ``DevicePolicy.read``) for batches of
    ``UncroppedImages`` on any device, ending with normalisation: -> float32 (B, 3, H, W).

    Args:
        policy: the pipeline the CPU path would run, e.g. ``transforms.train_transform(img_size, augment)``.
        mean, std: per-channel normalisation of 0..1 values (ImageNet's by default in the data module).
        seed: seeds this object's CPU generator (give each DDP rank its own).
    """

    def __init__(self, policy: A.Compose, mean: Sequence[float], std: Sequence[float], seed: int = 0):
        self.policy = DevicePolicy.read(policy)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.generator = torch.Generator().manual_seed(seed)
        self._device_generators: dict[torch.device, torch.Generator] = {}
        self._norm_cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def draw(self, sizes: torch.Tensor) -> dict[str, object]:
        """Every random choice for a batch of images of ``sizes`` (B, 2), as CPU tensors."""
        policy, g = self.policy, self.generator
        n = sizes.shape[0]
        draws: dict[str, object] = {
            "boxes": sample_crop_boxes(sizes, policy.crop_scale, policy.crop_ratio, g),
            "flip": torch.rand(n, generator=g) < policy.flip_p,
            "choice": torch.full((n,), -1, dtype=torch.long),
        }
        if policy.choice:
            picked = torch.multinomial(torch.tensor(policy.choice_weights), n, replacement=True, generator=g)
            draws["choice"] = torch.where(torch.rand(n, generator=g) < policy.choice_p, picked, -1)
            draws["choice_params"] = [op.draw(n, policy.size, g) for op in policy.choice]
        draws["steps"] = [(torch.rand(n, generator=g) < p, op.draw(n, policy.size, g)) for op, p in policy.steps]
        return draws

    def __call__(self, batch: UncroppedImages) -> torch.Tensor:
        """uint8 canvas + sizes -> augmented, normalised float32 (B, 3, H, W) on the canvas's device."""
        pixels, sizes = batch
        draws = self.draw(torch.tensor(sizes, dtype=torch.int64).view(-1, 2))
        return self.normalize(self.augment(pixels, draws))

    def augment(self, pixels: torch.Tensor, draws: dict[str, object]) -> torch.Tensor:
        """Apply ``draws`` (from ``draw``): float (B, 3, H, W) of integers 0..255, not normalised."""
        policy = self.policy
        choice = draws["choice"]
        warp = torch.eye(3, dtype=torch.float64).repeat(choice.shape[0], 1, 1)
        pixel_ops = []  # (op, images it applies to, their draws), in the pipeline's order
        for index, op in enumerate(policy.choice):
            chosen = choice == index
            if isinstance(op, AffineOp):
                warp[chosen] = draws["choice_params"][index][chosen]
            else:
                pixel_ops.append((op, chosen.nonzero().squeeze(1), draws["choice_params"][index][chosen]))
        for (op, _), (applies, params) in zip(policy.steps, draws["steps"]):
            pixel_ops.append((op, applies.nonzero().squeeze(1), params[applies]))
        inverse = torch.linalg.inv(warp)  # output pixel -> pre-warp pixel, computed here rather than on the device
        shipped = ship([draws["boxes"], draws["flip"], inverse] + [t for _, index, params in pixel_ops
                                                                   for t in (index, params)], pixels.device)
        x = resample(pixels, shipped[0], policy.size, shipped[1], inverse_warp=shipped[2])
        for i, (op, index, _) in enumerate(pixel_ops):
            if len(index) == 0:  # counted on the CPU: no device sync
                continue
            index, params = shipped[3 + 2 * i], shipped[4 + 2 * i]
            extra = (self._device_generator(x.device),) if isinstance(op, ErasingOp) else ()
            x.index_copy_(0, index, op.apply(x[index], params, *extra))
        return x

    def _device_generator(self, device: torch.device) -> torch.Generator:
        if device not in self._device_generators:
            seed = int(torch.randint(2**62, (1,), generator=self.generator))
            self._device_generators[device] = torch.Generator(device=device).manual_seed(seed)
        return self._device_generators[device]

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """0..255 -> (x / 255 - mean) / std per channel, in place."""
        if x.device not in self._norm_cache:  # built once per device: a blocking copy would wait for the GPU
            self._norm_cache[x.device] = (torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1) * 255.0,
                                          torch.tensor(self.std, device=x.device).view(1, 3, 1, 1) * 255.0)
        mean, std = self._norm_cache[x.device]
        return x.sub_(mean).div_(std)


def ship(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """CPU tensors -> the same on ``device`` in one non-blocking copy from pinned memory.

    A plain ``.to("cuda")`` of pageable memory waits for the GPU to finish its queue; a few of those per batch would
    stop the CPU from running ahead of the GPU. Values travel as float64 (exact for these integers and draws).
    """
    if device.type == "cpu":
        return tensors
    flat = torch.cat([t.reshape(-1).double() for t in tensors]).pin_memory().to(device, non_blocking=True)
    return [chunk.view(t.shape).to(t.dtype) for chunk, t in zip(flat.split([t.numel() for t in tensors]), tensors)]
