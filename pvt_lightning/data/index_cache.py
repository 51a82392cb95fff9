"""The index cache: a dataset's listing saved once as ``.npz`` and reused while the dataset is unchanged.

Listing a million files takes minutes on a network file system, and every DDP rank (and every run)
would do it again. The first process to take the cache file's lock lists the folders (or reads the
manifests) and writes ``<cache>/<name>-<key>.npz``; the others wait for the lock and load it. The
key is the absolute dataset path plus the options that change the listing (val_split, seed, classes);
inside the file, the size and mtime of every folder scanned (or manifest read, and the classes file)
tell whether the dataset changed: adding, removing or renaming an image changes its folder's mtime,
so a changed dataset is listed anew. Not noticed: a file rewritten in place under the same name (its
folder's mtime stays) - its content is read at training time anyway.

The cache folder: ``index_cache`` (data module argument), else ``$PVT_LIGHTNING_INDEX_CACHE``, else
``$XDG_CACHE_HOME/pvt_lightning/index`` (``~/.cache/...``). Put it on a shared file system for
multi-node jobs, or each node lists the data once. ``index_cache=False`` turns it off.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from pvt_lightning.data.discover import DatasetIndex
from pvt_lightning.data.index import SampleIndex
from pvt_lightning.errors import printable

log = logging.getLogger("pvt_lightning.data")

FORMAT = 1
CACHE_ENV = "PVT_LIGHTNING_INDEX_CACHE"


def default_cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pvt_lightning" / "index"


def resolve_cache_dir(index_cache: str | Path | bool | None) -> Path | None:
    """The data module's ``index_cache``: None/True -> the default folder, False -> no cache, else that folder."""
    if index_cache is False:
        return None
    if index_cache is None or index_cache is True:
        return default_cache_dir()
    return Path(index_cache).expanduser()


def cache_file(cache_dir: Path, source: Path, options: dict) -> Path:
    key = json.dumps({"source": os.fspath(source.resolve()), "format": FORMAT, **options}, sort_keys=True)
    digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", source.name)[:40] or "data"
    return cache_dir / f"{name}-{digest}.npz"


def stamps(paths: list[str]) -> np.ndarray:
    """(size, mtime_ns) of each path, (-1, -1) where it is gone: int64 (N, 2)."""
    out = np.full((len(paths), 2), -1, dtype=np.int64)
    for i, path in enumerate(paths):
        try:
            status = os.stat(path)
        except OSError:
            continue
        out[i] = status.st_size, status.st_mtime_ns
    return out


def load_or_build(source: Path, options: dict, build: Callable[[], DatasetIndex],
                  cache_dir: Path | None) -> tuple[DatasetIndex, Path | None, bool]:
    """(index, cache file or None, reused?): the cached index if still valid, else ``build()`` (then saved)."""
    if cache_dir is None:
        return build(), None, False
    from filelock import FileLock

    file = cache_file(cache_dir, source, options)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        lock = FileLock(os.fspath(file) + ".lock")
        lock.acquire()
    except OSError as err:
        log.warning("index cache %s unusable (%s); listing the data without it", printable(cache_dir), err)
        return build(), None, False
    try:
        index = load_index(file)
        if index is not None:
            return index, file, True
        index = build()
        save_index(file, index)
        return index, file, False
    finally:
        lock.release()


def save_index(file: Path, index: DatasetIndex) -> None:
    """Written atomically (a temporary file renamed); a cache that cannot be written is only a warning."""
    meta = {"format": FORMAT, "class_names": index.class_names, "skipped": index.skipped,
            "splits": list(index.splits), "watched": index.watched}
    arrays = {"meta": np.frombuffer(json.dumps(meta).encode("utf-8", "surrogateescape"), dtype=np.uint8),
              "stamps": stamps(index.watched)}
    for split, samples in index.splits.items():
        arrays.update(samples.arrays(split))
    try:
        handle, temporary = tempfile.mkstemp(dir=file.parent, prefix=file.name, suffix=".tmp")
        with os.fdopen(handle, "wb") as out:
            np.savez(out, **arrays)
        os.replace(temporary, file)
    except OSError as err:
        log.warning("cannot write the index cache %s (%s); the next run lists the data again", printable(file), err)


def load_index(file: Path) -> DatasetIndex | None:
    """The index in ``file``, or None if there is none, it is unreadable, or the dataset changed since."""
    if not file.is_file():
        return None
    try:
        with np.load(file, allow_pickle=False) as arrays:
            meta = json.loads(arrays["meta"].tobytes().decode("utf-8", "surrogateescape"))
            if meta.get("format") != FORMAT:
                return None
            if not np.array_equal(arrays["stamps"], stamps(meta["watched"])):
                log.info("data changed since %s was written; listing it again", printable(file))
                return None
            splits = {split: SampleIndex.from_arrays(arrays, split) for split in meta["splits"]}
    except (OSError, ValueError, KeyError) as err:
        log.warning("ignoring the unreadable index cache %s (%s)", printable(file), err)
        return None
    return DatasetIndex(meta["class_names"], splits, meta["skipped"], meta["watched"])
