"""Every .mcp.json entry starts from the repo root and answers the official mcp stdio client."""

from __future__ import annotations

import json

import pytest

from servers import SERVERS, load_server
from servers.core.settings import REPO_ROOT

ENTRIES = json.loads((REPO_ROOT / ".mcp.json").read_text())["mcpServers"]


@pytest.mark.parametrize("name", sorted(ENTRIES))
async def test_entry_answers_initialize_and_tools_list(name, stdio_client_for):
    expected = {tool.name for tool in await load_server(name).list_tools()}
    async with stdio_client_for(name) as session:
        listing = await session.list_tools()
    assert expected, f"{name} has no tools"
    assert {tool.name for tool in listing.tools} == expected
    assert all(tool.description for tool in listing.tools)


def test_entries_use_the_repo_venv_and_cover_every_server():
    assert set(ENTRIES) == set(SERVERS)
    for name, entry in ENTRIES.items():
        assert entry["command"] == ".venv/bin/python", name
        assert entry["args"] == ["-m", SERVERS[name]], name
