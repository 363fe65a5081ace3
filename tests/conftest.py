"""Shared fixtures: an isolated Valor environment per test, the store, and MCP clients."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from servers.core.settings import REPO_ROOT, reset_settings_cache
from servers.core.store import Store, close_all_stores, get_store

pytest_plugins = ["tests.fakes.fixtures", "tests.support.redis_server"]

# Real credentials on a developer's machine must never reach a test (or a fake's logs).
_SCRUBBED_PREFIXES = ("VALOR_", "OPENAI_", "PERPLEXITY_", "NOTION_", "ANTHROPIC_", "TELEGRAM_")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "e2e: starts the real Claude Code CLI, a browser or a daemon subprocess "
        '(slow; `pytest -m "not e2e"` is the fast inner loop)',
    )


# Fixtures that start something slow and real. A test using one (directly or through another
# fixture) must be marked e2e, or `pytest -m "not e2e"` stops being the fast inner loop.
E2E_FIXTURES = {"claude_bin": "the real Claude Code CLI"}


@pytest.hookimpl(tryfirst=True)  # before -m/-k deselect anything: every collected test is checked
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    unmarked = [
        f"{item.nodeid} (uses {name}: {E2E_FIXTURES[name]})"
        for item in items
        if item.get_closest_marker("e2e") is None
        for name in sorted(E2E_FIXTURES.keys() & set(getattr(item, "fixturenames", ())))
    ]
    if unmarked:
        raise pytest.UsageError(
            "these tests start something real but are not marked e2e "
            "(add @pytest.mark.e2e):\n  " + "\n  ".join(unmarked)
        )


@pytest.fixture(autouse=True)
def valor_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Every test gets its own data directory and a settings object read afresh."""
    for name in list(os.environ):
        if name.startswith(_SCRUBBED_PREFIXES):
            monkeypatch.delenv(name, raising=False)
    data_dir = tmp_path / "valor-data"
    monkeypatch.setenv("VALOR_DATA_DIR", str(data_dir))
    monkeypatch.chdir(tmp_path)
    # Valor's .env is VALOR_ENV_FILE, else the repository's: a test reads only its own (empty).
    env_file = tmp_path / "test.env"
    env_file.touch()
    monkeypatch.setenv("VALOR_ENV_FILE", str(env_file))
    reset_settings_cache()
    yield data_dir
    close_all_stores()
    reset_settings_cache()


@pytest.fixture
def store(valor_env: Path) -> Store:
    return get_store()


def mcp_entry(server_name: str) -> dict:
    """The server's entry in the committed .mcp.json."""
    config = json.loads((REPO_ROOT / ".mcp.json").read_text())
    return config["mcpServers"][server_name]


@asynccontextmanager
async def stdio_session(server_name: str, env: dict[str, str] | None = None) -> AsyncIterator:
    """The official mcp SDK client, spawning the server exactly as .mcp.json says."""
    from mcp import ClientSession
    from mcp.client.stdio import StdioServerParameters, stdio_client

    entry = mcp_entry(server_name)
    child_env = {**entry.get("env", {}), "VALOR_DATA_DIR": os.environ["VALOR_DATA_DIR"]}
    child_env.update(env or {})
    params = StdioServerParameters(
        command=entry["command"], args=entry["args"], env=child_env, cwd=str(REPO_ROOT)
    )
    async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        yield session


@pytest.fixture
def stdio_client_for():
    return stdio_session
