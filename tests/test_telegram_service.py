"""The Telegram transport against Telegram's behaviour, offline (issue 20).

Telethon's real client runs end to end: ``connect``, login, ``MessageBox`` with catch-up, the
update loop and dispatcher, ``_call`` with its retries and flood bookkeeping, the session. Only
the socket is replaced (tests/support/telegram_loopback.py): Telegram's answers come from
``FakeTelegram``, and its errors are Telethon's own classes.
"""

from __future__ import annotations

import asyncio
import json
import os

import pytest
from telethon import errors
from telethon.crypto import AuthKey
from telethon.sessions import StringSession
from telethon.tl import functions, types

from bridge.live import LiveReply
from bridge.rate import Limits, RateController
from bridge.telegram import TelegramTransport
from servers.core.errors import Category, ValorError
from servers.core.settings import get_settings
from tests.support import configure, wait_until_async
from tests.support.telegram_loopback import (
    ANN,
    API,
    BOT_TOKEN,
    EPOCH,
    EVE,
    FORUM,
    FORUM_CHAT,
    FakeTelegram,
    loopback_transport,
)

TOPIC = 17


@pytest.fixture
def bot_env(monkeypatch):
    configure(monkeypatch, TELEGRAM_BOT_TOKEN=BOT_TOKEN, **API)
    return get_settings()


@pytest.fixture
def server() -> FakeTelegram:
    fake = FakeTelegram(bot_id=123456)
    fake.user(ANN)
    fake.user(EVE)
    return fake


def transport_for(settings, server: FakeTelegram) -> TelegramTransport:
    return loopback_transport(settings, server, lambda incoming: incoming.sender_id == ANN.id)


def text_message(text: str, msg_id: int, sender=ANN, **extra) -> types.Message:
    return types.Message(
        id=msg_id,
        peer_id=types.PeerUser(sender.id),
        date=EPOCH,
        message=text,
        from_id=types.PeerUser(sender.id),
        **extra,
    )


async def next_incoming(transport: TelegramTransport, timeout: float = 10):
    stream = transport.updates()
    try:
        return await asyncio.wait_for(stream.__anext__(), timeout)
    finally:
        await stream.aclose()


async def collect(transport: TelegramTransport, count: int, timeout: float = 10) -> list:
    stream = transport.updates()
    got = []
    try:
        for _ in range(count):
            got.append(await asyncio.wait_for(stream.__anext__(), timeout))
    finally:
        await stream.aclose()
    return got


def differences_from(server: FakeTelegram) -> list[int]:
    return [r.pts for r in server.requested(functions.updates.GetDifferenceRequest)]


# --- 1. a bot's login and position are kept ------------------------------------------------
async def test_a_bot_restarted_twice_logs_in_once_and_resumes_its_position(bot_env, server):
    first = transport_for(bot_env, server)
    await first.start()
    assert server.logins == 1 and first.self_id == 123456
    await first.close()
    state_file = bot_env.data_dir / "telegram" / "update_state.json"
    assert oct(state_file.stat().st_mode & 0o777) == "0o600"
    stored = json.loads(state_file.read_text())
    assert stored["account"] == "bot:123456" and BOT_TOKEN not in state_file.read_text()

    server.post(text_message("written while Valor was away", 10))
    second = transport_for(bot_env, server)
    await second.start()
    got = await next_incoming(second)
    assert got.text == "written while Valor was away"
    await second.close()

    server.post(text_message("and again", 11))
    third = transport_for(bot_env, server)
    await third.start()
    assert (await next_incoming(third)).text == "and again"
    await third.close()
    assert server.logins == 1  # the stored login was reused: no flood wait for re-logins


async def test_a_bot_token_for_another_bot_starts_afresh(bot_env, server, monkeypatch):
    first = transport_for(bot_env, server)
    await first.start()
    await first.close()
    configure(monkeypatch, TELEGRAM_BOT_TOKEN="654321:" + "B" * 35)
    other = FakeTelegram(bot_id=654321)
    second = transport_for(get_settings(), other)
    await second.start()  # the other bot's key and position were not used
    assert other.logins == 1 and second.self_id == 654321
    await second.close()


