"""Warm sessions: a resident Claude Code per active chat (servers/core/claude_resident.py),
driven by the bridge (bridge/pipeline.py). The real CLI against the fake Anthropic API, sandboxed
as in production; the fake's responder holds a turn open where a test needs one mid-turn."""

from __future__ import annotations

import base64
import json
import os
import signal
import threading
import time

import pytest

from bridge import inbox
from bridge.memory import MemoryTransport, incoming
from bridge.pipeline import Bridge
from servers.core import sandbox
from tests.fakes import Text
from tests.fakes.anthropic_api import current_turn
from tests.support import configure
from tests.support.bridge import alive

OWNER = 1
CHAT, OTHER, THIRD = 4242, 4343, 4444
HOLD_SECONDS = 60.0  # a held model call is released by the test long before this


@pytest.fixture
def warm(claude_bin, monkeypatch, tmp_path):
    configure(
        monkeypatch,
        VALOR_CLAUDE_BIN=str(claude_bin),
        VALOR_CLAUDE_WORKDIR=str(tmp_path),  # no repo hooks: fast runs
        VALOR_CLAUDE_MAX_RETRIES="0",
        VALOR_ALLOWED_USER_IDS=json.dumps([OWNER]),
        VALOR_WARM_SESSIONS="on",
    )
    return claude_bin


def prompt_line(request) -> str:
    """The last line of the person's prompt in the current turn (Claude Code's reminders,
    ``<system-reminder>`` blocks and role "system" messages, left out)."""
    texts = [
        block.get("text", "")
        for message in current_turn(request)
        if message.get("role") == "user"
        for block in (
            [{"type": "text", "text": message["content"]}]
            if isinstance(message.get("content"), str)
            else message.get("content") or []
        )
        if block.get("type") == "text" and not block.get("text", "").startswith("<system-")
    ]
    lines = [line for text in texts for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


class Model:
    """The fake model's answers: ``Reply to: <the prompt's last line>``; a prompt holding a
    word in ``hold`` waits until ``release`` (or the hold limit), so a turn stays open."""

    def __init__(self, fake):
        self.fake = fake
        self.hold: set[str] = set()
        self.released = threading.Event()
        self.held: list[str] = []
        fake.responder = self

    def __call__(self, request):
        last = prompt_line(request)
        if any(word in last for word in self.hold):
            self.held.append(last)
            self.released.wait(HOLD_SECONDS)
        return [Text(f"Reply to: {last}")]

    def prompts_seen(self, request) -> str:
        return json.dumps(request["messages"])


def bridge_for(transport, claude_env, **kwargs):
    return Bridge(transport, claude_env=claude_env, host_tools=kwargs.pop("host_tools", False),
                  **kwargs)  # fmt: skip


def replies(transport, chat, message_id):
    return [m.text for m in transport.replies_to(chat, message_id)]


def registrations(store):
    return [dict(r) for r in store.query("SELECT pid, ended_at FROM processes ORDER BY id")]


def token_claims(config_path):
    config = json.loads(config_path.read_text())
    header = next(iter(config["mcpServers"].values()))["headers"]["Authorization"]
    body = header.removeprefix("Bearer ").split(".")[1]
    return json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))


@pytest.mark.e2e
async def test_three_messages_one_process_whole_conversation_and_per_turn_cost(
    store, warm, claude_env, fake_anthropic
):
    model = Model(fake_anthropic)
    transport = MemoryTransport()
    bridge = bridge_for(transport, claude_env, host_tools=True)
    pids, costs = [], []
    async with bridge.serving():
        for n, text in enumerate(["first: apples", "second: pears", "third: plums"], start=1):
            await bridge.receive(incoming(CHAT, n, text))
            await bridge.drain()
            pids.append(bridge.warm.process_of(CHAT).pid)
            costs.append(inbox.last_cost(store, CHAT)[0])
        # The tools token lives in the process's config: bound to the chat, outliving the
        # process's maximum age (so it never expires under a running process).
        (config,) = (store.path.parent / "run").glob("mcp-*.json")
        claims = token_claims(config)
        assert claims["c"] == CHAT
        assert claims["e"] - time.time() > bridge.settings.warm_max_age_seconds
    assert len(set(pids)) == 1 and not alive(pids[0])  # one process, ended with the bridge
    assert [replies(transport, CHAT, n) for n in (1, 2, 3)] == [
        ["Reply to: first: apples"],
        ["Reply to: second: pears"],
        ["Reply to: third: plums"],
    ]
    last = fake_anthropic.main_requests[-1]
    for earlier in ("first: apples", "Reply to: first: apples", "second: pears"):
        assert earlier in model.prompts_seen(last)
    assert len(registrations(store)) == 1 and registrations(store)[0]["ended_at"]
    # Claude Code reports the session's running total; each turn is charged its difference.
    assert all(cost > 0 for cost in costs)
    assert costs[1] < 1.5 * costs[0] and costs[2] < 1.5 * costs[0]
    assert inbox.last_cost(store, CHAT)[1] == pytest.approx(sum(costs))
    assert not list((store.path.parent / "run").glob("mcp-*.json"))  # removed with the process


