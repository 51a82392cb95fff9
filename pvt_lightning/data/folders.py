"""Finding and checking ImageFolder datasets: class folders -> (path, class index) samples (a SampleIndex).

Every problem a user can cause is a ``DataError`` naming the folder and the fix, raised while the
data module is set up, i.e. before any training starts.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from pvt_lightning.data.decode import IMAGE_EXTENSIONS, is_image_file
from pvt_lightning.data.index import Sample, SampleIndex
from pvt_lightning.errors import DataError, printable

log = logging.getLogger("pvt_lightning.data")

_EXTENSIONS = tuple(IMAGE_EXTENSIONS)


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


def list_images(folder: str | Path, dirs: list[str] | None = None) -> list[str]:
    """All image files under ``folder``: recursively, sorted, hidden entries skipped, symlinks followed.

    Each real folder is scanned once: a symlink back to a folder above it (a loop) or to a folder
    already scanned is skipped with a warning, so no image is listed twice. Non-regular files with an
    image name (a FIFO called x.jpg) are listed; reading them fails, so they count as bad images.
    ``dirs``: if given, every folder scanned is appended to it (the index cache watches their mtimes).
    """
    found: list[str] = []
    seen: dict[tuple[int, int], str] = {}
    _scan_folder(os.fspath(folder), found, seen, ancestors=[])
    if dirs is not None:
        dirs.extend(seen.values())
    return found


def _scan_folder(directory: str, found: list[str], seen: dict[tuple[int, int], str], ancestors: list[tuple[int, int]]):
    """Depth first, in os.walk's order: this folder's files, then each sub-folder. ``seen``: (st_dev, st_ino) -> path."""
    files: list[str] = []
    subfolders: list[os.DirEntry] = []
    try:
        status = os.stat(directory)
        with os.scandir(directory) as scan:
            for entry in scan:
                name = entry.name
                if name[0] == ".":
                    continue
                if name.lower().endswith(_EXTENSIONS):
                    if not _is_dir(entry):
                        files.append(name)
                        continue
                if _is_dir(entry):
                    subfolders.append(entry)
    except OSError as error:
        log.warning("cannot list folder %s (%s); skipped", printable(directory), error.strerror)
        return
    key = (status.st_dev, status.st_ino)
    seen[key] = directory
    ancestors.append(key)
    prefix = os.path.join(directory, "")
    files.sort()
    found.extend([prefix + name for name in files])
    subfolders.sort(key=_name)
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


def _name(entry: os.DirEntry) -> str:
    return entry.name


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows symlinks
    except OSError:
        return False


def scan_split(root: Path, class_names: list[str] | None = None, fixed: bool = False,
               dirs: list[str] | None = None) -> tuple[list[str], SampleIndex, dict[str, int]]:
    """Class names, samples and skipped images ({folder: count}) of one class-folder root.

    ``class_names`` with ``fixed`` (a classes file): exactly these classes in this order, each must have
    a folder; the images of other folders are counted and skipped. Without ``fixed``, the folders must
    be exactly ``class_names`` (the training classes). ``dirs`` collects every folder scanned.
    """
    folders = class_folders(root)
    if fixed:
        absent = [name for name in class_names if name not in folders]
        if absent:
            raise DataError(f"class(es) {', '.join(absent)} of the classes file have no folder in {root}; create "
                            f"{root}/<class>/ with images, or remove them from the classes file")
        names = list(class_names)
    else:
        names = folders
        if class_names is not None and names != class_names:
            raise DataError(
                f"the classes in {root} differ from the training classes:\n"
                f"  train: {', '.join(class_names)}\n  {root.name}: {', '.join(names)}\n"
                "every split needs the same class folders (add the missing ones, even with few images)"
            )
    paths: list[str] = []
    labels: list[int] = []
    for index, name in enumerate(names):
        images = list_images(root / name, dirs)
        if not images:
            extensions = ", ".join(sorted(IMAGE_EXTENSIONS))
            raise DataError(f"class folder {root / name} contains no images ({extensions}); add images or remove the folder")
        paths += images
        labels += [index] * len(images)
    skipped = {name: len(list_images(root / name, dirs)) for name in folders if name not in names}
    return names, SampleIndex.from_paths(paths, labels), skipped


def check_enough_classes(class_names: list[str], where: Path | str) -> None:
    if len(class_names) < 2:
        raise DataError(f"{where} has {len(class_names)} class ({', '.join(class_names)}); "
                        "classification needs at least 2 classes (one folder or label each)")


def stratified_split(samples: SampleIndex | list[Sample], fraction: float, seed: int) -> tuple[SampleIndex, SampleIndex]:
    """Split into (train, val), taking ``fraction`` of every class (at least one image) into val.

    Deterministic for a given seed and file list; classes with a single image stay in train.
    """
    if not 0.0 < fraction < 1.0:
        raise DataError(f"val_split must be a fraction between 0 and 1, got {fraction}")
    samples = SampleIndex.of(samples)
    by_class = np.argsort(samples.labels, kind="stable")  # sample positions grouped by class, in listing order
    classes, counts = np.unique(samples.labels, return_counts=True)
    rng = np.random.default_rng(seed)
    train: list[np.ndarray] = []
    val: list[np.ndarray] = []
    start = 0
    for count in counts.tolist():
        members = by_class[start:start + count]
        start += count
        order = rng.permutation(count)
        n_val = min(max(1, round(fraction * count)), count - 1)
        val.append(members[np.sort(order[:n_val])])
        train.append(members[np.sort(order[n_val:])])
    empty = np.zeros(0, np.int64)
    return (samples.take(np.concatenate(train) if train else empty),
            samples.take(np.concatenate(val) if val else empty))
