"""Categorized, person-readable errors for tools.

A tool raises ``ValorError`` (a FastMCP ``ToolError``) whose message says what happened and what
to do. Unexpected exceptions are masked (see ``servers.core.app``): logged with a correlation id,
never shown.
"""

from __future__ import annotations

import logging
import re
import uuid
from enum import StrEnum

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
    re.compile(r"\d{6,}:[A-Za-z0-9_\-]{30,}"),  # Telegram bot token
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
    """Log an unexpected exception with a correlation id; return the error a client may see."""
    correlation_id = uuid.uuid4().hex[:12]
    log.error("unexpected error in %s [%s]: %s", where, correlation_id, redact(repr(exc)))
    return ValorError(
        Category.INTERNAL,
        f"Valor hit an unexpected error (correlation id {correlation_id}); "
        "the details are in the server log.",
    )
