"""Data side: ImageFolder / manifest / shards discovery and checks, the cached sample index, OpenCV decoding,
albumentations transforms, resumable loaders, demo data."""

from pvt_lightning.data.datamodule import ImageFolderDataModule
from pvt_lightning.data.decode import DEFAULT_MAX_IMAGE_PIXELS, IMAGE_EXTENSIONS, decode_image, read_image
from pvt_lightning.data.demo import DEMO_EPOCHS, DEMO_IMG_SIZE, ensure_demo_dataset
from pvt_lightning.data.index import SampleIndex
from pvt_lightning.models.registry import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["DEFAULT_MAX_IMAGE_PIXELS", "DEMO_EPOCHS", "DEMO_IMG_SIZE", "IMAGENET_MEAN",
           "IMAGENET_STD", "IMAGE_EXTENSIONS", "ImageFolderDataModule", "SampleIndex", "decode_image",
           "ensure_demo_dataset", "read_image"]
