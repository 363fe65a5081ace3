# ruff: noqa: F811 - pytest fixtures imported from tests.social_fakes are parameters here
"""Progress notifications from the long tools, through real MCP clients, and `valor call`'s bar."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from fastmcp import Client

from servers.core.progress import Steps
from servers.core.settings import REPO_ROOT
from tests.social_fakes import article, only_loopback_connections, pages  # noqa: F401
from tests.support import configure
from tests.test_notion_tools import ROWS, VALOR_DB, use_notion
from tests.test_social_tools import use_openai, use_perplexity


@pytest.fixture
def model_env(fake_openai, monkeypatch) -> dict[str, str]:
    """The daydream pointed at the fake OpenAI-compatible model; never skipped as busy."""
    fake_openai.chat_reply = "- Tidy the daemon module"
    env = {
        "VALOR_DAYDREAM_BASE_URL": f"{fake_openai.url}/v1",
        "VALOR_DAYDREAM_MODEL": "llama3.2",
        "VALOR_DAYDREAM_WORKSPACES": json.dumps([str(REPO_ROOT)]),
        "VALOR_DAYDREAM_BUSY_CPU_PERCENT": "100",  # tests share two busy cores
        "VALOR_DAYDREAM_BUSY_MEMORY_PERCENT": "100",
    }
    configure(monkeypatch, **env)
    return env


async def test_daydream_through_the_official_client_reports_each_phase(model_env, stdio_client_for):
    """The official mcp SDK client, the server spawned as .mcp.json says (stdio)."""
    updates: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        updates.append((progress, total, message))

    async with stdio_client_for("daydream-tools", env=model_env) as session:
        result = await session.call_tool(
            "run_daydream", {"dry_run": True}, progress_callback=on_progress
        )
    assert not result.is_error, result.content
    messages = [message or "" for _, _, message in updates]
    for phase in ("readiness", "pre-cleanup", "context", "analysis", "output", "post-cleanup"):
        assert any(m.startswith(phase) for m in messages), (phase, messages)
    values = [progress for progress, _, _ in updates]
    assert values == sorted(values) and len(set(values)) == len(values)  # strictly increasing
    assert {total for _, total, _ in updates} == {6}
    assert values[-1] == 6 and messages[-1].startswith("completed")


async def test_a_skipped_daydream_still_ends_its_progress(store, model_env, monkeypatch):
    from servers.daydream import mcp

    configure(monkeypatch, VALOR_DAYDREAM_BUSY_MEMORY_PERCENT="0.1")
    updates: list[tuple[float, str]] = []

    async def on_progress(progress, total, message):
        updates.append((progress, message))

    async with Client(mcp, progress_handler=on_progress) as client:
        result = await client.call_tool("run_daydream", {"dry_run": True})
    assert result.structured_content["status"] == "skipped"
    assert updates[-1][0] == 6 and updates[-1][1].startswith("skipped: the machine is busy")


async def test_force_runs_the_daydream_on_a_busy_machine_and_says_why(
    store, model_env, monkeypatch
):
    from servers.daydream import mcp

    configure(monkeypatch, VALOR_DAYDREAM_BUSY_MEMORY_PERCENT="0.1")  # always "busy"
    async with Client(mcp) as client:
        skipped = await client.call_tool("run_daydream", {"dry_run": True})
        forced = await client.call_tool("run_daydream", {"dry_run": True, "force": True})
    assert skipped.structured_content["status"] == "skipped"
    data = forced.structured_content
    assert data["status"] == "completed"
    readiness = data["phases"][0]
    assert readiness["status"] == "done"
    assert readiness["detail"].startswith("forced; the machine is busy: memory")


async def test_heartbeat_while_waiting_keeps_increasing_below_the_next_step():
    updates: list[tuple[float, str]] = []

    async def report(progress, total, message):
        updates.append((progress, message))

    steps = Steps(report, total=3, heartbeat=0.01)
    await steps.at(1, "step one")
    async with steps.waiting("waiting for the model"):
        deadline = time.monotonic() + 30
        while len(updates) < 6 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
    await steps.at(2, "step two")
    values = [value for value, _ in updates]
    assert len(values) >= 6
    assert values == sorted(values) and len(set(values)) == len(values)
    beats = [value for value, message in updates if message.startswith("waiting for the model (")]
    assert beats and all(1 < value < 2 for value in beats)
    assert updates[-1] == (2, "step two")


async def test_a_failing_report_never_ends_the_work():
    async def report(progress, total, message):
        raise ConnectionResetError("the client went away")

    steps = Steps(report, total=2, heartbeat=0.01)
    await steps.at(1, "one")
    async with steps.waiting("slow"):
        await asyncio.sleep(0.05)
    await steps.done()


async def progress_of(server, tool: str, arguments: dict) -> list[tuple[float, float, str]]:
    """Call through FastMCP's in-memory client; the progress notifications it received."""
    updates: list[tuple[float, float, str]] = []

    async def on_progress(progress, total, message):
        updates.append((progress, total, message or ""))

    async with Client(server, progress_handler=on_progress) as client:
        result = await client.call_tool(tool, arguments, raise_on_error=False)
    assert not result.is_error, result.content
    values = [value for value, _, _ in updates]
    assert values and values == sorted(values) and len(set(values)) == len(values)
    assert values[-1] == updates[-1][1]  # it ends at its total
    return updates


