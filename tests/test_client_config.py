"""`valor mcp-config` and the one-process bundle: configs that work from any directory."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from scheduler.cli import app
from servers import SERVERS, load_all
from servers.bundle import BUNDLE_NAME, bundle
from servers.core import client_config
from servers.core.app import create_server
from servers.core.client_config import ClientConfigError
from servers.core.settings import REPO_ROOT
from tests.fakes import call_tool, mcp_tool
from tests.support import INITIALIZE_REQUEST, call, free_port, texts

SERVER_NAMES = list(SERVERS)
TOKEN = "v2.test-token-not-a-real-one"


def stdio_entries(config: dict) -> list[dict]:
    return list(config["mcpServers"].values())


async def every_tool_name() -> set[str]:
    return {tool.name for server in load_all().values() for tool in await server.list_tools()}


# -- the generated configs ------------------------------------------------------------------------
@pytest.mark.parametrize("client", client_config.CLIENTS)
@pytest.mark.parametrize("per_server", [False, True])
def test_stdio_configs_use_absolute_paths(client, per_server):
    config = client_config.build(client, "stdio", SERVER_NAMES, per_server=per_server)
    servers = config["mcpServers"]
    assert list(servers) == (SERVER_NAMES if per_server else [BUNDLE_NAME])
    for name, entry in servers.items():
        assert ("type" in entry) == (client == "claude-code")
        if client == "claude-code":
            assert entry["type"] == "stdio"
        command = Path(entry["command"])
        assert command.is_absolute() and os.access(command, os.X_OK), command
        args = entry["args"]
        assert args[:2] == ["-m", "servers.stdio_front"]  # the bundle behind its caching front
        directory = Path(args[args.index("--directory") + 1])
        assert directory.is_absolute() and directory == REPO_ROOT.resolve()
        assert entry["env"]["PYTHONPATH"] == str(REPO_ROOT.resolve())
        if per_server:
            assert args[args.index("--only") + 1] == name
        else:
            assert "--only" not in args


def test_direct_runs_the_bundle_without_its_front():
    config = client_config.build("claude-code", "stdio", SERVER_NAMES, direct=True)
    [entry] = stdio_entries(config)
    assert entry["args"][:2] == ["-m", "servers.bundle"]
    printed = CliRunner().invoke(app, ["mcp-config", "--print", "--direct"])
    assert printed.exit_code == 0, printed.output
    assert json.loads(printed.stdout)["mcpServers"][BUNDLE_NAME]["args"][:2] == [
        "-m",
        "servers.bundle",
    ]


@pytest.mark.parametrize("client", ["claude-code", "cursor"])
def test_http_configs_name_each_endpoint_with_the_token(client):
    config = client_config.build(
        client, "http", SERVER_NAMES, url="http://127.0.0.1:8765", token=TOKEN
    )
    servers = config["mcpServers"]
    assert list(servers) == SERVER_NAMES
    for name, entry in servers.items():
        expected = {"url": f"http://127.0.0.1:8765/{name}/mcp"}
        expected["headers"] = {"Authorization": f"Bearer {TOKEN}"}
        if client == "claude-code":
            expected["type"] = "http"
        assert entry == expected


def test_impossible_combinations_are_refused():
    with pytest.raises(ClientConfigError, match="only stdio"):
        client_config.build("claude-desktop", "http", SERVER_NAMES, url="http://h", token=TOKEN)
    with pytest.raises(ClientConfigError, match="token"):
        client_config.build("claude-code", "http", SERVER_NAMES, url="http://h", token="")
    with pytest.raises(ClientConfigError, match="http only"):
        client_config.build("claude-code", "stdio", SERVER_NAMES, token=TOKEN)
    with pytest.raises(ClientConfigError, match="unknown client"):
        client_config.build("vim", "stdio", SERVER_NAMES)


def test_default_paths_per_client(tmp_path):
    home = tmp_path / "home"
    assert client_config.default_path("claude-code", cwd=tmp_path) == tmp_path / ".mcp.json"
    assert client_config.default_path("cursor", home=home) == home / ".cursor" / "mcp.json"
    linux = client_config.default_path("claude-desktop", home=home, platform="linux", environ={})
    assert linux == home / ".config" / "Claude" / "claude_desktop_config.json"
    mac = client_config.default_path("claude-desktop", home=home, platform="darwin")
    assert mac == home / "Library" / "Application Support" / "Claude" / mac.name


# -- writing files --------------------------------------------------------------------------------
def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_config_with_a_token_is_owner_only_and_never_overwritten_silently(tmp_path):
    path = tmp_path / "client" / "mcp.json"
    config = client_config.build("cursor", "http", SERVER_NAMES, url="http://h:1", token=TOKEN)
    client_config.write_config(path, config)
    assert mode(path) == 0o600
    assert json.loads(path.read_text()) == config
    with pytest.raises(ClientConfigError, match="--force"):
        client_config.write_config(path, client_config.build("cursor", "stdio", SERVER_NAMES))
    assert json.loads(path.read_text()) == config
    path.chmod(0o644)  # replacing a readable file still leaves the token owner-only
    client_config.write_config(path, config, force=True)
    assert mode(path) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["mcp.json"]  # no temporary left behind


def test_cli_writes_prints_and_refuses_to_overwrite(tmp_path):
    runner = CliRunner()
    target = tmp_path / "out" / ".mcp.json"
    written = runner.invoke(app, ["mcp-config", "--output", str(target)])
    assert written.exit_code == 0, written.output
    assert list(json.loads(target.read_text())["mcpServers"]) == [BUNDLE_NAME]
    again = runner.invoke(app, ["mcp-config", "--output", str(target), "--per-server"])
    assert again.exit_code == 2 and "--force" in again.output
    forced = runner.invoke(app, ["mcp-config", "-o", str(target), "--per-server", "--force"])
    assert forced.exit_code == 0, forced.output
    assert list(json.loads(target.read_text())["mcpServers"]) == SERVER_NAMES

    http = tmp_path / "http.json"
    args = ["mcp-config", "--transport", "http", "--token", "-", "-o", str(http)]
    result = runner.invoke(app, [*args, "--server", "telegram-tools"], input=TOKEN + "\n")
    assert result.exit_code == 0, result.output
    assert mode(http) == 0o600
    [entry] = json.loads(http.read_text())["mcpServers"].values()
    assert entry["headers"]["Authorization"] == f"Bearer {TOKEN}"
    assert entry["url"].endswith("/telegram-tools/mcp")

    printed = runner.invoke(app, ["mcp-config", "--print", "--client", "claude-desktop"])
    assert printed.exit_code == 0
    assert "type" not in json.loads(printed.stdout)["mcpServers"][BUNDLE_NAME]
    unknown = runner.invoke(app, ["mcp-config", "--print", "--server", "nope-tools"])
    assert unknown.exit_code != 0


# -- the bundle -----------------------------------------------------------------------------------
async def test_tool_names_are_unique_so_the_bundle_keeps_them():
    names = [t.name for server in load_all().values() for t in await server.list_tools()]
    assert len(names) == len(set(names))
    listed = {tool.name for tool in await bundle().list_tools()}
    assert listed == set(names)


async def test_a_mounted_servers_own_middleware_and_masking_still_run():
    from fastmcp.server.middleware import Middleware

    seen: list[str] = []

    class Record(Middleware):
        async def on_list_tools(self, context, call_next):
            seen.append("list")
            return await call_next(context)

        async def on_call_tool(self, context, call_next):
            seen.append(f"call {context.message.name}")
            return await call_next(context)

    child = create_server("demo-tools", instructions="demo")
    child.add_middleware(Record())

    @child.tool
    def explode() -> str:
        """Fails unexpectedly, with a secret in the message."""
        raise RuntimeError("connection refused for sk-live-abcdefghijkl")

    combined = bundle({"demo-tools": child})
    assert [tool.name for tool in await combined.list_tools()] == ["explode"]
    result = await call(combined, "explode")
    assert result.is_error
    assert texts(result).startswith("[internal]")
    assert "sk-live" not in texts(result)
    assert seen == ["list", "call explode"]
    bad = await call(combined, "explode", {"unexpected": 1})
    assert bad.is_error


async def test_the_generated_stdio_config_answers_the_official_client_from_elsewhere(tmp_path):
    from mcp import ClientSession
    from mcp.client.stdio import StdioServerParameters, stdio_client

    [entry] = stdio_entries(client_config.build("claude-code", "stdio", SERVER_NAMES))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    params = StdioServerParameters(
        command=entry["command"],
        args=entry["args"],
        env={**entry["env"], "VALOR_DATA_DIR": os.environ["VALOR_DATA_DIR"]},
        cwd=str(elsewhere),
    )
    async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        listing = await session.list_tools()
        result = await session.call_tool("list_promises", {})
    assert {tool.name for tool in listing.tools} == await every_tool_name()
    assert not result.is_error, result.content
    assert result.structured_content is not None


def test_serve_all_runs_the_bundle_over_stdio(tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "scheduler.cli", "serve", "--all"],
        input=json.dumps(INITIALIZE_REQUEST) + "\n",
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    first = json.loads(completed.stdout.splitlines()[0])
    assert first["id"] == 1
    assert first["result"]["serverInfo"]["name"] == BUNDLE_NAME


# -- the real Claude Code CLI ---------------------------------------------------------------------
def claude_elsewhere(
    claude_bin: Path, env: dict[str, str], tmp_path: Path, config_text: str, server: str
) -> tuple[list[dict], dict]:
    """Claude Code started in a directory outside the repository with ``config_text`` as its MCP
    config, allowed ``server``'s tools: its init line's servers and its final result."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(parents=True)
    config = elsewhere / "valor.json"
    config.write_text(config_text)
    completed = subprocess.run(
        [
            str(claude_bin),
            "-p",
            "what is queued?",
            "--output-format",
            "stream-json",
            "--verbose",
            "--strict-mcp-config",
            "--mcp-config",
            str(config),
            "--allowedTools",
            f"mcp__{server}",
        ],
        env=env,
        cwd=elsewhere,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=180,
    )
    events = [json.loads(line) for line in completed.stdout.splitlines() if line.startswith("{")]
    assert events, completed.stderr
    init = next(event for event in events if event.get("subtype") == "init")
    return init["mcp_servers"], events[-1]


