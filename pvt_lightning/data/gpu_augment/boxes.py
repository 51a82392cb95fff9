"""Random laws and crop geometry of device augmentation: Python's uniform/randint draws, RandomResizedCrop's boxes,
and one bilinear resampling that crops, resizes, mirrors and warps a batch."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

CROP_ATTEMPTS = 10
"""RandomResizedCrop's tries per image before its centre-crop fallback (albumentations 2.0.8)."""


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
