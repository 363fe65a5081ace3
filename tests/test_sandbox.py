"""The OS sandbox of Claude Code runs (servers/core/sandbox.py, bubblewrap).

The attack runs as a prompt-injected model would: the real Claude Code CLI, scripted by the fake
Anthropic API, tries every way in through Bash, and the test reads the tool results the fake
received. The same run with VALOR_SANDBOX=off shows each leak, so the test can fail. The mount
view itself is checked faster by wrapping a plain shell in the same launch.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shlex
import subprocess
import sys
import uuid
from pathlib import Path

import psutil
import pytest

from bridge.memory import MemoryTransport, incoming
from bridge.pipeline import Bridge
from servers.core import history, sandbox
from servers.core.claude_command import ClaudeRun
from servers.core.claude_runner import ClaudeRunner
from servers.core.errors import Category, ValorError
from servers.core.history import Message
from servers.core.settings import REPO_ROOT, get_settings
from tests.fakes import Script, Text, ToolUse, call_tool, mcp_tool
from tests.fakes.anthropic_api import tool_result_text
from tests.support import configure, wait_until, wait_until_async
from tests.support.bridge import alive, install_fake_claude

pytestmark = pytest.mark.skipif(
    not any(Path(p, "bwrap").exists() for p in os.environ.get("PATH", "").split(":")),
    reason="bubblewrap is not installed (bash .ci/setup installs it)",
)

CHAT, OTHER_CHAT = 4242, 777
CLAUDE = str(REPO_ROOT / "node_modules" / ".bin" / "claude")
PYTHON = shlex.quote(sys.executable)  # `python3` may be a shim in the (hidden) home


def tag() -> str:
    return uuid.uuid4().hex[:12]


# -- the attack, end to end ---------------------------------------------------------------------
RUN_IN_A_VALOR_PROCESS = """
import asyncio, json, sys
from pathlib import Path
from servers.core.claude_command import ClaudeRun
from servers.core.claude_runner import ClaudeRunner

run = ClaudeRun(prompt="probe", chat_id=int(sys.argv[1]), allowed_tools=["Bash"],
                workdir=Path(sys.argv[2]), launched_by="bug-report")
outcome = asyncio.run(ClaudeRunner().run(run))
print(json.dumps({"status": outcome.status, "error": str(outcome.error or "")}))
"""


def all_tool_results(request: dict) -> list[str]:
    return [
        tool_result_text(block)
        for message in request["messages"]
        if isinstance(message.get("content"), list)
        for block in message["content"]
        if block.get("type") == "tool_result"
    ]


@pytest.fixture
def planted(store, valor_env, tmp_path):
    """Secrets and another chat's data, planted where a run should never reach them."""
    marks = {name: f"{name}-{tag()}" for name in ("ENVFILE", "PROCENV", "STORE", "MEDIA")}
    work = tmp_path / "work"
    work.mkdir()
    (work / ".env").write_text(f"VALOR_TELEGRAM_SESSION={marks['ENVFILE']}\n")
    history.record_message(store, Message(OTHER_CHAT, 1, marks["STORE"], "bob", 9))
    settings = get_settings()
    other_media = settings.chat_media_path(OTHER_CHAT)
    other_media.mkdir(parents=True)
    (other_media / "secret.txt").write_text(marks["MEDIA"])
    own_media = settings.chat_media_path(CHAT)
    own_media.mkdir(parents=True)
    (own_media / "mine.txt").write_text("own chat media is readable")
    return marks, work, other_media / "secret.txt", own_media


def attack_steps(data_dir: Path, other_media_file: Path, own_media: Path) -> list:
    database = data_dir / "valor.db"
    read_store = (
        f"import sqlite3; print(sqlite3.connect('file:{database}?mode=ro', uri=True)"
        ".execute('SELECT text FROM messages').fetchall())"
    )
    commands = [
        "cat ./.e?v",
        f"{PYTHON} -c \"print(open('.e'+'nv').read())\"",
        "grep -a -h -o 'PROCENV-[0-9a-f]*' /proc/*/environ",
        f'{PYTHON} -c "{read_store}"',
        f"cat {other_media_file}",
        f"ls -a {data_dir}",
        # What the run may do: read and write its own chat's media.
        f"cat {own_media / 'mine.txt'} && echo made > {own_media / 'out.txt'}",
    ]
    return [ToolUse("Bash", {"command": command}) for command in commands] + [Text("done")]