async def test_a_revoked_bot_login_logs_in_again_without_asking_for_the_old_position(
    bot_env, server
):
    first = transport_for(bot_env, server)
    await first.start()
    await first.close()
    server.authorized_keys.clear()  # Telegram forgot the login (token revoked, say)
    second = transport_for(bot_env, server)
    await second.start()
    assert server.logins == 2 and second.client.is_connected()
    await second.close()


# --- 2. a lost connection is noticed, reconnected and caught up ----------------------------
async def test_a_dead_connection_is_noticed_reconnected_and_caught_up(bot_env, server, monkeypatch):
    monkeypatch.setattr(bot_env, "operator_chat_id", ANN.id)
    transport = transport_for(bot_env, server)
    transport.outage_notice_after = 0.0
    await transport.start()
    status = bot_env.data_dir / "telegram" / "status.json"
    assert json.loads(status.read_text())["connected"] is True

    server.down = True  # reconnects fail until the network is back
    transport.reconnect_delays = (0.2,)
    transport.client._sender.lose_network()  # Telethon's retries run out
    await wait_until_async(lambda: not transport.health.connected, timeout=10)
    seen = json.loads(status.read_text())
    assert seen["connected"] is False and "connection" in seen["last_error"].lower()
    server.post(text_message("sent during the outage", 12))

    server.down = False
    got = await next_incoming(transport, timeout=15)
    assert got.text == "sent during the outage"
    assert transport.health.connected and transport.health.reconnects == 1
    assert json.loads(status.read_text())["connected"] is True
    await wait_until_async(lambda: server.sent, timeout=10)  # the operator hears about it
    assert "unreachable" in server.sent[0].message
    await transport.close()


async def test_a_short_drop_that_telethon_survives_still_catches_up(bot_env, server):
    transport = transport_for(bot_env, server)
    await transport.start()
    sender = transport.client._sender
    sender._delay = 0.3  # Telethon's pause between its own reconnect attempts
    sender.lose_network()
    server.post(text_message("sent during the blip", 14))  # not pushed: no connection
    server.down = False  # Telethon's next attempt succeeds
    got = await next_incoming(transport, timeout=15)
    assert got.text == "sent during the blip"
    assert transport.health.reconnects == 0  # the watchdog was not needed
    await transport.close()


async def test_a_logged_out_account_ends_the_updates_with_a_config_error(bot_env, server):
    transport = transport_for(bot_env, server)
    await transport.start()
    server.authorized_keys.clear()
    server.fail[functions.auth.ImportBotAuthorizationRequest].append(
        errors.AccessTokenInvalidError(request=None)
    )
    transport.client._sender.lose_network()
    await wait_until_async(lambda: not transport.health.connected, timeout=10)
    server.down = False
    with pytest.raises(ValorError) as caught:
        await next_incoming(transport, timeout=15)
    assert caught.value.category is Category.CONFIG and transport.health.logged_out
    await transport.close()


# --- 3. the position is saved on every stop -------------------------------------------------
def user_session(server: FakeTelegram) -> str:
    session = StringSession()
    session.set_dc(2, "149.154.167.51", 443)
    session.auth_key = AuthKey(os.urandom(256))
    server.authorized_keys.add(session.auth_key.key)
    return session.save()


async def test_stop_then_start_fetches_nothing_again(monkeypatch, server):
    configure(monkeypatch, TELEGRAM_SESSION=user_session(server), **API)
    settings = get_settings()
    server.me = types.User(id=5000, access_hash=5, first_name="Valor", is_self=True)
    first = transport_for(settings, server)
    await first.start()
    # What Telethon's keep-alive writes once a minute: the position before the messages below.
    await first.client._save_states_and_entities()
    first.client.session.save()
    server.post(text_message("live one", 20))
    server.post(text_message("live two", 21))
    assert [m.text for m in await collect(first, 2)] == ["live one", "live two"]
    await first.close()  # well within the minute: only the stop itself can store the position

    second = transport_for(settings, server)
    await second.start()
    await wait_until_async(lambda: differences_from(server)[-1:] == [server.pts], timeout=10)
    assert second._queue.empty()  # nothing fetched (or answered) twice
    await second.close()


