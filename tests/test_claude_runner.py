"""The shared Claude Code runner: stream-json parsing, argv/env, and real runs.

Real runs use the pinned Claude Code CLI against the fake Anthropic API (fixtures claude_bin,
claude_env, fake_anthropic); tests/fake_claude.py stands in only where the CLI adds nothing.
"""

from __future__ import annotations

import json
import stat
import uuid

import pytest

from servers.core import outbox
from servers.core.claude_command import ClaudeRun, build_argv, build_env
from servers.core.claude_events import (
    ApiRetryEvent,
    InitEvent,
    MalformedLine,
    PermissionDenialEvent,
    ResultEvent,
    TextEvent,
    ToolResultEvent,
    ToolUseEvent,
    UnknownEvent,
    parse_stream_line,
)
from servers.core.claude_runner import ClaudeRunner
from servers.core.errors import Category
from servers.core.mcp_config import http_mcp_config, runtime_mcp_config
from servers.core.sandbox import resolve_bwrap
from servers.core.settings import REPO_ROOT, get_settings
from tests.fakes import reply_with
from tests.support import configure
from tests.support.bridge import alive, install_fake_claude

# Shapes as Claude Code 2.1.332 prints them (trimmed).
INIT = {
    "type": "system",
    "subtype": "init",
    "session_id": "s-1",
    "model": "claude-x",
    "tools": ["Bash", "mcp__telegram-tools__search_conversation_history"],
    "mcp_servers": [
        {"name": "telegram-tools", "status": "connected", "source": "dynamic"},
        {"name": "notion-tools", "status": "failed", "source": "dynamic"},
    ],
}
ASSISTANT = {
    "type": "assistant",
    "message": {
        "content": [
            {"type": "text", "text": "Looking."},
            {"type": "tool_use", "id": "t1", "name": "Bash", "input": {"command": "ls"}},
        ]
    },
}
TOOL_RESULT = {
    "type": "user",
    "message": {
        "content": [
            {"type": "tool_result", "tool_use_id": "t1", "content": "a\nb", "is_error": True}
        ]
    },
}
RETRY = {
    "type": "system",
    "subtype": "api_retry",
    "attempt": 1,
    "max_retries": 2,
    "retry_delay_ms": 556,
    "error_status": 429,
    "error": "rate_limit",
}
RESULT = {
    "type": "result",
    "subtype": "success",
    "is_error": True,
    "result": "API Error: 500",
    "session_id": "s-1",
    "total_cost_usd": 0.25,
    "num_turns": 3,
    "duration_ms": 146,
    "usage": {"input_tokens": 5},
    "api_error_status": 500,
    "permission_denials": [{"tool_name": "Bash", "tool_use_id": "t9", "tool_input": {"c": 1}}],
    "terminal_reason": "api_error",
}


def test_every_line_kind_becomes_a_typed_event():
    (init,) = parse_stream_line(json.dumps(INIT))
    assert isinstance(init, InitEvent) and init.session_id == "s-1"
    assert init.failed_servers == ["notion-tools"]
    text, tool = parse_stream_line(json.dumps(ASSISTANT))
    assert text == TextEvent("Looking.")
    assert tool == ToolUseEvent("t1", "Bash", {"command": "ls"})
    assert parse_stream_line(json.dumps(TOOL_RESULT)) == [ToolResultEvent("t1", "a\nb", True)]
    assert parse_stream_line(json.dumps(RETRY)) == [ApiRetryEvent(1, 2, 556.0, 429, "rate_limit")]
    denial, result = parse_stream_line(json.dumps(RESULT))
    assert denial == PermissionDenialEvent("Bash", "t9", {"c": 1})
    assert isinstance(result, ResultEvent)
    assert (result.is_error, result.api_error_status, result.total_cost_usd) == (True, 500, 0.25)
    assert result.num_turns == 3 and result.terminal_reason == "api_error"


@pytest.mark.parametrize(
    "line", ['{"type": "assistant", "message": {BROKEN', "[1, 2]", '{"type": "result", "usage": 5}']
)
def test_malformed_lines_are_kept_not_fatal(line):
    (event,) = parse_stream_line(line)
    assert isinstance(event, MalformedLine)
    assert event.line.startswith(line[:10])


