"""Data side: ImageFolder discovery and checks, OpenCV decoding, albumentations transforms, demo data."""

from .datamodule import IMAGENET_MEAN, IMAGENET_STD, ImageFolderDataModule
from .decode import DEFAULT_MAX_IMAGE_PIXELS, IMAGE_EXTENSIONS, decode_image, read_image
from .demo import DEMO_EPOCHS, DEMO_IMG_SIZE, ensure_demo_dataset
from .errors import BadImageError, DataError

__all__ = ["BadImageError", "DEFAULT_MAX_IMAGE_PIXELS", "DEMO_EPOCHS", "DEMO_IMG_SIZE", "DataError", "IMAGENET_MEAN",
           "IMAGENET_STD", "IMAGE_EXTENSIONS", "ImageFolderDataModule", "decode_image", "ensure_demo_dataset",
           "read_image"]
