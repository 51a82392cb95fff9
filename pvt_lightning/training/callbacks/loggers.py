"""Writing epoch-level values to the run's loggers, on rank 0, at step = epoch index.

Every scalar the callbacks log goes through ``log_epoch_scalars``, so TensorBoard x-axes line up across runs
whatever their batch size. Values are reduced across DDP ranks before rank 0 logs them: metrics through
torchmetrics' own synchronisation, counters and memory through the strategy.
"""

from __future__ import annotations

from typing import Mapping

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger


def log_epoch_scalars(trainer: L.Trainer, scalars: Mapping[str, float]) -> None:
    """Log ``scalars`` to every logger at step = current epoch (rank 0 only)."""
    if not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        logger.log_metrics(dict(scalars), step=trainer.current_epoch)


def tensorboard_writers(trainer: L.Trainer) -> list:
    """The SummaryWriters of the run's TensorBoard loggers, on rank 0 (empty elsewhere)."""
    if not trainer.is_global_zero:
        return []
    return [logger.experiment for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]
