"""The Dataset a DataLoader worker runs: read, decode, transform, and the bad-image policy."""

from __future__ import annotations

import ctypes
import gc
import logging
import multiprocessing
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate, get_worker_info

from pvt_lightning.data.decode import DEFAULT_MAX_IMAGE_PIXELS, read_image
from pvt_lightning.errors import BadImageError, DataError, PATH_ERRORS, printable
from pvt_lightning.data.index import Sample, SampleIndex

PR_SET_PDEATHSIG = 1  # linux/prctl.h

log = logging.getLogger("pvt_lightning.data")

BAD_IMAGE_POLICIES = ("skip", "error")
_MAX_REPLACEMENTS = 16


class BadImageLog:
    """Paths of undecodable images, shared by all worker processes through an append-only text file.

    A line of a few hundred bytes appended with O_APPEND lands whole even when two workers write at
    once, so no lock is needed; each path is logged (warning) and written once. The file holds one
    path per line, in the exact bytes of the OS's name (``PATH_ERRORS``). ``keep``: the file is the
    user's (e.g. ``bad_images.txt`` in the run folder) and messages may point to it; otherwise it is a
    temporary file, and messages list the paths themselves.
    """

    def __init__(self, file: str | Path, keep: bool = False) -> None:
        self.file = Path(file)
        self.keep = keep

    def paths(self) -> list[str]:
        if not self.file.exists():
            return []
        return sorted(set(self.file.read_text(encoding="utf-8", errors=PATH_ERRORS).splitlines()))

    def add(self, error: BadImageError, warn: bool = True) -> bool:
        """Record ``error.path``; False if it was already recorded."""
        if error.path in self.paths():
            return False
        if warn:
            log.warning("skipping unreadable image %s: %s (bad_images='skip'; use 'error' to stop instead)",
                        printable(error.path), error.reason)
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            with open(self.file, "a", encoding="utf-8", errors=PATH_ERRORS) as handle:
                handle.write(error.path.replace("\n", " ") + "\n")
        except OSError as err:
            raise DataError(f"cannot record the unreadable image {printable(error.path)} in {printable(self.file)}: "
                            f"{err.strerror}; make room on that disk or choose another bad-images file") from None
        return True

    def where(self, limit: int = 5) -> str:
        """Where the user finds the list: the kept file, or the first ``limit`` paths."""
        if self.keep:
            return f"the full list is in {printable(self.file)}"
        paths = self.paths()
        more = f" and {len(paths) - limit} more" if len(paths) > limit else ""
        return "they are " + ", ".join(printable(p) for p in paths[:limit]) + more


class ImageDataset(Dataset):
    """``samples`` -> (uint8 image tensor (3, H, W), class index) or, with ``with_paths``, (image, path).

    Bad files: ``bad_images="error"`` raises a DataError naming the path. ``"skip"`` records the path
    in ``bad_log`` and, if ``replace_bad``, returns another sample instead (training keeps its batch
    size) or else returns None, which ``CollateDroppingBad`` removes from the batch (evaluation
    and prediction neither count nor name an image twice). When the last readable image of a class
    (or, for unlabelled samples, of the whole set) turns out bad, a DataError names the class and
    its folder: training on would give that class 0 accuracy without a word.
    """

    def __init__(
        self,
        samples: Sequence[Sample] | SampleIndex,
        transform: Callable,
        bad_log: BadImageLog,
        bad_images: str = "skip",
        replace_bad: bool = False,
        with_paths: bool = False,
        min_side: int = 0,
        max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        split: str = "",
        class_names: Sequence[str] | None = None,
    ) -> None:
        if bad_images not in BAD_IMAGE_POLICIES:
            raise ValueError(f"bad_images must be one of {BAD_IMAGE_POLICIES}, got {bad_images!r}")
        self.samples = SampleIndex.of(samples)  # arrays: workers' memory stays flat (index.py)
        self.transform = transform
        self.bad_log = bad_log
        self.bad_images = bad_images
        self.replace_bad = replace_bad
        self.with_paths = with_paths
        self.min_side = min_side
        self.max_pixels = max_pixels
        self.split = split
        self.class_names = list(class_names) if class_names is not None else None
        self._known_bad: set[int] = set()
        self._paths_by_label: dict[int, list[str]] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        for attempt in range(_MAX_REPLACEMENTS):
            candidate = (index + attempt * 7919) % len(self.samples)  # a prime stride reaches other classes/folders
            if candidate in self._known_bad:
                continue
            try:
                return self._load(candidate)
            except BadImageError as error:
                if self.bad_images == "error":
                    raise DataError(f"cannot decode image {printable(error.path)}: {error.reason}; delete or "
                                    "replace the file, or use bad_images='skip' to skip unreadable files") from None
                self._known_bad.add(candidate)
                if self.bad_log.add(error):
                    self._check_class_left(int(self.samples.labels[candidate]))
                if not self.replace_bad:
                    return None
        raise DataError(f"{_MAX_REPLACEMENTS} images in a row failed to decode near "
                        f"{printable(self.samples.path(index))} in the {self.split or 'data'} split; the dataset looks "
                        f"broken ({self.bad_log.where()})")

    def _check_class_left(self, label: int) -> None:
        """DataError if every image of ``label`` is now known to be bad (read from the log all workers share)."""
        if label not in self._paths_by_label:
            self._paths_by_label[label] = [self.samples.path(i) for i in np.flatnonzero(self.samples.labels == label)]
        paths = self._paths_by_label[label]
        if not set(paths) <= set(self.bad_log.paths()):
            return
        folder = printable(os.path.commonpath(paths) if len(paths) > 1 else os.path.dirname(paths[0]))
        if label < 0 or self.class_names is None:  # unlabelled: the whole prediction folder
            raise DataError(f"all {len(paths)} images under {folder} are unreadable; {self.bad_log.where()}; "
                            "replace or delete them")
        raise DataError(f"all {len(paths)} images of class {self.class_names[label]!r} in the {self.split} split "
                        f"({folder}) are unreadable, so the class can be neither learnt nor measured; "
                        f"{self.bad_log.where()}; replace them, or remove the class folder from every split")

    def read(self, index: int) -> np.ndarray:
        """Sample ``index`` decoded to RGB uint8 (H, W, 3); BadImageError if it cannot be."""
        return read_image(self.samples.path(index), self.min_side, self.max_pixels)

    def _load(self, index: int):
        path, label = self.samples.path(index), int(self.samples.labels[index])
        image = self.transform(image=self.read(index))["image"]  # uint8 (H, W, 3)
        tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)  # uint8 (3, H, W), a view
        if self.with_paths:
            return tensor, path
        if self.samples.targets is not None:  # multi-label: the float multi-hot row (C,)
            return tensor, torch.from_numpy(self.samples.targets[index].astype(np.float32))
        return tensor, label

    def reseed(self, seed: int) -> None:
        """Give this process's copy of the augmentation its own random stream (workers start as clones)."""
        if hasattr(self.transform, "set_random_seed"):
            self.transform.set_random_seed(seed % 2**32)


