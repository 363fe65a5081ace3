"""Approvals: a bridge run asks its chat before a tool it was not allowed up front.

The e2e tests run the real Claude Code CLI (fake Anthropic API scripted to call Bash, which no
bridge run may use unasked) with Valor's tools hosted over HTTP: Claude Code calls
approval-tools' ``approve_tool_use`` as its ``--permission-prompt-tool``; the question reaches
the in-memory chat and the chat's answer decides whether Bash runs.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest

from bridge.memory import MemoryTransport, incoming
from bridge.pipeline import Bridge
from servers import load_server
from servers.core import approvals
from servers.core.approvals import Answer, parse_answer, preview
from servers.core.claude_command import ClaudeRun, build_argv
from servers.core.settings import get_settings
from tests.fakes import Script, Text, ToolUse
from tests.fakes.anthropic_api import last_tool_result
from tests.support import call, configure, texts

OWNER, SECOND_OWNER, STRANGER = 1, 2, 666
CHAT = 4242
GROUP = -100777
CODE_RE = re.compile(r"yes ([a-z]{5})")


@pytest.fixture
def allowlist(monkeypatch):
    configure(
        monkeypatch,
        VALOR_ALLOWED_USER_IDS=json.dumps([OWNER, SECOND_OWNER]),
        VALOR_ALLOWED_CHAT_IDS=json.dumps([GROUP]),
    )


@pytest.fixture
def real_claude(claude_bin, monkeypatch, allowlist, tmp_path):
    configure(
        monkeypatch,
        VALOR_CLAUDE_BIN=str(claude_bin),
        VALOR_CLAUDE_WORKDIR=str(tmp_path),  # no repo hooks: fast runs
        VALOR_CLAUDE_MAX_RETRIES="0",
        VALOR_WARM_SESSIONS="off",
    )
    return claude_bin


def bash_script(marker: Path, word: str = "RAN") -> Script:
    """The model calls Bash (writing ``marker``), then answers with what Bash said."""
    command = f"echo {word} > {marker} && echo {word}-OK"
    return Script(
        [
            ToolUse("Bash", {"command": command}),
            lambda request: Text("Result: " + last_tool_result(request)),
        ]
    )


def questions(transport: MemoryTransport, chat: int = CHAT) -> list[str]:
    return [m.text for m in transport.messages_in(chat) if m.text.startswith("🔐")]


async def next_code(transport: MemoryTransport, seen: int = 0, chat: int = CHAT) -> str:
    """The code of the chat's question number ``seen + 1`` once it has been asked."""
    await transport.wait_for(lambda: len(questions(transport, chat)) > seen, timeout=90)
    match = CODE_RE.search(questions(transport, chat)[seen])
    assert match, questions(transport, chat)[seen]
    return match.group(1)


def decisions(store) -> list[dict]:
    return [dict(r) for r in store.query("SELECT * FROM approvals ORDER BY id")]


# -- the contract and the parts, without the CLI ----------------------------------------------
def test_answers_are_parsed_by_code_and_nothing_else():
    assert parse_answer("yes abcde") == Answer(True, False, "abcde")
    assert parse_answer("  NO Abcde ") == Answer(False, False, "abcde")
    assert parse_answer("always abcde") == Answer(True, True, "abcde")
    assert parse_answer("yes") is None
    assert parse_answer("yes please do abcde") is None
    assert parse_answer("yes abcdef") is None


def test_preview_masks_secrets_cuts_and_drops_control_characters():
    text = preview(
        {"command": "curl -H 'Authorization: Bearer sk-abcdefghijklmnopqrstuvwx' \x1b[2J"}
    )
    assert "sk-abcdefghijklmnopqrstuvwx" not in text and "\x1b" not in text
    assert len(preview({"content": "x" * 5000})) == approvals.PREVIEW_CHARS


def test_runs_pass_the_permission_prompt_tool():
    argv = build_argv("claude", ClaudeRun(prompt="", permission_prompt_tool=approvals.PROMPT_TOOL))
    assert argv[argv.index("--permission-prompt-tool") + 1] == (
        "mcp__approval-tools__approve_tool_use"
    )
    assert "--permission-prompt-tool" not in build_argv("claude", ClaudeRun(prompt=""))


