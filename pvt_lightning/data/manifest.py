"""Manifests: CSV / Parquet tables of ``path,label[,split]`` -> class names and per-split samples.

Layout (docs/large_datasets.md):

- ``--data train.csv``: the training rows; ``val.csv`` / ``test.csv`` next to it (the file name with its
  last ``train`` replaced: ``imagenet_train.parquet`` -> ``imagenet_val.parquet``) are the other splits.
  Without a validation file, ``val_split`` holds out a stratified fraction of train, as for folders.
- or one manifest with a ``split`` column (``train``, ``val``/``validation``, ``test``): sibling files
  are then not read.
- ``path``: absolute, or relative to the manifest's folder. ``label``: the class name.
- multi-label (docs/multilabel.md): a ``labels`` column of class names separated by ``|`` (empty: an image
  without a label, allowed and counted), or one 0/1 column per class (no ``label`` column then; the
  classes are those columns, in their order). ``manifest_task`` tells which a manifest is.

Classes are the sorted labels of the training rows, or a classes file (``classes.txt``, one name per
line: that order, and only those classes; rows of other labels are counted and skipped). Rows keep
their order within a class, grouped by class in class order (as a folder listing is). Checks, each a
``DataError`` naming the file and the fix: missing columns or values, files that do not exist,
labels of val/test that training does not have, classes without rows.
"""

from __future__ import annotations

import csv
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pvt_lightning.data.index import SampleIndex
from pvt_lightning.errors import DataError, printable

log = logging.getLogger("pvt_lightning.data")

MANIFEST_SUFFIXES = (".csv", ".parquet", ".pq")
RESERVED_COLUMNS = ("path", "label", "labels", "split")
"""Column names read case-insensitively; any other column keeps its spelling (a 0/1 column names its class)."""
LABEL_SEPARATOR = "|"
"""Between the class names of one ``labels`` cell."""
_BINARY = {"0", "1", "0.0", "1.0", "true", "false"}
SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
_SHOWN = 5


def is_manifest(path: Path) -> bool:
    return path.suffix.lower() in MANIFEST_SUFFIXES and not path.is_dir()


@dataclass
class Table:
    """The rows of one manifest file, paths resolved; ``lines[i]``: where row i is in the file (for messages)."""

    file: Path
    paths: list[str]
    labels: list  # single-label: the class name per row; multi-label: the list of class names per row
    splits: list[str] | None
    first_line: int  # CSV: 2 (after the header); Parquet: row 1
    class_columns: list[str] | None = None  # multi-label from 0/1 columns: those columns, in file order


def _columns(file: Path) -> dict[str, list]:
    if not file.is_file():
        raise DataError(f"manifest {file} does not exist; check the path")
    return _read_parquet(file) if file.suffix.lower() in (".parquet", ".pq") else _read_csv(file)


def binary_columns(columns: dict[str, list]) -> list[str]:
    """The columns other than path/label/labels/split whose every value is 0 or 1: one class each."""
    return [name for name, values in columns.items() if name not in RESERVED_COLUMNS and values
            and all(str(value).strip().lower() in _BINARY for value in values if value is not None)]


def manifest_task(file: Path) -> str:
    """``multilabel`` when ``file`` has a ``labels`` column, or 0/1 class columns and no ``label`` column; else
    ``multiclass``."""
    columns = _columns(file)
    multi = "labels" in columns or ("label" not in columns and bool(binary_columns(columns)))
    return "multilabel" if multi else "multiclass"


def read_table(file: Path, multilabel: bool = False) -> Table:
    """``file`` (CSV or Parquet) -> its rows; relative paths are taken from the file's folder. ``multilabel``:
    each row's labels from the ``labels`` column (``|``-separated), the 0/1 class columns, or a ``label``."""
    columns = _columns(file)
    first_line = 1 if file.suffix.lower() in (".parquet", ".pq") else 2
    if multilabel:
        return _multilabel_table(file, columns, first_line)
    for name in ("path", "label"):
        if name not in columns:
            raise DataError(f"manifest {file} has no '{name}' column (columns: {', '.join(columns) or 'none'}); "
                            "it needs a header row path,label[,split]")
    _check_blanks(file, columns, ("path", "label", "split"), first_line)
    base = os.fspath(file.resolve().parent)
    paths = [os.path.normpath(os.path.join(base, os.path.expanduser(str(p).strip()))) for p in columns["path"]]
    splits = [str(s).strip().lower() for s in columns["split"]] if "split" in columns else None
    return Table(file, paths, [str(label).strip() for label in columns["label"]], splits, first_line)


