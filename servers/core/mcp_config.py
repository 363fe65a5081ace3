"""Runtime MCP configs for Claude Code runs that use the servers hosted over HTTP.

Each entry is ``{"type": "http", "url": ..., "headers": {"Authorization": "Bearer <token>"}}``;
the token is minted per run and fixes the chat the run serves. The file holds a credential, so it
is written owner-only into a private directory and deleted when the run ends.

``HostedTools`` is the one way to give a run those servers (the bridge and the promise workers
both use it); ``endpoint`` is the URL layout ``servers.hosting`` serves.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from servers.core.trust import mint_scope_token

if TYPE_CHECKING:
    from servers.core.claude_command import ClaudeRun

MCP_PATH = "/mcp"  # each hosted server's endpoint, under its /<server-name> mount


def endpoint(base_url: str, server_name: str) -> str:
    """The streamable-HTTP URL of one server hosted at ``base_url``."""
    return f"{base_url.rstrip('/')}/{server_name}{MCP_PATH}"


def http_mcp_config(endpoints: Mapping[str, str], token: str) -> dict:
    """``endpoints`` maps server name to its streamable-HTTP URL."""
    headers = {"Authorization": f"Bearer {token}"}
    return {
        "mcpServers": {
            name: {"type": "http", "url": url, "headers": dict(headers)}
            for name, url in endpoints.items()
        }
    }


def allowed_tool_patterns(server_names: list[str] | tuple[str, ...]) -> list[str]:
    """``--allowedTools`` entries granting every tool of each server (denied in -p otherwise)."""
    return [f"mcp__{name}" for name in server_names]


@contextmanager
def private_run_file(
    text: str, directory: Path | None = None, *, prefix: str, suffix: str
) -> Iterator[Path]:
    """Write ``text`` to an owner-only temporary file for the duration of the block."""
    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=directory)
    path = Path(name)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        yield path
    finally:
        path.unlink(missing_ok=True)


def runtime_mcp_config(config: dict, directory: Path | None = None) -> AbstractContextManager[Path]:
    """Write ``config`` to an owner-only temporary file for the duration of the block."""
    return private_run_file(json.dumps(config), directory, prefix="mcp-", suffix=".json")


def use_servers(run: ClaudeRun, config_path: Path, server_names: Sequence[str]) -> None:
    """Point ``run`` at an MCP config and allow every tool of its servers (ahead of the rest)."""
    run.mcp_config = config_path
    run.expected_servers = list(server_names)
    run.allowed_tools = [*allowed_tool_patterns(list(server_names)), *run.allowed_tools]


@dataclass(frozen=True)
class HostedTools:
    """Servers hosted over HTTP at ``base_url`` whose requests need tokens signed by ``secret``."""

    base_url: str
    secret: bytes
    servers: tuple[str, ...]

    def without(self, names: Collection[str]) -> HostedTools:
        """The same host offering all but ``names``."""
        return replace(self, servers=tuple(name for name in self.servers if name not in names))

    def config(self, chat_id: int | None, ttl_seconds: float) -> dict:
        """A config naming every server, with a fresh token scoped to ``chat_id``."""
        token = mint_scope_token(self.secret, chat_id, ttl_seconds=ttl_seconds)
        return http_mcp_config(
            {name: endpoint(self.base_url, name) for name in self.servers}, token
        )

    @contextmanager
    def for_run(
        self, run: ClaudeRun, chat_id: int | None, ttl_seconds: float, run_dir: Path | None
    ) -> Iterator[Path]:
        """Give ``run`` these servers for the block: the config (with its token) is written
        owner-only into ``run_dir`` and deleted at the end."""
        with runtime_mcp_config(self.config(chat_id, ttl_seconds), run_dir) as path:
            use_servers(run, path, self.servers)
            yield path