async def test_messages_not_yet_taken_at_a_stop_are_fetched_again(bot_env, server):
    first = transport_for(bot_env, server)
    await first.start()
    server.post(text_message("arrived just before the stop", 22))
    await wait_until_async(lambda: first._queue.qsize() == 1, timeout=10)
    state_file = bot_env.data_dir / "telegram" / "update_state.json"
    stored_pts = json.loads(state_file.read_text())["states"]["0"]["pts"]
    await first.client._save_states_and_entities()  # Telethon's keep-alive, meanwhile
    first.client.session.save()
    assert json.loads(state_file.read_text())["states"]["0"]["pts"] == stored_pts
    await first.close()  # the bridge never took it: the stored position stays before it
    second = transport_for(bot_env, server)
    await second.start()
    assert (await next_incoming(second)).text == "arrived just before the stop"
    await second.close()


# --- 4. order, the allowlist before any download, albums -----------------------------------
def photo_message(msg_id: int, photo_id: int, caption="", sender=ANN, **extra) -> types.Message:
    photo = types.Photo(
        id=photo_id,
        access_hash=1,
        file_reference=b"",
        date=EPOCH,
        dc_id=2,
        sizes=[types.PhotoSize(type="y", w=800, h=600, size=4096)],
    )
    return text_message(
        caption, msg_id, sender, media=types.MessageMediaPhoto(photo=photo), **extra
    )


async def test_a_photo_then_a_question_arrive_in_order(bot_env, server):
    transport = transport_for(bot_env, server)
    await transport.start()
    server.files[1] = b"\xff\xd8" + b"p" * 4094
    server.post(photo_message(30, 1))
    server.post(text_message("what is this?", 31))
    first, second = await collect(transport, 2)
    assert (first.message_id, second.message_id) == (30, 31)
    assert first.media_paths and first.media_paths[0].read_bytes() == server.files[1]
    await transport.close()


async def test_a_strangers_media_is_never_written(bot_env, server):
    transport = transport_for(bot_env, server)
    await transport.start()
    server.files[2] = b"x" * 4096
    server.post(photo_message(40, 2, "look", sender=EVE))
    got = await next_incoming(transport)
    assert got.sender_id == EVE.id and got.media_paths == ()  # the bridge refuses it next
    assert server.requested(functions.upload.GetFileRequest) == []
    media = bot_env.chat_media_path(EVE.id)
    assert not media.exists() or not any(media.rglob("*"))
    await transport.close()


async def test_stickers_are_not_downloaded(bot_env, server):
    # (Voice notes, audio and video notes are: the bridge transcribes them, test_transcription.)
    transport = transport_for(bot_env, server)
    await transport.start()
    sticker = types.Document(
        id=3,
        access_hash=1,
        file_reference=b"",
        date=EPOCH,
        mime_type="image/webp",
        size=100,
        dc_id=2,
        attributes=[
            types.DocumentAttributeSticker(alt="🙂", stickerset=types.InputStickerSetEmpty())
        ],
    )
    server.post(text_message("", 50, media=types.MessageMediaDocument(document=sticker)))
    server.post(text_message("hello", 51))
    assert (await next_incoming(transport)).text == "hello"  # the sticker was dropped
    assert server.requested(functions.upload.GetFileRequest) == []
    await transport.close()


async def test_an_album_is_one_prompt(bot_env, server):
    transport = transport_for(bot_env, server)
    await transport.start()
    server.files[4], server.files[5] = b"a" * 4096, b"b" * 4096
    server.post(photo_message(60, 4, "compare these", grouped_id=777))
    server.post(photo_message(61, 5, "", grouped_id=777))
    server.post(text_message("thanks", 62))
    album, after = await collect(transport, 2)
    assert album.text == "compare these" and len(album.media_paths) == 2
    assert [p.read_bytes()[:1] for p in album.media_paths] == [b"a", b"b"]
    assert after.text == "thanks"
    await transport.close()


# --- 5. failures mapped, retried, never sent twice ------------------------------------------
def long_answer() -> str:
    return "\n\n".join(f"Paragraph {i}: " + "words " * 120 for i in range(12))


