"""daydream-tools through real MCP clients, with the real openai SDK against a loopback fake."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

import pytest
from fastmcp import Client

from servers.core import daydream, promises
from servers.core.settings import REPO_ROOT, get_settings
from servers.daydream import mcp
from tests.support import call, configure, texts


@pytest.fixture(autouse=True)
def cpu_is_never_busy(monkeypatch):
    configure(monkeypatch, VALOR_DAYDREAM_BUSY_CPU_PERCENT="100")  # tests share two busy cores


@pytest.fixture
def model(fake_openai, monkeypatch):
    """The daydream pointed at the fake OpenAI-compatible model (like Ollama's /v1)."""
    fake_openai.chat_reply = "- Tidy the daemon module\n- Close the oldest TODO"
    configure(
        monkeypatch,
        VALOR_DAYDREAM_BASE_URL=f"{fake_openai.url}/v1",
        VALOR_DAYDREAM_MODEL="llama3.2",
        VALOR_DAYDREAM_WORKSPACES=json.dumps([str(REPO_ROOT)]),
    )
    return fake_openai


async def run(arguments=None):
    return await call(mcp, "run_daydream", arguments)


async def test_session_measures_repo_and_writes_insights(store, model):
    result = await run()
    data = result.structured_content
    assert not result.is_error, texts(result)
    assert data["status"] == "completed" and data["analysis_status"] == "done"
    assert [p["name"] for p in data["phases"]] == list(daydream.PHASES)
    assert all(p["seconds"] >= 0 for p in data["phases"])
    # The cleanup phases are real calls to monitoring-tools' cleanup_resources.
    cleanup = {p["name"]: p for p in data["phases"] if p["name"].endswith("cleanup")}
    assert all(p["status"] == "done" and "summary" in p["data"] for p in cleanup.values())
    # The model saw the measured context of this repository.
    prompt = model.chat_requests[-1]["messages"][-1]["content"]
    context = json.loads(prompt) if prompt.endswith("}") else None
    assert '"Python"' in prompt and '"branch"' in prompt and "TODO" in prompt
    if context:
        assert context["workspaces"][0]["lines_by_language"]["Python"] > 1000
    insights = get_settings().daydream_insights_path
    text = insights.read_text()
    assert data["session_id"] in text and "Close the oldest TODO" in text
    assert "Python" in text and "branch `" in text
    row = store.query("SELECT status, phases FROM daydream_sessions")[0]
    assert row["status"] == "completed" and len(json.loads(row["phases"])) == 6


async def test_model_timeout_still_completes(store, model, monkeypatch):
    model.hang_seconds = 60  # far beyond the limit: only the timeout can end the call early
    model.fail_next("timeout", path="/v1/chat/completions")
    configure(monkeypatch, VALOR_DAYDREAM_TIMEOUT_SECONDS="0.5")
    loop = asyncio.get_running_loop()
    started = loop.time()
    result = await run()
    elapsed = loop.time() - started
    data = result.structured_content
    assert data["status"] == "completed" and data["analysis_status"] == "skipped"
    analysis = next(p for p in data["phases"] if p["name"] == "analysis")
    assert "did not answer within 0.5 s" in analysis["detail"]
    assert analysis["seconds"] < 30 and elapsed < 60
    text = get_settings().daydream_insights_path.read_text()
    assert "Analysis skipped: the model did not answer within 0.5 s" in text


async def test_unreachable_model_says_analysis_was_skipped(store, monkeypatch):
    configure(monkeypatch, VALOR_DAYDREAM_BASE_URL="http://127.0.0.1:9/v1")  # nothing listens
    data = (await run({"workspaces": [REPO_ROOT.name]})).structured_content
    assert data["status"] == "completed"
    assert "analysis skipped: no model answers at http://127.0.0.1:9/v1" in data["summary"]
    assert get_settings().daydream_insights_path.exists()


@pytest.mark.parametrize(("reply", "reason"), [("500", "HTTP 500"), ("malformed", "unusable")])
async def test_model_errors_are_survived(store, model, reply, reason):
    model.fail_next(reply, path="/v1/chat/completions")
    data = (await run()).structured_content
    assert data["status"] == "completed" and data["analysis_status"] == "skipped"
    assert reason in data["summary"]


async def test_readiness_skips_when_promises_wait(store, model, monkeypatch):
    configure(monkeypatch, VALOR_DAYDREAM_MAX_PENDING_PROMISES="1")
    queue = promises.get_queue()
    for n in range(2):
        promises.create_promise(store, queue, f"question {n}", "research", None)
    data = (await run()).structured_content
    assert data["status"] == "skipped"
    assert "2 promises are waiting" in data["skip_reason"]
    assert [p["name"] for p in data["phases"]] == ["readiness"]
    assert model.chat_requests == []  # nothing after readiness ran
    assert not get_settings().daydream_insights_path.exists()
    promises.close_queues()


async def test_readiness_skips_a_busy_machine(store, model, monkeypatch):
    configure(monkeypatch, VALOR_DAYDREAM_BUSY_MEMORY_PERCENT="0.1")
    data = (await run()).structured_content
    assert data["status"] == "skipped" and "the machine is busy: memory" in data["skip_reason"]


async def test_dry_run_writes_and_cleans_nothing(store, model):
    data = (await run({"dry_run": True})).structured_content
    assert data["status"] == "completed" and data["dry_run"] is True
    output = next(p for p in data["phases"] if p["name"] == "output")
    assert output["status"] == "skipped" and "## Daydream" in output["data"]["preview"]
    cleanup = next(p for p in data["phases"] if p["name"] == "pre_cleanup")
    assert cleanup["data"]["dry_run"] is True
    assert not get_settings().daydream_insights_path.exists()


async def test_workspaces_can_narrow_but_not_widen(store, model):
    result = await run({"workspaces": ["/etc"]})
    assert result.is_error and "[input]" in texts(result)
    assert "not a configured workspace" in texts(result)
    assert store.query("SELECT COUNT(*) AS n FROM daydream_sessions")[0]["n"] == 0


async def test_history_lists_sessions_newest_first(store, model):
    first = (await run({"dry_run": True})).structured_content["session_id"]
    second = (await run({"dry_run": True})).structured_content["session_id"]
    async with Client(mcp) as client:
        history = await client.call_tool("daydream_history", {"limit": 5})
    ids = [s["session_id"] for s in history.structured_content["sessions"]]
    assert ids == [second, first]


def test_rotation_keeps_the_newest(tmp_path):
    insights = tmp_path / "logs" / "insights.md"
    for n in range(13):
        daydream.write_insights(insights, f"## session {n}", f"dd-{n:02d}", keep=10)
    archives = sorted(daydream.archive_directory(insights).iterdir())
    assert len(archives) == 10
    assert archives[0].name.endswith("-dd-03.md") and archives[-1].name.endswith("-dd-12.md")
    assert insights.read_text().count("## session") == 13


@pytest.mark.e2e  # the daemon's command line in a subprocess
async def test_cli_once_daydream_eleventh_run_leaves_ten_archives(store, model, valor_env):
    settings = get_settings()
    for n in range(10):  # ten earlier sessions' archives, written as a session writes them
        daydream.write_insights(settings.daydream_insights_path, f"## earlier {n}", f"dd-{n}", 10)
    archive_dir = daydream.archive_directory(settings.daydream_insights_path)
    assert len(list(archive_dir.iterdir())) == 10
    oldest = sorted(archive_dir.iterdir())[0]
    env = {k: v for k, v in os.environ.items()}
    completed = subprocess.run(
        [sys.executable, "-m", "scheduler.cli", "daemon", "--once", "daydream"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    outcome = json.loads(completed.stdout)
    session_id = outcome["result"]["session_id"]
    assert outcome["ok"] and outcome["result"]["analysis_status"] == "done"
    archives = sorted(archive_dir.iterdir())
    assert len(archives) == 10 and not oldest.exists()
    assert archives[-1].name.endswith(f"-{session_id}.md")
    assert session_id in settings.daydream_insights_path.read_text()


def test_abandoned_running_sessions_are_closed(store):
    for session_id, age in (("dd-old", 10_000), ("dd-live", 5)):
        with store.transaction() as conn:
            conn.execute(
                "INSERT INTO daydream_sessions (id, started_at, status) VALUES (?, ?, 'running')",
                (session_id, time.time() - age),
            )
    assert daydream.close_abandoned(store, older_than_seconds=3600) == 1
    statuses = {
        r["id"]: r["status"] for r in store.query("SELECT id, status FROM daydream_sessions")
    }
    assert statuses == {"dd-old": "interrupted", "dd-live": "running"}