async def test_search_and_image_generation_report_progress(monkeypatch, fake_openai):
    from servers.social import mcp

    fake_openai.chat_reply = "An answer [1]."
    fake_openai.citations = ["https://python.org/news"]
    use_perplexity(monkeypatch, fake_openai)
    use_openai(monkeypatch, fake_openai)
    search = await progress_of(mcp, "search_current_info", {"query": "latest python"})
    assert search[0][2] == "searching the web (Perplexity)" and search[-1][2] == "1 sources"
    image = await progress_of(mcp, "create_image", {"prompt": "a lighthouse"})
    assert [m for _, _, m in image] == [
        "generating the image (dall-e-3)",
        "saving the image",
        "image saved",
    ]


async def test_link_analysis_reports_fetch_extract_and_save(pages, store):
    from servers.core import http_guard
    from servers.social import mcp

    url = pages.html("post", article("Tracing", description="How a team traced slow calls."))
    with http_guard.allow_loopback_ports_for_tests(int(pages.url.rsplit(":", 1)[1])):
        updates = await progress_of(mcp, "save_link", {"url": url})
    assert [m for _, _, m in updates] == ["fetching the page", "extracting the article", "saved"]


async def test_notion_query_reports_pages_read(fake_notion, monkeypatch):
    from servers.notion import mcp

    fake_notion.add_database(VALOR_DB, ROWS)
    use_notion(monkeypatch, fake_notion)
    updates = await progress_of(
        mcp, "query_notion_projects", {"workspace": "valor", "question": "what is in progress?"}
    )
    messages = [m for _, _, m in updates]
    assert messages[0] == "reading the Valor database in Notion"
    assert f"read {len(ROWS)} rows of Valor" in messages
    assert messages[-1] == f"{len(ROWS)} rows read"


def valor_call(tool: str, arguments: dict, env: dict[str, str]):
    import os
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "scheduler.cli", "call", tool, "--args", json.dumps(arguments)],
        cwd=REPO_ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_valor_call_renders_the_progress_as_a_bar(model_env):
    completed = valor_call("daydream-tools.run_daydream", {"dry_run": True}, model_env)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert json.loads(completed.stdout)["status"] == "completed"  # stdout stays clean JSON
    bar = completed.stderr
    assert "completed; analysis written" in bar and "100%" in bar and "━" in bar

    quiet = valor_call("daydream-tools.daydream_history", {}, model_env)  # reports no progress
    assert quiet.returncode == 0 and "%" not in quiet.stderr and "━" not in quiet.stderr
