"""Who is calling, and which tools that caller may use; enforced by the host, not by each tool.

- The operator: every tool of every server.
- A chat run: its one chat's data (see ``servers.core.trust``) and every tool not tagged
  ``OPERATOR_TAG``.
- A named client: what its token's scopes grant ("operator" or "chat"), optionally narrowed to
  some servers by ``server:<server-name>`` scopes.

``PrincipalToolAccess`` (added by ``servers.core.app.create_server``) lists to each principal only
the tools it may use, and answers a call of any other tool exactly as it answers an unknown tool,
so a chat run cannot even learn that an operator tool exists.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from fastmcp.exceptions import NotFoundError
from fastmcp.server.middleware import Middleware
from fastmcp.server.providers.fastmcp_provider import FastMCPProviderTool

log = logging.getLogger("valor.principals")

OPERATOR_TAG = "operator"  # the FastMCP tool tag marking operator-only tools

OPERATOR_SCOPE = "operator"  # every tool
CHAT_SCOPE = "chat"  # the tools a chat may use
SERVER_SCOPE_PREFIX = "server:"  # "server:<server-name>" narrows which servers are seen
WORKER_SCOPE = "worker"  # a promise worker: no tool; claims promises and gets their run tokens


@dataclass(frozen=True)
class Principal:
    kind: str  # "operator" | "chat" | "client"
    chat_id: int | None = None  # the one chat whose data it may reach (None: not bound to a chat)
    scopes: frozenset[str] = frozenset()
    token_id: str | None = None
    name: str | None = None  # a client's name, for logs and `valor token list`

    def describe(self) -> str:
        """A short label for log lines (never the token itself)."""
        parts = [] if self.kind == "chat" and self.chat_id is not None else [self.kind]
        if self.name:
            parts.append(repr(self.name))
        if self.chat_id is not None:
            parts.append(f"chat {self.chat_id}")
        if self.token_id:
            parts.append(f"token {self.token_id}")
        return " ".join(parts)


OPERATOR = Principal("operator", scopes=frozenset({OPERATOR_SCOPE}))


def chat_principal(chat_id: int, token_id: str | None = None) -> Principal:
    """The principal of a chat's Claude Code run: that chat, the tools a chat may use."""
    return Principal("chat", chat_id=chat_id, scopes=frozenset({CHAT_SCOPE}), token_id=token_id)


def may_use(principal: Principal, server_name: str, tool_tags: Iterable[str]) -> bool:
    """Whether ``principal`` may see and call a tool of ``server_name`` tagged ``tool_tags``."""
    servers = {
        scope.removeprefix(SERVER_SCOPE_PREFIX)
        for scope in principal.scopes
        if scope.startswith(SERVER_SCOPE_PREFIX)
    }
    if servers and server_name not in servers:
        return False
    if OPERATOR_SCOPE in principal.scopes:
        return True
    return CHAT_SCOPE in principal.scopes and OPERATOR_TAG not in set(tool_tags)


class PrincipalToolAccess(Middleware):
    """tools/list shows the current principal only the tools it may use; tools/call of any other
    tool fails as an unknown tool does (FastMCP's own ``NotFoundError``)."""

    def __init__(self, server_name: str):
        self.server_name = server_name

    async def on_list_tools(self, context: Any, call_next: Any) -> Sequence[Any]:
        tools = await call_next(context)
        principal = _current_principal()
        return [tool for tool in tools if self._allows(principal, tool)]

    async def on_call_tool(self, context: Any, call_next: Any) -> Any:
        name = context.message.name
        principal = _current_principal()
        server = getattr(context.fastmcp_context, "fastmcp", None)
        # Only tools found by their listed name are callable through this check; FastMCP's other
        # addressing (hashed names of app-callable tools, unused by Valor) is refused like any
        # unknown name rather than checked a second way.
        tool = await server.get_tool(name) if server is not None else None
        if tool is None or not self._allows(principal, tool):
            if tool is not None:
                log.info("refused %s on %s to %s", name, self.server_name, principal.describe())
            raise NotFoundError(f"Unknown tool: {name!r}")  # FastMCP's words for an unknown tool
        return await call_next(context)

    def _allows(self, principal: Principal, tool: Any) -> bool:
        # A tool of a server mounted into this one (the one-process bundle) is judged by the
        # server that defines it, so "server:social-tools" keeps its meaning inside the bundle.
        defining = getattr(tool, "_server", None) if isinstance(tool, FastMCPProviderTool) else None
        server_name = getattr(defining, "name", None) or self.server_name
        return may_use(principal, server_name, tool.tags)


def _current_principal() -> Principal:
    # Imported here: servers.core.trust builds principals from this module.
    from servers.core import trust

    return trust.current_principal()
