"""Parts of an answer already delivered are never sent again, across a bridge restart (issue 20).

A bridge stopped between part 1 and part 2 of a split answer leaves its inbox row open; the next
start finds the answer and its progress in the store (``bridge_deliveries``) and sends only the
missing parts, without running Claude Code again. Shown through the bridge with the in-memory
transport, and through Telethon's real client against the loopback Telegram.
"""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest
from telethon.tl import functions

from bridge import inbox
from bridge.formatting import render
from bridge.live import LiveReply
from bridge.memory import MemoryTransport, incoming
from bridge.pipeline import Bridge
from bridge.rate import Limits, RateController
from bridge.transport import SentMessage
from servers.core import history
from servers.core.claude_command import ClaudeRun
from servers.core.claude_events import ResultEvent
from servers.core.claude_runner import RunOutcome
from servers.core.settings import get_settings
from tests.support import configure, wait_until_async
from tests.test_telegram_service import ANN, bot_env, server, text_message, transport_for

__all__ = ["bot_env", "server"]  # fixtures shared with the transport tests

OWNER, CHAT = 1, 4242


def long_answer() -> str:
    return "\n\n".join(f"Paragraph {i}: " + "words " * 120 for i in range(12))


class OneAnswerRunner:
    """Stands in for ClaudeRunner: each run answers at once with a long (split) answer."""

    claude_bin = "claude"

    def __init__(self) -> None:
        self.runs = 0

    async def run(self, request: ClaudeRun, on_event, cancel) -> RunOutcome:
        self.runs += 1
        session = str(uuid.uuid4())
        result = ResultEvent(
            "success", False, "ok", session, 0.0, 1, 5.0, {}, None, (), (), "completed"
        )
        return RunOutcome("ok", text=long_answer(), session_id=session, result=result)


class StallingTransport(MemoryTransport):
    """Sends the first message, then hangs on the next, as a bridge being stopped would."""

    def __init__(self) -> None:
        super().__init__()
        self.stalled = asyncio.Event()

    async def send_text(self, chat_id, text, *, reply_to=None) -> SentMessage:
        if self.sent:
            self.stalled.set()
            await asyncio.Event().wait()  # until the bridge stops
        return await super().send_text(chat_id, text, reply_to=reply_to)


def live_replies(transport, chat_id, reply_to, **topic) -> LiveReply:
    rate = RateController(Limits(time_scale=0.001))
    return LiveReply(transport, chat_id, reply_to, rate=rate, retry_backoff=0.01, **topic)


@pytest.fixture
def owner(monkeypatch):
    configure(monkeypatch, VALOR_ALLOWED_USER_IDS=json.dumps([OWNER]), VALOR_WARM_SESSIONS="off")


async def test_a_bridge_stopped_after_part_one_sends_only_the_rest_on_restart(store, owner):
    parts = [p.plain() for p in render(long_answer())]
    assert len(parts) >= 3
    runner = OneAnswerRunner()

    first = StallingTransport()
    bridge = Bridge(first, runner=runner, host_tools=False, persona="", reply_factory=live_replies)
    async with bridge.serving():
        await bridge.receive(incoming(CHAT, 7, "tell me a lot", sender_id=OWNER))
        await asyncio.wait_for(first.stalled.wait(), 30)
    # stopped mid-answer: part 1 is in the chat, the row is still open
    assert [m.text for m in first.sent] == parts[:1]
    [row] = inbox.unfinished(store)
    assert inbox.DeliveryLog(store, row.id).parts_sent == 1

    second = MemoryTransport(first_message_id=20_000)
    bridge = Bridge(second, runner=runner, host_tools=False, persona="", reply_factory=live_replies)
    async with bridge.serving():
        await asyncio.wait_for(bridge.drain(), 30)
    assert [m.text for m in second.sent] == parts[1:]  # the rest, once each
    assert runner.runs == 1  # the answer was not asked for again
    assert inbox.get_row(store, row.id).status == "done"
    assert inbox.DeliveryLog(store, row.id).answer is None  # kept only while the row is open
    [reply] = [m for m in history.recent_messages(store, CHAT, 0, 10) if m["direction"] == "out"]
    assert reply["message_id"] == first.sent[0].message_id  # the answer's first message


async def test_a_restart_between_parts_over_telethon_sends_each_part_once(
    store, bot_env, server, monkeypatch
):
    server.post(text_message("tell me a lot", 70))
    transport = transport_for(bot_env, server)
    await transport.start()
    row_id = 1  # the inbox row this answer belongs to
    real_call = transport.client._call
    stalled = asyncio.Event()

    async def stall_second_part(sender, request, *args, **kwargs):
        if isinstance(request, functions.messages.SendMessageRequest) and server.sent:
            stalled.set()
            await asyncio.Event().wait()  # the bridge is stopped here
        return await real_call(sender, request, *args, **kwargs)

    monkeypatch.setattr(transport.client, "_call", stall_second_part)
    live = live_replies(transport, ANN.id, 70)
    live.track(inbox.DeliveryLog(store, row_id))
    sending = asyncio.create_task(live.finish(long_answer()))
    await asyncio.wait_for(stalled.wait(), 15)
    sending.cancel()
    with pytest.raises(asyncio.CancelledError):
        await sending
    await transport.close()
    assert len(server.sent) == 1

    restarted = transport_for(get_settings(), server)
    await restarted.start()
    live = live_replies(restarted, ANN.id, 70)
    live.track(inbox.DeliveryLog(store, row_id))
    await live.finish("a different answer from a re-run")  # the recorded answer wins
    await wait_until_async(lambda: len(server.sent) >= 2, timeout=10)
    texts = [r.message for r in server.sent]
    assert texts == [p.plain() for p in render(long_answer())]
    assert live.message_id == inbox.DeliveryLog(store, row_id).message_ids[0]
    await restarted.close()