def _multilabel_table(file: Path, columns: dict[str, list], first_line: int) -> Table:
    if "path" not in columns:
        raise DataError(f"manifest {file} has no 'path' column (columns: {', '.join(columns) or 'none'}); a "
                        "multi-label manifest needs path plus a labels column (names separated by '|') or one 0/1 "
                        "column per class")
    class_columns = None
    if "labels" in columns or "label" in columns:
        cells = columns["labels" if "labels" in columns else "label"]
        labels = [[name.strip() for name in str(cell or "").split(LABEL_SEPARATOR) if name.strip()] for cell in cells]
    else:
        class_columns = binary_columns(columns)
        if not class_columns:
            raise DataError(f"manifest {file} has neither a labels column nor 0/1 class columns (columns: "
                            f"{', '.join(columns)}); add labels (class names separated by '|') or one 0/1 column "
                            "per class")
        flags = [[str(v).strip().lower() in ("1", "1.0", "true") for v in columns[name]] for name in class_columns]
        labels = [[name for name, row in zip(class_columns, flags) if row[i]] for i in range(len(columns["path"]))]
    _check_blanks(file, columns, ("path", "split"), first_line)
    base = os.fspath(file.resolve().parent)
    paths = [os.path.normpath(os.path.join(base, os.path.expanduser(str(p).strip()))) for p in columns["path"]]
    splits = [str(s).strip().lower() for s in columns["split"]] if "split" in columns else None
    return Table(file, paths, labels, splits, first_line, class_columns)


def _check_blanks(file: Path, columns: dict[str, list], names: tuple[str, ...], first_line: int) -> None:
    for name in [n for n in names if n in columns]:
        blank = [i for i, value in enumerate(columns[name]) if value is None or not str(value).strip()]
        if blank:
            raise DataError(f"manifest {file}: {len(blank)} row(s) have no {name}, e.g. line {blank[0] + first_line}; "
                            f"fill in the {name} or remove the rows")


def _column_name(name: str) -> str:
    name = name.strip()
    return name.lower() if name.lower() in RESERVED_COLUMNS else name


def _read_csv(file: Path) -> dict[str, list]:
    try:
        with open(file, newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = [_column_name(name) for name in next(reader, [])]
            rows = list(reader)
    except UnicodeDecodeError as err:
        raise DataError(f"manifest {file} is not UTF-8 text ({err.reason}); save it as UTF-8 CSV") from None
    short = [i for i, row in enumerate(rows) if len(row) < len(header) and any(cell.strip() for cell in row)]
    if short:
        raise DataError(f"manifest {file}: line {short[0] + 2} has {len(rows[short[0]])} value(s) for "
                        f"{len(header)} columns ({', '.join(header)}); fix or remove the line")
    rows = [row for row in rows if any(cell.strip() for cell in row)]  # blank lines
    return {name: [row[k] for row in rows] for k, name in enumerate(header) if name}


def _read_parquet(file: Path) -> dict[str, list]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"reading {file} needs pyarrow: pip install 'pvt-lightning[data]' (or use a CSV "
                        "manifest)") from None
    try:
        table = pq.read_table(file)
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read the Parquet manifest {file}: {err}") from None
    return {_column_name(name): table.column(name).to_pylist() for name in table.column_names}


def sibling(file: Path, split: str) -> Path | None:
    """``train.csv`` -> ``val.csv`` (the last ``train`` of the name replaced), if that file exists."""
    stem, suffix = file.name[:-len(file.suffix)], file.suffix
    at = stem.lower().rfind("train")
    if at < 0:
        return None
    candidate = file.with_name(stem[:at] + split + stem[at + 5:] + suffix)
    return candidate if candidate.is_file() else None


def split_tables(file: Path, multilabel: bool = False) -> dict[str, Table]:
    """{split: its rows}: from the ``split`` column, or from ``file`` and its val/test siblings."""
    table = read_table(file, multilabel)
    if table.splits is None:
        tables = {"train": table}
        for split in ("val", "test"):
            if (other := sibling(file, split)) is not None:
                tables[split] = read_table(other, multilabel)
        return tables
    unknown = sorted(set(table.splits) - set(SPLIT_NAMES))
    if unknown:
        line = table.splits.index(unknown[0]) + table.first_line
        raise DataError(f"manifest {file}: split value(s) {', '.join(map(repr, unknown))} (e.g. line {line}); "
                        "use train, val or test")
    names = np.array([SPLIT_NAMES[s] for s in table.splits])
    tables = {}
    for split in ("train", "val", "test"):
        rows = np.flatnonzero(names == split).tolist()
        if rows:
            tables[split] = Table(file, [table.paths[i] for i in rows], [table.labels[i] for i in rows], None,
                                  table.first_line, table.class_columns)
    if "train" not in tables:
        raise DataError(f"manifest {file} has no rows with split 'train'; training needs some")
    return tables


