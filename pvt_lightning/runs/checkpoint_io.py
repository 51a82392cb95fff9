"""Checkpoint files that are never half-written: save to a temporary file, then rename over.

A save that fails (disk full, read-only or missing folder, file-size limit) leaves the previous
file as it was and raises ``CheckpointSaveError``: one message naming the path, the reason and
the free space, shown without a traceback (exit status 2).
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from pvt_lightning.errors import CheckpointError, CheckpointSaveError
from pvt_lightning.runs.io import umask
from pvt_lightning.models.weights import read_state_dict_file
from pvt_lightning.runs.checkpoint_info import describe_checkpoint


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """torch.save to ``path`` so that a reader (or a kill mid-write) sees the old file or the new one, never a mix.

    An OSError (no space, read-only, no permission, file too large) becomes a CheckpointSaveError.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a writer killed mid-save
            stale.unlink(missing_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise CheckpointSaveError(save_error_message(path, err)) from None
    try:
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes 0600; give the file torch.save's usual mode
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX within one filesystem
    except BaseException as err:
        written = _size_or_zero(tmp)
        Path(tmp).unlink(missing_ok=True)
        cause = err if isinstance(err, OSError) else err.__cause__ or err.__context__
        if isinstance(err, OSError) or (isinstance(err, RuntimeError) and isinstance(cause, OSError)):
            # torch.save's zip writer reports a failed write as RuntimeError("... unexpected pos ...")
            raise CheckpointSaveError(save_error_message(path, cause, written)) from None
        raise


def _size_or_zero(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


_NO_ROOM = "free some space, or point --logdir at a disk with room"
_NOT_WRITABLE = "point --logdir at a folder you can write to"
_REASONS = {  # errno -> (what happened, what to do)
    errno.ENOSPC: ("the disk is full", _NO_ROOM),
    errno.EDQUOT: ("the disk quota is used up", _NO_ROOM),
    errno.EROFS: ("the file system is read-only", _NOT_WRITABLE),
    errno.EACCES: ("no permission to write there", _NOT_WRITABLE),
    errno.EPERM: ("no permission to write there", _NOT_WRITABLE),
    errno.ENOTDIR: ("a file stands where a folder of the path should be", _NOT_WRITABLE),
    errno.EEXIST: ("a file stands where a folder of the path should be", _NOT_WRITABLE),
    errno.EFBIG: ("the file would exceed the file-size limit of this process (ulimit -f)",
                  "raise the limit (ulimit -f unlimited) or ask your scheduler for one"),
}


def save_error_message(path: str | Path, err: OSError, written: int = 0) -> str:
    """'cannot write PATH: REASON [strerror] (N written before it failed; M free ...); the previous file is kept. FIX'"""
    path = Path(path)
    reason, fix = _REASONS.get(err.errno, (err.strerror or str(err), _NOT_WRITABLE))
    progress = f"{_size(written)} written before it failed; " if written else ""
    kept = f"the previous {path.name} there is kept" if path.exists() else "no earlier file of that name was touched"
    return (f"cannot write {path}: {reason} [{err.strerror or type(err).__name__}] ({progress}{free_space(path)}); "
            f"{kept}. To go on: {fix}, then rerun (with --resume last to continue from the last checkpoint saved, "
            "if any)")


def free_space(path: str | Path) -> str:
    """'1.2 GB free of 270.6 GB on the file system of /folder', for the nearest existing folder of ``path``."""
    folder = Path(path).absolute().parent
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    try:
        usage = shutil.disk_usage(folder)
    except OSError:
        return "free space unknown"
    return f"{_size(usage.free)} free of {_size(usage.total)} on the file system of {folder}"


def _size(num_bytes: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if num_bytes < 1000 or unit == "GB":
            return f"{num_bytes:.0f} {unit}" if unit == "bytes" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1000
    return f"{num_bytes:.1f} TB"  # pragma: no cover


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with atomic writes (a SIGKILL during a save leaves the previous last.ckpt)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options, got {storage_options!r}")
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None):
        """Our checkpoints hold only tensors and plain data: always weights_only, and a clear CheckpointError
        for a file that is unsafe, truncated, not a checkpoint, or model weights with no training state."""
        checkpoint = read_state_dict_file(path, map_location=map_location or "cpu")
        if not isinstance(checkpoint, Mapping):
            describe_checkpoint(checkpoint, path)  # raises: "... is not a checkpoint: it holds a list"
        if "state_dict" not in checkpoint and _weights_layout(checkpoint, path) is not None:
            info = describe_checkpoint(checkpoint, path)
            raise CheckpointError(f"cannot resume from {path}: it is {info.describe()}, with no training state to "
                                  f"continue; to start a new run from its weights, pass --pretrained {path}")
        return checkpoint


def _weights_layout(checkpoint: Mapping, path) -> str | None:
    """The model layout of a plain weights file (official, timm, HF, ours), or None if it is not one."""
    try:
        return describe_checkpoint(checkpoint, path).layout
    except CheckpointError:
        return None
