"""Every error a user can cause, and the one map from an error to the command's exit status.

Entry points catch ``UserFacingError`` (and ``RunStopped``), print the message on one line without a
traceback and exit with ``exit_code(err)``. Messages name the file, folder or flag and the fix.

Exit statuses: 0 done; 2 a usage, data, checkpoint or export error; 3 training stopped on a NaN/inf
loss or out of memory; 143 stopped by SIGTERM after saving (resumable); 1 a bug (with its traceback).

File names are kept exactly as the OS gives them: a name that is not valid UTF-8 is a ``str`` holding
surrogate escapes (``os.fsdecode``). Text for people shows such bytes as ``\\xNN`` via ``printable``;
lists of paths for programs (``bad_images.txt``, the predictions CSV) are written with ``PATH_ERRORS``.
"""

from __future__ import annotations

import os
import signal

EXIT_USER_ERROR = 2
"""A problem the user fixes outside the program: a flag, a file, a folder, a full disk."""
EXIT_TRAINING_FAULT = 3
"""Training stopped on a numerical fault or out of memory (1 stays for crashes with tracebacks)."""
EXIT_SIGTERM = 128 + signal.SIGTERM
"""Stopped by SIGTERM after saving (the shell's convention for 'terminated'): the run can be resumed."""

PATH_ERRORS = "surrogateescape"
"""``errors=`` for text files that list paths: open them with ``encoding="utf-8", errors=PATH_ERRORS``."""


def printable(path: str | bytes | os.PathLike) -> str:
    """``path`` as valid text for messages: bytes that are not UTF-8 become ``\\xNN`` (e.g. ``caf\\xe9.jpg``)."""
    text = os.fsdecode(path)
    try:
        return text.encode("utf-8", PATH_ERRORS).decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that no file name produces
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


class UserFacingError(ValueError):
    """Base of every error the user can fix: printed as one line, exit status 2."""

    def __str__(self) -> str:
        return printable(super().__str__())  # paths in it may hold undecodable bytes


class UsageError(UserFacingError):
    """A mistake in the command line or a config file."""


class OutputExistsError(UsageError):
    """An output file exists and overwriting was not asked for."""


class DataError(UserFacingError):
    """A problem with the user's data (missing folder, empty class, bad file under ``bad_images='error'``)."""

    def __str__(self) -> str:
        # DataLoader workers re-raise our error in the main process as DataError("Caught DataError
        # in DataLoader worker process 0.\nOriginal Traceback ..."); show only the original message.
        message = super().__str__()
        if message.startswith("Caught DataError") and "Traceback" in message:
            last_line = message.rstrip().splitlines()[-1]
            message = last_line.split("DataError: ", 1)[-1]
        return message


class BadImageError(Exception):
    """One file could not be decoded into an image; ``path`` and ``reason`` say which and why."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{printable(path)}: {reason}")
        self.path = path
        self.reason = reason


class CheckpointError(UserFacingError):
    """A weights file that cannot be used: unreadable, unsafe, or not matching the model."""


class CheckpointSaveError(CheckpointError):
    """A checkpoint could not be written; the previous file at its path is kept."""


class ExportError(UserFacingError):
    """An export that cannot be made or does not reproduce the model."""


class ParityError(ExportError):
    """The exported graph's logits differ from the eager model's by more than the tolerance."""


class MissingExportDependency(ExportError, ImportError):
    """onnx / onnxruntime / onnxscript is not installed."""


class RunStopped(Exception):
    """Training stopped early for a reason the user can act on: printed without a traceback."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""

    def __init__(self, value: float, epoch: int, step: int):
        super().__init__(f"training loss is {value} at epoch {epoch}, global step {step}")
        self.value, self.epoch, self.step = value, epoch, step


def exit_code(err: BaseException) -> int:
    """The exit status for an error an entry point caught (1: not ours, a bug)."""
    if isinstance(err, RunStopped):
        return err.exit_code
    if isinstance(err, UserFacingError):
        return EXIT_USER_ERROR
    return 1