@pytest.mark.e2e
async def test_idle_process_is_closed_after_the_idle_time(
    store, warm, claude_env, fake_anthropic, monkeypatch
):
    configure(monkeypatch, VALOR_WARM_IDLE_SECONDS="1")
    Model(fake_anthropic)
    transport = MemoryTransport()
    bridge = bridge_for(transport, claude_env)
    async with bridge.serving():
        await bridge.receive(incoming(CHAT, 1, "hello"))
        await bridge.drain()
        pid = bridge.warm.process_of(CHAT).pid
        assert alive(pid)
        # Closed: out of the pool, the process gone, and (a moment later) its registry row ended.
        await transport.wait_for(
            lambda: (
                len(bridge.warm) == 0
                and not alive(pid)
                and registrations(store)[0]["ended_at"] is not None
            ),
            timeout=30,
        )
        # The session stays: the next message resumes it in a fresh process.
        await bridge.receive(incoming(CHAT, 2, "again"))
        await bridge.drain()
        assert bridge.warm.process_of(CHAT).pid != pid
    assert replies(transport, CHAT, 2) == ["Reply to: again"]
    assert "Reply to: hello" in json.dumps(fake_anthropic.main_requests[-1]["messages"])
    assert bridge.warm.closed_reasons["idle"] >= 1


@pytest.mark.e2e
async def test_least_recently_used_process_is_closed_at_the_limit(
    store, warm, claude_env, fake_anthropic, monkeypatch
):
    configure(monkeypatch, VALOR_WARM_MAX_PROCESSES="2")
    Model(fake_anthropic)
    transport = MemoryTransport()
    bridge = bridge_for(transport, claude_env)
    pid = {}
    async with bridge.serving():
        for n, chat in enumerate([CHAT, OTHER, CHAT, THIRD], start=1):
            await bridge.receive(incoming(chat, n, f"message {n}"))
            await bridge.drain()
            pid.setdefault(chat, bridge.warm.process_of(chat).pid)
        # CHAT was used after OTHER, so OTHER (least recently used) made room for THIRD.
        assert bridge.warm.chats() == [CHAT, THIRD]
        await transport.wait_for(lambda: not alive(pid[OTHER]))
        assert alive(pid[CHAT]) and alive(pid[THIRD])
        assert bridge.warm.peak <= 2
    assert bridge.warm.closed_reasons == {"evicted": 1, "bridge stopped": 2}
    assert [replies(transport, c, n) for n, c in enumerate([CHAT, OTHER, CHAT, THIRD], 1)] == [
        [f"Reply to: message {n}"] for n in range(1, 5)
    ]


@pytest.mark.e2e
async def test_recycling_after_n_turns_keeps_the_conversation(
    store, warm, claude_env, fake_anthropic, monkeypatch
):
    configure(monkeypatch, VALOR_WARM_MAX_TURNS="2")
    model = Model(fake_anthropic)
    transport = MemoryTransport()
    bridge = bridge_for(transport, claude_env)
    started, sessions = [], []
    async with bridge.serving():
        for n in (1, 2, 3):
            await bridge.receive(incoming(CHAT, n, f"fact number {n}"))
            await bridge.drain()
            started.append(bridge.warm.started_total)
            sessions.append(inbox.session_for(store, CHAT))
        third = bridge.warm.process_of(CHAT).pid
    # Renewed right after its second turn: the third turn ran in a second process.
    assert started == [1, 1, 2]
    first, second = (r["pid"] for r in registrations(store))
    assert third == second != first and not alive(first)
    assert bridge.warm.closed_reasons.get("turns") == 1
    # The new process resumed the session: same session, and the model sees it all.
    assert len(set(sessions)) == 1
    last = fake_anthropic.main_requests[-1]
    for earlier in ("fact number 1", "Reply to: fact number 2", "fact number 3"):
        assert earlier in model.prompts_seen(last)
    assert replies(transport, CHAT, 3) == ["Reply to: fact number 3"]


@pytest.mark.e2e
async def test_stop_interrupts_the_turn_and_the_next_message_works(
    store, warm, claude_env, fake_anthropic
):
    model = Model(fake_anthropic)
    model.hold.add("novel")
    transport = MemoryTransport()
    bridge = bridge_for(transport, claude_env)
    try:
        async with bridge.serving():
            await bridge.receive(incoming(CHAT, 1, "write a novel"))
            await transport.wait_for(lambda: bool(model.held))
            pid = bridge.warm.process_of(CHAT).pid
            started = time.monotonic()
            assert await bridge.receive(incoming(CHAT, 2, "/stop")) == "command"
            await bridge.drain()
            assert time.monotonic() - started < 20  # the held model call would take 60 s
            (stopped,) = replies(transport, CHAT, 1)
            assert "Stopped." in stopped
            # The interrupt went through the control channel: the same process answers next.
            assert alive(pid) and bridge.warm.process_of(CHAT).pid == pid
            await bridge.receive(incoming(CHAT, 3, "a haiku then"))
            await bridge.drain()
            assert bridge.warm.process_of(CHAT).pid == pid
    finally:
        model.released.set()
    assert replies(transport, CHAT, 2) == ["Stopping the current reply."]
    assert replies(transport, CHAT, 3) == ["Reply to: a haiku then"]
    rows = [r["status"] for r in store.query("SELECT status FROM bridge_inbox ORDER BY id")]
    assert rows == ["cancelled", "command", "done"]


