"""Manifests: CSV / Parquet tables of ``path,label[,split]`` -> class names and per-split samples.

Layout (docs/large_datasets.md):

- ``--data train.csv``: the training rows; ``val.csv`` / ``test.csv`` next to it (the file name with its
  last ``train`` replaced: ``imagenet_train.parquet`` -> ``imagenet_val.parquet``) are the other splits.
  Without a validation file, ``val_split`` holds out a stratified fraction of train, as for folders.
- or one manifest with a ``split`` column (``train``, ``val``/``validation``, ``test``): sibling files
  are then not read.
- ``path``: absolute, or relative to the manifest's folder. ``label``: the class name.

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
SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
_SHOWN = 5


def is_manifest(path: Path) -> bool:
    return path.suffix.lower() in MANIFEST_SUFFIXES and not path.is_dir()


@dataclass
class Table:
    """The rows of one manifest file, paths resolved; ``lines[i]``: where row i is in the file (for messages)."""

    file: Path
    paths: list[str]
    labels: list[str]
    splits: list[str] | None
    first_line: int  # CSV: 2 (after the header); Parquet: row 1


def read_table(file: Path) -> Table:
    """``file`` (CSV or Parquet) -> its rows; relative paths are taken from the file's folder."""
    if not file.is_file():
        raise DataError(f"manifest {file} does not exist; check the path")
    columns = _read_parquet(file) if file.suffix.lower() in (".parquet", ".pq") else _read_csv(file)
    first_line = 1 if file.suffix.lower() in (".parquet", ".pq") else 2
    for name in ("path", "label"):
        if name not in columns:
            raise DataError(f"manifest {file} has no '{name}' column (columns: {', '.join(columns) or 'none'}); "
                            "it needs a header row path,label[,split]")
    for name in [n for n in ("path", "label", "split") if n in columns]:
        blank = [i for i, value in enumerate(columns[name]) if value is None or not str(value).strip()]
        if blank:
            raise DataError(f"manifest {file}: {len(blank)} row(s) have no {name}, e.g. line {blank[0] + first_line}; "
                            f"fill in the {name} or remove the rows")
    base = os.fspath(file.resolve().parent)
    paths = [os.path.normpath(os.path.join(base, os.path.expanduser(str(p).strip()))) for p in columns["path"]]
    splits = [str(s).strip().lower() for s in columns["split"]] if "split" in columns else None
    return Table(file, paths, [str(label).strip() for label in columns["label"]], splits, first_line)


def _read_csv(file: Path) -> dict[str, list]:
    try:
        with open(file, newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = [name.strip().lower() for name in next(reader, [])]
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
    return {name.strip().lower(): table.column(name).to_pylist() for name in table.column_names}


def sibling(file: Path, split: str) -> Path | None:
    """``train.csv`` -> ``val.csv`` (the last ``train`` of the name replaced), if that file exists."""
    stem, suffix = file.name[:-len(file.suffix)], file.suffix
    at = stem.lower().rfind("train")
    if at < 0:
        return None
    candidate = file.with_name(stem[:at] + split + stem[at + 5:] + suffix)
    return candidate if candidate.is_file() else None


def split_tables(file: Path) -> dict[str, Table]:
    """{split: its rows}: from the ``split`` column, or from ``file`` and its val/test siblings."""
    table = read_table(file)
    if table.splits is None:
        tables = {"train": table}
        for split in ("val", "test"):
            if (other := sibling(file, split)) is not None:
                tables[split] = read_table(other)
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
                                  table.first_line)
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


def read_manifests(file: Path, classes: list[str] | None) -> tuple[list[str], dict[str, SampleIndex], dict[str, int], list[Path]]:
    """Class names, {split: samples}, skipped rows per label (summed over splits) and the files read."""
    tables = split_tables(file)
    fixed = classes is not None
    names = list(classes) if fixed else sorted(set(tables["train"].labels))
    splits: dict[str, SampleIndex] = {}
    skipped: Counter = Counter()
    for split, table in tables.items():
        splits[split], dropped = index_table(table, names, fixed, split, file)
        skipped.update(dropped)
    if skipped:
        log.warning("skipped %d manifest row(s) of classes not in the classes file: %s", sum(skipped.values()),
                    ", ".join(f"{label} ({rows})" for label, rows in sorted(skipped.items())))
    return names, splits, dict(skipped), sorted({table.file for table in tables.values()})
