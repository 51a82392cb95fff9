"""What an audit reads: a list of (path, label, split) records, from an ImageFolder root or given directly.

The audit itself only sees ``Record`` lists, so a manifest (a CSV of path, label, split) can feed it the
same way as a folder; ``records_from_folder`` is the folder reader: ``ROOT/{train,val,test}/<class>/...``
or one class-folder root ``ROOT/<class>/...`` (split ``all``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from pvt_lightning.data.folders import scan_split
from pvt_lightning.errors import DataError

SPLITS = ("train", "val", "test")
SINGLE_SPLIT = "all"
HELD_OUT = ("val", "test")
"""Splits whose figures leaked duplicates inflate: images the model is measured on."""


@dataclass(frozen=True)
class Record:
    """One image: its file, its given class index (-1: none) and its split (``train``, ``val``, ``test``, ``all``)."""

    path: str
    label: int
    split: str


def records_from_folder(root: str | Path) -> tuple[list[str], list[Record]]:
    """Class names and records of an ImageFolder root (with split folders or without)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"--data {root}: no such folder (expected train/ and val/ class folders, or class folders)")
    splits = [s for s in SPLITS if (root / s).is_dir()]
    if not splits:
        names, samples, _ = scan_split(root)
        return names, [Record(path, label, SINGLE_SPLIT) for path, label in samples]
    if "train" not in splits:
        raise DataError(f"{root} has {', '.join(s + '/' for s in splits)} but no train/ folder; add "
                        f"{root}/train/<class>/... or audit one class-folder root")
    names, train, _ = scan_split(root / "train")
    records = [Record(path, label, "train") for path, label in train]
    for split in splits[1:]:
        records += [Record(path, label, split) for path, label in scan_split(root / split, names)[1]]
    return names, records


def map_labels(records: Sequence[Record], data_names: Sequence[str], model_names: Sequence[str]) -> list[Record]:
    """Records with labels re-indexed from the data's class names to the model's; a class the model lacks is an error."""
    missing = [name for name in data_names if name not in model_names]
    if missing:
        raise DataError(f"class folder(s) {', '.join(missing[:10])} are not classes of the checkpoint "
                        f"({', '.join(list(model_names)[:10])}{'...' if len(model_names) > 10 else ''}); audit data "
                        "with the classes the model was trained on")
    index = [list(model_names).index(name) for name in data_names]
    return [Record(r.path, index[r.label] if r.label >= 0 else -1, r.split) for r in records]


def split_counts(records: Sequence[Record], class_names: Sequence[str]) -> dict[str, dict[str, int]]:
    """{class name: {split: images}} (classes of ``class_names`` order, splits in their order of appearance)."""
    counts = Counter((r.label, r.split) for r in records)
    splits = list(dict.fromkeys(r.split for r in records))
    return {name: {split: counts[(i, split)] for split in splits} for i, name in enumerate(class_names)}