def test_unknown_types_are_kept():
    (event,) = parse_stream_line('{"type": "stream_event", "event": {"x": 1}}')
    assert isinstance(event, UnknownEvent) and event.data["event"] == {"x": 1}
    assert parse_stream_line("   ") == []


def test_argv_is_a_list_with_every_option(tmp_path):
    run = ClaudeRun(
        prompt="hi; rm -rf /",
        session_id="abc",
        mcp_config=tmp_path / "m.json",
        allowed_tools=["mcp__telegram-tools", "Read"],
        append_system_prompt="You are Valor.",
    )
    argv = build_argv("/bin/claude", run)
    assert argv[:5] == ["/bin/claude", "-p", "--output-format", "stream-json", "--verbose"]
    assert argv[argv.index("--resume") + 1] == "abc"
    assert argv[argv.index("--mcp-config") + 1] == str(tmp_path / "m.json")
    assert "--strict-mcp-config" in argv
    assert argv[argv.index("--allowedTools") + 1] == "mcp__telegram-tools,Read"
    assert argv[-2:] == ["--append-system-prompt", "You are Valor."]
    assert not any("rm -rf" in part for part in argv)  # the prompt goes on stdin


def test_claude_env_carries_the_chat_and_no_other_secrets(monkeypatch):
    configure(monkeypatch, VALOR_CLAUDE_MAX_RETRIES="1")
    base = {
        "PATH": "/usr/bin",
        "TELEGRAM_SESSION": "1BVtsOK-session",
        "OPENAI_API_KEY": "sk-openai-secret-value",
        "VALOR_NOTION_API_KEY": "secret_notion",
        "telegram_session": "1BVtsOK-lower-case",  # Settings reads any letter case
        "Valor_Scope_Secret": "mixed-case-scope-secret",
        "ANTHROPIC_API_KEY": "kept",
    }
    run = ClaudeRun(prompt="x", chat_id=-1001, user_id=7, user_name="Eve\x00\nEvil", env=base)
    env = build_env(run, get_settings())
    assert env["VALOR_CHAT_ID"] == "-1001" and env["VALOR_USER_ID"] == "7"
    assert env["VALOR_USER_NAME"] == "EveEvil"
    assert env["VALOR_LAUNCHED_BY"] == "bridge"
    assert env["CLAUDE_CODE_MAX_RETRIES"] == "1"
    assert env["ANTHROPIC_API_KEY"] == "kept"
    for name in ("TELEGRAM_SESSION", "OPENAI_API_KEY", "VALOR_NOTION_API_KEY"):
        assert name not in env
    assert "lower-case" not in str(env) and "mixed-case" not in str(env)


def test_runtime_config_is_private_and_removed(tmp_path):
    config = http_mcp_config({"telegram-tools": "http://127.0.0.1:1/telegram-tools/mcp"}, "tok")
    with runtime_mcp_config(config, tmp_path / "run") as path:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        entry = json.loads(path.read_text())["mcpServers"]["telegram-tools"]
        assert entry == {
            "type": "http",
            "url": "http://127.0.0.1:1/telegram-tools/mcp",
            "headers": {"Authorization": "Bearer tok"},
        }
    assert not path.exists()


async def test_malformed_stream_line_does_not_lose_the_answer(store, tmp_path, monkeypatch):
    install_fake_claude(tmp_path / "bin", monkeypatch)
    seen = []

    async def collect(event):
        seen.append(event)

    outcome = await ClaudeRunner(store).run(
        ClaudeRun(prompt="please malformed reply", chat_id=5), on_event=collect
    )
    assert outcome.ok and outcome.text == "Echo: please malformed reply"
    assert outcome.malformed_lines == 1 and outcome.unknown_events == 1
    assert any(isinstance(e, MalformedLine) for e in seen)
    rows = store.query("SELECT pid, kind, chat_id, ended_at FROM processes")
    assert len(rows) == 1 and rows[0]["chat_id"] == 5 and rows[0]["ended_at"] is not None


