"""Forum topics as conversations of their own (issue 17), through Telethon's real client.

Updates are hand-built ``types.Message`` objects posted by ``FakeTelegram``
(tests/support/telegram_loopback.py) and read by Telethon's real update loop and dispatcher; the
bridge answers with the stand-in ``claude`` (tests/fake_claude.py) and, once, with the real CLI
against the fake Anthropic API. A topic gets its own session, queue, warm process, history scope
and context block; the chat's allowlist and tools token stay the chat's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

import pytest
from fastmcp import Client
from telethon.tl import functions, types

from bridge import inbox
from bridge.live import live_reply_factory
from bridge.memory import MemoryTransport, incoming
from bridge.pipeline import Bridge
from bridge.rate import Limits, RateController
from bridge.telegram import TelegramTransport
from bridge.transport import IncomingMessage
from servers.core.settings import get_settings
from servers.telegram import mcp
from tests.fakes import reply_with
from tests.support import configure, wait_until_async
from tests.support.bridge import install_fake_claude
from tests.support.telegram_loopback import (
    ANN,
    API,
    BOT_TOKEN,
    EPOCH,
    FORUM,
    FORUM_CHAT,
    FakeTelegram,
    loopback_transport,
)

APPLES, BANANAS = 17, 23  # two forum topics (their first message's id)


@pytest.fixture
def forum_env(monkeypatch, tmp_path):
    configure(
        monkeypatch,
        TELEGRAM_BOT_TOKEN=BOT_TOKEN,
        VALOR_ALLOWED_CHAT_IDS=json.dumps([FORUM_CHAT]),  # the allowlist stays per chat
        VALOR_CLAUDE_WORKDIR=str(tmp_path),  # no repo hooks: the block goes into the prompt
        VALOR_SANDBOX="off",
        **API,
    )
    return get_settings()


@pytest.fixture
def server() -> FakeTelegram:
    fake = FakeTelegram(bot_id=123456)
    fake.user(ANN)
    fake.chat(FORUM)
    return fake


def transport_for(settings, server: FakeTelegram) -> TelegramTransport:
    return loopback_transport(settings, server)


def in_topic(text: str, msg_id: int, topic: int) -> types.Message:
    """Ann writes ``@valorbot <text>`` (or a command, ``/status@valorbot``) in a forum topic;
    Telegram marks the topic in the reply header: ``forum_topic`` and the topic's id."""
    if text.startswith("/"):
        text = f"{text}@valorbot"
        entity = types.MessageEntityBotCommand(0, len(text))
    else:
        text = f"@valorbot {text}"
        entity = types.MessageEntityMention(0, 9)
    return types.Message(
        id=msg_id,
        peer_id=types.PeerChannel(FORUM.id),
        date=EPOCH,
        message=text,
        from_id=types.PeerUser(ANN.id),
        entities=[entity],
        reply_to=types.MessageReplyHeader(forum_topic=True, reply_to_msg_id=topic),
    )


@contextlib.asynccontextmanager
async def serving(bridge: Bridge, transport: TelegramTransport):
    """The bridge answering what Telethon's dispatcher delivers (as bridge/service.py runs it)."""
    transport.authorize = bridge.authorized
    if transport.client.is_connected() is False:
        await transport.start()

    async def feed() -> None:
        async for message in transport.updates():
            await bridge.receive(message)

    async with bridge.serving():
        pump = asyncio.create_task(feed())
        try:
            yield
        finally:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump
            await bridge.drain()
    await transport.close()


def rows_done(store, count: int):
    def check() -> bool:
        rows = store.query("SELECT status FROM bridge_inbox WHERE status != 'command'")
        return len(rows) == count and all(r["status"] == "done" for r in rows)

    return check


def answers(server: FakeTelegram) -> dict[int, set[int | None]]:
    """Question id → where the messages answering it went (reply_to ids)."""
    found: dict[int, set[int | None]] = {}
    for request in server.sent:
        if "Echo:" in request.message:
            question = int(request.message.split("#", 1)[1].split()[0])
            found.setdefault(question, set()).add(request.reply_to.reply_to_msg_id)
    return found


def sessions(store) -> dict[int, str | None]:
    rows = store.query(
        "SELECT topic_id, session_id FROM chat_sessions WHERE chat_id = ?", (FORUM_CHAT,)
    )
    return {r["topic_id"]: r["session_id"] for r in rows}