async def test_telegram_failing_after_telethons_retries_is_retried_without_duplicate_parts(
    bot_env, server, monkeypatch
):
    transport = transport_for(bot_env, server)
    await transport.start()
    server.post(text_message("tell me a lot", 70))
    await next_incoming(transport)
    real_call = transport.client._call
    sends = 0

    async def flaky_call(sender, request, *args, **kwargs):
        nonlocal sends
        if isinstance(request, functions.messages.SendMessageRequest):
            sends += 1
            if sends == 2:  # the second part: Telegram's internal error outlasted the retries
                raise ValueError("Request was unsuccessful 6 time(s)")
        return await real_call(sender, request, *args, **kwargs)

    monkeypatch.setattr(transport.client, "_call", flaky_call)
    rate = RateController(Limits(time_scale=0.001))
    live = LiveReply(transport, ANN.id, 70, rate=rate, retry_backoff=0.01)
    await live.finish(long_answer())
    texts = [r.message for r in server.sent]
    assert len(texts) >= 2 and len(texts) == len(set(texts))  # every part once
    assert texts[0].startswith("Paragraph 0") and len(live.delivered) == len(texts)
    await transport.close()


def test_telethon_failures_map_to_categories():
    from bridge.telegram import translate_error

    cases = {
        ValueError("Request was unsuccessful 6 time(s)"): Category.UPSTREAM,
        ValueError("Could not find the input entity for PeerUser(user_id=42) (PeerUser)"): (
            Category.INPUT
        ),
        errors.RpcCallFailError(request=None): Category.UPSTREAM,
        errors.TimedOutError(None, "Timeout"): Category.TIMEOUT,
        errors.AuthKeyUnregisteredError(request=None): Category.CONFIG,
        errors.FloodPremiumWaitError(request=None, capture=30): Category.RATE_LIMIT,
    }
    for exc, category in cases.items():
        assert translate_error(exc, "send").category is category, exc
    premium = translate_error(errors.FloodPremiumWaitError(request=None, capture=30), "send")
    assert premium.retry_after == 30  # not a fixed 5 s
    assert translate_error(ValueError("a bug"), "send") is None  # not Telegram's: raised as is


async def test_a_failed_upload_after_the_text_is_reported_not_resent(bot_env, server, tmp_path):
    transport = transport_for(bot_env, server)
    await transport.start()
    server.post(text_message("draw it", 80))
    await next_incoming(transport)
    picture = bot_env.chat_media_path(ANN.id) / "out.png"
    picture.parent.mkdir(parents=True, exist_ok=True)
    picture.write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 32)

    async def refuse(*args, **kwargs):
        raise errors.MediaInvalidError(request=None)

    transport.client.send_file = refuse
    rate = RateController(Limits(time_scale=0.001))
    live = LiveReply(
        transport, ANN.id, 80, rate=rate, allowed_file_roots=[bot_env.chat_media_path(ANN.id)]
    )
    await live.finish("Here it is.", files=[picture])  # does not raise: the text is out
    texts = [r.message for r in server.sent]
    assert texts == ["Here it is.", "⚠️ Could not send: out.png"]
    await transport.close()


# --- 6. forum topics ------------------------------------------------------------------------
async def test_a_split_answer_in_a_topic_lands_wholly_in_the_topic(bot_env, server):
    server.chat(FORUM)
    transport = transport_for(bot_env, server)
    transport.authorize = lambda incoming: True
    await transport.start()
    question = types.Message(
        id=90,
        peer_id=types.PeerChannel(FORUM.id),
        date=EPOCH,
        message="@valorbot explain",
        from_id=types.PeerUser(ANN.id),
        entities=[types.MessageEntityMention(0, 9)],
        reply_to=types.MessageReplyHeader(forum_topic=True, reply_to_msg_id=TOPIC),
    )
    server.post(question)
    got = await next_incoming(transport)
    assert (got.chat_id, got.topic_id, got.mentions_valor) == (FORUM_CHAT, TOPIC, True)
    assert not got.replies_to_valor  # being in a topic is not replying to Valor

    rate = RateController(Limits(time_scale=0.001))
    live = LiveReply(transport, FORUM_CHAT, 90, rate=rate, typing=True)
    assert live.topic_id == TOPIC
    await live.tool_progress("mcp__social-tools__search_current_info")  # a typing action
    await live.finish(long_answer())
    parts = server.sent
    assert len(parts) >= 2
    assert parts[0].reply_to.reply_to_msg_id == 90  # answers the question, inside its topic
    assert {p.reply_to.reply_to_msg_id for p in parts[1:]} == {TOPIC}
    [typing] = server.requested(functions.messages.SetTypingRequest)
    assert typing.top_msg_id == TOPIC
    await transport.close()


