"""``verify_images``: decode every listed image once before training and leave the unreadable ones out."""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import numpy as np

from pvt_lightning.data.dataset import BadImageLog
from pvt_lightning.data.decode import read_image
from pvt_lightning.data.index import SampleIndex
from pvt_lightning.errors import BadImageError, DataError, printable

log = logging.getLogger("pvt_lightning.data")


def drop_unreadable(splits: dict[str, SampleIndex], names: list[str], bad_images: str, max_pixels: int | None,
                    bad_log: BadImageLog) -> dict[str, SampleIndex]:
    """Decode every file once, in parallel (OpenCV releases the GIL), and keep only the readable ones."""
    paths = [path for samples in splits.values() for path in samples.paths()]
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1)) as pool:
        problems = [p for p in pool.map(partial(_decode_problem, max_pixels=max_pixels), paths) if p]
    bad = {error.path: error.reason for error in problems}
    if bad and bad_images == "error":
        listing = "\n".join(f"  {printable(path)}: {reason}" for path, reason in sorted(bad.items())[:20])
        raise DataError(f"{len(bad)} unreadable image(s) found by verify_images (showing up to 20):\n{listing}\n"
                        "delete or replace them, or use bad_images='skip' to train without them")
    for error in sorted(problems, key=lambda e: e.path):
        log.warning("excluding unreadable image %s: %s", printable(error.path), error.reason)
        bad_log.add(error, warn=False)
    kept = {}
    for split, samples in splits.items():
        kept[split] = samples.where(np.array([path not in bad for path in samples.paths()], dtype=bool))
        empty = sorted(set(range(len(names))) - set(kept[split].labels.tolist()))
        if empty:
            folders = {label: os.path.dirname(path) for path, label in samples}
            raise DataError(f"after excluding unreadable images, class folder(s) "
                            f"{', '.join(printable(folders[i]) for i in empty)} have no images left "
                            f"({split} split); {bad_log.where()}")
    return kept


def _decode_problem(path: str, max_pixels: int | None) -> BadImageError | None:
    try:
        read_image(path, max_pixels=max_pixels)
    except BadImageError as error:
        return error
    return None
