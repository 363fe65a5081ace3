"""HostedTools: the one way a Claude Code run gets the servers hosted over HTTP."""

from __future__ import annotations

import json
import stat

from servers.core.claude_command import ClaudeRun
from servers.core.mcp_config import HostedTools, endpoint, use_servers
from servers.core.trust import verify_token

SECRET = b"s" * 32
TOOLS = HostedTools("http://127.0.0.1:8765/", SECRET, ("telegram-tools", "promise-tools"))


def test_a_run_gets_every_server_with_a_token_for_its_chat(tmp_path):
    run = ClaudeRun(prompt="hi", chat_id=42, allowed_tools=["Read"])
    with TOOLS.for_run(run, 42, ttl_seconds=600, run_dir=tmp_path / "run") as path:
        assert run.mcp_config == path and path.parent == tmp_path / "run"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600  # it holds a credential
        servers = json.loads(path.read_text())["mcpServers"]
        assert list(servers) == ["telegram-tools", "promise-tools"]
        entry = servers["telegram-tools"]
        assert entry["url"] == "http://127.0.0.1:8765/telegram-tools/mcp"
        token = entry["headers"]["Authorization"].removeprefix("Bearer ")
        assert verify_token(SECRET, token).chat_id == 42
        assert run.expected_servers == ["telegram-tools", "promise-tools"]
        # The servers' tools come first, then what the run allowed already.
        assert run.allowed_tools == ["mcp__telegram-tools", "mcp__promise-tools", "Read"]
    assert not path.exists()


def test_without_leaves_the_original_alone(tmp_path):
    fewer = TOOLS.without({"promise-tools"})
    assert fewer.servers == ("telegram-tools",) and fewer.base_url == TOOLS.base_url
    assert TOOLS.servers == ("telegram-tools", "promise-tools")
    run = ClaudeRun(prompt="hi")
    with fewer.for_run(run, None, ttl_seconds=60, run_dir=tmp_path):
        assert run.allowed_tools == ["mcp__telegram-tools"]


def test_a_stdio_config_is_used_the_same_way(tmp_path):
    run = ClaudeRun(prompt="hi", allowed_tools=["Read"])
    use_servers(run, tmp_path / ".mcp.json", ["context-tools"])
    assert run.mcp_config == tmp_path / ".mcp.json"
    assert run.expected_servers == ["context-tools"]
    assert run.allowed_tools == ["mcp__context-tools", "Read"]


def test_endpoint_layout():
    assert endpoint("http://h:1/", "x-tools") == endpoint("http://h:1", "x-tools")
    assert endpoint("http://h:1", "x-tools") == "http://h:1/x-tools/mcp"