class CollateDroppingBad:
    """default_collate after removing the None entries that skipped bad images leave in a batch.

    A batch whose every image was bad becomes None: Lightning skips a None training batch, and the
    module's evaluation and predict steps return None for it (a model cannot run on zero images).
    """

    def __call__(self, batch: list):
        kept = [item for item in batch if item is not None]
        return default_collate(kept) if kept else None


def worker_init(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: no OpenCV thread pools inside workers, distinct augmentation seeds, and
    survival of a SIGTERM sent to the whole job (see ``outlive_job_sigterm``)."""
    import cv2

    # A forked worker inherits the main process's uncollected garbage. Freed here, an object owning threads
    # of the main process (an onnxruntime session left in a reference cycle by an earlier export or predict in
    # the same process, as in a notebook) waits in its destructor for threads the fork did not copy: the
    # worker hangs and the loader with it. Frozen, the worker's collector never visits what it inherited.
    gc.freeze()
    die_with_main_process()
    outlive_job_sigterm()
    cv2.setNumThreads(0)
    info = get_worker_info()
    if info is not None and isinstance(info.dataset, ImageDataset):
        info.dataset.reseed(info.seed)


def die_with_main_process() -> None:
    """In a worker (Linux): the kernel kills it when the process that started it ends, however that ends.

    PyTorch's own check (the parent's pid, read when the worker loop starts) misses a parent that dies while
    the worker starts up; such an orphan then waits forever, holding its memory and every inherited file
    descriptor (a test runner's pipe among them). The signal follows the thread that created the loader, which
    is the training or prediction loop's thread.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    parent = multiprocessing.parent_process()
    if parent is not None and not parent.is_alive():  # it died before the request above
        os._exit(1)


def outlive_job_sigterm() -> None:
    """In a worker: ignore SIGTERM unless the main process sends it.

    Schedulers (SLURM) signal every process of a job. A worker killed that way breaks the step in
    progress before the trainer can save; surviving it lets the main process save ``last.ckpt`` and then
    shut the workers down. The main process's own SIGTERM (``Process.terminate()``, also sent at
    interpreter exit, followed by a wait) must still end the worker, so SIGTERM is blocked in this thread
    (and the threads it starts) and a watcher thread reads each one's sender. Where the platform cannot
    tell senders apart (no ``sigwaitinfo``: macOS, Windows) workers keep the default behaviour.
    """
    if not hasattr(signal, "sigwaitinfo"):
        return
    parent = multiprocessing.parent_process()
    main_pid = parent.pid if parent is not None else os.getppid()  # the DataLoader's process, also under forkserver
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def watch() -> None:
        while signal.sigwaitinfo({signal.SIGTERM}).si_pid != main_pid:
            pass
        os._exit(0)  # asked to stop by the main process: a clean exit, which its worker-failure checks accept

    threading.Thread(target=watch, name="sigterm-watch", daemon=True).start()
