"""The `valor` command line, run as a person would run it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from servers.core import history
from servers.core.history import Message
from servers.core.settings import REPO_ROOT


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
    assert result.returncode == 0
    search = next(line for line in result.stdout.splitlines() if "(Perplexity)" in line)
    bridge = next(line for line in result.stdout.splitlines() if "Telegram bridge" in line)
    assert search.startswith("ok")
    assert bridge.startswith("missing") and "TELEGRAM_API_ID" in bridge
    assert "pplx-test-key" not in result.stdout


def test_serve_rejects_unknown_server():
    result = valor("serve", "no-such-tools")
    assert result.returncode != 0
    assert "known servers" in result.stderr
