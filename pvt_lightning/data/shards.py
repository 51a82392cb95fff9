"""Shards: a dataset converted into LitData's optimized chunks, and read back as the same samples.

``write_shards`` lists a folder or manifest dataset (discover.py: the same splits, classes file and
checks), then writes ``DIR/<split>/`` with ``litdata.optimize`` (or, with one worker, LitData's
``BinaryWriter`` in this process, which optimize's workers use): each item is the file's encoded bytes
(not decoded pixels: a tenth of the size, and a bad file stays a bad file), its class index and its
original path. Next to them: ``DIR/index.npz`` (the samples per split, in shard order, as arrays),
``DIR/classes.txt`` and ``DIR/pvt_shards.json``. ``--data DIR`` then trains, evaluates and predicts
with the same augmentation, class list and bad-image handling: ``ShardImageDataset`` reads an item's
bytes by index and decodes them with decode.py, inside the data module's own loaders, so sampling
(shuffle or class-balanced) and exact mid-epoch resume work as for folders (resume.py). LitData's own
loader state is not used: Lightning does not restore it on ``trainer.fit(ckpt_path=...)``
(Lightning-AI/litData#775).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np

from pvt_lightning.data.dataset import ImageDataset
from pvt_lightning.data.decode import decode_image, read_file
from pvt_lightning.data.discover import DatasetIndex
from pvt_lightning.data.index import SampleIndex
from pvt_lightning.errors import BadImageError, DataError

log = logging.getLogger("pvt_lightning.data")

SHARDS_FILE = "pvt_shards.json"
FORMAT = 1


def is_shards(path: Path) -> bool:
    return path.is_dir() and (path / SHARDS_FILE).is_file()


def require_litdata():
    try:
        import litdata
    except ImportError:
        raise DataError("shards need LitData: pip install 'pvt-lightning[shards]'") from None
    return litdata


def encode_item(sample: tuple[str, int]) -> dict:
    """One shard item: the file's bytes, class index and path; an unreadable file keeps its reason."""
    path, label = sample
    try:
        data, error = read_file(path, max_pixels=None), ""
    except BadImageError as bad:
        data, error = b"", bad.reason
    # The path as bytes: LitData takes a string ending in .jpg for a media file to load and decode itself.
    return {"image": np.frombuffer(data, dtype=np.uint8), "label": int(label), "path": os.fsencode(path),
            "error": error}


