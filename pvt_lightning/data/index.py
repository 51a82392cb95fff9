"""SampleIndex: (path, class index) samples held in three numpy arrays instead of a list of tuples.

A list of a million ``(str, int)`` tuples is three million Python objects; every DataLoader worker
forked from the main process touches their reference counts while reading them, which copies the
pages they live on into the worker (copy-on-access, pytorch/pytorch#13246): each worker's memory
grows over an epoch until it holds its own copy of the list. Here the paths are one contiguous byte
buffer (each path encoded with ``os.fsencode``, so any name the OS gives round-trips) plus an
offsets array, and the labels an int32 array: three objects, read without writing to them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Iterable, Iterator

import numpy as np

Sample = tuple[str, int]
"""(file path, class index); -1 for unlabelled (prediction) samples."""


class SampleIndex(Sequence):
    """A read-only sequence of ``(path, label)``: ``index[i]``, ``len(index)``, iteration, ``index.path(i)``,
    ``index.labels`` (int32 array), ``index.take(positions)`` (a subset, still arrays).

    Multi-label data also holds ``targets``: a uint8 (N, C) multi-hot matrix (row i: the classes of sample i,
    all 0 for an image without a label); ``labels`` is then each sample's first class (-1 without one), used only
    to spread validation hold-outs over the classes. Single-label data has ``targets`` None."""

    __slots__ = ("blob", "offsets", "labels", "targets")

    def __init__(self, blob: np.ndarray, offsets: np.ndarray, labels: np.ndarray,
                 targets: np.ndarray | None = None) -> None:
        if len(offsets) != len(labels) + 1:
            raise ValueError(f"offsets must have one entry more than labels, got {len(offsets)} and {len(labels)}")
        self.blob = np.ascontiguousarray(blob, dtype=np.uint8)
        self.offsets = np.ascontiguousarray(offsets, dtype=np.int64)
        self.labels = np.ascontiguousarray(labels, dtype=np.int32)
        if targets is not None and (targets.ndim != 2 or len(targets) != len(labels)):
            raise ValueError(f"targets must be (samples, classes), got shape {targets.shape} for {len(labels)} samples")
        self.targets = None if targets is None else np.ascontiguousarray(targets, dtype=np.uint8)

    @classmethod
    def from_paths(cls, paths: Sequence[str], labels: Iterable[int] | int) -> "SampleIndex":
        """``paths`` with one label each (or the same ``labels`` int for all)."""
        encoding, errors = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()  # = os.fsencode, faster
        encoded = [path.encode(encoding, errors) for path in paths]
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(item) for item in encoded], out=offsets[1:])
        blob = np.frombuffer(b"".join(encoded), dtype=np.uint8) if encoded else np.zeros(0, np.uint8)
        if isinstance(labels, (int, np.integer)):
            labels = np.full(len(encoded), labels, dtype=np.int32)
        return cls(blob, offsets, np.fromiter(labels, dtype=np.int32, count=len(encoded)))

    @classmethod
    def multilabel(cls, paths: Sequence[str], targets: np.ndarray) -> "SampleIndex":
        """``paths`` with a multi-hot row each (``targets``: (N, C) of 0/1)."""
        targets = np.asarray(targets, dtype=np.uint8).reshape(len(paths), -1)
        first = np.where(targets.any(axis=1), targets.argmax(axis=1), -1)
        plain = cls.from_paths(paths, first)
        return cls(plain.blob, plain.offsets, plain.labels, targets)

    @classmethod
    def of(cls, samples: "Sequence[Sample] | SampleIndex") -> "SampleIndex":
        """``samples`` as a SampleIndex (itself if it already is one)."""
        if isinstance(samples, SampleIndex):
            return samples
        return cls.from_paths([path for path, _ in samples], [label for _, label in samples])

    @classmethod
    def concat(cls, parts: Sequence["SampleIndex"]) -> "SampleIndex":
        if not parts:
            return cls.from_paths([], [])
        starts = np.cumsum([0] + [len(part.blob) for part in parts[:-1]])
        offsets = np.concatenate([parts[0].offsets[:1]] + [part.offsets[1:] + start
                                                          for part, start in zip(parts, starts)])
        targets = None if parts[0].targets is None else np.concatenate([part.targets for part in parts])
        return cls(np.concatenate([part.blob for part in parts]), offsets,
                   np.concatenate([part.labels for part in parts]), targets)

    def __len__(self) -> int:
        return len(self.labels)

    def path(self, i: int) -> str:
        start, end = self.offsets[i], self.offsets[i + 1]
        return os.fsdecode(self.blob[start:end].tobytes())

    def label(self, i: int) -> int:
        return int(self.labels[i])

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.take(np.arange(len(self))[i])
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range (0..{len(self) - 1})")
        return self.path(i), int(self.labels[i])

    def __iter__(self) -> Iterator[Sample]:
        blob, offsets = self.blob, self.offsets
        for i, label in enumerate(self.labels.tolist()):
            yield os.fsdecode(blob[offsets[i]:offsets[i + 1]].tobytes()), label

    def paths(self) -> list[str]:
        return [path for path, _ in self]

    def take(self, positions: Sequence[int] | np.ndarray) -> "SampleIndex":
        """The samples at ``positions``, in that order."""
        positions = np.asarray(positions, dtype=np.int64)
        starts, ends = self.offsets[positions], self.offsets[positions + 1]
        lengths = ends - starts
        offsets = np.zeros(len(positions) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        view = memoryview(self.blob)
        joined = b"".join([view[start:end] for start, end in zip(starts.tolist(), ends.tolist())])
        blob = np.frombuffer(joined, dtype=np.uint8) if joined else np.zeros(0, np.uint8)
        return SampleIndex(blob, offsets, self.labels[positions],
                           None if self.targets is None else self.targets[positions])

    def where(self, keep: np.ndarray) -> "SampleIndex":
        """The samples whose entry of the boolean mask ``keep`` is True."""
        return self.take(np.flatnonzero(keep))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, SampleIndex):
            return (np.array_equal(self.labels, other.labels) and np.array_equal(self.offsets, other.offsets)
                    and np.array_equal(self.blob, other.blob)
                    and (self.targets is None) == (other.targets is None)
                    and (self.targets is None or np.array_equal(self.targets, other.targets)))
        if isinstance(other, Sequence) and not isinstance(other, (str, bytes)):
            return len(other) == len(self) and all(a == tuple(b) for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None  # mutable arrays inside: not hashable, like a list

    def __repr__(self) -> str:
        return f"SampleIndex({len(self)} samples, {self.blob.nbytes / 2**20:.1f} MiB of paths)"

    def nbytes(self) -> int:
        return self.blob.nbytes + self.offsets.nbytes + self.labels.nbytes + \
            (0 if self.targets is None else self.targets.nbytes)

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        """The three arrays (four with multi-label targets) under ``prefix/...`` keys, for ``np.savez``."""
        arrays = {f"{prefix}/blob": self.blob, f"{prefix}/offsets": self.offsets, f"{prefix}/labels": self.labels}
        if self.targets is not None:
            arrays[f"{prefix}/targets"] = self.targets
        return arrays

    @classmethod
    def from_arrays(cls, arrays, prefix: str) -> "SampleIndex":
        names = arrays.files if hasattr(arrays, "files") else arrays
        targets = arrays[f"{prefix}/targets"] if f"{prefix}/targets" in names else None
        return cls(arrays[f"{prefix}/blob"], arrays[f"{prefix}/offsets"], arrays[f"{prefix}/labels"], targets)
