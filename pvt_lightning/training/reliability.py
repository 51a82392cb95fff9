"""Surviving real training runs: periodic and SIGTERM checkpoints, NaN stops, readable OOM and refusal messages.

``cli.train`` adds the two callbacks and runs ``trainer.fit`` inside ``explain_stops``, which turns each
way a run can stop early into a ``RunStopped`` (a message and an exit status) instead of a traceback.
"""

from __future__ import annotations

import argparse
import errno
import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from pvt_lightning.errors import EXIT_SIGTERM, EXIT_TRAINING_FAULT, EXIT_USER_ERROR, NonFiniteLossError, RunStopped


_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


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

    def save(self, trainer: L.Trainer) -> None:
        if self.saved_step == trainer.global_step and self.saved_path:
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


@contextmanager
def explain_stops(trainer: L.Trainer, args: argparse.Namespace) -> Iterator[None]:
    """Run ``trainer.fit`` in this: SIGTERM, NaN loss, out-of-memory and a full or read-only disk become clear
    messages. (A failed checkpoint save is already a ``CheckpointSaveError``, exit status 2, and passes through.)"""
    from pvt_lightning.runs.checkpoint_io import save_error_message

    try:
        yield
    except SIGTERMException:
        raise RunStopped(sigterm_message(trainer), EXIT_SIGTERM) from None
    except NonFiniteLossError as err:
        raise RunStopped(non_finite_message(err, trainer, args), EXIT_TRAINING_FAULT) from None
    except torch.cuda.OutOfMemoryError:  # the same class as torch.OutOfMemoryError (torch >= 2.5)
        raise RunStopped(out_of_memory_message(args), EXIT_TRAINING_FAULT) from None
    except OSError as err:  # e.g. Lightning writing hparams.yaml, or removing an old best checkpoint
        if err.errno not in _DISK_ERRNOS or not err.filename:
            raise
        raise RunStopped(save_error_message(err.filename, err), EXIT_USER_ERROR) from None


def _saver(trainer: L.Trainer) -> LastCheckpointSaver | None:
    return next((c for c in trainer.callbacks if isinstance(c, LastCheckpointSaver)), None)


def sigterm_message(trainer: L.Trainer) -> str:
    saver = _saver(trainer)
    where = f"epoch {trainer.current_epoch}, global step {trainer.global_step}"
    if saver is None or saver.saved_path is None:
        return f"received SIGTERM at {where} before training started; nothing to save. Rerun the same command."
    return (f"received SIGTERM at {where}: saved {saver.saved_path}. To continue, run the same command with "
            f"--resume last (same --logdir and --name); the run continues in the same version folder.")


def non_finite_message(err: NonFiniteLossError, trainer: L.Trainer, args: argparse.Namespace) -> str:
    checkpoint = next((c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)), None)
    last = (checkpoint.last_model_path if checkpoint else None) or trainer.ckpt_path  # or the one resumed from
    kept = f"the last good checkpoint {last} is left as it was" if last else "no checkpoint had been saved yet"
    fixes = [f"a lower learning rate (--lr, now {trainer.lightning_module.hparams.lr:.2e})",
             f"a smaller --grad-clip (now {trainer.gradient_clip_val})" if trainer.gradient_clip_val
             else "gradient clipping (--grad-clip 1.0)"]
    if args.precision == "16-mixed":
        fixes.append("--precision bf16-mixed instead of 16-mixed (float16 overflows)")
    return f"{err}; stopped without saving, {kept}. Likely fixes: {', '.join(fixes)}."


def out_of_memory_message(args: argparse.Namespace) -> str:
    fixes = []
    if args.batch_size > 1:
        fixes.append(f"a smaller --batch-size (now {args.batch_size}; try {args.batch_size // 2})")
    if args.variant != "resnet50" and not args.grad_checkpointing:
        fixes.append("--grad-checkpointing (recomputes activations: less memory, slower)")
    if args.precision == "32":
        fixes.append("--precision bf16-mixed (half the activation memory)")
    return f"out of memory on the device. Try {', '.join([*fixes, 'a smaller --img-size'])}."
