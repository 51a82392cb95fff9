"""ImageFolderDataModule: folders of images -> normalised float NCHW batches on the training device."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import weakref
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, default_collate

from pvt_lightning.data.dataset import BAD_IMAGE_POLICIES, BadImageLog, CollateDroppingBad, ImageDataset, worker_init
from pvt_lightning.data.decode import DEFAULT_MAX_IMAGE_PIXELS, read_image
from pvt_lightning.errors import BadImageError, DataError, printable
from pvt_lightning.data.folders import Sample, check_enough_classes, list_images, scan_split, stratified_split
from pvt_lightning.data.gpu_augment import AUGMENT_DEVICES, DeviceAugment, ShrinkToFit, UncroppedImages, collate_uncropped, \
    resolve_augment_device
from pvt_lightning.data.sampling import SAMPLERS, ClassBalancedSampler
from pvt_lightning.data.transforms import eval_transform, resize_target, train_transform
from pvt_lightning.models.registry import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger("pvt_lightning.data")


def default_num_workers() -> int:
    """Data-loader workers per device when none are asked for: min(8, CPUs)."""
    return min(8, os.cpu_count() or 1)


class ImageFolderDataModule(L.LightningDataModule):
    """ImageFolder data for classification: ``train/`` + ``val/`` (+ optional ``test/``) class folders,
    or one class-folder root split by ``val_split`` (stratified per class, seeded).

    Workers decode with OpenCV and augment with albumentations, shipping uint8 (B, 3, H, W); the
    ``on_after_batch_transfer`` hook turns batches into normalised float32 on the device, so a
    LightningModule receives ``(images float (B, 3, H, W), targets int64 (B,))``, and predict batches
    ``(images, paths)``. ``img_size`` is (height, width); non-square sizes work.

    ``augment_device``: "gpu" moves training augmentation onto the device (gpu_augment.py: workers only
    decode and pad, each batch is cropped, flipped, coloured and normalised there, with the same random laws);
    "cpu" keeps it in the workers; "auto" (default) takes the GPU path when training runs on CUDA.

    Unreadable images (corrupt, not regular files, over the ``max_image_pixels`` budget) follow
    ``bad_images``: "skip" leaves them out and counts them (``bad_image_paths``, ``bad_images_report``),
    "error" stops with the path. Under "skip", batches can shrink, and an evaluation or prediction batch
    of bad files only is None (skipped); a class or split left with no readable image is a DataError.
    ``bad_images_file``: where the list of skipped files is kept (appended, one path per line, created
    at the first one); without it the list lives in a temporary file removed with this object.
    """

    def __init__(
        self,
        data_dir: str | Path | None,
        img_size: int | Sequence[int] = (224, 224),
        batch_size: int = 32,
        num_workers: int | None = None,
        val_split: float | None = None,
        seed: int = 0,
        augment: str = "basic",
        crop_pct: float = 0.875,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        bad_images: str = "skip",
        verify_images: bool = False,
        pin_memory: bool | None = None,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        predict_dir: str | Path | None = None,
        sampler: str = "none",
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        bad_images_file: str | Path | None = None,
        augment_device: str = "auto",
    ) -> None:
        """See the class docstring; ``num_workers`` defaults to min(8, CPUs), ``pin_memory`` to CUDA availability,
        ``crop_scale`` is RandomResizedCrop's area range, ``predict_dir`` a folder (flat or nested) to predict,
        ``max_image_pixels`` the pixel budget per image, checked from each file's header (0 or None: no limit)."""
        super().__init__()
        self.data_dir = Path(data_dir).expanduser() if data_dir is not None else None
        self.img_size = _as_hw(img_size)
        self.batch_size = batch_size
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        self.val_split = val_split
        self.seed = seed
        self.augment = augment
        self.crop_pct = crop_pct
        self.crop_scale = tuple(crop_scale)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        if bad_images not in BAD_IMAGE_POLICIES:
            raise ValueError(f"bad_images must be one of {BAD_IMAGE_POLICIES}, got {bad_images!r}")
        self.bad_images = bad_images
        self.verify_images = verify_images
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.predict_dir = Path(predict_dir).expanduser() if predict_dir is not None else None
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        self.sampler = sampler  # training: "none" shuffles, "balanced"/"sqrt" rebalance classes (sampling.py)
        if max_image_pixels is not None and max_image_pixels < 0:
            raise ValueError(f"max_image_pixels must be a number of pixels (0 or None: no limit), got {max_image_pixels}")
        self.max_image_pixels = max_image_pixels or None
        train_transform(self.img_size, augment, self.crop_scale)  # fail on a bad augment name now, not in a worker
        if augment_device not in AUGMENT_DEVICES:
            raise ValueError(f"augment_device must be one of {AUGMENT_DEVICES}, got {augment_device!r}")
        self.augment_device = augment_device  # training augmentation: "cpu" workers, "gpu" per batch (gpu_augment.py)
        self._device_augment: DeviceAugment | None = None
        eval_transform(self.img_size, crop_pct)

        # Where worker processes record the bad files they meet: the user's file, or one removed with this object.
        log_dir = tempfile.mkdtemp(prefix="pvt_lightning_bad_images_")
        weakref.finalize(self, shutil.rmtree, log_dir, ignore_errors=True)
        self._bad_log = BadImageLog(Path(log_dir) / "bad_images.txt")
        if bad_images_file is not None:
            self.bad_images_file = bad_images_file
        self._class_names: list[str] | None = None
        self._predict_list: list[Sample] | None = None
        self._splits: dict[str, list[Sample]] = {}
        self._norm_cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def for_prediction(
        cls,
        folder: str | Path,
        img_size: int | Sequence[int] = (224, 224),
        crop_pct: float = 0.875,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        **kwargs,
    ) -> "ImageFolderDataModule":
        """A data module whose ``predict_dataloader`` yields ``(images, paths)`` for every image under ``folder``."""
        return cls(None, img_size=img_size, crop_pct=crop_pct, mean=mean, std=std, predict_dir=folder, **kwargs)

    # ----------------------------------------------------------------- dataset discovery and checks

    def setup(self, stage: str | None = None) -> None:
        """Find and check the data (every DataError happens here, before training); idempotent."""
        if stage == "predict" and self.predict_dir is not None:
            self._predict_samples()
        else:
            self._scan()

    @property
    def class_names(self) -> list[str]:
        """Sorted class folder names; index i is class i."""
        self._scan()
        return list(self._class_names)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def split_sizes(self) -> dict[str, int]:
        """Number of images per split, e.g. {"train": 900, "val": 100}."""
        self._scan()
        return {name: len(samples) for name, samples in self._splits.items()}

    def samples(self, split: str) -> list[Sample]:
        """The (path, class index) pairs of ``split`` ("train", "val" or "test")."""
        self._scan()
        if split not in self._splits:
            raise DataError(f"no {split}/ folder in {self.data_dir}; create {self.data_dir}/{split}/<class>/... "
                            f"(available: {', '.join(self._splits)})")
        return self._splits[split]

    def _scan(self) -> None:
        if self._class_names is not None:
            return
        if self.data_dir is None:
            raise DataError("this data module has no data_dir (it was made for prediction only); "
                            "the class names come from the checkpoint")
        root = self.data_dir
        if not root.exists():
            raise DataError(f"data folder {root} does not exist; check the path "
                            "(expected train/ and val/ class folders, or class folders plus val_split)")
        if (root / "train").is_dir():
            names, splits = self._scan_split_layout(root)
        elif (root / "val").is_dir():
            raise DataError(f"{root} has a val/ folder but no train/ folder; add {root}/train/<class>/...")
        else:
            names, all_samples = scan_split(root)
            check_enough_classes(names, root)
            if self.val_split is None:
                raise DataError(f"{root} has class folders but no train/ and val/ folders; pass val_split "
                                "(e.g. 0.1, --val-split 0.1) to hold out a stratified validation set")
            train, val = stratified_split(all_samples, self.val_split, self.seed)
            splits = {"train": train, "val": val}
        if self.verify_images:
            splits = self._drop_unreadable(splits, names)
        self._class_names, self._splits = names, splits
        log.info("data %s: %d classes, %s", root, len(names),
                 ", ".join(f"{k} {len(v)} images" for k, v in splits.items()))

    def _scan_split_layout(self, root: Path) -> tuple[list[str], dict[str, list[Sample]]]:
        names, train = scan_split(root / "train")
        check_enough_classes(names, root / "train")
        if (root / "val").is_dir():
            if self.val_split is not None:
                log.warning("ignoring val_split=%s: %s has its own val/ folder", self.val_split, root)
            splits = {"train": train, "val": scan_split(root / "val", names)[1]}
        elif self.val_split is not None:
            train, val = stratified_split(train, self.val_split, self.seed)
            splits = {"train": train, "val": val}
        else:
            raise DataError(f"{root}/train has no sibling val/ folder; add {root}/val/<class>/... "
                            "or pass val_split (e.g. 0.1) to hold out part of train/")
        if (root / "test").is_dir():
            splits["test"] = scan_split(root / "test", names)[1]
        return names, splits

    def _drop_unreadable(self, splits: dict[str, list[Sample]], names: list[str]) -> dict[str, list[Sample]]:
        """Decode every file once, in parallel (OpenCV releases the GIL), and keep only the readable ones."""
        paths = [path for samples in splits.values() for path, _ in samples]
        with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1)) as pool:
            problems = [p for p in pool.map(partial(_decode_problem, max_pixels=self.max_image_pixels), paths) if p]
        bad = {error.path: error.reason for error in problems}
        if bad and self.bad_images == "error":
            listing = "\n".join(f"  {printable(path)}: {reason}" for path, reason in sorted(bad.items())[:20])
            raise DataError(f"{len(bad)} unreadable image(s) found by verify_images (showing up to 20):\n{listing}\n"
                            "delete or replace them, or use bad_images='skip' to train without them")
        for error in sorted(problems, key=lambda e: e.path):
            log.warning("excluding unreadable image %s: %s", printable(error.path), error.reason)
            self._bad_log.add(error, warn=False)
        kept = {split: [s for s in samples if s[0] not in bad] for split, samples in splits.items()}
        for split, samples in kept.items():
            empty = sorted(set(range(len(names))) - {label for _, label in samples})
            if empty:
                folders = {label: os.path.dirname(path) for path, label in splits[split]}
                raise DataError(f"after excluding unreadable images, class folder(s) "
                                f"{', '.join(printable(folders[i]) for i in empty)} have no images left "
                                f"({split} split); {self._bad_log.where()}")
        return kept

    def _predict_samples(self) -> list[Sample]:
        if self._predict_list is None:
            folder = self.predict_dir
            if not folder.is_dir():
                raise DataError(f"prediction folder {folder} does not exist or is not a folder")
            paths = list_images(folder)
            if not paths:
                raise DataError(f"no images found under {folder} (looked recursively for image file extensions)")
            self._predict_list = [(path, -1) for path in paths]
        return self._predict_list

    @property
    def bad_images_file(self) -> Path | None:
        """The kept list of skipped images (None: a temporary one). Set it before the loaders are built;
        paths recorded so far (by ``verify_images``) are copied into it."""
        return self._bad_log.file if self._bad_log.keep else None

    @bad_images_file.setter
    def bad_images_file(self, path: str | Path) -> None:
        kept = BadImageLog(Path(path).expanduser(), keep=True)
        for old in self._bad_log.paths():
            kept.add(BadImageError(old, ""), warn=False)
        self._bad_log = kept

    def bad_image_paths(self) -> list[str]:
        """Every file found unreadable so far (by ``verify_images`` or by any worker process), sorted."""
        return self._bad_log.paths()

    def bad_images_report(self) -> str | None:
        """One line for the end of a run: how many images were skipped and where they are listed; None if none."""
        paths = self.bad_image_paths()
        if not paths:
            return None
        return f"skipped {len(paths)} unreadable image(s) (bad_images='skip'); {self._bad_log.where()}"

    # ----------------------------------------------------------------------------- data loaders

    def train_dataloader(self) -> DataLoader:
        transform = train_transform(self.img_size, self.augment, self.crop_scale, seed=self.seed)
        if self.train_augment_device() == "gpu":  # workers only decode; on_after_batch_transfer augments
            rank = self.trainer.global_rank if self.trainer is not None else 0
            self._device_augment = DeviceAugment(transform, self.mean, self.std, seed=self.seed + 7919 * rank)
            max_side = 2 * max(resize_target(self.img_size, self.crop_pct))  # as far as reduced decoding goes
            return self._loader("train", self.samples("train"), ShrinkToFit(max_side), train=True,
                                sampler=self._train_sampler(), collate=collate_uncropped)
        return self._loader("train", self.samples("train"), transform, train=True, sampler=self._train_sampler())

    def _train_sampler(self) -> ClassBalancedSampler | None:
        """The class-rebalancing sampler, if any; it splits its draws across DDP ranks itself, so Lightning keeps it."""
        if self.sampler == "none":
            return None
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer is not None else (1, 0)
        return ClassBalancedSampler([label for _, label in self.samples("train")], self.sampler, num_replicas=world,
                                    rank=rank, seed=self.seed)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.samples("val"), eval_transform(self.img_size, self.crop_pct))

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.samples("test"), eval_transform(self.img_size, self.crop_pct))

    def predict_dataloader(self) -> DataLoader:
        """Batches of ``(images, paths)`` over ``predict_dir``, or over the val split when there is none
        (None for a batch whose every image was unreadable)."""
        if self.predict_dir is not None:
            split, samples = "predict", self._predict_samples()
        else:
            split, samples = "val", self.samples("val")
        return self._loader(split, samples, eval_transform(self.img_size, self.crop_pct), with_paths=True)

    def _loader(self, split: str, samples: list[Sample], transform, train: bool = False,
                with_paths: bool = False, sampler: ClassBalancedSampler | None = None, collate=None) -> DataLoader:
        dataset = ImageDataset(samples, transform, self._bad_log, self.bad_images, replace_bad=train,
                               with_paths=with_paths, min_side=max(resize_target(self.img_size, self.crop_pct)),
                               max_pixels=self.max_image_pixels, split=split,
                               class_names=None if split == "predict" else self._class_names)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=train and sampler is None,
            sampler=sampler,
            drop_last=train and len(samples) > self.batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            worker_init_fn=worker_init,
            collate_fn=collate or (default_collate if train else CollateDroppingBad()),  # train batches keep their size
        )

    # ---------------------------------------------------------------- normalisation on the device

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """uint8 images -> normalised float32, after the (4x smaller) uint8 batch reached the device."""
        if batch is None:  # every image of the batch was unreadable
            return None
        images, *rest = batch
        if isinstance(images, UncroppedImages):  # the GPU path's training batches: crop, flip, colour, normalise here
            return (self._device_augment(images), *rest)
        return (self.normalize(images), *rest)

    def train_augment_device(self) -> str:
        """Where training augmentation runs: "gpu" (per batch on the device) or "cpu" (in the loader workers);
        ``augment_device="auto"`` picks the GPU path when the Trainer (or, without one, this machine) uses CUDA."""
        device = self.trainer.strategy.root_device if self.trainer is not None else None
        return resolve_augment_device(self.augment_device, device)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) in 0..255 -> float32 (B, 3, H, W), (x / 255 - mean) / std, on the images' device."""
        if images.dtype != torch.uint8:
            raise TypeError(f"normalize expects uint8 images from this data module's loaders, got {images.dtype}")
        if images.device not in self._norm_cache:
            mean = torch.tensor(self.mean, device=images.device).view(1, 3, 1, 1) * 255.0
            std = torch.tensor(self.std, device=images.device).view(1, 3, 1, 1) * 255.0
            self._norm_cache[images.device] = mean, std
        mean, std = self._norm_cache[images.device]
        return images.float().sub_(mean).div_(std)


def _as_hw(img_size: int | Sequence[int]) -> tuple[int, int]:
    size = (img_size, img_size) if isinstance(img_size, int) else tuple(int(s) for s in img_size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"img_size must be an int or (height, width) of positive ints, got {img_size!r}")
    return size


def _decode_problem(path: str, max_pixels: int | None) -> BadImageError | None:
    try:
        read_image(path, max_pixels=max_pixels)
    except BadImageError as error:
        return error
    return None