async def test_policy_answers_without_asking(store, monkeypatch):
    configure(
        monkeypatch,
        VALOR_CHAT_ID=str(CHAT),
        VALOR_APPROVAL_NEVER_ASK=json.dumps(["mcp__notion-tools", "WebFetch"]),
        VALOR_APPROVAL_ALWAYS_DENY=json.dumps(["Bash"]),
    )
    server = load_server("approval-tools")

    async def ask(tool: str) -> dict:
        result = await call(server, "approve_tool_use", {"tool_name": tool, "input": {"a": 1}})
        assert not result.is_error, texts(result)
        return json.loads(texts(result))

    assert await ask("WebFetch") == {"behavior": "allow", "updatedInput": {"a": 1}}
    assert (await ask("mcp__notion-tools__query_notion_projects"))["behavior"] == "allow"
    # Valor's read-only tools never ask; a tool that changes things is not read-only.
    assert (await ask("mcp__telegram-tools__search_conversation_history"))["behavior"] == "allow"
    denied = await ask("Bash")
    assert denied["behavior"] == "deny" and "never allowed" in denied["message"]
    assert [(d["tool_name"], d["status"], d["scope"]) for d in decisions(store)] == [
        ("WebFetch", "allowed", "policy"),
        ("mcp__notion-tools__query_notion_projects", "allowed", "policy"),
        ("mcp__telegram-tools__search_conversation_history", "allowed", "policy"),
        ("Bash", "denied", "policy"),
    ]
    from servers.approvals import read_only_valor_tools

    read_only = await read_only_valor_tools()
    assert "mcp__context-tools__context_health" in read_only
    assert "mcp__promise-tools__create_promise" not in read_only
    assert approvals.policy(get_settings(), "mcp__promise-tools__create_promise", read_only) is None


async def test_a_run_bound_to_no_chat_is_denied_without_asking(store):
    result = await call(
        load_server("approval-tools"), "approve_tool_use", {"tool_name": "Bash", "input": {}}
    )
    answer = json.loads(texts(result))
    assert answer["behavior"] == "deny" and "serves no chat" in answer["message"]
    assert decisions(store) == []


async def test_the_tool_waits_with_progress_and_an_answer_from_another_chat_does_nothing(
    store, monkeypatch
):
    configure(monkeypatch, VALOR_CHAT_ID=str(CHAT))
    progress: list[str] = []

    async def on_progress(value, total, message):
        progress.append(message)

    waiting = asyncio.create_task(
        approvals.decide_tool_use(
            store,
            get_settings(),
            CHAT,
            "Bash",
            {"command": "ls"},
            "t1",
            lambda s: on_progress(s, None, f"waiting {s:.1f}"),
            heartbeat_seconds=0.05,
        )
    )
    while not approvals.unasked(store):
        await asyncio.sleep(0.01)
    (pending,) = approvals.unasked(store)
    assert approvals.decide(store, CHAT + 1, Answer(True, False, pending.code), 9, "x") is None
    while len(progress) < 2:
        await asyncio.sleep(0.01)
    assert not waiting.done()
    decided = approvals.decide(store, CHAT, Answer(False, False, pending.code), OWNER, "ann")
    assert decided is not None and decided.status == "denied"
    answer = json.loads(await asyncio.wait_for(waiting, 10))
    assert answer["behavior"] == "deny" and "ann denied it" in answer["message"]
    # A second answer to a decided question changes nothing.
    assert approvals.decide(store, CHAT, Answer(True, True, pending.code), OWNER, "ann") is None