# --- 7. flood waits are per method, account-wide --------------------------------------------
async def test_a_flood_wait_on_one_chats_sends_holds_every_chats_sends(bot_env, server):
    from bridge.live import SEND_METHODS

    transport = transport_for(bot_env, server)
    await transport.start()
    server.fail[functions.messages.SendMessageRequest].append(
        errors.FloodWaitError(request=functions.messages.SendMessageRequest(42, "x"), capture=30)
    )
    rate = RateController(Limits(time_scale=0.001))
    reply_a = LiveReply(transport, ANN.id, None, rate=rate)
    with pytest.raises(ValorError) as caught:
        await transport.send_text(ANN.id, "first")
    reply_a._flood(caught.value)
    assert caught.value.flood_key == "SendMessageRequest"
    # Telethon now refuses every SendMessage for 30 s, whichever chat, before any request goes.
    before = len(server.requested(functions.messages.SendMessageRequest))
    with pytest.raises(ValorError) as early:
        await transport.send_text(EVE.id, "other chat")
    assert early.value.category is Category.RATE_LIMIT
    assert len(server.requested(functions.messages.SendMessageRequest)) == before
    # ... and the rate controller holds the other chat's sends the same way, not its edits.
    assert rate.blocked_for(EVE.id, SEND_METHODS) > 25
    assert rate.blocked_for(EVE.id, ("EditMessageRequest",)) == 0
    await transport.close()


# --- 8. smaller points ----------------------------------------------------------------------
async def test_mentions_are_read_from_entities_and_exact_usernames(bot_env, server):
    server.chat(FORUM)
    transport = transport_for(bot_env, server)
    await transport.start()

    def in_forum(text, msg_id, entities):
        return types.Message(
            id=msg_id,
            peer_id=types.PeerChannel(FORUM.id),
            date=EPOCH,
            message=text,
            from_id=types.PeerUser(ANN.id),
            entities=entities,
        )

    server.post(in_forum("@valorbot2 hi", 100, [types.MessageEntityMention(0, 10)]))
    server.post(in_forum("ask valorbot later", 101, []))
    server.post(in_forum("/status@valorbot", 102, [types.MessageEntityBotCommand(0, 16)]))
    got = await next_incoming(transport)
    assert got.message_id == 102 and got.mentions_valor
    await transport.close()


async def test_updates_caught_up_before_identity_is_known_are_not_lost(bot_env, server):
    first = transport_for(bot_env, server)
    await first.start()
    await first.close()
    server.chat(FORUM)
    server.post(
        types.Message(
            id=110,
            peer_id=types.PeerChannel(FORUM.id),
            date=EPOCH,
            message="@valorbot are you there?",
            from_id=types.PeerUser(ANN.id),
            entities=[types.MessageEntityMention(0, 9)],
        )
    )
    second = transport_for(bot_env, server)
    await second.start()
    got = await next_incoming(second)
    assert got.message_id == 110 and got.mentions_valor
    await second.close()


def test_at_most_100_entities_go_out_per_part():
    from bridge.formatting import Entity
    from bridge.telegram import to_telethon_entities

    many = [Entity("bold", offset=i * 2, length=1) for i in range(150)]
    assert len(to_telethon_entities(many)) == 100


async def test_a_deleted_preview_is_not_edited_again(bot_env, server):
    from bridge.transport import SentMessage

    class Gone:
        def __init__(self):
            self.edits = 0
            self.sent: list[str] = []

        async def send_text(self, chat_id, text, *, reply_to=None):
            self.sent.append(str(text))
            return SentMessage(chat_id, len(self.sent))

        async def edit_text(self, message, text):
            self.edits += 1
            raise ValorError(Category.INPUT, "Telegram refused: MessageIdInvalidError.")

        async def send_file(self, *args, **kwargs):
            raise AssertionError("no files")

        async def signal(self, *args, **kwargs):
            return None

    transport = Gone()
    rate = RateController(Limits(time_scale=0.001))
    live = LiveReply(transport, 42, 7, rate=rate)
    await live.text("first")
    await wait_until_async(lambda: transport.sent == ["first"])
    await live.text("second")
    await wait_until_async(lambda: transport.edits == 1)
    for i in range(5):
        await live.text(f"more {i}")
        await asyncio.sleep(0.01)
    await live.finish("done")
    assert transport.edits == 1 and transport.sent[-1] == "done"
