"""Opening files a caller names, safely, and keeping Valor's own files private.

A name from a tool argument or a message may point at a FIFO (an open without ``O_NONBLOCK``
waits forever), a device, or a symlink planted to lead elsewhere. ``open_regular`` opens with
``O_NONBLOCK | O_NOFOLLOW`` and checks the type on the descriptor, never on the path (no race
between the check and the open). ``ensure_private_dir`` keeps the data directory owner-only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from pathlib import Path

log = logging.getLogger("valor.files")

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600


class UnsafeFile(Exception):
    """The path is not a regular file Valor may read (its reason is safe to show)."""


class FileTooLarge(UnsafeFile):
    def __init__(self, limit: int):
        super().__init__(f"larger than the {limit:,}-byte limit")
        self.limit = limit


def open_regular(path: str | os.PathLike[str], flags: int = os.O_RDONLY) -> int:
    """A descriptor for ``path`` if it is a regular file and not a symlink; else ``UnsafeFile``.

    ``FileNotFoundError`` and ``PermissionError`` pass through as they are.
    """
    try:
        fd = os.open(path, flags | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == 40:  # ELOOP: the last component is a symlink
            raise UnsafeFile("a symbolic link, which is not followed") from None
        raise
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        os.close(fd)
        raise
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise UnsafeFile("not a regular file")
    return fd


def read_regular(path: str | os.PathLike[str], limit: int) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes (see ``open_regular``)."""
    fd = open_regular(path)
    with os.fdopen(fd, "rb") as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise FileTooLarge(limit)
    return data


def ensure_private_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` (and parents) owner-only; tighten it, with a log line, if it is looser."""
    folder = Path(path)
    folder.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
    tighten(folder, PRIVATE_DIR_MODE)
    return folder


def tighten(path: str | os.PathLike[str], mode: int) -> bool:
    """Remove group and other permissions beyond ``mode``; True when it changed anything."""
    with contextlib.suppress(FileNotFoundError):
        current = stat.S_IMODE(os.stat(path, follow_symlinks=False).st_mode)
        if current & ~mode & 0o077:
            os.chmod(path, current & mode)
            log.warning("tightened permissions of %s from %o to %o", path, current, current & mode)
            return True
    return False