# -- end to end: the real CLI, the hosted tools, the chat -------------------------------------
@pytest.mark.e2e
async def test_approve_once_runs_the_tool_and_the_answer_arrives(
    store, real_claude, claude_env, fake_anthropic, tmp_path
):
    marker = tmp_path / "approved.txt"
    fake_anthropic.responder = bash_script(marker)
    transport = MemoryTransport()
    bridge = Bridge(transport, claude_env=claude_env)
    async with bridge.serving():
        assert await bridge.receive(incoming(CHAT, 1, "run it", sender_id=OWNER)) == "queued"
        code = await next_code(transport)
        question = questions(transport)[0]
        assert "Bash" in question and f"echo RAN > {marker}" in question
        assert await bridge.receive(incoming(CHAT, 2, f"yes {code}", sender_id=OWNER)) == (
            "approval"
        )
        await asyncio.wait_for(bridge.drain(), 120)
    (reply,) = transport.replies_to(CHAT, 1)
    assert "RAN-OK" in reply.text and marker.read_text().strip() == "RAN"
    (confirmation,) = transport.replies_to(CHAT, 2)
    assert confirmation.text == "Allowed Bash once."
    (row,) = decisions(store)
    assert (row["status"], row["scope"], row["decided_by"]) == ("allowed", "once", OWNER)
    # Asked after created, decided after asked: wall-clock times, which a clock adjustment can
    # step back by a fraction of a millisecond between two threads, hence the slack.
    slack = 0.25
    assert row["asked_at"] >= row["created_at"] - slack
    assert row["decided_at"] >= row["asked_at"] - slack


@pytest.mark.e2e
async def test_deny_does_not_run_the_tool_and_the_model_is_told_why(
    store, real_claude, claude_env, fake_anthropic, tmp_path
):
    marker = tmp_path / "denied.txt"
    fake_anthropic.responder = bash_script(marker)
    transport = MemoryTransport()
    bridge = Bridge(transport, claude_env=claude_env)
    async with bridge.serving():
        await bridge.receive(incoming(CHAT, 1, "run it", sender_id=OWNER))
        code = await next_code(transport)
        await bridge.receive(incoming(CHAT, 2, f"no {code}", sender_id=SECOND_OWNER))
        await asyncio.wait_for(bridge.drain(), 120)
    assert not marker.exists()
    (reply,) = transport.replies_to(CHAT, 1)
    assert "RAN-OK" not in reply.text
    assert "Bash was not run: tester denied it in the chat" in reply.text  # what the model read
    assert transport.replies_to(CHAT, 2)[0].text == "Denied Bash."
    (row,) = decisions(store)
    assert (row["status"], row["decided_by"]) == ("denied", SECOND_OWNER)


@pytest.mark.e2e
async def test_no_answer_is_a_denial_after_the_timeout_and_the_chat_is_told(
    store, real_claude, claude_env, fake_anthropic, tmp_path, monkeypatch
):
    configure(monkeypatch, VALOR_APPROVAL_TIMEOUT_SECONDS="2")
    marker = tmp_path / "timeout.txt"
    fake_anthropic.responder = bash_script(marker)
    transport = MemoryTransport()
    bridge = Bridge(transport, claude_env=claude_env)
    async with bridge.serving():
        await bridge.receive(incoming(CHAT, 1, "run it", sender_id=OWNER))
        code = await next_code(transport)
        await asyncio.wait_for(bridge.drain(), 120)
        await transport.wait_for(
            lambda: any("No answer about Bash" in m.text for m in transport.messages_in(CHAT))
        )
        # An answer after the timeout finds no open question.
        await bridge.receive(incoming(CHAT, 2, f"yes {code}", sender_id=OWNER))
    assert not marker.exists()
    (reply,) = transport.replies_to(CHAT, 1)
    assert "nobody in the chat answered" in reply.text
    told = [m.text for m in transport.messages_in(CHAT) if "No answer about Bash" in m.text]
    assert told == [f"No answer about Bash ({code}) within 2 s: denied."]
    assert transport.replies_to(CHAT, 2)[0].text.startswith("No open question")
    (row,) = decisions(store)
    assert (row["status"], row["decided_by"]) == ("expired", None)