@pytest.mark.e2e
async def test_resume_fallback_starts_fresh_once_and_says_so(
    store, claude_bin, claude_env, fake_anthropic, tmp_path
):
    fake_anthropic.responder = reply_with("fresh answer")
    stale = str(uuid.uuid4())
    outcome = await ClaudeRunner(store, claude_bin=str(claude_bin)).run(
        ClaudeRun(prompt="hello", session_id=stale, env=claude_env, workdir=tmp_path)
    )
    assert outcome.ok and outcome.text == "fresh answer"
    assert outcome.session_id and outcome.session_id != stale
    assert "could not be resumed" in (outcome.fresh_session_notice or "")
    assert len(store.query("SELECT id FROM processes")) == 2  # the failed resume, then fresh
    # The fresh session itself resumes (a second turn sees the first).
    again = await ClaudeRunner(store, claude_bin=str(claude_bin)).run(
        ClaudeRun(prompt="again", session_id=outcome.session_id, env=claude_env, workdir=tmp_path)
    )
    assert again.ok and again.fresh_session_notice is None
    assert again.session_id == outcome.session_id


@pytest.mark.e2e
async def test_timeout_ends_the_whole_process_tree(
    store, claude_bin, claude_env, fake_anthropic, tmp_path
):
    # A stdio server gives Claude Code a child process; the model call then hangs. The timeout
    # leaves a busy machine ample time to start both before it fires.
    fake_anthropic.fail_next("timeout", count=5, path="/v1/messages")
    config = tmp_path / "stdio.json"
    config.write_text(
        json.dumps(
            {
                "mcpServers": {
                    "telegram-tools": {
                        "type": "stdio",
                        "command": str(REPO_ROOT / ".venv" / "bin" / "python"),
                        "args": ["-m", "servers.telegram"],
                    }
                }
            }
        )
    )
    outcome = await ClaudeRunner(store, claude_bin=str(claude_bin)).run(
        ClaudeRun(
            prompt="hang",
            mcp_config=config,
            env=claude_env,
            workdir=REPO_ROOT,
            timeout_seconds=15,
        )
    )
    assert outcome.status == "timeout"
    assert outcome.error.category is Category.TIMEOUT and "15 s" in outcome.error.detail
    assert len(outcome.pids) >= 2, "the stdio server should have been a child of Claude Code"
    assert not [pid for pid in outcome.pids if alive(pid)]
    (registered,) = store.query("SELECT command, ended_at FROM processes")
    assert registered["ended_at"] is not None
    # Sandboxed by default: the registered root is bwrap, whose tree held the run.
    assert registered["command"].startswith(resolve_bwrap(get_settings()) + " -- ")
    assert str(claude_bin) in registered["command"]


@pytest.mark.e2e
async def test_failed_mcp_server_is_reported(
    store, claude_bin, claude_env, fake_anthropic, tmp_path
):
    fake_anthropic.responder = reply_with("no tools today")
    config = http_mcp_config({"telegram-tools": "http://127.0.0.1:9/telegram-tools/mcp"}, "x")
    with runtime_mcp_config(config, tmp_path) as path:
        outcome = await ClaudeRunner(store, claude_bin=str(claude_bin)).run(
            ClaudeRun(
                prompt="hi",
                mcp_config=path,
                expected_servers=["telegram-tools", "notion-tools"],
                env=claude_env,
                workdir=tmp_path,
            )
        )
    assert outcome.ok and outcome.text == "no tools today"
    assert outcome.failed_servers == ["telegram-tools", "notion-tools"]  # failed, and missing


def test_outbox_round_trip(store):
    first = outbox.enqueue_outbound(store, 5, "promise #1 done", source="promise")
    second = outbox.enqueue_outbound(store, 5, "promise #2 done", source="promise")
    assert [m.id for m in outbox.pending_outbound(store)] == [first, second]
    outbox.mark_outbound_sent(store, first)
    gave_up = [outbox.mark_outbound_failed(store, second, "down") for _ in range(5)]
    assert gave_up == [False, False, False, False, True]
    assert outbox.pending_outbound(store) == []
    with pytest.raises(ValueError):
        outbox.enqueue_outbound(store, 5, "  ")
