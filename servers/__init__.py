"""Valor's MCP servers. Each module holds one FastMCP server named ``mcp``.

``SERVERS`` maps the name used in ``.mcp.json`` (and in ``mcp__<server>__<tool>``) to its module.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastmcp import FastMCP

SERVERS: dict[str, str] = {
    "telegram-tools": "servers.telegram",
    "social-tools": "servers.social",
    "notion-tools": "servers.notion",
    "daydream-tools": "servers.daydream",
    "promise-tools": "servers.promises",
    "monitoring-tools": "servers.monitoring",
    "context-tools": "servers.context",
    "development-tools": "servers.development",
    "approval-tools": "servers.approvals",
}


def load_server(name: str) -> FastMCP:
    if name not in SERVERS:
        known = ", ".join(sorted(SERVERS))
        raise KeyError(f"Unknown server {name!r}; known servers: {known}")
    return importlib.import_module(SERVERS[name]).mcp


def load_all() -> dict[str, FastMCP]:
    return {name: load_server(name) for name in SERVERS}