@pytest.mark.e2e
async def test_allow_for_this_session_holds_until_a_new_session(
    store, real_claude, claude_env, fake_anthropic, tmp_path
):
    first, second, third = (tmp_path / f"run{n}.txt" for n in (1, 2, 3))
    transport = MemoryTransport()
    bridge = Bridge(transport, claude_env=claude_env)
    async with bridge.serving():
        fake_anthropic.responder = bash_script(first, "ONE")
        await bridge.receive(incoming(CHAT, 1, "first", sender_id=OWNER))
        code = await next_code(transport)
        await bridge.receive(incoming(CHAT, 2, f"always {code}", sender_id=OWNER))
        await asyncio.wait_for(bridge.drain(), 120)
        assert transport.replies_to(CHAT, 2)[0].text == "Allowed Bash for this session."

        fake_anthropic.responder = bash_script(second, "TWO")
        await bridge.receive(incoming(CHAT, 3, "second", sender_id=OWNER))
        await asyncio.wait_for(bridge.drain(), 120)
        assert len(questions(transport)) == 1  # the same session: not asked again
        assert "TWO-OK" in transport.replies_to(CHAT, 3)[0].text

        await bridge.receive(incoming(CHAT, 4, "/new", sender_id=OWNER))
        fake_anthropic.responder = bash_script(third, "THREE")
        await bridge.receive(incoming(CHAT, 5, "third", sender_id=OWNER))
        code = await next_code(transport, seen=1)  # a new session asks again
        await bridge.receive(incoming(CHAT, 6, f"yes {code}", sender_id=OWNER))
        await asyncio.wait_for(bridge.drain(), 120)
    assert [p.read_text().strip() for p in (first, second, third)] == ["ONE", "TWO", "THREE"]
    assert [(d["status"], d["scope"]) for d in decisions(store)] == [
        ("allowed", "session"),
        ("allowed", "session"),  # the grant answered, recorded as such
        ("allowed", "once"),
    ]


@pytest.mark.e2e
async def test_an_answer_from_a_user_who_is_not_allowed_is_ignored(
    store, real_claude, claude_env, fake_anthropic, tmp_path, monkeypatch
):
    configure(monkeypatch, VALOR_APPROVAL_TIMEOUT_SECONDS="4")
    marker = tmp_path / "stranger.txt"
    fake_anthropic.responder = bash_script(marker)
    transport = MemoryTransport()
    bridge = Bridge(transport, claude_env=claude_env)
    async with bridge.serving():
        # A group allowed by chat id: any member may talk to Valor, only allowlisted users
        # may answer its questions.
        await bridge.receive(
            incoming(GROUP, 1, "@valor run it", sender_id=OWNER, is_group=True, mentions_valor=True)
        )
        code = await next_code(transport, chat=GROUP)
        member = incoming(GROUP, 2, f"yes {code}", sender_id=STRANGER, is_group=True)
        assert await bridge.receive(member) == "ignored"
        # In a private chat a stranger is not even authorized.
        stranger_dm = incoming(CHAT, 3, f"yes {code}", sender_id=STRANGER)
        assert await bridge.receive(stranger_dm) == "unauthorized"
        await asyncio.wait_for(bridge.drain(), 120)
    assert not marker.exists()
    (row,) = decisions(store)
    assert (row["status"], row["decided_by"]) == ("expired", None)
    assert not transport.replies_to(GROUP, 2)


@pytest.mark.e2e
async def test_valor_read_only_tools_never_ask(store, real_claude, claude_env, fake_anthropic):
    fake_anthropic.responder = Script(
        [
            ToolUse("mcp__telegram-tools__search_conversation_history", {"query": "billing"}),
            lambda request: Text("Found: " + last_tool_result(request)),
        ]
    )
    transport = MemoryTransport()
    bridge = Bridge(transport, claude_env=claude_env)
    async with bridge.serving():
        await bridge.receive(incoming(CHAT, 1, "search billing", sender_id=OWNER))
        await asyncio.wait_for(bridge.drain(), 120)
    (reply,) = transport.replies_to(CHAT, 1)
    assert '"chat_id": 4242' in reply.text or '"chat_id":4242' in reply.text
    assert questions(transport) == [] and decisions(store) == []


