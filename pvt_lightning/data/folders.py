"""Finding and checking ImageFolder datasets: class folders -> (path, class index) samples.

Every problem a user can cause is a ``DataError`` naming the folder and the fix, raised while the
data module is set up, i.e. before any training starts.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from pathlib import Path

import numpy as np

from pvt_lightning.data.decode import IMAGE_EXTENSIONS, is_image_file
from pvt_lightning.errors import DataError, printable

log = logging.getLogger("pvt_lightning.data")

Sample = tuple[str, int]
"""(file path, class index)."""


def class_folders(root: Path) -> list[str]:
    """Sorted names of the visible sub-folders of ``root``: the class names."""
    if not root.exists():
        raise DataError(f"data folder {root} does not exist; check the path (expected class folders, or train/ and val/)")
    if not root.is_dir():
        raise DataError(f"data path {root} is a file, not a folder of class folders")
    names = sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith("."))
    if not names:
        loose = sum(1 for p in root.iterdir() if is_image_file(p))
        hint = f" ({loose} images lie directly in it: move them into one folder per class)" if loose else ""
        raise DataError(f"{root} has no class folders{hint}; expected {root}/<class name>/<images>")
    return names


def list_images(folder: str | Path) -> list[str]:
    """All image files under ``folder``: recursively, sorted, hidden entries skipped, symlinks followed.

    Each real folder is scanned once: a symlink back to a folder above it (a loop) or to a folder
    already scanned is skipped with a warning, so no image is listed twice. Non-regular files with an
    image name (a FIFO called x.jpg) are listed; reading them fails, so they count as bad images.
    """
    found: list[str] = []
    _scan_folder(os.fspath(folder), found, seen={}, ancestors=[])
    return found


def _scan_folder(directory: str, found: list[str], seen: dict[tuple[int, int], str], ancestors: list[tuple[int, int]]):
    """Depth first, in os.walk's order: this folder's files, then each sub-folder. ``seen``: (st_dev, st_ino) -> path."""
    try:
        status = os.stat(directory)
        with os.scandir(directory) as scan:
            entries = sorted((entry for entry in scan if not entry.name.startswith(".")), key=lambda e: e.name)
    except OSError as error:
        log.warning("cannot list folder %s (%s); skipped", printable(directory), error.strerror)
        return
    key = (status.st_dev, status.st_ino)
    seen[key] = directory
    ancestors.append(key)
    subfolders = []
    for entry in entries:
        if _is_dir(entry):
            subfolders.append(entry)
        elif is_image_file(entry.name):
            found.append(os.path.join(directory, entry.name))
    for entry in subfolders:
        try:
            status = entry.stat()  # follows the symlink: the real folder's identity
        except OSError:
            continue
        target = (status.st_dev, status.st_ino)
        if target in ancestors:
            log.warning("symlink loop: %s leads back to %s; not followed (each real folder is scanned once)",
                        printable(entry.path), printable(seen[target]))
        elif target in seen:
            log.warning("%s leads to %s, which was already scanned; skipped so its images are not listed twice",
                        printable(entry.path), printable(seen[target]))
        else:
            _scan_folder(entry.path, found, seen, ancestors)
    ancestors.pop()


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows symlinks
    except OSError:
        return False


def scan_split(root: Path, class_names: list[str] | None = None) -> tuple[list[str], list[Sample]]:
    """Class names and samples of one class-folder root; with ``class_names``, the folders must match them."""
    names = class_folders(root)
    if class_names is not None and names != class_names:
        raise DataError(
            f"the classes in {root} differ from the training classes:\n"
            f"  train: {', '.join(class_names)}\n  {root.name}: {', '.join(names)}\n"
            "every split needs the same class folders (add the missing ones, even with few images)"
        )
    samples: list[Sample] = []
    for index, name in enumerate(names):
        images = list_images(root / name)
        if not images:
            extensions = ", ".join(sorted(IMAGE_EXTENSIONS))
            raise DataError(f"class folder {root / name} contains no images ({extensions}); add images or remove the folder")
        samples.extend((path, index) for path in images)
    return names, samples


def check_enough_classes(class_names: list[str], root: Path) -> None:
    if len(class_names) < 2:
        raise DataError(f"{root} has {len(class_names)} class folder ({', '.join(class_names)}); "
                        "classification needs at least 2 classes, one folder each")


def stratified_split(samples: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Split into (train, val), taking ``fraction`` of every class (at least one image) into val.

    Deterministic for a given seed and file list; classes with a single image stay in train.
    """
    if not 0.0 < fraction < 1.0:
        raise DataError(f"val_split must be a fraction between 0 and 1, got {fraction}")
    by_class: dict[int, list[Sample]] = defaultdict(list)
    for sample in samples:
        by_class[sample[1]].append(sample)
    rng = np.random.default_rng(seed)
    train: list[Sample] = []
    val: list[Sample] = []
    for label in sorted(by_class):
        members = by_class[label]
        order = rng.permutation(len(members))
        n_val = min(max(1, round(fraction * len(members))), len(members) - 1)
        val.extend(members[i] for i in sorted(order[:n_val]))
        train.extend(members[i] for i in sorted(order[n_val:]))
    return train, val
