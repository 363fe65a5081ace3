"""Live drafts (issue 17) on the transport level, through Telethon's real client offline.

Telethon 1.45 (layer 229) has the MTProto side of the Bot API's ``sendMessageDraft``:
``messages.setTyping`` with ``SendMessageTextDraftAction``, used by bots in private chats. A
bot's reply in a private chat streams as a draft and ends as a sent message; a user account, a
group, or a draft Telegram refuses keeps the edited live message. Draft updates go through the
rate controller like edits, and a flood wait on their method holds them.
"""

from __future__ import annotations

import asyncio
import os

import pytest
from telethon import errors
from telethon.crypto import AuthKey
from telethon.sessions import StringSession
from telethon.tl import functions, types

from bridge.live import DRAFT_METHODS, LiveReply
from bridge.rate import Limits, RateController
from bridge.telegram import TelegramTransport
from bridge.transport import DraftTransport
from servers.core.settings import get_settings
from tests.support import configure, wait_until_async
from tests.support.telegram_loopback import (
    ANN,
    API,
    BOT_TOKEN,
    EPOCH,
    FakeTelegram,
    loopback_transport,
)

GROUP = types.Chat(
    id=77, title="Team", photo=types.ChatPhotoEmpty(), participants_count=3, date=EPOCH, version=1
)
GROUP_CHAT = -77


@pytest.fixture
def server() -> FakeTelegram:
    fake = FakeTelegram(bot_id=123456)
    fake.user(ANN)
    fake.chat(GROUP)
    return fake


async def started(settings, server: FakeTelegram) -> TelegramTransport:
    transport = loopback_transport(settings, server, lambda incoming: True)
    await transport.start()
    # Telethon learns the peers from an update, as it does from a real chat.
    server.post(
        types.Message(
            id=1,
            peer_id=types.PeerUser(ANN.id),
            date=EPOCH,
            message="hi",
            from_id=types.PeerUser(ANN.id),
        )
    )
    stream = transport.updates()
    await asyncio.wait_for(stream.__anext__(), 10)
    await stream.aclose()
    return transport


@pytest.fixture
async def bot(monkeypatch, server):
    configure(monkeypatch, TELEGRAM_BOT_TOKEN=BOT_TOKEN, **API)
    transport = await started(get_settings(), server)
    yield transport
    await transport.close()


def drafts(server: FakeTelegram) -> list:
    return [
        r.action
        for r in server.requested(functions.messages.SetTypingRequest)
        if isinstance(r.action, types.SendMessageTextDraftAction)
    ]


def sent_texts(server: FakeTelegram) -> list[str]:
    return [r.message for r in server.sent]


async def test_a_bot_streams_a_draft_in_a_private_chat_and_sends_the_answer(bot, server):
    assert isinstance(bot, DraftTransport)
    assert bot.drafts_enabled(ANN.id) and not bot.drafts_enabled(GROUP_CHAT)
    rate = RateController(Limits(time_scale=0.01))
    live = LiveReply(bot, ANN.id, 1, rate=rate)
    assert live.drafting
    for text in ("The answer", "The answer grows", "The answer grows **longer**"):
        await live.text(text)
        await wait_until_async(
            lambda t=text: (
                drafts(server) and drafts(server)[-1].text.text.startswith(t.replace("**", ""))
            ),
            message="the draft",
        )
    assert not server.sent  # nothing was sent as a message while streaming
    await live.finish("The answer grows **longer**. Done.")

    shown = drafts(server)
    assert len({d.random_id for d in shown}) == 1 and shown[0].random_id == live.draft_id
    assert shown[-1].text.entities  # formatted like a message (bold)
    assert sent_texts(server) == ["The answer grows longer. Done."]  # the final, as a message
    assert server.sent[0].reply_to.reply_to_msg_id == 1
    assert not server.requested(functions.messages.EditMessageRequest)
    assert not server.requested(functions.messages.DeleteMessagesRequest)
    assert live.drafts_sent == len(shown) and live.edits_sent == 0


async def test_an_unchanged_draft_is_shown_again_before_it_lapses(bot, server):
    rate = RateController(Limits(time_scale=0.01))
    live = LiveReply(bot, ANN.id, 1, rate=rate, draft_refresh_seconds=0.05)
    await live.text("Thinking about it")
    await wait_until_async(lambda: len(drafts(server)) >= 3, message="the draft shown again")
    assert {d.text.text for d in drafts(server)} == {"Thinking about it"}
    await live.finish("Thought.")
    count = len(drafts(server))
    await asyncio.sleep(0.2)
    assert len(drafts(server)) == count  # no draft after the answer went out


async def test_a_flood_wait_on_drafts_holds_them_and_the_draft_follows(bot, server):
    server.fail[functions.messages.SetTypingRequest].append(
        errors.FloodWaitError(request=functions.messages.SetTypingRequest(ANN.id, None), capture=1)
    )
    rate = RateController(Limits(time_scale=0.01))
    live = LiveReply(bot, ANN.id, 1, rate=rate)
    await live.text("Slow start")
    await wait_until_async(lambda: live.flood_waits == 1, message="the flood wait")
    assert rate.blocked_for(ANN.id, DRAFT_METHODS) > 0  # drafts (and typing) wait
    assert rate.blocked_for(ANN.id, ("SendMessageRequest",)) == 0  # the answer need not
    await wait_until_async(lambda: drafts(server), timeout=15, message="the draft after the wait")
    assert live.drafting  # a flood wait is no refusal
    await live.finish("Slow start, then done.")
    assert sent_texts(server) == ["Slow start, then done."]


async def test_a_refused_draft_falls_back_to_the_live_message(bot, server):
    server.fail[functions.messages.SetTypingRequest].append(
        errors.RPCError(functions.messages.SetTypingRequest(ANN.id, None), "METHOD_INVALID", 400)
    )
    rate = RateController(Limits(time_scale=0.01))
    live = LiveReply(bot, ANN.id, 1, rate=rate)
    await live.text("Partial answer")
    await wait_until_async(lambda: server.sent, message="the live message instead")
    assert not live.drafting and not bot.drafts_enabled(ANN.id)  # for later replies too
    assert sent_texts(server) == ["Partial answer"]  # the preview, as before drafts
    assert not LiveReply(bot, ANN.id, 2, rate=rate).drafting


async def test_a_group_keeps_the_edited_live_message(bot, server):
    rate = RateController(Limits(time_scale=0.01))
    live = LiveReply(bot, GROUP_CHAT, 5, rate=rate)
    assert not live.drafting
    await live.text("In a group")
    await wait_until_async(lambda: server.sent, message="the live message")
    assert not drafts(server) and sent_texts(server) == ["In a group"]


async def test_a_user_account_keeps_the_edited_live_message(monkeypatch, server):
    session = StringSession()
    session.set_dc(2, "149.154.167.51", 443)
    session.auth_key = AuthKey(os.urandom(256))
    server.authorized_keys.add(session.auth_key.key)
    server.me = types.User(id=5000, access_hash=5, first_name="Valor", is_self=True)
    configure(monkeypatch, TELEGRAM_SESSION=session.save(), **API)
    transport = await started(get_settings(), server)
    try:
        assert not transport.drafts_enabled(ANN.id)  # drafts are for bots
        live = LiveReply(transport, ANN.id, 1, rate=RateController(Limits(time_scale=0.01)))
        assert not live.drafting
        await live.text("From a user account")
        await wait_until_async(lambda: server.sent, message="the live message")
        assert not drafts(server) and sent_texts(server) == ["From a user account"]
    finally:
        await transport.close()
