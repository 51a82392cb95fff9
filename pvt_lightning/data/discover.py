"""A dataset's classes and splits, from class folders or manifests, with the classes file applied.

``discover(source, ...)`` is the one place that decides the layout: a manifest file (manifest.py),
``train/`` + ``val/`` (+ ``test/``) class folders, or one class-folder root split by ``val_split``.
Every problem is a ``DataError`` naming the folder or file and the fix.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from pvt_lightning.data.folders import check_enough_classes, scan_split, stratified_split
from pvt_lightning.data.index import SampleIndex
from pvt_lightning.data.manifest import is_manifest, manifest_task, read_manifests
from pvt_lightning.errors import DataError

log = logging.getLogger("pvt_lightning.data")

SPLITS = ("train", "val", "test")


@dataclass
class DatasetIndex:
    """What a data source holds: class names (index i = class i), samples per split, the images or rows
    left out because their class is not in the classes file ({class: count}), and the files and folders
    whose size and mtime tell whether the dataset changed since (index_cache.py)."""

    class_names: list[str]
    splits: dict[str, SampleIndex]
    skipped: dict[str, int] = field(default_factory=dict)
    watched: list[str] = field(default_factory=list)


def read_classes_file(path: str | Path) -> list[str]:
    """One class name per line (blank lines and ``#`` comments ignored): the classes, in this order."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"classes file {path} does not exist; give a text file with one class name per line")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as err:
        raise DataError(f"classes file {path} is not UTF-8 text ({err.reason})") from None
    names = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise DataError(f"classes file {path} names {', '.join(map(repr, repeated))} more than once; "
                        "list each class once")
    check_enough_classes(names, f"classes file {path}")
    return names


def resolve_classes(classes: str | Path | Sequence[str] | None) -> tuple[list[str] | None, list[str]]:
    """``classes`` (a file or a list of names) -> (names or None, files to watch)."""
    if classes is None:
        return None, []
    if isinstance(classes, (str, Path)):
        return read_classes_file(classes), [os.fspath(Path(classes).expanduser())]
    names = [str(name) for name in classes]
    if len(set(names)) != len(names):
        raise DataError(f"classes {names}: a class is named twice")
    check_enough_classes(names, "the classes list")
    return names, []


TASKS = ("auto", "multiclass", "multilabel")
"""``--task``: auto is multilabel for a manifest with a labels column or 0/1 class columns (manifest.py)."""
FOLDER_MULTILABEL = ("folders cannot express several labels per image (one folder = one class); use a manifest "
                     "with a labels column (class names separated by '|') or one 0/1 column per class "
                     "(docs/multilabel.md)")


def resolve_task(source: Path, task: str) -> str:
    """``multiclass`` or ``multilabel`` for the data at ``source``; DataError for multilabel folders."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if source.exists() and is_manifest(source):
        return manifest_task(source) if task == "auto" else task
    if task == "multilabel":
        raise DataError(f"--task multilabel with {source}: {FOLDER_MULTILABEL}")
    return "multiclass"


def discover(source: Path, val_split: float | None, seed: int,
             classes: str | Path | Sequence[str] | None = None, task: str = "multiclass") -> DatasetIndex:
    """Class names and samples of every split found under / in ``source`` (``task``: resolved, not auto)."""
    names, watched = resolve_classes(classes)
    if not source.exists():
        raise DataError(f"data folder {source} does not exist; check the path "
                        "(expected train/ and val/ class folders, or class folders plus val_split)")
    if is_manifest(source):
        class_names, splits, skipped, files = read_manifests(source, names, task)
        check_enough_classes(class_names, source)
        watched += [os.fspath(f) for f in files] + [os.fspath(source.resolve().parent)]
        hint = (f"manifest {source} has no validation rows: add a val manifest next to it (same columns, the "
                "file name with 'train' replaced by 'val'), or a split column with val rows, or pass val_split "
                "(e.g. 0.1, --val-split 0.1) to hold out part of the training rows")
        return DatasetIndex(class_names, _hold_out(splits, val_split, seed, source, hint), skipped, watched)
    dirs: list[str] = [os.fspath(source)]
    if (source / "train").is_dir():
        class_names, splits, skipped = _split_layout(source, names, dirs)
        hint = (f"{source}/train has no sibling val/ folder; add {source}/val/<class>/... "
                "or pass val_split (e.g. 0.1) to hold out part of train/")
    elif (source / "val").is_dir():
        raise DataError(f"{source} has a val/ folder but no train/ folder; add {source}/train/<class>/...")
    else:
        class_names, train, skipped = scan_split(source, names, fixed=names is not None, dirs=dirs)
        check_enough_classes(class_names, source)
        splits = {"train": train}
        hint = (f"{source} has class folders but no train/ and val/ folders; pass val_split "
                "(e.g. 0.1, --val-split 0.1) to hold out a stratified validation set")
    if skipped:
        log.warning("skipped %d image(s) of class folders not in the classes file: %s", sum(skipped.values()),
                    ", ".join(f"{name} ({count})" for name, count in sorted(skipped.items())))
    return DatasetIndex(class_names, _hold_out(splits, val_split, seed, source, hint), skipped, watched + dirs)


def _split_layout(root: Path, names: list[str] | None, dirs: list[str]):
    """``train/`` (+ ``val/``, ``test/``): each split scanned with the training classes."""
    fixed = names is not None
    class_names, train, skipped = scan_split(root / "train", names, fixed=fixed, dirs=dirs)
    check_enough_classes(class_names, root / "train")
    splits = {"train": train}
    for split in ("val", "test"):
        if (root / split).is_dir():
            dirs.append(os.fspath(root / split))
            _, splits[split], other = scan_split(root / split, class_names, fixed=fixed, dirs=dirs)
            for name, count in other.items():
                skipped[name] = skipped.get(name, 0) + count
    return class_names, splits, skipped


def _hold_out(splits: dict[str, SampleIndex], val_split: float | None, seed: int, source: Path,
              hint: str) -> dict[str, SampleIndex]:
    """The splits in train, val, test order; without a val split, a stratified ``val_split`` of train."""
    if "val" in splits:
        if val_split is not None:
            log.warning("ignoring val_split=%s: %s has its own validation split", val_split, source)
    elif val_split is not None:
        splits["train"], splits["val"] = stratified_split(splits["train"], val_split, seed)
    else:
        raise DataError(hint)
    return {split: splits[split] for split in SPLITS if split in splits}
