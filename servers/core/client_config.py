"""Ready MCP client configs for Valor's tools (``valor mcp-config``), with absolute paths.

Three clients, one neutral shape rendered per client:

- Claude Code (``.mcp.json``): ``{"type": "stdio", "command", "args", "env"}`` or
  ``{"type": "http", "url", "headers"}``.
- Claude Desktop (``claude_desktop_config.json``): stdio only (``command``, ``args``, ``env``);
  its config file takes no URL or headers.
- Cursor (``~/.cursor/mcp.json``): ``{"command", "args", "env"}`` or ``{"url", "headers"}``.

Over stdio the default is one process for every tool: the bundle (``servers.bundle``) behind its
quick front (``python -m servers.stdio_front``), which answers the client's listings from a cache
while the bundle starts; ``direct`` runs ``python -m servers.bundle`` without the front. Per-server
entries run the same module with ``--only NAME``. Either way the command is the virtual
environment's python by absolute path and ``--directory`` is the repository (where ``.env`` is
read), so a config works from any directory. Over HTTP each server is one entry with its own
endpoint and the bearer token in an ``Authorization`` header: such a file holds a secret and is
written owner-only (0600).

The server registry lives above servers.core, so callers pass the server names in.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from servers.core.mcp_config import endpoint
from servers.core.settings import REPO_ROOT

CLIENTS = ("claude-code", "claude-desktop", "cursor")
TRANSPORTS = ("stdio", "http")
BUNDLE_SERVER = "valor-tools"  # the one-process entry; ends in -tools like every server name
BUNDLE_MODULE = "servers.bundle"
FRONT_MODULE = "servers.stdio_front"  # answers listings from a cache, then relays to the bundle


class ClientConfigError(ValueError):
    """A combination the client cannot express, or a file that may not be replaced."""


@dataclass(frozen=True)
class Checkout:
    """Where Valor is installed: the repository and the python that has Valor installed."""

    repo: Path
    python: Path

    @classmethod
    def current(cls) -> Checkout:
        # sys.executable is the venv's python when run as .venv/bin/valor; not resolved, since
        # resolving a venv's python symlink lands on the base interpreter without Valor.
        return cls(repo=REPO_ROOT.resolve(), python=Path(sys.executable).absolute())


def stdio_entry(checkout: Checkout, only: Iterable[str] = (), *, direct: bool = False) -> dict:
    """A neutral stdio entry running the bundle (of every server, or of ``only``), behind its
    front unless ``direct``."""
    args = ["-m", BUNDLE_MODULE if direct else FRONT_MODULE]
    for name in only:
        args += ["--only", name]
    args += ["--directory", str(checkout.repo)]
    return {
        "command": str(checkout.python),
        "args": args,
        "env": {"PYTHONPATH": str(checkout.repo)},
    }


def stdio_servers(
    checkout: Checkout,
    server_names: Iterable[str],
    *,
    per_server: bool,
    subset: bool = False,
    direct: bool = False,
) -> dict[str, dict]:
    """Neutral stdio entries: one bundle process, or one process per server.

    ``subset``: ``server_names`` is a choice of the user's, so the bundle serves only those.
    ``direct``: run the bundle without its caching front.
    """
    names = list(server_names)
    if per_server:
        return {name: stdio_entry(checkout, [name], direct=direct) for name in names}
    return {BUNDLE_SERVER: stdio_entry(checkout, names if subset else (), direct=direct)}


def http_servers(base_url: str, token: str, server_names: Iterable[str]) -> dict[str, dict]:
    """Neutral HTTP entries: each server's endpoint on the host at ``base_url``."""
    if not token.strip():
        raise ClientConfigError("an HTTP config needs a token (`valor token create`)")
    headers = {"Authorization": f"Bearer {token.strip()}"}
    return {
        name: {"url": endpoint(base_url, name), "headers": dict(headers)} for name in server_names
    }


