"""The colour, affine and erasing ops of device augmentation: one record per albumentations transform (its ranges,
its batched draws), ``read_op`` to read one from the policy, and the batched pixel functions they apply."""

from __future__ import annotations

from dataclasses import dataclass

import albumentations as A
import cv2
import numpy as np
import torch
import torch.nn.functional as F

from pvt_lightning.data.gpu_augment.boxes import randint, uniform


def float_range(value) -> tuple[float, float]:
    """An albumentations range (low, high) as two floats."""
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
        return AffineOp(rotate=float_range(transform.rotate), shear_x=float_range(transform.shear["x"]),
                        shear_y=float_range(transform.shear["y"]), scale_x=float_range(transform.scale["x"]),
                        scale_y=float_range(transform.scale["y"]), translate_x=float_range(translate["x"]),
                        translate_y=float_range(translate["y"]), translate_in_pixels=not by_percent)
    if isinstance(transform, A.RandomBrightnessContrast) and transform.brightness_by_max \
            and not transform.ensure_safe_range:
        return MultiplyAddOp(contrast=float_range(transform.contrast_limit),
                             brightness=float_range(transform.brightness_limit))
    if isinstance(transform, A.ColorJitter) and tuple(transform.hue) == (0.0, 0.0):
        return ColorJitterOp(float_range(transform.brightness), float_range(transform.contrast),
                             float_range(transform.saturation))
    if isinstance(transform, A.Sharpen) and transform.method == "kernel":
        return SharpenOp(float_range(transform.alpha), float_range(transform.lightness))
    if isinstance(transform, A.Posterize) and not isinstance(transform.num_bits, list):
        return PosterizeOp(tuple(int(b) for b in transform.num_bits))
    if isinstance(transform, A.Solarize):
        return SolarizeOp(float_range(transform.threshold_range))
    if isinstance(transform, A.AutoContrast) and transform.cutoff == 0 and transform.ignore is None \
            and transform.method == "cdf":
        return AutoContrastOp()
    if isinstance(transform, A.Equalize) and transform.mode == "cv" and transform.by_channels \
            and transform.mask is None:
        return EqualizeOp()
    if isinstance(transform, A.Erasing) and transform.fill == "random":
        return ErasingOp(float_range(transform.scale), float_range(transform.ratio))
    raise ValueError(f"no device version of albumentations {name} with these settings ({transform!r}); "
                     "use augment_device='cpu' for this policy")


# --------------------------------------------------------------------------------------- batched ops

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