@pytest.mark.e2e
async def test_a_warm_session_asks_too(
    store, real_claude, claude_env, fake_anthropic, tmp_path, monkeypatch
):
    configure(monkeypatch, VALOR_WARM_SESSIONS="on")
    marker = tmp_path / "warm.txt"
    fake_anthropic.responder = bash_script(marker, "WARM")
    transport = MemoryTransport()
    bridge = Bridge(transport, claude_env=claude_env)
    async with bridge.serving():
        await bridge.receive(incoming(CHAT, 1, "run it", sender_id=OWNER))
        code = await next_code(transport)
        await bridge.receive(incoming(CHAT, 2, f"yes {code}", sender_id=OWNER))
        await asyncio.wait_for(bridge.drain(), 120)
        assert bridge.warm.process_of(CHAT) is not None  # it was a resident process's turn
    assert "WARM-OK" in transport.replies_to(CHAT, 1)[0].text
    assert marker.read_text().strip() == "WARM"


async def test_a_restarted_bridge_closes_questions_of_runs_that_ended(store, allowlist):
    left = approvals.record(store, CHAT, "Bash", {"command": "ls"})
    bridge = Bridge(MemoryTransport(), host_tools=False)
    async with bridge.serving():
        assert approvals.unasked(store) == []
    assert approvals.get(store, left.id).status == "expired"
    assert approvals.expired_untold(store) == []  # nobody is told about a run that is gone


@pytest.mark.e2e
async def test_the_model_cannot_call_the_approval_tool_itself(
    store, real_claude, claude_env, fake_anthropic
):
    fake_anthropic.responder = Script(
        [
            ToolUse(approvals.PROMPT_TOOL, {"tool_name": "Bash", "input": {"command": "ls"}}),
            lambda request: Text("Got: " + last_tool_result(request)),
        ]
    )
    transport = MemoryTransport()
    bridge = Bridge(transport, claude_env=claude_env)
    async with bridge.serving():
        await bridge.receive(incoming(CHAT, 1, "ask yourself", sender_id=OWNER))
        await asyncio.wait_for(bridge.drain(), 120)
    assert questions(transport) == [] and decisions(store) == []
    # Claude Code keeps its permission prompt tool from the model (2.1.332): no question can
    # be forged to the chat.
    assert "No such tool available" in transport.replies_to(CHAT, 1)[0].text


# -- the Telegram transport: a user session answers by code -----------------------------------
async def test_telegram_code_replies_reach_the_bridge_through_telethons_dispatcher(
    store, monkeypatch, allowlist
):
    """Hand-built updates through Telethon's own dispatcher, as tests/test_telegram_transport.py
    does: a user session's `yes CODE` in a group arrives without a mention (other group text
    still needs one), and the bridge decides the chat's question from it."""
    from telethon import TelegramClient
    from telethon.sessions import StringSession
    from telethon.tl import types

    from bridge.telegram import TelegramTransport

    configure(
        monkeypatch,
        TELEGRAM_API_ID="12345",
        TELEGRAM_API_HASH="0123456789abcdef0123456789abcdef",
        TELEGRAM_SESSION="1" + "A" * 40,
    )
    owner = types.User(id=OWNER, access_hash=1, first_name="Ann")
    group = types.Chat(
        id=777,
        title="Team",
        photo=types.ChatPhotoEmpty(),
        participants_count=3,
        date=None,
        version=1,
    )
    client = TelegramClient(StringSession(), 12345, "0123456789abcdef0123456789abcdef")
    telegram = TelegramTransport(client, get_settings())
    telegram.set_identity(999, "valor", bot=False)
    telegram.add_handlers()

    async def deliver(text: str, msg_id: int):
        update = types.UpdateNewMessage(
            message=types.Message(
                id=msg_id,
                peer_id=types.PeerChat(group.id),
                date=None,
                message=text,
                from_id=types.PeerUser(OWNER),
            ),
            pts=1,
            pts_count=1,
        )
        update._entities = {OWNER: owner, -group.id: group}
        await client._dispatch_update(update)
        return None if telegram._queue.empty() else telegram._queue.get_nowait()

    assert await deliver("just chatting", 1) is None  # no mention: not for Valor
    question = approvals.record(store, -777, "Bash", {"command": "ls"})
    answer = await deliver(f"always {question.code}", 2)
    assert answer is not None and answer.is_group and not answer.mentions_valor
    configure(monkeypatch, VALOR_ALLOWED_CHAT_IDS=json.dumps([-777]))
    bridge = Bridge(MemoryTransport(), host_tools=False)
    assert await bridge.receive(answer) == "approval"
    decided = approvals.get(store, question.id)
    assert (decided.status, decided.scope, decided.decided_by) == ("allowed", "session", OWNER)
    assert decided.decided_by_name == "Ann"
    assert approvals.has_session_grant(store, -777, "Bash")


