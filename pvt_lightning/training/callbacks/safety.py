"""Callbacks that let a long run survive: ``last.ckpt`` every N steps / M minutes / on SIGTERM, NaN-loss stops.

``training/reliability.py`` turns the stops they cause into readable messages (``explain_stops``).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from pvt_lightning.errors import NonFiniteLossError


class LastCheckpointSaver(Callback):
    """Writes the run's ``last.ckpt`` every N optimizer steps and/or M minutes, and when SIGTERM arrives.

    It saves through ``checkpoint`` (the run's ModelCheckpoint with ``save_last=True``) so there stays one
    ``last.ckpt``; Lightning restores the loop position from it, so a resumed epoch continues at the next batch.
    """

    def __init__(self, checkpoint: ModelCheckpoint, every_n_steps: int = 0, every_minutes: float = 30.0):
        if every_n_steps < 0 or every_minutes < 0:
            raise ValueError("every_n_steps and every_minutes must be >= 0 (0 = off)")
        self.checkpoint = checkpoint
        self.every_n_steps = every_n_steps
        self.every_minutes = every_minutes
        self._last_save_time = time.monotonic()
        self.saved_path: str | None = None
        self.saved_step: int | None = None
        self._validated_step: int | None = None
        """The global step of the latest validation (not the sanity check)."""
        self._written: tuple[int, bool] | None = None
        """(global step, whether it followed a validation at that step) of the latest checkpoint written."""

    @property
    def path(self) -> str:
        name = self.checkpoint.CHECKPOINT_NAME_LAST + self.checkpoint.FILE_EXTENSION
        return str(Path(self.checkpoint.dirpath) / name)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_save_time = time.monotonic()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        due = self.every_n_steps > 0 and trainer.global_step % self.every_n_steps == 0
        if self.every_minutes > 0:
            # Clocks differ across ranks: rank 0 decides, or the ranks would disagree on a collective save.
            due = trainer.strategy.broadcast(due or time.monotonic() - self._last_save_time >= self.every_minutes * 60)
        if due:
            self.save(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """Lightning raises SIGTERMException at the next batch boundary after a SIGTERM: save there."""
        if isinstance(exception, SIGTERMException) and not trainer.sanity_checking:
            self.save(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._validated_step = trainer.global_step  # runs before ModelCheckpoint's (Lightning puts it last)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self._written = (trainer.global_step, self._validated_step == trainer.global_step)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Lightning's ModelCheckpoint rewrites last.ckpt only when it also writes a best checkpoint: after an epoch
        whose --monitor did not improve, last.ckpt would stay an epoch behind and a resume would train that epoch
        again. Write it here when this epoch ended with a validation that no save followed (an epoch stopped early
        by --max-steps keeps its mid-epoch checkpoint, so a resume continues inside that epoch)."""
        step = trainer.global_step
        if not trainer.fast_dev_run and self._validated_step == step and self._written != (step, True):
            self.save(trainer, force=True)

    def save(self, trainer: L.Trainer, force: bool = False) -> None:
        if self.saved_step == trainer.global_step and self.saved_path and not force:
            return
        self.checkpoint.last_model_path = self.path  # ModelCheckpoint keeps writing this same file
        trainer.save_checkpoint(self.path, weights_only=False)  # full state: resumable
        self.saved_path, self.saved_step = self.path, trainer.global_step
        self._last_save_time = time.monotonic()


class StopOnNonFiniteLoss(Callback):
    """Stops before the backward pass of a NaN/inf loss, so no checkpoint is written from a broken state."""

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        value = float(loss.detach().float().sum())
        # All ranks must stop together, or the others wait forever in the next all-reduce.
        if not trainer.strategy.reduce_boolean_decision(math.isfinite(value), all=True):
            raise NonFiniteLossError(value, trainer.current_epoch, trainer.global_step)
