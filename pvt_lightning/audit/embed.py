"""One pass over the audited images: per image a content hash, a perceptual hash, an embedding and logits.

Images are read, hashed, decoded and thumbnailed in DataLoader workers, the model runs on the device in
batches: ``embedding = normalise(model.forward_head(model.forward_features(x), pre_logits=True))`` and the
logits from the same features. Memory: the outputs are kept for every image, (4 D + 4 C + 1049) bytes
each (b0: D = 256, so about 2.1 KB an image, 210 MB for 100k images with 10 classes), besides the model
and ``num_workers`` x 2 batches in flight; unreadable images are left out and listed.
"""

from __future__ import annotations

import hashlib
import os
import stat
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate

from pvt_lightning.audit.records import Record
from pvt_lightning.data.dataset import worker_init
from pvt_lightning.data.decode import DEFAULT_MAX_IMAGE_PIXELS, decode_image, max_file_bytes
from pvt_lightning.data.transforms import eval_transform, resize_target
from pvt_lightning.errors import BadImageError

DIGEST_BYTES = 16
PHASH_BITS = 64
THUMBNAIL = 32
"""Side of the grey thumbnail kept per image for the aligned-correlation check of near-duplicate candidates."""


def read_file(path: str, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> bytes:
    """The bytes of a regular file (a FIFO named x.jpg is refused, not waited on); BadImageError if it cannot be."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as error:
        raise BadImageError(path, f"cannot read file ({error.strerror})") from None
    with open(fd, "rb") as file:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise BadImageError(path, "not a regular file")
        if max_pixels and info.st_size > max_file_bytes(max_pixels):
            raise BadImageError(path, "file larger than any image within the pixel budget")
        try:
            return file.read()
        except OSError as error:
            raise BadImageError(path, f"cannot read file ({error.strerror})") from None


def grey_thumbnail(image: np.ndarray) -> np.ndarray:
    """The whole image in grey, area-resized to THUMBNAIL x THUMBNAIL uint8."""
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) if image.ndim == 3 else image
    return cv2.resize(grey, (THUMBNAIL, THUMBNAIL), interpolation=cv2.INTER_AREA)


def perceptual_hash(image: np.ndarray) -> np.ndarray:
    """64-bit DCT perceptual hash (pHash) of an RGB or grey uint8 image, packed as 8 uint8.

    Grey, resized to 32x32 (area), 2-D DCT, the 8x8 lowest frequencies; a bit is set where the
    coefficient exceeds their median. Re-encoding and resizing flip few bits, other images about half.
    """
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) if image.ndim == 3 else image
    small = cv2.resize(grey, (32, 32), interpolation=cv2.INTER_AREA).astype(np.float32)
    low = cv2.dct(small)[:8, :8]
    return np.packbits((low > np.median(low)).flatten())


class AuditImages(Dataset):
    """Item ``i`` -> (uint8 crop (3, H, W), i, content digest (16,), pHash (8,), grey thumbnail (32, 32)), or None
    for an unreadable file."""

    def __init__(self, paths: Sequence[str], img_size: tuple[int, int], crop_pct: float,
                 max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS):
        self.paths = list(paths)
        self.transform = eval_transform(img_size, crop_pct)
        self.min_side = max(resize_target(img_size, crop_pct))
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            data = read_file(self.paths[i], self.max_pixels)
            image = decode_image(data, self.min_side, name=self.paths[i], max_pixels=self.max_pixels)
        except BadImageError:
            return None
        crop = self.transform(image=image)["image"]
        digest = np.frombuffer(hashlib.blake2b(data, digest_size=DIGEST_BYTES).digest(), np.uint8).copy()
        return (torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1), i, torch.from_numpy(digest),
                torch.from_numpy(perceptual_hash(image)), torch.from_numpy(grey_thumbnail(image)))


def collate_readable(batch: list):
    kept = [item for item in batch if item is not None]
    return default_collate(kept) if kept else None


@dataclass
class Embedded:
    """The pass's outputs, one row per record (rows of unreadable images stay zero and ``readable`` False)."""

    embeddings: torch.Tensor
    logits: torch.Tensor
    digests: np.ndarray
    phash: np.ndarray
    thumbnails: np.ndarray
    readable: np.ndarray
    seconds: float = 0.0

    @property
    def unreadable(self) -> list[int]:
        return np.flatnonzero(~self.readable).tolist()


def embed(model: nn.Module, records: Sequence[Record], img_size: tuple[int, int], crop_pct: float,
          mean: Sequence[float], std: Sequence[float], batch_size: int = 256, num_workers: int = 2,
          device: str | torch.device = "cpu", max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
          log: Callable[[str], None] | None = None) -> Embedded:
    """Run the model over every record (see the module docstring); the model is put in eval mode on ``device``."""
    start, n = time.perf_counter(), len(records)
    device = torch.device(device)
    model = model.to(device).eval()
    loader = DataLoader(AuditImages([r.path for r in records], img_size, crop_pct, max_pixels), batch_size=batch_size,
                        num_workers=num_workers, worker_init_fn=worker_init, collate_fn=collate_readable,
                        pin_memory=device.type == "cuda")
    scale = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255.0
    shift = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255.0
    out = Embedded(torch.zeros(n, model.num_features), torch.zeros(n, model.num_classes),
                   np.zeros((n, DIGEST_BYTES), np.uint8), np.zeros((n, PHASH_BITS // 8), np.uint8),
                   np.zeros((n, THUMBNAIL, THUMBNAIL), np.uint8), np.zeros(n, bool))
    done, next_report = 0, n / 10
    with torch.inference_mode():
        for batch in loader:
            if batch is None:
                continue
            images, index, digests, phash, thumbnails = batch
            x = (images.to(device, non_blocking=True).float() - shift) / scale
            pooled = model.forward_head(model.forward_features(x), pre_logits=True)
            out.logits[index] = model.get_classifier()(pooled).float().cpu()
            out.embeddings[index] = F.normalize(pooled.float(), dim=1).cpu()
            out.digests[index.numpy()], out.phash[index.numpy()] = digests.numpy(), phash.numpy()
            out.thumbnails[index.numpy()] = thumbnails.numpy()
            out.readable[index.numpy()] = True
            done += len(index)
            if log is not None and done >= next_report:
                log(f"embedded {done}/{n} images ({time.perf_counter() - start:.0f} s)")
                next_report += n / 10
    out.seconds = time.perf_counter() - start
    return out
