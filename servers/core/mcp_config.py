"""Runtime MCP configs for Claude Code runs that use the servers hosted over HTTP.

Each entry is ``{"type": "http", "url": ..., "headers": {"Authorization": "Bearer <token>"}}``;
the token is minted per run and fixes the chat the run serves. The file holds a credential, so it
is written owner-only into a private directory and deleted when the run ends.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path


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