@pytest.mark.e2e
def test_claude_code_outside_the_repo_connects_and_calls_a_tool(
    claude_bin, claude_env, fake_anthropic, tmp_path
):
    printed = subprocess.run(
        [sys.executable, "-m", "scheduler.cli", "mcp-config", "--print"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        check=True,
    )
    assert '"servers.stdio_front"' in printed.stdout  # the default: the bundle behind its front
    tool = mcp_tool(BUNDLE_NAME, "list_promises")
    env = {**claude_env, "VALOR_DATA_DIR": os.environ["VALOR_DATA_DIR"]}
    cache = Path(os.environ["VALOR_DATA_DIR"]) / "stdio_front"
    for attempt in ("cold", "warm"):  # the front's cache empty, then filled by the first run
        assert any(cache.glob("*.json")) == (attempt == "warm")
        fake_anthropic.responder = call_tool(tool, {}, "Promises: {result}")
        servers, result = claude_elsewhere(
            claude_bin, env, tmp_path / attempt, printed.stdout, BUNDLE_NAME
        )
        assert [(s["name"], s["status"]) for s in servers] == [(BUNDLE_NAME, "connected")]
        assert result["is_error"] is False, result
        assert result["result"].startswith("Promises: ")
        assert "promises" in result["result"]


def answers(url: str) -> bool:
    import httpx

    try:
        return httpx.get(url, timeout=2).status_code in (401, 404, 405, 406)
    except httpx.HTTPError:
        return False


@pytest.mark.e2e
def test_claude_code_outside_the_repo_uses_the_http_host_with_a_token(
    claude_bin, claude_env, fake_anthropic, tmp_path
):
    from tests.support import wait_until

    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    cli = [sys.executable, "-m", "scheduler.cli"]
    port = free_port()
    host = subprocess.Popen(
        [*cli, "serve", "--all", "--http", "--port", str(port)],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: answers(f"{base}/telegram-tools/mcp"), timeout=90)
        token = subprocess.run(
            [*cli, "token", "create", "--operator", "--name", "e2e", "--ttl", "1h"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout.strip()
        printed = subprocess.run(
            [*cli, "mcp-config", "--print", "--transport", "http", "--url", base, "--token", "-"],
            input=token + "\n",
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        fake_anthropic.responder = call_tool(
            mcp_tool("promise-tools", "list_promises"), {}, "Promises: {result}"
        )
        servers, result = claude_elsewhere(
            claude_bin, claude_env, tmp_path, printed.stdout, "promise-tools"
        )
    finally:
        host.terminate()
        host.wait(timeout=30)
    assert {s["name"]: s["status"] for s in servers} == dict.fromkeys(SERVER_NAMES, "connected")
    assert result["is_error"] is False, result
    assert result["result"].startswith("Promises: ")
