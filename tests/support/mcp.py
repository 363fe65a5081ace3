"""Tool calls through FastMCP's in-memory client, the way every server test makes them."""

from __future__ import annotations

from typing import Any

from fastmcp import Client, FastMCP
from fastmcp.client.client import CallToolResult

# A raw JSON-RPC initialize, for tests that speak to a server below any MCP client (HTTP status
# codes and headers, a stdio process's first reply).
INITIALIZE_REQUEST: dict[str, Any] = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "test", "version": "0"},
    },
}


async def call(
    server: FastMCP, tool: str, arguments: dict[str, Any] | None = None, **client_options: Any
) -> CallToolResult:
    """One call of ``tool`` on ``server``; a tool error comes back as a result with
    ``is_error`` set, not as an exception. ``client_options`` go to ``Client`` (e.g.
    ``progress_handler``)."""
    async with Client(server, **client_options) as client:
        return await client.call_tool(tool, arguments or {}, raise_on_error=False)


def texts(result: Any) -> str:
    """The text blocks of a tool result, joined (where error messages are)."""
    return " ".join(getattr(block, "text", "") for block in result.content)
