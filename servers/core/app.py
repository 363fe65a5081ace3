"""The one way a Valor server is made: a FastMCP instance with errors masked and logged."""

from __future__ import annotations

from typing import Any

from fastmcp import FastMCP
from fastmcp.exceptions import ToolError
from fastmcp.server.middleware import Middleware

from servers.core.errors import mask_unexpected


class MaskUnexpectedErrors(Middleware):
    """ToolErrors pass through as they are; anything else becomes an internal error with an id."""

    async def on_call_tool(self, context: Any, call_next: Any) -> Any:
        try:
            return await call_next(context)
        except ToolError:
            raise
        except Exception as exc:
            name = getattr(context.message, "name", "tool")
            raise mask_unexpected(exc, name) from None


def create_server(name: str, instructions: str) -> FastMCP:
    server = FastMCP(name, instructions=instructions, mask_error_details=True)
    server.add_middleware(MaskUnexpectedErrors())
    return server