def render(client: str, servers: Mapping[str, dict]) -> dict:
    """The config file's content for ``client``."""
    if client not in CLIENTS:
        raise ClientConfigError(f"unknown client {client!r}; one of {', '.join(CLIENTS)}")
    return {"mcpServers": {name: _render_entry(client, entry) for name, entry in servers.items()}}


def _render_entry(client: str, entry: dict) -> dict:
    if "url" in entry:
        if client == "claude-desktop":
            raise ClientConfigError(
                "Claude Desktop's config file takes only stdio servers (no URL or headers): "
                "use --transport stdio, or add the server as a connector in Claude Desktop"
            )
        typed = {"type": "http"} if client == "claude-code" else {}
        return {**typed, "url": entry["url"], "headers": dict(entry["headers"])}
    typed = {"type": "stdio"} if client == "claude-code" else {}
    return {**typed, "command": entry["command"], "args": list(entry["args"]), "env": entry["env"]}


def holds_secret(config: dict) -> bool:
    return any("headers" in entry for entry in config.get("mcpServers", {}).values())


def default_path(
    client: str,
    *,
    cwd: Path | None = None,
    home: Path | None = None,
    platform: str = sys.platform,
    environ: Mapping[str, str] = os.environ,
) -> Path:
    """Where ``client`` reads its config: Claude Code's project ``.mcp.json`` in ``cwd``,
    Claude Desktop's per-user file, Cursor's global ``~/.cursor/mcp.json``."""
    home = home or Path.home()
    if client == "claude-code":
        return (cwd or Path.cwd()) / ".mcp.json"
    if client == "cursor":
        return home / ".cursor" / "mcp.json"
    if client == "claude-desktop":
        if platform == "darwin":
            base = home / "Library" / "Application Support"
        elif platform.startswith("win"):
            base = Path(environ.get("APPDATA") or home / "AppData" / "Roaming")
        else:
            base = Path(environ.get("XDG_CONFIG_HOME") or home / ".config")
        return base / "Claude" / "claude_desktop_config.json"
    raise ClientConfigError(f"unknown client {client!r}; one of {', '.join(CLIENTS)}")


def to_text(config: dict) -> str:
    return json.dumps(config, indent=2, ensure_ascii=False) + "\n"


def write_config(path: Path, config: dict, *, force: bool = False) -> Path:
    """Write ``config`` to ``path`` atomically; never replaces a file unless ``force``.

    A config with a token is owner-only (0600) from the moment it exists: it is written to a
    0600 temporary file beside ``path`` and then linked (or, with ``force``, renamed) into place.
    """
    path = Path(path).absolute()
    if path.exists() and not force:
        raise ClientConfigError(f"{path} exists: pass --force to replace it, or --print")
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = 0o600 if holds_secret(config) else 0o644
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(to_text(config))
        if force:
            os.replace(temporary, path)
        else:
            try:
                os.link(temporary, path)  # fails if the file appeared meanwhile
            except FileExistsError:
                raise ClientConfigError(
                    f"{path} exists: pass --force to replace it, or --print"
                ) from None
    finally:
        Path(temporary).unlink(missing_ok=True)
    return path


def build(
    client: str,
    transport: str,
    server_names: Iterable[str],
    *,
    per_server: bool = False,
    subset: bool = False,
    direct: bool = False,
    url: str | None = None,
    token: str | None = None,
    checkout: Checkout | None = None,
) -> dict:
    """The whole config for ``client`` over ``transport`` (``url``/``token`` for HTTP)."""
    if transport == "stdio":
        if token:
            raise ClientConfigError("a token goes with --transport http only")
        servers = stdio_servers(
            checkout or Checkout.current(),
            server_names,
            per_server=per_server,
            subset=subset,
            direct=direct,
        )
    elif transport == "http":
        if not url:
            raise ClientConfigError("an HTTP config needs the host's base URL (--url)")
        servers = http_servers(url, token or "", server_names)
    else:
        raise ClientConfigError(f"unknown transport {transport!r}; one of {', '.join(TRANSPORTS)}")
    return render(client, servers)
