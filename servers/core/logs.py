"""Where a Valor process logs: one rotating file per process kind, and a quiet console.

``setup_logging(kind)`` is called once by each entry point (``valor daemon``, the bridge,
``valor serve``, a stdio server's start, the CLI). The first call in a process wins, so a server
module imported by the daemon logs into ``daemon.log``, and a stdio server started on its own
into ``server-<name>.log``.

- The file: ``LOG_DIR/<kind>.log``, owner-only (0600, also after each rotation), rotated at
  ``VALOR_LOG_MAX_BYTES`` keeping ``VALOR_LOG_BACKUP_COUNT`` old files, at ``VALOR_LOG_LEVEL``.
  A line carries time, pid, level and logger, so the correlation id of an ``[internal]`` error
  (``servers.core.errors.mask_unexpected``) finds its line with ``grep``.
- The console (stderr): warnings and up by default; ``-v`` info, ``-vv`` debug.
- Every line, file or console, passes through ``errors.redact``: the same secret shapes and
  configured secret values that never reach an error text never reach a log either.
- Libraries that log per request (the MCP session manager's "StreamableHTTP session manager
  started", httpx, uvicorn, apscheduler, huey) stay at WARNING unless ``-vv``.

A log directory that cannot be written (a sandboxed run masks it) leaves the console only.
"""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from servers.core.errors import redact

if TYPE_CHECKING:
    from servers.core.settings import Settings

LINE_FORMAT = "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"
CONSOLE_LEVELS = (logging.WARNING, logging.INFO, logging.DEBUG)  # by -v count
# Per-request or per-run INFO lines from libraries (16 session-manager lines per `valor chat`).
NOISY_LOGGERS = (
    "mcp",
    "fastmcp",
    "httpx",
    "httpcore",
    "uvicorn",
    "uvicorn.access",
    "uvicorn.error",
    "apscheduler",
    "huey",
    "telethon",
    "openai",
    "anthropic",
    "notion_client",
)
# Library loggers whose DEBUG lines echo every tool call's arguments (chat text, paths): kept at
# INFO even when Valor logs at DEBUG, so a log holds where and what failed, never what was said.
ARGUMENT_ECHOING_LOGGERS = ("fastmcp.server.mixins.mcp_operations",)
_KIND = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")

_configured: str | None = None  # the kind this process logs as, once set up


class RedactingFormatter(logging.Formatter):
    """The formatted line (message, arguments and any traceback) without secrets."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """A rotating file created 0600 (and re-created 0600 after each rotation), never opened
    through a symlink planted in its place."""

    def _open(self):  # type: ignore[override]
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
        descriptor = os.open(self.baseFilename, flags, 0o600)
        with contextlib.suppress(OSError):
            os.fchmod(descriptor, 0o600)  # an older, looser file is tightened
        return open(descriptor, self.mode, encoding=self.encoding, errors=self.errors)


def log_file(settings: Settings, kind: str) -> Path:
    """``LOG_DIR/<kind>.log``: where a process of this kind writes."""
    if not _KIND.match(kind):
        raise ValueError(f"not a log kind: {kind!r}")
    return settings.log_path / f"{kind}.log"


def configured_kind() -> str | None:
    return _configured


def setup_logging(
    kind: str,
    *,
    verbosity: int = 0,
    settings: Settings | None = None,
    console: bool = True,
    force: bool = False,
) -> Path | None:
    """Log this process as ``kind``; returns the log file, or None when it cannot be written.

    A second call is a no-op unless ``force`` (the first entry point decides the kind)."""
    global _configured
    if _configured is not None and not force:
        return None
    if settings is None:
        from servers.core.settings import get_settings

        settings = get_settings()
    file_level = logging.getLevelName(settings.log_level)
    if not isinstance(file_level, int):
        file_level = logging.INFO
    console_level = CONSOLE_LEVELS[max(0, min(verbosity, len(CONSOLE_LEVELS) - 1))]
    reset_logging()
    root = logging.getLogger()
    formatter = RedactingFormatter(LINE_FORMAT)
    path: Path | None = log_file(settings, kind)
    try:
        from servers.core.safe_files import ensure_private_dir

        ensure_private_dir(settings.log_path)
        handler: logging.Handler = PrivateRotatingFileHandler(
            path,
            maxBytes=settings.log_max_bytes,
            backupCount=settings.log_backup_count,
            encoding="utf-8",
        )
        handler.setLevel(file_level)
        handler.setFormatter(formatter)
        handler._valor = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    except OSError:
        path = None
    if console:
        stream = logging.StreamHandler(sys.stderr)
        stream.setLevel(console_level)
        stream.setFormatter(formatter)
        stream._valor = True  # type: ignore[attr-defined]
        root.addHandler(stream)
    root.setLevel(min(file_level if path else logging.CRITICAL, console_level))
    _route_library_loggers()
    quiet = verbosity < 2 and file_level > logging.DEBUG
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING if quiet else logging.NOTSET)
    _configured = kind
    if path is None:
        logging.getLogger("valor.logs").warning(
            "cannot write logs to %s; logging to stderr only", settings.log_path
        )
    return path


def adopt_library_loggers() -> None:
    """FastMCP (at import) and uvicorn (when a server starts, unless ``log_config=None``) give
    their loggers console handlers of their own and stop them propagating: those lines would
    miss the file and the redaction. Route them through Valor's handlers instead."""
    if _configured is not None:
        _route_library_loggers()


def _route_library_loggers() -> None:
    for name in ("fastmcp", "uvicorn", "uvicorn.access", "uvicorn.error"):
        library = logging.getLogger(name)
        for own in list(library.handlers):
            library.removeHandler(own)
        library.propagate = True
    for name in ARGUMENT_ECHOING_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO)


def reset_logging() -> None:
    """Remove the handlers ``setup_logging`` added (tests set logging up more than once)."""
    global _configured
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_valor", False):
            root.removeHandler(handler)
            handler.close()
    _configured = None
