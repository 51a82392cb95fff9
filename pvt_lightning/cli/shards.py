"""``pvt-lightning shards``: convert a folder or manifest dataset into LitData shards that ``--data DIR`` reads.

The splits, the class list (a classes file applies) and the checks are those a training run would
use; ``DIR`` gets one sub-folder of chunks per split plus ``index.npz``, ``classes.txt`` and
``pvt_shards.json`` (pvt_lightning/data/shards.py). Needs the ``[shards]`` extra (litdata).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from jsonargparse.typing import OpenUnitInterval, PositiveInt

from pvt_lightning.cli.options import option
from pvt_lightning.data.discover import discover
from pvt_lightning.data.shards import is_shards, require_litdata, write_shards
from pvt_lightning.errors import DataError, OutputExistsError, UsageError


@dataclass
class ShardsConfig:
    """Options of ``pvt-lightning shards``."""

    data: Optional[str] = option(None, "dataset to convert: class folders (train/ and val/, or one root with "
                                 "--val-split) or a manifest train.csv / .parquet", "data")
    output: Optional[str] = option(None, "folder to write the shards into (must be empty unless --overwrite)",
                                   "data", metavar="DIR")
    classes: Optional[str] = option(None, "classes file: the class order, or a subset (other classes are counted "
                                    "and skipped)", "data", metavar="FILE")
    val_split: Optional[OpenUnitInterval] = option(None, "fraction of train held out for validation (stratified, "
                                                   "seeded) when the data has no validation split", "data")
    seed: int = option(0, "seed of the --val-split hold-out", "data")
    num_workers: PositiveInt = option(1, "processes writing shards", "data")
    chunk_bytes: str = option("64MB", "target size of each chunk file", "data")
    overwrite: bool = option(False, "replace the shards already in --output", "data")


CONFIG = ShardsConfig


def run(config: ShardsConfig) -> int:
    """Convert ``config.data`` into shards under ``config.output``; returns 0."""
    if not config.data or not config.output:
        raise UsageError("shards needs --data SOURCE and --output DIR")
    source, output = Path(config.data).expanduser(), Path(config.output).expanduser()
    require_litdata()
    if is_shards(source):
        raise DataError(f"{source} already holds shards; --data takes class folders or a manifest")
    if output.exists() and any(output.iterdir()) and not (config.overwrite and is_shards(output)):
        raise OutputExistsError(f"--output {output} is not empty; choose a new folder, or pass --overwrite to "
                                "replace shards written there before")
    started = time.perf_counter()
    index = discover(source, config.val_split, config.seed, config.classes)
    info = write_shards(index, output, num_workers=config.num_workers, chunk_bytes=config.chunk_bytes)
    sizes = ", ".join(f"{split} {count} images" for split, count in info["splits"].items())
    skipped = sum(info["skipped_classes"].values())
    print(f"Wrote shards of {source} to {output}: {len(index.class_names)} classes, {sizes}"
          + (f", {skipped} images of other classes skipped" if skipped else "")
          + f" ({time.perf_counter() - started:.0f} s). Train on them with --data {output}", flush=True)
    return 0
