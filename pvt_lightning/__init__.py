"""pvt-lightning: PVTv2 image classification with PyTorch Lightning."""

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations checks PyPI for updates on import

from pvt_lightning.models import VARIANTS, create_model, load_pretrained, measure_complexity  # noqa: E402

__version__ = "0.1.0"

_LAZY = {"ImageClassifier": "pvt_lightning.training.module", "ImageFolderDataModule": "pvt_lightning.data"}


def __getattr__(name: str):
    """Import the Lightning-heavy parts on first use, so `import pvt_lightning` stays light for model users."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ImageClassifier", "ImageFolderDataModule", "VARIANTS", "create_model", "load_pretrained",
           "measure_complexity", "__version__"]