async def test_two_topics_are_two_conversations(store, forum_env, server, tmp_path, monkeypatch):
    install_fake_claude(tmp_path / "bin", monkeypatch)
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    monkeypatch.setenv("FAKE_CLAUDE_PROMPTS_DIR", str(prompts))
    settings = get_settings()
    transport = transport_for(settings, server)
    factory = live_reply_factory(RateController(Limits(time_scale=0.01)), settings)
    bridge = Bridge(transport, settings=settings, host_tools=False, reply_factory=factory)
    async with serving(bridge, transport):
        server.post(in_topic("#101 apples are red", 101, APPLES))
        server.post(in_topic("#102 bananas are yellow", 102, BANANAS))
        await wait_until_async(rows_done(store, 2), timeout=60, message="both topics answered")
        first = sessions(store)
        server.post(in_topic("#103 which colour were they?", 103, APPLES))
        await wait_until_async(rows_done(store, 3), timeout=60, message="the follow-up")
        server.post(in_topic("/status", 104, BANANAS))
        server.post(in_topic("/new", 105, APPLES))
        await wait_until_async(
            lambda: {"Queue:", "Fresh"} <= {r.message.split()[0] for r in server.sent},
            timeout=30,
            message="the commands' replies",
        )

    # Two sessions, one per topic; the follow-up resumed its own topic's session.
    assert set(first) == {APPLES, BANANAS} and first[APPLES] != first[BANANAS]
    assert sessions(store) == {APPLES: None, BANANAS: first[BANANAS]}  # /new: that topic only
    # Every answer went to the question it answers, inside its topic; typing too.
    assert answers(server) == {101: {101}, 102: {102}, 103: {103}}
    typing = server.requested(functions.messages.SetTypingRequest)
    assert {t.top_msg_id for t in typing} == {APPLES, BANANAS}
    # The follow-up's context block held its topic's turns and nothing of the other topic.
    (follow_up,) = [p.read_text() for p in prompts.iterdir() if "#103" in p.read_text()]
    assert "apples are red" in follow_up and "bananas" not in follow_up
    assert f"forum topic {APPLES}" in follow_up  # the model is told its topic (for the tools)
    # /status answered in its topic, about the topic.
    (status,) = [r for r in server.sent if r.message.startswith("Queue:")]
    assert "waiting in this topic" in status.message
    assert status.reply_to.reply_to_msg_id == 104
    # History rows carry their topic: a search scoped to a topic returns only its messages.
    async with Client(mcp) as client:
        scoped = await client.call_tool(
            "search_conversation_history",
            {"query": "apples OR bananas", "chat_id": FORUM_CHAT, "topic_id": BANANAS},
        )
        whole = await client.call_tool(
            "search_conversation_history", {"query": "apples OR bananas", "chat_id": FORUM_CHAT}
        )
        context = await client.call_tool(
            "get_conversation_context", {"chat_id": FORUM_CHAT, "topic_id": APPLES}
        )
    topic_of = {
        r["message_id"]: r["topic_id"]
        for r in store.query("SELECT message_id, topic_id FROM messages")
    }
    hits = scoped.structured_content["hits"]
    assert hits and {topic_of[h["message_id"]] for h in hits} == {BANANAS}
    assert {topic_of[h["message_id"]] for h in whole.structured_content["hits"]} == {
        APPLES,
        BANANAS,
    }
    assert "apples are red" in context.structured_content["context"]
    assert "bananas" not in context.structured_content["context"]


async def test_a_recovered_row_answers_in_its_topic_after_a_restart(
    store, forum_env, server, tmp_path, monkeypatch
):
    """A row accepted by a bridge that stopped: the new transport has never seen the message
    (its topic map is empty), yet every part and the typing action go to the topic."""
    install_fake_claude(tmp_path / "bin", monkeypatch)
    long_line = " ".join(f"word{n}" for n in range(900))  # the echo needs several parts
    accepted = IncomingMessage(
        chat_id=FORUM_CHAT,
        message_id=201,
        sender_id=ANN.id,
        sender_name="Ann",
        text=f"#201 {long_line}",
        sent_at=EPOCH.timestamp(),
        is_group=True,
        mentions_valor=True,
        topic_id=APPLES,
    )
    assert inbox.persist_incoming(store, accepted)
    settings = get_settings()
    transport = transport_for(settings, server)
    await transport.start()
    # The session knows the group (as a restarted bridge's does), not the message's topic.
    server.post(
        types.Message(
            id=200,
            peer_id=types.PeerChannel(FORUM.id),
            date=EPOCH,
            message="@valorbot morning",
            entities=[types.MessageEntityMention(0, 9)],
            from_id=types.PeerUser(ANN.id),
        )
    )
    stream = transport.updates()
    assert (await asyncio.wait_for(stream.__anext__(), 10)).message_id == 200
    await stream.aclose()
    assert transport.topic_of(FORUM_CHAT, 201) is None
    factory = live_reply_factory(RateController(Limits(time_scale=0.01)), settings)
    bridge = Bridge(transport, settings=settings, host_tools=False, reply_factory=factory)
    async with serving(bridge, transport):
        await wait_until_async(rows_done(store, 1), timeout=60, message="the recovered row")

    finals = [r for r in server.sent if r.message.startswith(("Echo:", "word"))]
    parts = finals[-2:]
    assert parts[0].reply_to.reply_to_msg_id == 201  # answers the question, in its topic
    assert parts[1].reply_to.reply_to_msg_id == APPLES  # the rest is posted into the topic
    typing = server.requested(functions.messages.SetTypingRequest)
    assert typing and {t.top_msg_id for t in typing} == {APPLES}
    assert sessions(store).keys() == {APPLES}