@pytest.mark.e2e
async def test_process_killed_mid_turn_answers_the_message_exactly_once(
    store, warm, claude_env, fake_anthropic
):
    model = Model(fake_anthropic)
    model.hold.add("doomed")
    transport = MemoryTransport()
    bridge = bridge_for(transport, claude_env)
    try:
        async with bridge.serving():
            await bridge.receive(incoming(CHAT, 1, "remember the word kiwi"))
            await bridge.drain()
            first = bridge.warm.process_of(CHAT).pid
            await bridge.receive(incoming(CHAT, 2, "a doomed question"))
            await transport.wait_for(lambda: bool(model.held))
            claude_pid, _ = sandbox.run_process(first)  # Claude Code inside the sandbox
            assert claude_pid != first
            model.hold.clear()  # the re-run is answered at once
            os.kill(claude_pid, signal.SIGKILL)
            await bridge.drain()
            second = bridge.warm.process_of(CHAT).pid
    finally:
        model.released.set()
    assert second != first and not alive(first)
    assert replies(transport, CHAT, 2) == ["Reply to: a doomed question"]
    assert [r["status"] for r in store.query("SELECT status FROM bridge_inbox")] == ["done"] * 2
    # The fresh process resumed the session: the model saw the earlier turn.
    assert "kiwi" in json.dumps(fake_anthropic.main_requests[-1]["messages"])


@pytest.mark.e2e
async def test_a_message_whose_rerun_dies_too_is_reported_once(
    store, warm, claude_env, fake_anthropic
):
    model = Model(fake_anthropic)
    model.hold.add("cursed")
    transport = MemoryTransport()
    bridge = bridge_for(transport, claude_env)
    killed = []
    try:
        async with bridge.serving():
            await bridge.receive(incoming(CHAT, 1, "a cursed question"))
            for attempt in (1, 2):  # the first process, then the fresh one re-running it
                await transport.wait_for(lambda n=attempt: len(model.held) == n)
                root = bridge.warm.process_of(CHAT).pid
                os.kill(sandbox.run_process(root)[0], signal.SIGKILL)
                killed.append(root)
            await bridge.drain()
            assert len(bridge.warm) == 0
    finally:
        model.released.set()
    assert killed[0] != killed[1]
    (reply,) = replies(transport, CHAT, 1)
    assert "⚠️" in reply and "without an answer" in reply
    assert [r["status"] for r in store.query("SELECT status FROM bridge_inbox")] == ["failed"]


@pytest.mark.e2e
async def test_mid_turn_arrivals_wait_and_are_answered_in_order(
    store, warm, claude_env, fake_anthropic
):
    model = Model(fake_anthropic)
    model.hold.add("slow")
    transport = MemoryTransport()
    bridge = bridge_for(transport, claude_env)
    try:
        async with bridge.serving():
            await bridge.receive(incoming(CHAT, 1, "a slow one"))
            await transport.wait_for(lambda: bool(model.held))
            for n in (2, 3):
                assert await bridge.receive(incoming(CHAT, n, f"then number {n}")) == "queued"
            # Nothing was written into the busy process: the model has seen one prompt.
            assert len(fake_anthropic.main_requests) == 1
            assert "then number" not in json.dumps(fake_anthropic.main_requests[0])
            model.released.set()
            await bridge.drain()
    finally:
        model.released.set()
    assert [m.text for m in transport.messages_in(CHAT)] == [
        "Reply to: a slow one",
        "Reply to: then number 2",
        "Reply to: then number 3",
    ]
    assert len(registrations(store)) == 1


@pytest.mark.e2e
async def test_warm_sessions_off_runs_each_message_in_its_own_process(
    store, warm, claude_env, fake_anthropic, monkeypatch
):
    configure(monkeypatch, VALOR_WARM_SESSIONS="off")
    Model(fake_anthropic)
    transport = MemoryTransport()
    bridge = bridge_for(transport, claude_env)
    async with bridge.serving():
        assert not bridge.warm.enabled
        for n in (1, 2):
            await bridge.receive(incoming(CHAT, n, f"cold {n}"))
            await bridge.drain()
            assert len(bridge.warm) == 0
    registered = registrations(store)
    assert len({r["pid"] for r in registered}) == 2 and all(r["ended_at"] for r in registered)
    assert replies(transport, CHAT, 2) == ["Reply to: cold 2"]
