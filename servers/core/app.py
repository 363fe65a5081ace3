"""The one way a Valor server is made: a FastMCP instance with errors masked and logged."""

from __future__ import annotations

import logging
from typing import Any

from fastmcp import FastMCP
from fastmcp.exceptions import NotFoundError, ToolError, ValidationError
from fastmcp.server.middleware import Middleware

from servers.core.errors import input_error, mask_unexpected, redact
from servers.core.principals import PrincipalToolAccess


class MaskUnexpectedErrors(Middleware):
    """ValorErrors pass through as they are; anything else becomes an internal error with an id.

    FastMCP itself turns an unexpected exception into a bare ToolError ("Error calling tool x")
    chained to the original; that chain is how the original is recognised here.
    """

    async def on_call_tool(self, context: Any, call_next: Any) -> Any:
        name = getattr(context.message, "name", "tool")
        try:
            return await call_next(context)
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


class DropUnmaskedTracebacks(logging.Filter):
    """FastMCP logs a tool's unexpected exception with its traceback, unredacted; Valor logs it
    itself (redacted, with a correlation id), so FastMCP's copy loses the traceback and text."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info:
            record.exc_info = None
            record.exc_text = None
        record.msg = redact(str(record.msg))
        return True


def create_server(name: str, instructions: str) -> FastMCP:
    """A Valor server: errors masked and logged, and each principal shown and allowed only the
    tools it may use (``servers.core.principals``)."""
    fastmcp_logger = logging.getLogger("fastmcp.server.server")
    if not any(isinstance(f, DropUnmaskedTracebacks) for f in fastmcp_logger.filters):
        fastmcp_logger.addFilter(DropUnmaskedTracebacks())
    server = FastMCP(name, instructions=instructions, mask_error_details=True)
    server.add_middleware(MaskUnexpectedErrors())
    # Inside the masking: a refused call raises the very error an unknown tool raises, and is
    # answered through the same path.
    server.add_middleware(PrincipalToolAccess(name))
    return server
