"""Why a training run stopped early, in one line: SIGTERM, NaN loss, out of memory, a full or read-only disk.

``cli.train`` adds the callbacks of ``training/callbacks/safety.py`` and runs ``trainer.fit`` inside
``explain_stops``, which turns each way a run can stop early into a ``RunStopped`` (a message and an exit
status) instead of a traceback.
"""

from __future__ import annotations

import argparse
import errno
from contextlib import contextmanager
from typing import Iterator

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from pvt_lightning.errors import EXIT_SIGTERM, EXIT_TRAINING_FAULT, EXIT_USER_ERROR, NonFiniteLossError, RunStopped
from pvt_lightning.training.callbacks.safety import LastCheckpointSaver


_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


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
