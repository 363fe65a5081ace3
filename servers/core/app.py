"""The one way a Valor server is made: a FastMCP instance with errors masked and logged.

Every tool call's arguments are checked before the tool sees them (``check_arguments``): numbers
must fit SQLite's 64-bit integers, text may hold no NUL and no lone surrogate, and the text of one
call is capped (``VALOR_TOOL_TEXT_MAX_CHARS``, or a tool's own setting named with
``set_text_limit``). Each is an ``[input]`` error naming the argument, never ``[internal]``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import Any

from fastmcp import FastMCP
from fastmcp.exceptions import NotFoundError, ToolError, ValidationError
from fastmcp.server.middleware import Middleware

from servers.core.errors import ValorError, input_error, mask_unexpected, redact
from servers.core.principals import PrincipalToolAccess
from servers.core.version import valor_version

# New files and folders of every Valor process are owner-only (the data directory holds every
# chat's messages and the scope secret); each entry point sets it, servers here at import.
PRIVATE_UMASK = 0o077

# SQLite stores signed 64-bit integers; a larger id cannot name anything stored.
INTEGER_LIMIT = 2**63

# Tools whose text limit is a setting of their own (tool name -> Settings field); tool names are
# unique across Valor's servers, and the bundle checks a mounted server's tool by the same rule.
_TEXT_LIMIT_SETTINGS: dict[str, str] = {}
_GENERAL_TEXT_LIMIT = "tool_text_max_chars"


# How Claude Code loads a tool, read from each tool's ``_meta`` in the listing (the pinned CLI,
# 2.1.332): by default every MCP tool is deferred behind its ToolSearch tool (the model sees only
# the name, so a first use costs one more model request); ``anthropic/alwaysLoad`` puts the whole
# definition into every request; ``anthropic/searchHint`` is what ToolSearch matches a deferred
# tool by; ``anthropic/maxResultSizeChars`` is the largest result kept in the conversation (above
# it Claude Code saves the result to a file; default 100,000, at most 500,000). Set here, the
# policy reaches every client: the hosted HTTP servers, the stdio bundle and per-server entries.
ALWAYS_LOAD_META = "anthropic/alwaysLoad"
SEARCH_HINT_META = "anthropic/searchHint"
MAX_RESULT_META = "anthropic/maxResultSizeChars"


def always_loaded(max_result_chars: int | None = None) -> dict[str, Any]:
    """``meta=`` of a tool a chat uses in most conversations: its definition is in every request,
    so calling it takes no ToolSearch request first (its cost: the definition's tokens)."""
    meta: dict[str, Any] = {ALWAYS_LOAD_META: True}
    if max_result_chars is not None:
        meta[MAX_RESULT_META] = max_result_chars
    return meta


def deferred(search_hint: str, max_result_chars: int | None = None) -> dict[str, Any]:
    """``meta=`` of a tool used now and then: deferred behind ToolSearch, found by the words of
    ``search_hint`` (what a person would ask for, beyond the tool's name)."""
    meta: dict[str, Any] = {ALWAYS_LOAD_META: False, SEARCH_HINT_META: search_hint}
    if max_result_chars is not None:
        meta[MAX_RESULT_META] = max_result_chars
    return meta


class MaskUnexpectedErrors(Middleware):
    """ValorErrors pass through as they are; anything else becomes an internal error with an id.

    FastMCP itself turns an unexpected exception into a bare ToolError ("Error calling tool x")
    chained to the original; that chain is how the original is recognised here.
    """

    async def on_call_tool(self, context: Any, call_next: Any) -> Any:
        name = getattr(context.message, "name", "tool")
        try:
            check_arguments(name, getattr(context.message, "arguments", None) or {})
            return await call_next(context)
        except ValorError:
            raise
        except ToolError as exc:
            cause = exc.__cause__
            if isinstance(cause, Exception) and not isinstance(cause, ToolError):
                raise mask_unexpected(cause, name) from None
            raise
        except ValidationError as exc:  # the arguments did not match the tool's schema
            raise invalid_arguments(exc) from None
        except NotFoundError as exc:  # no such tool, or one this principal may not use
            raise input_error(str(exc)) from None
        except Exception as exc:
            raise mask_unexpected(exc, name) from None


def invalid_arguments(exc: ValidationError) -> Exception:
    """An [input] error naming each bad argument (pydantic's messages carry no secrets)."""
    cause = exc.__cause__
    errors = getattr(cause, "errors", None)
    if not callable(errors):
        return input_error(f"Invalid arguments: {exc}")
    problems = [
        f"{'.'.join(str(part) for part in error.get('loc', ())) or 'arguments'}: {error['msg']}"
        for error in errors(include_url=False, include_input=False)
    ]
    return input_error("Invalid arguments: " + "; ".join(problems))


def set_text_limit(tool: str, setting: str) -> None:
    """Let ``tool``'s arguments carry up to ``Settings.<setting>`` characters of text instead of
    the general ``VALOR_TOOL_TEXT_MAX_CHARS`` (for a tool that takes whole conversations)."""
    from servers.core.settings import Settings

    if setting not in Settings.model_fields:
        raise ValueError(f"no setting {setting!r}")
    _TEXT_LIMIT_SETTINGS[tool] = setting


def text_limit(tool: str) -> tuple[int, str]:
    """The most characters of text one call of ``tool`` may carry, and the variable that sets it."""
    from servers.core.settings import get_settings

    setting = _TEXT_LIMIT_SETTINGS.get(tool, _GENERAL_TEXT_LIMIT)
    return int(getattr(get_settings(), setting)), f"VALOR_{setting.upper()}"


def check_arguments(tool: str, arguments: dict[str, Any]) -> None:
    """Refuse, as ``[input]``, what no tool can use: numbers beyond SQLite's 64-bit integers,
    text with NUL characters or lone surrogates (not encodable as UTF-8), and more text in one
    call than the tool's limit. Runs over the raw arguments before any tool code."""
    limit, variable = text_limit(tool)
    total = 0
    largest, largest_size = "", 0
    for argument, value in arguments.items():
        size = 0
        for path, item in _leaves(str(argument), value):
            if isinstance(item, str):
                _check_text(path, item)
                size += len(item)
            elif (
                isinstance(item, int | float)
                and not isinstance(item, bool)
                and abs(item) >= INTEGER_LIMIT  # an infinity too; NaN compares False
            ):
                raise input_error(
                    f"Argument {path} is out of range: numbers (ids, counts) must lie "
                    "between -2^63 and 2^63-1."
                )
        total += size
        if size > largest_size:
            largest, largest_size = str(argument), size
    if total > limit:
        raise input_error(
            f"The arguments of {tool} hold {total:,} characters of text (the most is in "
            f"{largest}); the limit is {limit:,} ({variable}). Send less, or split it up."
        )


def _check_text(path: str, text: str) -> None:
    if "\x00" in text:
        raise input_error(f"Argument {path} contains a NUL character (\\x00); remove it.")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise input_error(
            f"Argument {path} contains a lone surrogate (U+{ord(text[exc.start]):04X} at "
            f"position {exc.start}), which is not valid Unicode text; send UTF-8 text."
        ) from None


def _leaves(path: str, value: Any) -> Iterator[tuple[str, Any]]:
    """Every scalar in an argument (and every key of its objects), with where it sits."""
    stack = [(path, value)]
    while stack:
        where, item = stack.pop()
        if isinstance(item, dict):
            for key, inner in item.items():
                yield f"{where} (a key)", key
                stack.append((f"{where}.{key}" if _plain_key(key) else f"{where}[…]", inner))
        elif isinstance(item, list | tuple):
            stack.extend((f"{where}[{index}]", inner) for index, inner in enumerate(item))
        else:
            yield where, item


def _plain_key(key: Any) -> bool:
    return isinstance(key, str) and len(key) <= 64 and key.isidentifier()


class DropUnmaskedTracebacks(logging.Filter):
    """FastMCP logs a tool's unexpected exception with its traceback, unredacted; Valor logs it
    itself (redacted, with a correlation id), so FastMCP's copy loses the traceback and text."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info:
            record.exc_info = None
            record.exc_text = None
        record.msg = redact(str(record.msg))
        return True


class LoggingFastMCP(FastMCP):
    """A server run on its own (``python -m servers.<name>``, ``valor serve NAME``) logs into
    ``LOG_DIR/server-<name>.log``; hosted in another process, it logs where that process does
    (``servers.core.logs``: the first entry point decides)."""

    async def run_async(self, *args: Any, **kwargs: Any) -> None:
        from servers.core.logs import setup_logging
        from servers.core.settings import exit_on_bad_settings

        exit_on_bad_settings()  # refuse to start (exit 2, one line per problem), not [internal]
        setup_logging(f"server-{self.name}")
        await super().run_async(*args, **kwargs)


def create_server(name: str, instructions: str) -> FastMCP:
    """A Valor server: errors masked and logged, and each principal shown and allowed only the
    tools it may use (``servers.core.principals``)."""
    os.umask(PRIVATE_UMASK)
    fastmcp_logger = logging.getLogger("fastmcp.server.server")
    if not any(isinstance(f, DropUnmaskedTracebacks) for f in fastmcp_logger.filters):
        fastmcp_logger.addFilter(DropUnmaskedTracebacks())
    server = LoggingFastMCP(
        name, instructions=instructions, version=valor_version(), mask_error_details=True
    )
    server.add_middleware(MaskUnexpectedErrors())
    # Inside the masking: a refused call raises the very error an unknown tool raises, and is
    # answered through the same path.
    server.add_middleware(PrincipalToolAccess(name))
    return server