@pytest.mark.e2e
async def test_topics_get_their_own_warm_claude_code(
    store, forum_env, server, claude_bin, claude_env, fake_anthropic, monkeypatch
):
    """The real CLI (warm sessions on) against the fake Anthropic API: one resident process
    and one session per topic, and each model request carries only its topic's turns."""
    configure(
        monkeypatch,
        VALOR_CLAUDE_BIN=str(claude_bin),
        VALOR_CLAUDE_MAX_RETRIES="0",
        VALOR_WARM_SESSIONS="on",
    )
    fake_anthropic.responder = reply_with("Noted.")
    settings = get_settings()
    transport = transport_for(settings, server)
    factory = live_reply_factory(RateController(Limits(time_scale=0.01)), settings)
    bridge = Bridge(
        transport, settings=settings, host_tools=False, reply_factory=factory, claude_env=claude_env
    )
    async with serving(bridge, transport):
        server.post(in_topic("apples are red", 301, APPLES))
        await wait_until_async(rows_done(store, 1), timeout=90, message="topic one")
        server.post(in_topic("bananas are yellow", 302, BANANAS))
        await wait_until_async(rows_done(store, 2), timeout=90, message="topic two")
        warm = sorted(bridge.warm.chats(), key=str)
        pids = {key: bridge.warm.process_of(key).pid for key in warm}

    assert warm == [(FORUM_CHAT, APPLES), (FORUM_CHAT, BANANAS)]
    assert len(set(pids.values())) == 2
    found = sessions(store)
    assert found.keys() == {APPLES, BANANAS} and found[APPLES] != found[BANANAS]
    second = json.dumps(fake_anthropic.main_requests[-1]["messages"])
    assert "bananas are yellow" in second and "apples are red" not in second
    assert {r.reply_to.reply_to_msg_id for r in server.sent if r.message == "Noted."} == {
        301,
        302,
    }


async def test_a_topic_waits_only_for_itself_and_stop_acts_on_its_topic(
    store, forum_env, tmp_path, monkeypatch
):
    """Each topic has its own queue: a long run in one topic does not hold the other's answer,
    and ``/stop`` in a topic stops that topic's run only."""
    install_fake_claude(tmp_path / "bin", monkeypatch)
    configure(monkeypatch, VALOR_MAX_CONCURRENT_RUNS="2")
    transport = MemoryTransport()
    bridge = Bridge(transport, host_tools=False)

    def said(message_id: int, text: str, topic: int) -> IncomingMessage:
        return incoming(
            FORUM_CHAT,
            message_id,
            text,
            sender_id=ANN.id,
            is_group=True,
            mentions_valor=True,
            topic_id=topic,
        )

    async with bridge.serving():
        await bridge.receive(said(1, "think long sleep:60", APPLES))
        await wait_until_async(lambda: bridge._running, message="the long run")
        await bridge.receive(said(2, "quick one", BANANAS))
        await wait_until_async(
            lambda: store.query(
                "SELECT 1 FROM bridge_inbox WHERE message_id = 2 AND status = 'done'"
            ),
            message="the other topic's answer",
        )
        assert bridge._running  # the long run is still going
        await bridge.receive(said(3, "/stop", BANANAS))
        await bridge.receive(said(4, "/stop", APPLES))
        await bridge.drain()

    assert transport.replies_to(FORUM_CHAT, 2)[0].text == "Echo: quick one"
    assert transport.replies_to(FORUM_CHAT, 2)[0].topic_id == BANANAS
    assert transport.replies_to(FORUM_CHAT, 3)[0].text == "Nothing is running in this chat."
    assert transport.replies_to(FORUM_CHAT, 4)[0].text == "Stopping the current reply."
    statuses = {r["message_id"]: r["status"] for r in store.query("SELECT * FROM bridge_inbox")}
    assert statuses[1] == "cancelled" and statuses[2] == "done"
    stopped = transport.replies_to(FORUM_CHAT, 1)
    assert stopped and all(m.topic_id == APPLES for m in stopped)
