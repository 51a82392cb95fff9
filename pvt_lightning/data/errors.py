"""The two errors of the data side: a user's dataset is unusable, or one image file is; and how paths are shown.

File names are kept exactly as the OS gives them: a name that is not valid UTF-8 is a ``str`` holding
surrogate escapes (``os.fsdecode``). Text for people (log lines, error messages) shows such bytes as
``\\xNN`` via ``printable``; lists of paths for programs (``bad_images.txt``, the predictions CSV) are
written with ``PATH_ERRORS`` ("surrogateescape"), so they hold the exact bytes of each name.
"""

from __future__ import annotations

import os

PATH_ERRORS = "surrogateescape"
"""``errors=`` for text files that list paths: open them with ``encoding="utf-8", errors=PATH_ERRORS``."""


def printable(path: str | bytes | os.PathLike) -> str:
    """``path`` as valid text for messages: bytes that are not UTF-8 become ``\\xNN`` (e.g. ``caf\\xe9.jpg``)."""
    text = os.fsdecode(path)
    try:
        return text.encode("utf-8", PATH_ERRORS).decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that no file name produces
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


class DataError(ValueError):
    """A problem with the user's data (missing folder, empty class, bad file under ``bad_images='error'``).

    The CLI prints the message without a traceback, so each message names the path and the fix.
    """

    def __str__(self) -> str:
        # DataLoader workers re-raise our error in the main process as DataError("Caught DataError
        # in DataLoader worker process 0.\nOriginal Traceback ..."); show only the original message.
        message = super().__str__()
        if message.startswith("Caught DataError") and "Traceback" in message:
            last_line = message.rstrip().splitlines()[-1]
            message = last_line.split("DataError: ", 1)[-1]
        return printable(message)  # paths in it may hold undecodable bytes


class BadImageError(Exception):
    """One file could not be decoded into an image; ``path`` and ``reason`` say which and why."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{printable(path)}: {reason}")
        self.path = path
        self.reason = reason