def run_attack(planted, valor_env, claude_bin, claude_env, fake_anthropic, sandbox_mode):
    """The run starts inside a Valor process whose environment holds a secret (as the bridge's
    or the daemon's does), so /proc/<parent>/environ has something to leak."""
    marks, work, other_media_file, own_media = planted
    fake_anthropic.responder = Script(attack_steps(valor_env, other_media_file, own_media))
    env = {
        **claude_env,
        "VALOR_DATA_DIR": str(valor_env),
        "VALOR_CLAUDE_BIN": str(claude_bin),
        "VALOR_SANDBOX": sandbox_mode,
        "TELEGRAM_SESSION": marks["PROCENV"],  # a secret of the Valor process
    }
    completed = subprocess.run(
        [sys.executable, "-c", RUN_IN_A_VALOR_PROCESS, str(CHAT), str(work)],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    outcome = json.loads(completed.stdout.strip().splitlines()[-1])
    assert outcome["status"] == "ok", outcome
    results = all_tool_results(fake_anthropic.main_requests[-1])
    assert len(results) == 7, results
    return marks, results


@pytest.mark.e2e
def test_a_sandboxed_run_reaches_no_secret_and_no_other_chat(
    planted, valor_env, claude_bin, claude_env, fake_anthropic
):
    marks, results = run_attack(planted, valor_env, claude_bin, claude_env, fake_anthropic, "bwrap")
    everything = "\n".join(results)
    for name, mark in marks.items():
        assert mark not in everything, f"{name} leaked: {everything[-2000:]}"
    assert "valor.db" not in results[5]  # the data directory shows only what the run needs
    # Not a broken run: its own chat's media is readable and writable.
    assert "own chat media is readable" in results[6]
    assert (planted[3] / "out.txt").read_text() == "made\n"


@pytest.mark.e2e
def test_without_the_sandbox_the_same_run_leaks_everything(
    planted, valor_env, claude_bin, claude_env, fake_anthropic
):
    marks, results = run_attack(planted, valor_env, claude_bin, claude_env, fake_anthropic, "off")
    everything = "\n".join(results)
    leaked = {name for name, mark in marks.items() if mark in everything}
    assert leaked == set(marks), f"expected every leak without the sandbox: {everything[-2000:]}"
    assert "valor.db" in results[5]


@pytest.mark.e2e
async def test_a_sandboxed_bridge_run_still_gets_context_and_records_its_hooks(
    store, claude_bin, claude_env, fake_anthropic, monkeypatch, valor_env
):
    """The repo's hooks run inside the sandbox: the context block still arrives, the tool call
    reaches tool_calls through the spool (with the runner's chat), and the session is recorded."""
    configure(monkeypatch, VALOR_CLAUDE_BIN=str(claude_bin), VALOR_CLAUDE_MAX_RETRIES="0")
    history.record_message(store, Message(CHAT, 1, "the rollout is on Tuesday", "alice", 1))
    fake_anthropic.responder = call_tool(
        mcp_tool("telegram-tools", "search_conversation_history"), {"query": "rollout"}, "ok"
    )
    transport = MemoryTransport()
    bridge = Bridge(transport, claude_env=claude_env, authorize_all=True)
    assert bridge.settings.workdir == REPO_ROOT  # the repo's .claude/settings.json hooks
    async with bridge.serving():
        await bridge.receive(incoming(CHAT, 2, "when is the rollout?"))
        await bridge.drain()
    (reply,) = transport.replies_to(CHAT, 2)
    assert reply.text.startswith("ok"), reply.text
    assert "the rollout is on Tuesday" in json.dumps(fake_anthropic.main_requests[0]["messages"])
    (call,) = store.query("SELECT * FROM tool_calls")
    assert (call["server"], call["tool"], call["success"], call["chat_id"]) == (
        "telegram-tools",
        "search_conversation_history",
        1,
        CHAT,
    )
    (session,) = store.query("SELECT * FROM claude_sessions")
    assert (session["launched_by"], session["chat_id"]) == ("bridge", CHAT)
    assert session["session_id"] == call["session_id"] and session["ended_at"] is not None
    assert session["pid"] and session["end_reason"] == "ok"
    # The chat's Claude Code home holds its transcript; no spool or context file is left.
    home = sandbox.claude_home(bridge.settings, CHAT)
    assert list(home.glob("projects/*/*.jsonl"))
    assert not list((valor_env / "run").glob("spool-*")) and not list(
        (valor_env / "run").glob("ctx-*")
    )
    assert (valor_env / "logs" / "hooks.log").exists() is False


# -- refusing, and ending the tree -----------------------------------------------------------------
async def test_a_run_refuses_to_start_without_bwrap_unless_the_sandbox_is_off(
    store, tmp_path, monkeypatch
):
    install_fake_claude(tmp_path / "bin", monkeypatch)
    configure(monkeypatch, VALOR_BWRAP_BIN=str(tmp_path / "no-bwrap-here"))
    with pytest.raises(ValorError) as refused:
        await ClaudeRunner(store).run(ClaudeRun(prompt="hello", chat_id=5))
    assert refused.value.category is Category.CONFIG
    assert "bubblewrap" in refused.value.detail and "VALOR_SANDBOX=off" in refused.value.detail
    assert store.query("SELECT id FROM processes") == []  # nothing was started

    configure(monkeypatch, VALOR_SANDBOX="off")
    outcome = await ClaudeRunner(store).run(ClaudeRun(prompt="hello", chat_id=5))
    assert outcome.ok and outcome.text == "Echo: hello"


async def test_a_bwrap_that_cannot_set_the_sandbox_up_is_a_config_error(
    store, tmp_path, monkeypatch
):
    """Where user namespaces are off, bwrap itself fails: the run says so, not "no answer"."""
    install_fake_claude(tmp_path / "bin", monkeypatch)
    failing = tmp_path / "bwrap"
    failing.write_text(
        "#!/bin/sh\necho 'bwrap: No permissions to creating new namespace' >&2\nexit 1\n"
    )
    failing.chmod(0o755)
    configure(monkeypatch, VALOR_BWRAP_BIN=str(failing))
    outcome = await ClaudeRunner(store).run(ClaudeRun(prompt="hello", chat_id=5))
    assert not outcome.ok and outcome.error.category is Category.CONFIG
    assert "sandbox could not start" in outcome.error.detail
    assert "No permissions to creating new namespace" in outcome.error.detail
    assert "VALOR_SANDBOX=off" in outcome.error.detail
    assert sandbox.start_failure("claude: some other failure") is None


def test_an_unsandboxed_start_is_logged_as_a_warning(monkeypatch, caplog):
    configure(monkeypatch, VALOR_SANDBOX="off")
    monkeypatch.setattr(sandbox, "_logged_mode", False)
    with caplog.at_level(logging.INFO, logger="valor.sandbox"):
        sandbox.log_sandbox_mode(get_settings())
        sandbox.log_sandbox_mode(get_settings())  # once per process
    (record,) = caplog.records
    assert record.levelno == logging.WARNING and "NOT sandboxed" in record.message


async def test_cancel_ends_the_whole_sandboxed_tree(store, tmp_path, monkeypatch):
    install_fake_claude(tmp_path / "bin", monkeypatch)
    work = tmp_path / "work"
    prompts = work / "prompts"
    prompts.mkdir(parents=True)
    cancel = asyncio.Event()
    run = ClaudeRun(
        prompt="wait sleep:120",
        chat_id=5,
        workdir=work,
        extra_env={"FAKE_CLAUDE_PROMPTS_DIR": str(prompts)},
    )
    task = asyncio.create_task(ClaudeRunner(store).run(run, cancel=cancel))
    await wait_until_async(lambda: any(prompts.iterdir()), 60, "the sandboxed run's start")
    (registered,) = store.query("SELECT pid, command FROM processes")
    inside = [p.pid for p in psutil.Process(registered["pid"]).children(recursive=True)]
    cancel.set()
    outcome = await asyncio.wait_for(task, 60)
    assert outcome.status == "cancelled"
    assert registered["command"].startswith(sandbox.resolve_bwrap(get_settings()) + " -- ")
    assert len(inside) >= 2 and set(inside) <= set(outcome.pids)  # bwrap's init, the run
    assert not [pid for pid in outcome.pids if alive(pid)]
    assert store.query("SELECT ended_at FROM processes")[0]["ended_at"] is not None


@pytest.mark.e2e  # a `valor chat` subprocess
def test_a_sandboxed_run_dies_with_a_killed_bridge(store, tmp_path, monkeypatch):
    """--die-with-parent: a bridge SIGKILLed mid-run leaves no orphaned run behind."""
    fake = install_fake_claude(tmp_path / "bin", monkeypatch)
    work = tmp_path / "work"
    prompts = work / "prompts"
    prompts.mkdir(parents=True)
    env = {
        **os.environ,
        "VALOR_CLAUDE_BIN": str(fake),
        "VALOR_CLAUDE_WORKDIR": str(work),
        "FAKE_CLAUDE_PROMPTS_DIR": str(prompts),
    }
    bridge = subprocess.Popen(
        [sys.executable, "-m", "scheduler.cli", "chat"],
        cwd=REPO_ROOT,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        bridge.stdin.write("slow question sleep:120\n")
        bridge.stdin.flush()
        wait_until(lambda: any(prompts.iterdir()), 60, "the run's start")
        (registered,) = store.query("SELECT pid FROM processes")
        tree = [registered["pid"]]
        tree += [p.pid for p in psutil.Process(registered["pid"]).children(recursive=True)]
        bridge.kill()
        bridge.communicate(timeout=30)
    finally:
        if bridge.poll() is None:
            bridge.kill()
    wait_until(lambda: not [pid for pid in tree if alive(pid)], 30, "the orphaned run ending")


# -- the mount view, with a plain shell in the same launch ---------------------------------------
def sandboxed_shell(script: str, chat_id: int | None, workdir: Path, **extra_env: str):
    settings = get_settings()
    run = ClaudeRun(prompt="", chat_id=chat_id, extra_env=extra_env)
    env = {**os.environ, **extra_env}
    with sandbox.launch(["sh", "-c", script], env, run, settings, workdir, CLAUDE) as launch:
        return subprocess.run(
            launch.argv, env=launch.env, capture_output=True, text=True, timeout=60, check=False
        )


def test_the_mount_view(store, valor_env, tmp_path):
    settings = get_settings()
    work = tmp_path / "work"
    work.mkdir()
    (work / ".env").write_text("TELEGRAM_SESSION=dotenv-secret\n")
    (work / ".env.local").write_text("OPENAI_API_KEY=dotenv-secret\n")
    own, other = settings.chat_media_path(CHAT), settings.chat_media_path(OTHER_CHAT)
    for folder in (own, other, settings.chat_screenshots_path(CHAT)):
        folder.mkdir(parents=True, exist_ok=True)
    (other / "b.txt").write_text("other chat")
    (settings.chat_screenshots_path(CHAT) / "shot.png").write_bytes(b"png")
    script = f"""
        cat .env .env.local; echo "dotenv:$?"
        ls -a {valor_env}; cat {other}/b.txt
        echo ok > {own}/a.txt && echo "media:written"
        cat {settings.chat_screenshots_path(CHAT)}/shot.png; echo
        echo x > {settings.chat_screenshots_path(CHAT)}/new.png || echo "shots:readonly"
        echo w > {work}/w.txt && echo "workdir:written"
        touch {REPO_ROOT}/servers/planted.py || echo "install:readonly"
        touch {REPO_ROOT}/planted.py || echo "repo:readonly"
        ls /proc | grep -c '^[0-9]'
        echo "home:$HOME"
    """
    completed = sandboxed_shell(script, CHAT, work)
    out = completed.stdout
    assert "dotenv-secret" not in out and "dotenv:0" in out  # readable, and empty
    assert "valor.db" not in out and "scope_secret" not in out and "other chat" not in out
    assert "media:written" in out and (own / "a.txt").read_text() == "ok\n"
    assert "png" in out and "shots:readonly" in out
    assert "workdir:written" in out and (work / "w.txt").exists()
    assert "install:readonly" in out and "repo:readonly" in out
    assert not (REPO_ROOT / "servers" / "planted.py").exists()
    processes = int(out.split("home:")[0].strip().splitlines()[-1])
    assert processes < 10, out  # its own PID namespace: none of Valor's processes
    assert f"home:{sandbox.claude_home(settings, CHAT)}" in out


def test_the_repository_stays_read_only_when_it_is_the_workdir(store, tmp_path):
    script = f"""
        touch {REPO_ROOT}/servers/planted.py || echo "servers:readonly"
        touch {REPO_ROOT}/.venv/planted.pth || echo "venv:readonly"
        touch {REPO_ROOT}/sitecustomize.py || echo "root:readonly"
        cat pyproject.toml | head -1
    """
    out = sandboxed_shell(script, CHAT, REPO_ROOT).stdout
    assert {"servers:readonly", "venv:readonly", "root:readonly"} <= set(out.split())
    assert "[" in out  # still readable: the run can work on the code
    assert not (REPO_ROOT / "sitecustomize.py").exists()


def test_a_configured_env_file_outside_the_repository_reads_empty(store, tmp_path, monkeypatch):
    # Inside the workdir (bound read-write), under a name no `.env*` rule matches.
    elsewhere = tmp_path / "work" / "config" / "valor.env"
    elsewhere.parent.mkdir(parents=True)
    elsewhere.write_text("VALOR_OPENAI_API_KEY=configured-env-secret\n")
    monkeypatch.setenv("VALOR_ENV_FILE", str(elsewhere))
    out = sandboxed_shell(f'cat {elsewhere}; echo "read:$?"', CHAT, tmp_path / "work").stdout
    assert "configured-env-secret" not in out and "read:0" in out


def test_a_bug_report_run_may_write_only_its_screenshot_folder(store, tmp_path):
    settings = get_settings()
    target = settings.chat_screenshots_path(CHAT) / "T-1"
    target.mkdir(parents=True)
    script = f'echo png > {target}/shot.png && echo "written"'
    completed = sandboxed_shell(script, CHAT, tmp_path, VALOR_SCREENSHOT_DIR=str(target))
    assert "written" in completed.stdout and (target / "shot.png").exists()


def test_the_operators_home_and_claude_login_stay_hidden(store, tmp_path, monkeypatch):
    home = tmp_path / "operator-home"
    (home / ".claude").mkdir(parents=True)
    (home / ".claude" / ".credentials.json").write_text('{"claudeAiOauth": "refresh-token"}')
    (home / ".ssh").mkdir()
    (home / ".ssh" / "id_ed25519").write_text("ssh-private-key")
    monkeypatch.setenv("HOME", str(home))
    secrets = f"{home}/.ssh/id_ed25519 {home}/.claude/.credentials.json"
    (tmp_path / "work").mkdir()
    out = sandboxed_shell(f"cat {secrets}", 1, tmp_path / "work", ANTHROPIC_API_KEY="k")
    assert "ssh-private-key" not in out.stdout and "refresh-token" not in out.stdout
    # Without an API key, a run says how to give it one instead of using the operator's login.
    with pytest.raises(ValorError) as refused:
        sandbox.check_credentials({}, sandbox.claude_home(get_settings(), 1))
    assert refused.value.category is Category.CONFIG
    assert "ANTHROPIC_API_KEY" in refused.value.detail
    sandbox.check_credentials({"ANTHROPIC_API_KEY": "k"}, sandbox.claude_home(get_settings(), 1))


# -- the spool -------------------------------------------------------------------------------------
def test_the_spool_is_untrusted_and_the_chat_is_the_runners(store, tmp_path, valor_env):
    spool = tmp_path / "spool.jsonl"
    lines = [
        {"event": "tool_call", "server": "telegram-tools", "tool": "search", "duration_ms": 12,
         "error": None, "session_id": "s1", "called_at": 1.0, "chat_id": OTHER_CHAT},
        {"event": "tool_call", "server": "social-tools", "tool": "x" * 5000, "error": "E" * 5000,
         "duration_ms": "NaN", "called_at": 1e30},
        {"event": "hook_failure", "hook": "post-tool-use", "detail": "OSError: gone\nforged"},
        {"event": "tool_call", "server": "", "tool": "missing-server"},
        ["not", "an", "object"],
    ]  # fmt: skip
    spool.write_text("\n".join(json.dumps(line) for line in lines) + "\nnot json\n")
    result = sandbox.ingest_spool(store, spool, CHAT, since=100.0, log_path=valor_env / "logs")
    assert (result.tool_calls, result.hook_failures, result.rejected_lines) == (2, 1, 3)
    rows = store.query("SELECT * FROM tool_calls ORDER BY id")
    assert {row["chat_id"] for row in rows} == {CHAT}  # never the spool's
    assert rows[0]["called_at"] == 100.0 and rows[0]["success"] == 1  # clamped to the run
    assert len(rows[1]["tool"]) == sandbox.NAME_LIMIT and len(rows[1]["error"]) == 300
    assert rows[1]["success"] == 0 and rows[1]["duration_ms"] is None
    log_text = (valor_env / "logs" / "hooks.log").read_text()
    assert "post-tool-use failed: OSError: goneforged (sandboxed)" in log_text
    assert len(log_text.splitlines()) == 1