def index_table(table: Table, names: list[str], fixed: bool, split: str, train_file: Path) -> tuple[SampleIndex, dict[str, int]]:
    """Rows -> samples grouped by class (in ``names`` order); skipped labels ({label: rows}) when ``fixed``."""
    position = {name: k for k, name in enumerate(names)}
    labels = np.array([position.get(label, -1) for label in table.labels], dtype=np.int64)
    outside = labels < 0
    skipped = dict(sorted(Counter(np.asarray(table.labels, dtype=object)[outside].tolist()).items()))
    if skipped and not fixed:
        listing = ", ".join(f"{label!r} ({rows} rows)" for label, rows in list(skipped.items())[:_SHOWN])
        raise DataError(f"manifest {table.file} ({split}) has label(s) that the training rows of {train_file.name} do "
                        f"not: {listing}; fix the labels, add training rows for them, or pass a classes file "
                        "(--classes) to train on a subset (rows of other classes are then counted and skipped)")
    counts = np.bincount(labels[~outside], minlength=len(names))
    empty = [name for name, count in zip(names, counts.tolist()) if count == 0]
    if empty:
        raise DataError(f"manifest {table.file} ({split}) has no rows of class(es) {', '.join(map(repr, empty))}; "
                        "every split needs every class: add rows, or leave the class out of the classes file")
    order = np.argsort(labels, kind="stable")[int(outside.sum()):]  # skipped rows (-1) sort first
    _check_files_exist(table, order)
    return SampleIndex.from_paths([table.paths[i] for i in order.tolist()], labels[order]), skipped


def _check_files_exist(table: Table, rows: np.ndarray) -> None:
    missing = [i for i in rows.tolist() if not os.path.exists(table.paths[i])]
    if missing:
        first = missing[0]
        raise DataError(f"{len(missing)} file(s) listed in manifest {table.file} do not exist, e.g. "
                        f"{printable(table.paths[first])} (line {first + table.first_line}); fix the paths (relative "
                        f"paths are read from {table.file.resolve().parent}) or remove the rows")


def index_multilabel(table: Table, names: list[str], fixed: bool, split: str,
                     train_file: Path) -> tuple[SampleIndex, dict[str, int]]:
    """Rows -> samples in file order with multi-hot targets (``names`` order); labels outside ``names`` are
    dropped from their rows and counted ({label: rows}) when ``fixed``, a DataError otherwise."""
    position = {name: k for k, name in enumerate(names)}
    targets = np.zeros((len(table.paths), len(names)), dtype=np.uint8)
    skipped: Counter = Counter()
    for row, labels in enumerate(table.labels):
        for label in labels:
            if label in position:
                targets[row, position[label]] = 1
            else:
                skipped[label] += 1
    if skipped and not fixed:
        listing = ", ".join(f"{label!r} ({rows} rows)" for label, rows in sorted(skipped.items())[:_SHOWN])
        raise DataError(f"manifest {table.file} ({split}) has label(s) that the training rows of {train_file.name} do "
                        f"not: {listing}; fix the labels, add training rows for them, or pass a classes file "
                        "(--classes) to train on a subset (other labels are then counted and dropped)")
    absent = [name for name, count in zip(names, targets.sum(axis=0).tolist()) if count == 0]
    if absent and split == "train":
        raise DataError(f"manifest {table.file} (train) has no image labelled {', '.join(map(repr, absent[:_SHOWN]))}; "
                        "a class needs training images: add rows, or leave the class out of the classes file")
    if absent:
        log.warning("the %s rows of %s label no image %s: their average precision is undefined", split, table.file,
                    ", ".join(map(repr, absent[:_SHOWN])))
    _check_files_exist(table, np.arange(len(table.paths)))
    return SampleIndex.multilabel(table.paths, targets), dict(sorted(skipped.items()))


def read_manifests(file: Path, classes: list[str] | None, task: str = "multiclass",
                   ) -> tuple[list[str], dict[str, SampleIndex], dict[str, int], list[Path]]:
    """Class names, {split: samples}, skipped rows per label (summed over splits) and the files read; ``task``
    "multilabel": samples carry multi-hot ``targets`` (SampleIndex)."""
    multilabel = task == "multilabel"
    tables = split_tables(file, multilabel)
    fixed = classes is not None
    train = tables["train"]
    if fixed:
        names = list(classes)
    elif multilabel:
        names = train.class_columns or sorted({label for labels in train.labels for label in labels})
    else:
        names = sorted(set(train.labels))
    splits: dict[str, SampleIndex] = {}
    skipped: Counter = Counter()
    for split, table in tables.items():
        splits[split], dropped = (index_multilabel if multilabel else index_table)(table, names, fixed, split, file)
        skipped.update(dropped)
    if skipped:
        log.warning("skipped %d manifest row(s) of classes not in the classes file: %s", sum(skipped.values()),
                    ", ".join(f"{label} ({rows})" for label, rows in sorted(skipped.items())))
    return names, splits, dict(skipped), sorted({table.file for table in tables.values()})
