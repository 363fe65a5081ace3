"""Categorized, person-readable errors for tools.

A tool raises ``ValorError`` (a FastMCP ``ToolError``) whose message says what happened and what
to do. Unexpected exceptions are masked (see ``servers.core.app``): logged with a correlation id,
never shown.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import sqlite3
import uuid
from enum import StrEnum
from pathlib import Path
from typing import Any

from fastmcp.exceptions import ToolError

log = logging.getLogger("valor.errors")


class Category(StrEnum):
    CONFIG = "config"
    INPUT = "input"
    UPSTREAM = "upstream_api"
    RATE_LIMIT = "rate_limit"
    TIMEOUT = "timeout"
    FILE = "file"
    ENCODING = "encoding"
    STORE = "store"  # the SQLite store is corrupt, read-only, full or locked
    INTERNAL = "internal"


class ValorError(ToolError):
    """A categorized error whose message a person can act on."""

    def __init__(self, category: Category, message: str, *, retry_after: float | None = None):
        self.category = Category(category)
        self.retry_after = retry_after
        self.detail = message
        super().__init__(f"[{self.category.value}] {redact(message)}")


def input_error(message: str) -> ValorError:
    return ValorError(Category.INPUT, message)


# Shapes of secrets that must never reach a log line or an error text.
_SECRET_PATTERNS = [
    re.compile(r"sk-[A-Za-z0-9_\-]{8,}"),
    re.compile(r"pplx-[A-Za-z0-9_\-]{8,}"),
    re.compile(r"(secret|ntn)_[A-Za-z0-9]{8,}"),
    re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._\-]{8,}"),
    # Telegram bot token; never starting inside a run of digits (a long one made this quadratic)
    re.compile(r"(?<!\d)\d{6,}+:[A-Za-z0-9_\-]{30,}"),
]


def redact(text: str) -> str:
    """Remove anything that looks like a secret, plus the configured secret values."""
    for pattern in _SECRET_PATTERNS:
        text = pattern.sub(lambda m: (m.group(1) if m.lastindex else "") + "***", text)
    for value in _configured_secret_values():
        if value and len(value) >= 6:
            text = text.replace(value, "***")
    return text


def _configured_secret_values() -> list[str]:
    from pydantic import SecretStr

    from servers.core.settings import get_settings

    try:
        settings = get_settings()
    except Exception:  # settings themselves invalid: nothing configured to redact
        return []
    values = []
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if isinstance(value, SecretStr):
            values.append(value.get_secret_value())
    return values


def mask_unexpected(exc: Exception, where: str) -> ValorError:
    """The error a client may see for an unexpected exception: a ``[store]`` error when SQLite
    says what is wrong with the store, else ``[internal]`` with a correlation id. Either way one
    log line describes it without its message (``describe_exception``)."""
    correlation_id = uuid.uuid4().hex[:12]
    log.error("unexpected error in %s [%s]: %s", where, correlation_id, describe_exception(exc))
    if isinstance(exc, sqlite3.Error):
        problem = store_error(exc)
        if problem is not None:
            return problem
    return ValorError(
        Category.INTERNAL,
        f"Valor hit an unexpected error (correlation id {correlation_id}); "
        "the details are in the server log.",
    )


# -- describing an exception without its text -------------------------------------------------
_REPO_ROOT = str(Path(__file__).resolve().parents[2]) + os.sep


def describe_exception(exc: BaseException) -> str:
    """What a log line may say about an exception: its type, where it was raised, and what
    cannot hold private text (an errno or SQLite code); any other message only by its size.

    An exception's message may quote what it was working on (a whole context block, a message,
    a prompt), so it is never logged as such; the correlation id ties the line to the caller."""
    text = f"{type(exc).__module__}.{type(exc).__qualname__}".removeprefix("builtins.")
    text += _raised_at(exc)
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorname", None)
        return f"{text} ({code})" if code else text
    if isinstance(exc, OSError) and exc.errno is not None:
        name = errno.errorcode.get(exc.errno, str(exc.errno))
        return f"{text} ({name}: {exc.strerror})"
    message = str(exc)
    return f"{text} (message of {len(message)} characters withheld)" if message else text


def _raised_at(exc: BaseException) -> str:
    """`` at file:line`` of the innermost frame, and of the innermost frame in Valor's own code
    when that is a different one (a library raised on Valor's behalf)."""
    frames = []
    trace = exc.__traceback__
    while trace is not None:
        frames.append((trace.tb_frame.f_code, trace.tb_lineno))
        trace = trace.tb_next
    if not frames:
        return ""

    def place(code: Any, line: int) -> str:
        path = code.co_filename
        shown = path.removeprefix(_REPO_ROOT) if path.startswith(_REPO_ROOT) else Path(path).name
        return f"{shown}:{line} in {code.co_name}"

    innermost = place(*frames[-1])
    ours = [
        frame
        for frame in frames
        if frame[0].co_filename.startswith(_REPO_ROOT) and "/.venv/" not in frame[0].co_filename
    ]
    if ours and ours[-1] is not frames[-1]:
        return f" at {innermost} (from {place(*ours[-1])})"
    return f" at {innermost}"


# -- the store's failures, with what to do about each --------------------------------------------
_STORE_PROBLEMS = {
    "SQLITE_CORRUPT": "corrupt",
    "SQLITE_NOTADB": "corrupt",
    "SQLITE_READONLY": "read-only",
    "SQLITE_PERM": "read-only",
    "SQLITE_CANTOPEN": "unopenable",
    "SQLITE_FULL": "full",
    "SQLITE_IOERR": "io",
    "SQLITE_BUSY": "locked",
    "SQLITE_LOCKED": "locked",
}


def store_error(
    exc: sqlite3.Error, path: str | os.PathLike[str] | None = None
) -> ValorError | None:
    """A ``[store]`` error saying what is wrong with the store and what to do, or None when the
    SQLite error is not about the store itself (a bad statement is Valor's own bug)."""
    code = getattr(exc, "sqlite_errorname", "") or ""
    primary = "_".join(code.split("_")[:2])  # SQLITE_IOERR_WRITE -> SQLITE_IOERR
    problem = _STORE_PROBLEMS.get(primary)
    if problem is None:
        return None
    folder = Path(path).parent if path else _data_dir()
    if problem == "unopenable" and folder is not None and not os.access(folder, os.W_OK):
        problem = "read-only"  # SQLite could not create its -wal/-shm beside the file
    where = f"The store {path}" if path else "Valor's store (in DATA_DIR)"
    message = {
        "corrupt": f"{where} is corrupt or not a SQLite database; stop Valor and restore it from "
        "a backup (or move it aside to start with an empty store).",
        "read-only": f"{where} is read-only; check the permissions of the data directory and "
        "its files, and whether the disk is mounted read-only.",
        "unopenable": f"{where} cannot be opened; check that the data directory exists, its "
        "permissions, and the disk.",
        "full": f"{where} cannot grow: the disk is full. Free space on the disk holding the "
        "data directory, then try again.",
        "io": f"{where} hit a disk I/O error; check the disk (dmesg, free space) and try again.",
        "locked": f"{where} is locked: another process holds a write lock on it (a stuck "
        "Valor process or a tool holding it open). Try again; if it persists, find and stop "
        "that process.",
    }[problem]
    return ValorError(Category.STORE, message)


def _data_dir() -> Path | None:
    from servers.core.settings import get_settings

    try:
        return get_settings().data_dir
    except Exception:  # settings themselves invalid: no folder to look at
        return None
