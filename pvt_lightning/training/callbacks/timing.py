"""Training time per epoch (validation excluded) and training throughput in images/s over all ranks."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch

from pvt_lightning.tags import THROUGHPUT_TAG, TIME_TAG
from pvt_lightning.training.callbacks.loggers import log_epoch_scalars


class EpochTimer(L.Callback):
    """Training time per epoch (validation excluded) and training throughput in images/s over all ranks.

    ``epoch_times_s`` and ``throughputs_img_s`` hold one value per finished epoch (slowest rank's time;
    images summed over ranks), logged as ``time/epoch_s`` and ``throughput/train_img_s``.
    """

    def __init__(self):
        self.epoch_times_s: list[float] = []
        self.throughputs_img_s: list[float] = []
        self._epoch_start = self._validation_start = 0.0
        self._validation_s = 0.0
        self._images = 0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_start = time.perf_counter()
        self._validation_s = 0.0
        self._images = 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        self._images += len(images)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._validation_start = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._validation_s += time.perf_counter() - self._validation_start

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning runs the epoch's validation before this hook, so its time is taken out.
        seconds = time.perf_counter() - self._epoch_start - self._validation_s
        strategy = trainer.strategy
        seconds = strategy.reduce(torch.tensor(seconds, dtype=torch.float64, device=pl_module.device), reduce_op="max")
        images = strategy.reduce(torch.tensor(self._images, dtype=torch.float64, device=pl_module.device),
                                 reduce_op="sum")
        self.epoch_times_s.append(seconds.item())
        self.throughputs_img_s.append(images.item() / max(seconds.item(), 1e-9))
        log_epoch_scalars(trainer, {TIME_TAG: self.epoch_times_s[-1], THROUGHPUT_TAG: self.throughputs_img_s[-1]})
