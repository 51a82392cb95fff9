"""Writing the user's files safely: atomically (a reader or a crash never sees half a file), never over an
existing file unless told to, parent folders created. Every report, CSV, export and run file goes through here."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import IO, Callable, Iterator

from pvt_lightning.errors import OutputExistsError, UsageError


def check_output(path: str | Path, overwrite: bool = False, flag: str = "--output") -> Path:
    """Fail now, before any work, if ``path`` cannot be written: it exists (without overwrite) or is a folder."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a folder; give a file path")
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{flag} {path} already exists; choose a new path or pass --overwrite to replace it "
                                "(pvt-lightning never replaces your files unasked)")
    parent = _existing_ancestor(path.parent)
    if not os.access(parent, os.W_OK):
        raise UsageError(f"{flag} {path}: cannot create files under {parent} (no write permission)")
    return path


def _existing_ancestor(folder: Path) -> Path:
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", overwrite: bool = False, **open_kwargs) -> Iterator[IO]:
    """Open a temporary file next to ``path``; on success it replaces ``path`` in one rename, else it vanishes."""
    path = check_output(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes 0600; give the file the usual mode
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if not overwrite and path.exists():  # appeared while we wrote: keep theirs
            raise OutputExistsError(f"{path} was created by someone else while pvt-lightning wrote it; "
                                    f"nothing was replaced")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_file(path: str | Path, content: str | bytes, overwrite: bool = False) -> Path:
    """Write ``content`` to ``path`` atomically, refusing to replace an existing file unless ``overwrite``."""
    mode = "wb" if isinstance(content, bytes) else "w"
    kwargs = {} if isinstance(content, bytes) else {"encoding": "utf-8", "errors": "surrogateescape"}
    with atomic_open(path, mode, overwrite, **kwargs) as f:
        f.write(content)
    return Path(path).expanduser()


def write_with(path: str | Path, writer: Callable[[IO], None], overwrite: bool = False, binary: bool = True) -> Path:
    """Atomic write through ``writer(file)`` (e.g. ``torch.save``, ``fig.savefig``)."""
    with atomic_open(path, "wb" if binary else "w", overwrite) as f:
        writer(f)
    return Path(path).expanduser()


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --- versions -----------------------------------------------------------------------------------------------