def write_shards(index: DatasetIndex, output: Path, num_workers: int = 1, chunk_bytes: str = "64MB") -> dict:
    """Write every split of ``index`` under ``output``; returns the description saved as pvt_shards.json."""
    litdata = require_litdata()
    output.mkdir(parents=True, exist_ok=True)
    for split, samples in index.splits.items():
        target = (output / split).resolve()
        if target.exists():
            shutil.rmtree(target)
        if num_workers > 1:  # worker processes, the items kept in input order
            litdata.optimize(fn=encode_item, inputs=list(samples), output_dir=os.fspath(target),
                             chunk_bytes=chunk_bytes, num_workers=num_workers, keep_data_ordered=True, verbose=False)
        else:  # the same chunks, written in this process (no worker start-up: seconds saved on small sets)
            from litdata.streaming.writer import BinaryWriter

            writer = BinaryWriter(os.fspath(target), chunk_bytes=chunk_bytes)
            for position, sample in enumerate(samples):
                writer.add_item(position, encode_item(sample))
            writer.done()
            writer.merge()
        written = _items_written(target)
        if written != len(samples):  # LitData's worker processes can fail without raising here
            raise DataError(f"LitData wrote {written} of the {len(samples)} {split} images into {target} (see the "
                            "messages above); run pvt-lightning shards again, e.g. with --num-workers 1")
    arrays = {key: value for split, samples in index.splits.items() for key, value in samples.arrays(split).items()}
    np.savez(output / "index.npz", **arrays)
    (output / "classes.txt").write_text("".join(f"{name}\n" for name in index.class_names), encoding="utf-8")
    info = {"format": FORMAT, "class_names": index.class_names, "splits": {k: len(v) for k, v in index.splits.items()},
            "skipped_classes": index.skipped, "chunk_bytes": chunk_bytes}
    (output / SHARDS_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return info


def _items_written(folder: Path) -> int:
    try:
        chunks = json.loads((folder / "index.json").read_text(encoding="utf-8"))["chunks"]
    except (OSError, ValueError, KeyError):
        return 0
    return sum(int(chunk.get("chunk_size", 0)) for chunk in chunks)


def read_shards_index(root: Path) -> DatasetIndex:
    """The class names and samples (original paths, labels) of a shards folder."""
    try:
        info = json.loads((root / SHARDS_FILE).read_text(encoding="utf-8"))
        with np.load(root / "index.npz", allow_pickle=False) as arrays:
            splits = {split: SampleIndex.from_arrays(arrays, split) for split in info["splits"]}
    except (OSError, ValueError, KeyError) as err:
        raise DataError(f"{root} is not a complete shards folder ({err}); write it again with "
                        f"pvt-lightning shards --data SOURCE --output {root} --overwrite") from None
    if info.get("format") != FORMAT:
        raise DataError(f"{root} was written by another version of pvt-lightning shards (format "
                        f"{info.get('format')}); write it again with this version")
    for split, size in info["splits"].items():
        if not (root / split / "index.json").is_file() or len(splits[split]) != size:
            raise DataError(f"shards folder {root} lacks {split}/ (or it is incomplete); write it again with "
                            "--overwrite")
    return DatasetIndex(list(info["class_names"]), splits, dict(info.get("skipped_classes", {})))


def open_shards(root: Path, classes, val_split: float | None) -> DatasetIndex:
    """A shards folder as the data module's index; its splits and classes were fixed when it was written."""
    index = read_shards_index(root)
    if classes is not None:
        names = list(classes) if not isinstance(classes, (str, Path)) else None
        if names is None:
            from pvt_lightning.data.discover import read_classes_file

            names = read_classes_file(classes)
        if names != index.class_names:
            raise DataError(f"shards folder {root} holds the classes {', '.join(index.class_names)}, not "
                            f"{', '.join(names)}; leave out the classes file, or write the shards again with it")
    if val_split is not None:
        log.warning("ignoring val_split=%s: the shards in %s keep the splits they were written with", val_split, root)
    return index


class ShardImageDataset(ImageDataset):
    """An ImageDataset whose images come from the shards of one split (``shard_dir``), read by index.

    The LitData reader is opened in the process that first reads (each loader worker opens its own).
    """

    def __init__(self, samples: SampleIndex, shard_dir: Path, *args, **kwargs) -> None:
        super().__init__(samples, *args, **kwargs)
        self.shard_dir = os.fspath(Path(shard_dir).resolve())
        self._stream = None
        self._stream_pid = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_stream": None, "_stream_pid": None}

    def _items(self):
        if self._stream is None or self._stream_pid != os.getpid():
            from litdata import StreamingDataset

            # batch_decode=0: deserialise the item asked for. LitData's default for small items decodes a window
            # of ~256 neighbours per read (made for its sequential streaming), which under our random access by
            # index threw away 255 of them: 5.9 ms per 1 KB digit instead of 0.02 ms.
            self._stream = StreamingDataset(self.shard_dir, batch_decode=0)
            self._stream_pid = os.getpid()
        return self._stream

    def read(self, index: int) -> np.ndarray:
        item, path = self._items()[index], self.samples.path(index)
        if item["error"]:
            raise BadImageError(path, item["error"])
        data = np.asarray(item["image"], dtype=np.uint8).tobytes()
        return decode_image(data, self.min_side, name=path, max_pixels=self.max_pixels)
