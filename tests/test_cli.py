"""The `valor` command line, run as a person would run it."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time

from servers.core import history
from servers.core.history import Message
from servers.core.settings import REPO_ROOT
from tests.support import wait_until


def valor(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "scheduler.cli", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def test_help_reads_well():
    result = valor("--help")
    assert result.returncode == 0
    for command in ("serve", "tools", "call", "doctor", "daemon"):
        assert command in result.stdout


def test_call_prints_the_structured_result(store):
    history.record_message(
        store, Message(42, 1, "the deploy key rotates monthly", "ann", 1, "in", time.time())
    )
    result = valor(
        "call",
        "telegram-tools.search_conversation_history",
        "--args",
        json.dumps({"query": "deploy", "chat_id": 42}),
    )
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["hits"][0]["message_id"] == 1


def test_call_reports_tool_errors_and_bad_arguments():
    tool_error = valor("call", "search_conversation_history", "--args", '{"query": "x"}')
    assert tool_error.returncode == 1
    assert "pass chat_id" in tool_error.stderr
    bad_json = valor("call", "search_conversation_history", "--args", "{not json")
    assert bad_json.returncode != 0 and "not valid JSON" in bad_json.stderr
    unknown = valor("call", "no_such_tool")
    assert unknown.returncode == 2 and "valor tools" in unknown.stderr


def test_doctor_names_what_is_missing():
    result = valor("doctor", env={"PERPLEXITY_API_KEY": "pplx-test-key-123456"})
    assert result.returncode == 0, result.stdout
    search = next(line for line in result.stdout.splitlines() if "(Perplexity)" in line)
    bridge = next(line for line in result.stdout.splitlines() if "Telegram bridge" in line)
    assert search.startswith("ok")
    assert bridge.startswith("off") and "TELEGRAM_API_ID" in bridge
    assert "pplx-test-key" not in result.stdout


def test_version_is_the_package_version():
    from importlib.metadata import version

    result = valor("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"valor {version('valor')}"


async def server_version(*argv: str) -> str:
    """serverInfo.version from the official mcp client's initialize over stdio."""
    from mcp import ClientSession
    from mcp.client.stdio import StdioServerParameters, stdio_client

    params = StdioServerParameters(
        command=sys.executable, args=list(argv), env=dict(os.environ), cwd=str(REPO_ROOT)
    )
    async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
        return (await session.initialize()).server_info.version


async def test_every_server_reports_valors_version():
    from servers.core.version import valor_version

    expected = valor_version()
    assert expected != "4.2.3"  # FastMCP's own version, which servers used to report
    assert await server_version("-m", "servers.telegram") == expected
    assert await server_version("-m", "servers.bundle") == expected
    # the stdio front: once through the bundle, then from its cache
    for _ in range(2):
        assert await server_version("-m", "servers.stdio_front") == expected


def test_the_version_falls_back_to_pyproject(tmp_path):
    from servers.core.version import UNKNOWN, pyproject_version

    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\nname = "valor"\nversion = "9.8.7"\n')
    assert pyproject_version(pyproject) == "9.8.7"
    assert pyproject_version(tmp_path / "absent.toml") == UNKNOWN


def test_help_renders_flags_as_flags():
    result = valor("serve", "--help")
    assert result.returncode == 0
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if line.strip()}
    assert "<bool>" not in result.stdout
    assert lines["--all"].split()[1] == "Every" and "<int>" in lines["--port"]


def test_tools_shows_whole_descriptions_json_and_one_tools_schema():
    from servers.social import mcp

    listing = valor("tools")
    assert listing.returncode == 0
    described = asyncio.run(mcp.get_tool("analyze_shared_image")).description
    last_words = " ".join(described.split()[-3:])
    assert last_words in " ".join(listing.stdout.split())  # the whole text, not its first line
    rows = json.loads(valor("tools", "--json").stdout)
    assert {"server", "name", "description", "input_schema"} <= rows[0].keys()
    assert len({(r["server"], r["name"]) for r in rows}) == len(rows) >= 20
    one = valor("tools", "social-tools.create_image")
    assert one.returncode == 0
    schema = json.loads(one.stdout.split("Input schema:", 1)[1])
    assert "prompt" in schema["properties"] and "prompt" in schema["required"]
    as_json = json.loads(valor("tools", "mcp__social-tools__create_image", "--json").stdout)
    assert as_json["input_schema"] == schema
    missing = valor("tools", "no_such_tool")
    assert missing.returncode == 2 and "valor tools" in missing.stderr


def test_a_tool_error_is_one_clean_line():
    result = valor("call", "search_conversation_history", "--args", '{"query": "x"}')
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: [input] No chat is fixed for this session (interactive use): pass chat_id to "
        "say which chat to read."
    ]


def test_serve_http_on_a_busy_port_fails_in_one_line_before_any_url():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = valor("serve", "--all", "--http", "--port", str(port))
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"Cannot listen on 127.0.0.1:{port}") and "--port" in line
    assert "http://" not in result.stderr


def test_serve_http_prints_the_bound_port_and_answers():
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "scheduler.cli",
            "serve",
            "monitoring-tools",
            "--http",
            "--port",
            "0",
        ],
        cwd=REPO_ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        first = process.stderr.readline()  # "monitoring-tools: http://127.0.0.1:<port>/..."
        url = first.split(": ", 1)[1].strip()
        assert ":0/" not in url
        import httpx

        answer = wait_until(lambda: _status(httpx, url), timeout=60)
        assert answer == 401  # the host answers, and wants a token
    finally:
        process.terminate()
        process.wait(timeout=30)


def _status(httpx, url: str) -> int | None:
    try:
        return httpx.post(url, json={}).status_code
    except httpx.HTTPError:
        return None


def test_serve_rejects_unknown_server():
    result = valor("serve", "no-such-tools")
    assert result.returncode != 0
    assert "known servers" in result.stderr
