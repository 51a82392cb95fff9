"""Where training augmentation runs, and the device pipeline: ``DevicePolicy`` reads an albumentations Compose
into batched steps, ``DeviceAugment`` draws and applies them to ``UncroppedImages`` and normalises."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import albumentations as A
import cv2
import torch

from pvt_lightning.data.gpu_augment.boxes import resample, sample_crop_boxes
from pvt_lightning.data.gpu_augment.ops import AffineOp, ErasingOp, float_range, read_op
from pvt_lightning.data.gpu_augment.uncropped import UncroppedImages

AUGMENT_DEVICES = ("auto", "cpu", "gpu")
"""Where training augmentation runs: ``auto`` = on the GPU when training runs on CUDA, else in CPU workers."""


def resolve_augment_device(choice: str, device: torch.device | str | None = None) -> str:
    """``"cpu"`` or ``"gpu"`` for ``choice``; ``auto`` picks the GPU path when ``device`` (default: any visible GPU)
    is CUDA."""
    if choice not in AUGMENT_DEVICES:
        raise ValueError(f"augment_device must be one of {AUGMENT_DEVICES}, got {choice!r}")
    if choice != "auto":
        return choice
    device_type = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    return "gpu" if device_type == "cuda" else "cpu"


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
        return cls(tuple(int(s) for s in crop.size), float_range(crop.scale), float_range(crop.ratio), float(flip_p),
                   choice, weights, float(choice_p), steps)


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
