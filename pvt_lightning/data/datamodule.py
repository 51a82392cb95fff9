"""ImageFolderDataModule: folders of images (or manifests) -> normalised float NCHW batches on the training device."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import weakref
from functools import partial
from pathlib import Path
from typing import Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, default_collate

from pvt_lightning.data.dataset import BAD_IMAGE_POLICIES, BadImageLog, CollateDroppingBad, ImageDataset
from pvt_lightning.data.decode import DEFAULT_MAX_IMAGE_PIXELS
from pvt_lightning.data.discover import DatasetIndex, discover, resolve_task
from pvt_lightning.data.folders import list_images
from pvt_lightning.data.gpu_augment import AUGMENT_DEVICES, DeviceAugment, ShrinkToFit, UncroppedImages, collate_uncropped, \
    resolve_augment_device
from pvt_lightning.data.index import SampleIndex
from pvt_lightning.data.index_cache import load_or_build, resolve_cache_dir
from pvt_lightning.data.loaders import build_loader
from pvt_lightning.data.resume import ShuffleSampler
from pvt_lightning.data.sampling import SAMPLERS, ClassBalancedSampler
from pvt_lightning.data.shards import ShardImageDataset, is_shards, open_shards
from pvt_lightning.data.transforms import eval_transform, resize_target, train_transform
from pvt_lightning.data.verify import drop_unreadable
from pvt_lightning.errors import BadImageError, DataError
from pvt_lightning.models.registry import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger("pvt_lightning.data")

DEFAULT_CROP_SCALE = (0.08, 1.0)
MULTILABEL_CROP_SCALE = (0.5, 1.0)
"""Multi-label training crops keep at least half the image: a crop of 8% (the single-label default) mostly drops
objects whose labels the image still carries."""


def default_num_workers() -> int:
    """Data-loader workers per device when none are asked for: min(8, CPUs)."""
    return min(8, os.cpu_count() or 1)


class ImageFolderDataModule(L.LightningDataModule):
    """ImageFolder data for classification: ``train/`` + ``val/`` (+ optional ``test/``) class folders,
    or one class-folder root split by ``val_split`` (stratified per class, seeded), or a manifest
    (``train.csv`` / ``.parquet`` with ``path,label[,split]`` columns and ``val``/``test`` siblings; manifest.py).

    ``classes``: a classes file (one name per line) or a list of names: the class order, possibly a
    subset; images of other classes are counted and skipped (``skipped_classes``). The listing is kept
    in numpy arrays (index.py) and cached (``index_cache``: a folder, None for the default, False for
    none; index_cache.py), so each job lists the data once and later runs reuse it while it is unchanged.

    Workers decode with OpenCV and augment with albumentations, shipping uint8 (B, 3, H, W); the
    ``on_after_batch_transfer`` hook turns batches into normalised float32 on the device, so a
    LightningModule receives ``(images float (B, 3, H, W), targets int64 (B,))``, and predict batches
    ``(images, paths)``. ``img_size`` is (height, width); non-square sizes work. The training loader is
    resumable mid-epoch (resume.py): a ``--resume`` goes on with the batches of the epoch not yet seen.

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
        self, data_dir: str | Path | None, img_size: int | Sequence[int] = (224, 224), batch_size: int = 32,
        num_workers: int | None = None, val_split: float | None = None, seed: int = 0, augment: str = "basic",
        crop_pct: float = 0.875, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
        bad_images: str = "skip", verify_images: bool = False, pin_memory: bool | None = None,
        crop_scale: tuple[float, float] = DEFAULT_CROP_SCALE, predict_dir: str | Path | None = None,
        sampler: str = "none",
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS, bad_images_file: str | Path | None = None,
        augment_device: str = "auto", classes: str | Path | Sequence[str] | None = None,
        index_cache: str | Path | bool | None = None, predict_split: str = "val", task: str = "auto",
    ) -> None:
        """See the class docstring; ``num_workers`` defaults to min(8, CPUs), ``pin_memory`` to CUDA availability,
        ``crop_scale`` is RandomResizedCrop's area range, ``predict_dir`` a folder (flat or nested) to predict,
        ``predict_split`` the split predicted without one, ``max_image_pixels`` the pixel budget per image,
        checked from each file's header (0 or None: no limit), ``task`` auto/multiclass/multilabel (multi-label:
        a manifest's ``labels`` or 0/1 class columns; targets become float multi-hot (B, C); docs/multilabel.md)."""
        super().__init__()
        check_choices(bad_images, sampler, augment_device, max_image_pixels)
        self.data_dir = Path(data_dir).expanduser() if data_dir is not None else None
        self.img_size = _as_hw(img_size)
        self.batch_size, self.seed, self.val_split = batch_size, seed, val_split
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        self.augment, self.crop_pct, self.crop_scale = augment, crop_pct, tuple(crop_scale)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.bad_images, self.verify_images = bad_images, verify_images
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.predict_dir = Path(predict_dir).expanduser() if predict_dir is not None else None
        self.sampler = sampler  # training: "none" shuffles, "balanced"/"sqrt" rebalance classes (sampling.py)
        self.max_image_pixels = max_image_pixels or None
        self.augment_device = augment_device  # training augmentation: "cpu" workers, "gpu" per batch (gpu_augment.py)
        self.classes, self.index_cache, self.predict_split = classes, index_cache, predict_split
        self.task_option = task
        train_transform(self.img_size, augment, self.crop_scale)  # fail on a bad augment name now, not in a worker
        eval_transform(self.img_size, crop_pct)
        self._device_augment: DeviceAugment | None = None
        # Where worker processes record the bad files they meet: the user's file, or one removed with this object.
        log_dir = tempfile.mkdtemp(prefix="pvt_lightning_bad_images_")
        weakref.finalize(self, shutil.rmtree, log_dir, ignore_errors=True)
        self._bad_log = BadImageLog(Path(log_dir) / "bad_images.txt")
        if bad_images_file is not None:
            self.bad_images_file = bad_images_file
        self._index: DatasetIndex | None = None
        self.index_file: Path | None = None  # the index cache file used, if any
        self.index_reused = False  # whether setup loaded the index from it rather than listing the data
        self._predict_list: SampleIndex | None = None
        self.predict_skip: set[str] = set()
        """Paths under ``predict_dir`` left out of prediction (a resumed predict: those already written)."""
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

    def prepare_data(self) -> None:
        """Lightning calls this on one process per node before ``setup``: the data is listed (or read from
        the index cache) there once, and the other ranks load the cached index."""
        if self.data_dir is not None and self.predict_dir is None:
            self._scan()

    def setup(self, stage: str | None = None) -> None:
        """Find and check the data (every DataError happens here, before training); idempotent."""
        if stage == "predict" and self.predict_dir is not None:
            self._predict_samples()
        else:
            self._scan()

    @property
    def class_names(self) -> list[str]:
        """Class names; index i is class i (sorted folder names or labels, or the classes file's order)."""
        self._scan()
        return list(self._index.class_names)

    @property
    def task(self) -> str:
        """``multiclass`` or ``multilabel`` (``task="auto"`` resolved from the data)."""
        self._scan()
        return "multilabel" if self._index.splits["train"].targets is not None else "multiclass"

    def unlabelled(self, split: str) -> int:
        """Multi-label: images of ``split`` with no label (0 for single-label data)."""
        targets = self.samples(split).targets
        return 0 if targets is None else int((targets.sum(axis=1) == 0).sum())

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def split_sizes(self) -> dict[str, int]:
        """Number of images per split, e.g. {"train": 900, "val": 100}."""
        self._scan()
        return {name: len(samples) for name, samples in self._index.splits.items()}

    def skipped_classes(self) -> dict[str, int]:
        """Images (or manifest rows) left out because their class is not in ``classes``: {class: count}."""
        self._scan()
        return dict(self._index.skipped)

    def samples(self, split: str) -> SampleIndex:
        """The (path, class index) pairs of ``split`` ("train", "val" or "test"): a read-only sequence
        backed by arrays (index.py); ``list(...)`` gives plain tuples."""
        self._scan()
        if split not in self._index.splits:
            raise DataError(f"no {split} split in {self.data_dir} (available: {', '.join(self._index.splits)}); "
                            f"add {split}/<class>/... folders, or a {split} manifest or split-column rows")
        return self._index.splits[split]

    def _scan(self) -> None:
        if self._index is not None:
            return
        if self.data_dir is None:
            raise DataError("this data module has no data_dir (it was made for prediction only); "
                            "the class names come from the checkpoint")
        root = self.data_dir
        if not root.exists():
            discover(root, self.val_split, self.seed, self.classes)  # the DataError naming the missing path
        task = resolve_task(root, self.task_option)
        build = partial(discover, root, self.val_split, self.seed, self.classes, task)
        if is_shards(root):
            self._index = open_shards(root, self.classes, self.val_split)
            return
        classes = os.fspath(Path(self.classes).expanduser().resolve()) if isinstance(self.classes, (str, Path)) \
            else self.classes if self.classes is None else list(self.classes)
        options = {"val_split": self.val_split, "seed": self.seed, "classes": classes}
        if task == "multilabel":  # single-label runs keep their cache keys (and cached indexes)
            options["task"] = task
        index, self.index_file, self.index_reused = load_or_build(root, options, build,
                                                                  resolve_cache_dir(self.index_cache))
        if self.verify_images:
            index.splits = drop_unreadable(index.splits, index.class_names, self.bad_images, self.max_image_pixels,
                                           self._bad_log)
        self._index = index
        log.info("data %s: %d classes, %s%s", root, len(index.class_names),
                 ", ".join(f"{k} {len(v)} images" for k, v in index.splits.items()),
                 f" (index {'reused from' if self.index_reused else 'saved to'} {self.index_file})"
                 if self.index_file else "")

    def predict_samples(self) -> SampleIndex:
        """The images ``predict_dataloader`` yields: every image under ``predict_dir`` but ``predict_skip``."""
        return self._predict_samples()

    def _predict_samples(self) -> SampleIndex:
        if self._predict_list is None:
            folder = self.predict_dir
            if not folder.exists():
                raise DataError(f"prediction input {folder} does not exist; give a folder of images or one image")
            paths = [str(folder)] if folder.is_file() else list_images(folder)  # one file: just that image
            if not paths:
                raise DataError(f"no images found under {folder} (looked recursively for image file extensions)")
            if self.predict_skip:  # may leave none: every image was already predicted
                paths = [path for path in paths if path not in self.predict_skip]
            self._predict_list = SampleIndex.from_paths(paths, -1)
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
        """The resumable training loader (loaders.py) over a sampler seeded per epoch (resume.py)."""
        crop_scale = self.crop_scale
        if self.task == "multilabel" and crop_scale == DEFAULT_CROP_SCALE:  # small crops cut labelled objects out
            crop_scale = MULTILABEL_CROP_SCALE
        transform = train_transform(self.img_size, self.augment, crop_scale, seed=self.seed)
        samples, sampler = self.samples("train"), self._train_sampler()
        if self.train_augment_device() == "gpu":  # workers only decode; on_after_batch_transfer augments
            rank = self.trainer.global_rank if self.trainer is not None else 0
            self._device_augment = DeviceAugment(transform, self.mean, self.std, seed=self.seed + 7919 * rank)
            max_side = 2 * max(resize_target(self.img_size, self.crop_pct))  # as far as reduced decoding goes
            return self._loader("train", samples, ShrinkToFit(max_side), sampler=sampler, collate=collate_uncropped)
        return self._loader("train", samples, transform, sampler=sampler)

    def _train_sampler(self) -> ShuffleSampler | ClassBalancedSampler:
        """Shuffling (or class-rebalancing) over this rank's share; both split their draws across DDP ranks
        themselves (so Lightning keeps them) and restart mid-epoch exactly (resume.py)."""
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer is not None else (1, 0)
        labels = self.samples("train").labels
        if self.sampler == "none":
            return ShuffleSampler(len(labels), num_replicas=world, rank=rank, seed=self.seed)
        return ClassBalancedSampler(labels, self.sampler, num_replicas=world, rank=rank, seed=self.seed)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.samples("val"), eval_transform(self.img_size, self.crop_pct))

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.samples("test"), eval_transform(self.img_size, self.crop_pct))

    def predict_dataloader(self) -> DataLoader:
        """Batches of ``(images, paths)`` over ``predict_dir``, or over ``predict_split`` (default val) when
        there is none (None for a batch whose every image was unreadable)."""
        if self.predict_dir is not None:
            split, samples = "predict", self._predict_samples()
        else:
            split, samples = self.predict_split, self.samples(self.predict_split)
        return self._loader(split, samples, eval_transform(self.img_size, self.crop_pct), with_paths=True)

    def _loader(self, split: str, samples: SampleIndex, transform, with_paths: bool = False,
                sampler=None, collate=None) -> DataLoader:
        train = split == "train" and not with_paths
        options = dict(transform=transform, bad_log=self._bad_log, bad_images=self.bad_images, replace_bad=train,
                       with_paths=with_paths, min_side=max(resize_target(self.img_size, self.crop_pct)),
                       max_pixels=self.max_image_pixels, split=split,
                       class_names=None if split == "predict" else self.class_names)
        shards = split != "predict" and self.data_dir is not None and is_shards(self.data_dir)
        dataset = (ShardImageDataset(samples, self.data_dir / split, **options) if shards
                   else ImageDataset(samples, **options))
        collate = collate or (default_collate if train else CollateDroppingBad())  # train batches keep their size
        return build_loader(dataset, self.batch_size, self.num_workers, self.pin_memory, collate, sampler, train)

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


def check_choices(bad_images: str, sampler: str, augment_device: str, max_image_pixels: int | None) -> None:
    """ValueError for a data module argument outside its choices."""
    for name, value, choices in (("bad_images", bad_images, BAD_IMAGE_POLICIES), ("sampler", sampler, SAMPLERS),
                                 ("augment_device", augment_device, AUGMENT_DEVICES)):
        if value not in choices:
            raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    if max_image_pixels is not None and max_image_pixels < 0:
        raise ValueError(f"max_image_pixels must be a number of pixels (0 or None: no limit), got {max_image_pixels}")
