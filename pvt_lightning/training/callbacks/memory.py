"""Peak memory per epoch: CUDA allocator peaks on a GPU, the proportional set size of the process tree on CPU.

Probes measure one rank (``CudaPeakMemory``, ``ProcessTreePeakPss``); ``MemoryMonitor`` starts one per
training epoch and logs the worst rank's figures.
"""

from __future__ import annotations

import os
import threading
from typing import Sequence

import lightning as L
import psutil
import torch

from pvt_lightning.tags import CPU_MEMORY_TAGS, CUDA_MEMORY_TAGS
from pvt_lightning.training.callbacks.loggers import log_epoch_scalars

MB = 2**20


class CudaPeakMemory:
    """Peak reserved and allocated CUDA memory of one device since the last reset, in MB (``tags`` order)."""

    tags = CUDA_MEMORY_TAGS

    def __init__(self, device: torch.device):
        self.device = device

    def start(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def stop(self) -> list[float]:
        return [torch.cuda.max_memory_reserved(self.device) / MB, torch.cuda.max_memory_allocated(self.device) / MB]


def proportional_set_size(pid: int) -> int:
    """Bytes of ``pid``'s memory, each page shared with N processes counted 1/N (Linux smaps_rollup).

    Falls back to the resident size where ``/proc`` has no smaps_rollup (macOS, Windows, old kernels).
    """
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return psutil.Process(pid).memory_info().rss


def process_tree_pss(process: psutil.Process, skip_pids: frozenset[int] = frozenset()) -> int:
    """Proportional set size of ``process`` and its descendants, leaving out ``skip_pids`` and their subtrees.

    Unlike summed RSS, the libraries and copy-on-write pages the data-loader workers share with the
    trainer count once, so the figure is what the run really adds to the machine's memory.
    """
    try:
        total = proportional_set_size(process.pid)
        children = process.children()
    except (psutil.NoSuchProcess, ProcessLookupError):
        return 0
    return total + sum(process_tree_pss(child, skip_pids) for child in children if child.pid not in skip_pids)


class ProcessTreePeakPss:
    """Peak proportional set size of this process plus its data-loader workers, sampled by a thread, in MB.

    ``skip_pids`` are the other DDP ranks: Lightning starts them as children of rank 0, and each
    rank reports its own tree.
    """

    tags = CPU_MEMORY_TAGS

    def __init__(self, interval_s: float = 0.1, skip_pids: frozenset[int] = frozenset()):
        self.interval_s = interval_s
        self.skip_pids = skip_pids
        self._process = psutil.Process()
        self._peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        self._peak = max(self._peak, process_tree_pss(self._process, self.skip_pids))

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def start(self) -> None:
        self._peak = 0
        self._sample()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="peak-memory-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> list[float]:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        self._sample()
        return [self._peak / MB]


def worst_rank(tags: Sequence[str], per_rank: Sequence[Sequence[float]]) -> dict[str, float]:
    """For each tag, the largest value over ranks: memory budgets are set by the fullest device."""
    return {tag: max(rank_values[i] for rank_values in per_rank) for i, tag in enumerate(tags)}


class MemoryMonitor(L.Callback):
    """Peak memory per epoch (training and its validation), worst rank under DDP.

    On CUDA: ``memory/peak_reserved_mb`` and ``memory/peak_allocated_mb`` (peaks reset at epoch
    start). On CPU: ``memory/peak_pss_mb``, the proportional set size of the process and its data-loader workers.
    ``peaks_mb`` holds one value per epoch (the probe's first tag: reserved on CUDA, which is what ``nvidia-smi``
    shows as used; PSS on CPU), ``memory_device`` is ``"cuda"`` or ``"cpu"`` and ``history`` every tag.
    """

    def __init__(self, interval_s: float = 0.1):
        self.interval_s = interval_s
        self.peaks_mb: list[float] = []
        self.history: list[dict[str, float]] = []
        self.memory_device: str | None = None
        self.probe: CudaPeakMemory | ProcessTreePeakPss | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        device = pl_module.device
        if device.type == "cuda":
            self.memory_device, self.probe = "cuda", CudaPeakMemory(device)
        else:
            pids = trainer.strategy.all_gather(torch.tensor([os.getpid()], device=device)).flatten().tolist()
            skip = frozenset(pid for pid in pids if pid != os.getpid())
            self.memory_device, self.probe = "cpu", ProcessTreePeakPss(self.interval_s, skip)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.probe.start()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        local = torch.tensor(self.probe.stop(), dtype=torch.float64, device=pl_module.device)
        per_rank = trainer.strategy.all_gather(local).reshape(-1, len(self.probe.tags)).tolist()
        peaks = worst_rank(self.probe.tags, per_rank)
        self.history.append(peaks)
        self.peaks_mb.append(peaks[self.probe.tags[0]])
        log_epoch_scalars(trainer, peaks)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if isinstance(self.probe, ProcessTreePeakPss):
            self.probe.stop()  # an interrupted epoch may have left the sampler running