# -- per-chat policy and the bridge's question loop (issue 16, remaining parts) -----------------
async def test_a_chats_own_policy_adds_to_the_global_one(store, monkeypatch):
    configure(
        monkeypatch,
        VALOR_APPROVAL_ALWAYS_DENY=json.dumps(["WebFetch"]),
        VALOR_APPROVAL_TIMEOUT_SECONDS="0.1",
        VALOR_APPROVAL_CHAT_POLICIES=json.dumps(
            {
                str(CHAT): {
                    "never_ask": ["Bash"],
                    "always_deny": ["mcp__notion-tools"],
                    "on_timeout": "allow",
                }
            }
        ),
    )
    settings = get_settings()
    assert approvals.policy(settings, "Bash", chat_id=CHAT) == "allow"
    assert approvals.policy(settings, "Bash", chat_id=CHAT + 1) is None
    assert approvals.policy(settings, "mcp__notion-tools__query_notion_projects", chat_id=CHAT) == (
        "deny"
    )
    assert approvals.policy(settings, "WebFetch", chat_id=CHAT) == "deny"  # global still holds
    assert (approvals.on_timeout(settings, CHAT), approvals.on_timeout(settings, CHAT + 1)) == (
        "allow",
        "deny",
    )
    # No answer in time means this chat's meaning: allowed here, denied elsewhere.
    here = await approvals.decide_tool_use(store, settings, CHAT, "Write", {"a": 1}, "t1")
    there = await approvals.decide_tool_use(store, settings, CHAT + 1, "Write", {"a": 1}, "t2")
    assert json.loads(here)["behavior"] == "allow" and json.loads(there)["behavior"] == "deny"


async def test_the_question_loop_sleeps_while_idle_wakes_on_a_question_and_backs_off(
    store, allowlist, monkeypatch, caplog
):
    import logging
    import sqlite3

    from tests.support.waiting import wait_until_async

    reads = 0
    unasked = approvals.unasked

    def counting(store_):
        nonlocal reads
        reads += 1
        return unasked(store_)

    monkeypatch.setattr(approvals, "unasked", counting)
    transport = MemoryTransport()
    bridge = Bridge(transport, host_tools=False)
    async with bridge.serving():
        await asyncio.sleep(0.5)
        assert reads <= 2  # no run in flight: no store reads (it was one every 20 ms)
        approvals.record(store, CHAT, "Bash", {"command": "ls"})  # asked in this process
        await transport.wait_for(lambda: len(questions(transport)) == 1, 10)

        def failing(store_):
            nonlocal reads
            reads += 1
            raise sqlite3.OperationalError("disk I/O error")

        monkeypatch.setattr(approvals, "unasked", failing)
        reads = 0
        with caplog.at_level(logging.INFO, "valor.bridge"):
            bridge.chat_approvals.wake.set()
            await wait_until_async(lambda: reads >= 4, timeout=30)
            assert reads <= 6  # 40, 80, 160, 320 ms … apart: backing off, not spinning
            monkeypatch.setattr(approvals, "unasked", counting)
            await wait_until_async(
                lambda: any("work again" in r.getMessage() for r in caplog.records), timeout=30
            )
    failures = [r for r in caplog.records if "approval questions failed" in r.getMessage()]
    assert len(failures) == 1  # once per streak
