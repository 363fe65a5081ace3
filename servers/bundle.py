"""Every Valor server in one FastMCP app: one stdio process for all tools.

Each server is mounted without a namespace, so its tools keep the names the persona and the docs
use (they are unique across servers: tests/test_client_config.py checks it). A mounted server's own
middleware still runs for its listings and calls, and the bundle is made by ``create_server``
like any server, so errors are masked at both levels.

    python -m servers.bundle [--only NAME ...] [--directory DIR]

``--directory`` is the process's working directory (client configs pass the repository, since
MCP clients start servers in their own working directory). ``.env`` does not depend on it: every
entry point reads ``VALOR_ENV_FILE``, else the repository's ``.env`` (``servers.core.env_file``).

Client configs and ``valor serve --all`` start this module behind ``servers.stdio_front``, which
answers the listings from a cache while this process imports FastMCP; run directly it is the
escape hatch (``valor mcp-config --direct``, ``VALOR_STDIO_FRONT=off``).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence

from fastmcp import FastMCP

from servers import SERVERS, load_server
from servers.core.app import create_server
from servers.core.settings import exit_on_bad_settings

BUNDLE_NAME = "valor-tools"  # ends in -tools: the hooks' matcher `mcp__.*-tools__.*` sees it

INSTRUCTIONS = (
    "Valor's tools in one server: Telegram conversation history, current information and images, "
    "saved links, Notion projects, daydreams, promises (long work that reports back), health "
    "and cleanup, context optimization, and workspace screenshots and bug reports."
)


def bundle(servers: Mapping[str, FastMCP] | None = None, name: str = BUNDLE_NAME) -> FastMCP:
    """One FastMCP app serving every tool of ``servers`` (default: every Valor server)."""
    if servers is None:
        servers = select(None)
    combined = create_server(name, instructions=INSTRUCTIONS)
    for server in servers.values():
        combined.mount(server)
    return combined


def select(names: Sequence[str] | None) -> dict[str, FastMCP]:
    """The named servers (all when ``names`` is empty); KeyError names an unknown one."""
    return {name: load_server(name) for name in (names or SERVERS)}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m servers.bundle", description=__doc__)
    parser.add_argument(
        "--only", action="append", metavar="NAME", help="serve only this server (repeatable)"
    )
    parser.add_argument("--directory", help="working directory of the process")
    args = parser.parse_args(argv)
    if args.directory:
        os.chdir(args.directory)
    exit_on_bad_settings()  # before importing every server: exit 2, one line per problem
    try:
        servers = select(args.only)
    except KeyError as exc:
        parser.error(str(exc.args[0]))
    bundle(servers).run(transport="stdio", show_banner=False)


if __name__ == "__main__":
    main()
