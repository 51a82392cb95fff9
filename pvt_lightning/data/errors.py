"""The two errors of the data side: a user's dataset is unusable, or one image file is."""

from __future__ import annotations


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
            return last_line.split("DataError: ", 1)[-1]
        return message


class BadImageError(Exception):
    """One file could not be decoded into an image; ``path`` and ``reason`` say which and why."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason
