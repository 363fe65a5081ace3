"""The Telethon transport (bridge/telegram.py), offline: hand-built updates go through Telethon's
own dispatch (``TelegramClient._dispatch_update``), exactly as if they came from Telegram."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import stat
import time
from pathlib import Path

import pytest
from telethon import TelegramClient, errors
from telethon.sessions import StringSession
from telethon.tl import types

from bridge.formatting import render
from bridge.telegram import (
    TelegramTransport,
    safe_file_name,
    to_telethon_entities,
)
from bridge.telegram_session import build_client, make_session
from bridge.transport import SentMessage, Transport
from servers.core.errors import Category, ValorError
from servers.core.settings import get_settings
from tests.support import configure, wait_until_async

ME = 999
ANN = types.User(id=42, access_hash=1, first_name="Ann", last_name="Lee")
BOB = types.User(id=43, access_hash=2, first_name="Bob")
GROUP = types.Chat(
    id=555, title="Team", photo=types.ChatPhotoEmpty(), participants_count=3, date=None, version=1
)
NOW = dt.datetime(2026, 11, 26, 7, 0, tzinfo=dt.UTC)
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 32


@pytest.fixture
def telegram_env(monkeypatch):
    configure(
        monkeypatch,
        TELEGRAM_API_ID="12345",
        TELEGRAM_API_HASH="0123456789abcdef0123456789abcdef",
        TELEGRAM_BOT_TOKEN="123456:" + "A" * 35,
    )
    return get_settings()


@pytest.fixture
def transport(telegram_env) -> TelegramTransport:
    client = TelegramClient(StringSession(), 12345, "0123456789abcdef0123456789abcdef")
    t = TelegramTransport(client, telegram_env)
    t.set_identity(ME, "ValorBot", bot=True)
    t.add_handlers()
    t.authorize = lambda incoming: True  # the bridge's allowlist check (bridge/service.py)
    return t


def message(text="hi", *, msg_id=7, sender=ANN, peer=None, **extra) -> types.Message:
    return types.Message(
        id=msg_id,
        peer_id=peer or types.PeerUser(sender.id),
        date=NOW,
        message=text,
        from_id=types.PeerUser(sender.id),
        **extra,
    )


async def deliver(transport: TelegramTransport, msg, *, update_cls=types.UpdateNewMessage):
    """Hand one update to Telethon's dispatcher; return what reached the bridge (or None)."""
    update = update_cls(message=msg, pts=1, pts_count=1)
    update._entities = {ANN.id: ANN, BOB.id: BOB, -GROUP.id: GROUP}
    await transport.client._dispatch_update(update)
    if transport._queue.empty():
        return None
    return await transport._complete(transport._queue.get_nowait())


def in_group(text, **extra):
    return message(text, sender=BOB, peer=types.PeerChat(GROUP.id), **extra)


def test_transport_satisfies_the_interface(transport):
    assert isinstance(transport, Transport)


async def test_private_message_reaches_the_bridge(transport):
    got = await deliver(transport, message("hello Valor"))
    assert got is not None
    assert (got.chat_id, got.message_id, got.sender_id) == (42, 7, 42)
    assert got.sender_name == "Ann Lee" and got.text == "hello Valor"
    assert got.sent_at == NOW.timestamp() and not got.is_group and got.media_paths == ()


async def test_own_messages_are_never_processed(transport):
    assert await deliver(transport, message("echo", out=True)) is None
    mine = types.User(id=ME, access_hash=3, first_name="Valor", is_self=True)
    assert (
        await deliver(transport, message("from me", sender=mine, peer=types.PeerUser(42))) is None
    )


async def test_group_needs_a_mention_or_a_reply(transport):
    assert await deliver(transport, in_group("just chatting")) is None
    mention = [types.MessageEntityMention(0, 9)]
    got = await deliver(transport, in_group("@valorbot what is the time?", entities=mention))
    assert got is not None and got.is_group and got.mentions_valor and got.chat_id == -555
    named = in_group("Valor, look", msg_id=9, entities=[types.MessageEntityMentionName(0, 5, ME)])
    assert (await deliver(transport, named)).mentions_valor


async def test_group_reply_to_valor_is_answered_reply_to_others_is_not(transport):
    transport._remember_sent(-555, 300)
    to_valor = in_group(
        "and then?", msg_id=10, reply_to=types.MessageReplyHeader(reply_to_msg_id=300)
    )
    got = await deliver(transport, to_valor)
    assert got is not None and got.replies_to_valor and not got.mentions_valor
    to_ann = in_group("agreed", msg_id=11, reply_to=types.MessageReplyHeader(reply_to_msg_id=301))
    assert await deliver(transport, to_ann) is None
    flagged = in_group(
        "yes", msg_id=12, mentioned=True, reply_to=types.MessageReplyHeader(reply_to_msg_id=77)
    )
    assert (await deliver(transport, flagged)).replies_to_valor


async def test_edited_messages_are_ignored(transport):
    edited = message("changed my mind", msg_id=7, edit_date=NOW)
    assert await deliver(transport, edited, update_cls=types.UpdateEditMessage) is None


async def test_channel_posts_and_empty_messages_are_ignored(transport):
    channel = types.Channel(
        id=777, title="News", photo=types.ChatPhotoEmpty(), date=NOW, access_hash=5, broadcast=True
    )
    post = types.Message(
        id=1, peer_id=types.PeerChannel(777), date=NOW, message="@valorbot news", post=True
    )
    update = types.UpdateNewChannelMessage(message=post, pts=1, pts_count=1)
    update._entities = {-1_000_000_000_777: channel}
    await transport.client._dispatch_update(update)
    assert transport._queue.empty()
    assert await deliver(transport, message("   ")) is None


async def test_photo_is_saved_into_the_media_dir(transport, telegram_env):
    photo = types.Photo(
        id=1,
        access_hash=1,
        file_reference=b"",
        date=NOW,
        dc_id=2,
        sizes=[types.PhotoCachedSize(type="x", w=4, h=4, bytes=PNG)],
    )
    got = await deliver(
        transport, message("what is this?", media=types.MessageMediaPhoto(photo=photo))
    )
    assert got is not None and len(got.media_paths) == 1
    saved = got.media_paths[0]
    # Into the chat's own media folder (owner-only), where only that chat's run can name it.
    assert saved.is_relative_to(telegram_env.chat_media_path(42).resolve())
    assert oct(saved.parent.parent.stat().st_mode & 0o777) == "0o700"
    assert saved.read_bytes() == PNG and saved.name == "42_7.jpg"


async def test_photo_without_caption_still_arrives(transport):
    photo = types.Photo(
        id=1,
        access_hash=1,
        file_reference=b"",
        date=NOW,
        dc_id=2,
        sizes=[types.PhotoCachedSize(type="x", w=4, h=4, bytes=PNG)],
    )
    got = await deliver(transport, message("", media=types.MessageMediaPhoto(photo=photo)))
    assert got is not None and got.text == "" and got.media_paths


def _document(size: int, name: str = "report.pdf") -> types.MessageMediaDocument:
    doc = types.Document(
        id=1,
        access_hash=1,
        file_reference=b"",
        date=NOW,
        mime_type="application/pdf",
        size=size,
        dc_id=2,
        attributes=[types.DocumentAttributeFilename(name)],
    )
    return types.MessageMediaDocument(document=doc)


async def test_too_large_document_is_skipped_but_the_message_arrives(transport, monkeypatch):
    monkeypatch.setattr(transport.settings, "telegram_max_download_mb", 1.0)
    got = await deliver(transport, message("see attached", media=_document(5 * 1024 * 1024)))
    assert got is not None and got.text == "see attached" and got.media_paths == ()


async def test_failed_download_loses_nothing_but_the_file(transport):
    # The client is offline, so Telethon refuses the download: the text must still arrive.
    got = await asyncio.wait_for(
        deliver(transport, message("the report", media=_document(1000))), 5
    )
    assert got is not None and got.text == "the report" and got.media_paths == ()


def test_safe_file_names():
    assert safe_file_name("../../etc/passwd", "file") == "passwd"
    assert safe_file_name(".hidden", "file") == "hidden"
    assert safe_file_name("my report (final).pdf", "file") == "my_report_final_.pdf"
    assert safe_file_name("", "file") == "file"
    assert safe_file_name("...", "file") == "file"


async def test_updates_yields_messages_in_order(transport):
    for i in range(3):
        await deliver(transport, message(f"m{i}", msg_id=20 + i))
    # deliver() took them off the queue; put them through the public iterator instead
    for i in range(3):
        update = types.UpdateNewMessage(message=message(f"n{i}", msg_id=30 + i), pts=1, pts_count=1)
        update._entities = {ANN.id: ANN}
        await transport.client._dispatch_update(update)
    stream = transport.updates()
    texts = [(await stream.__anext__()).text for _ in range(3)]
    assert texts == ["n0", "n1", "n2"]


# --- outgoing: a client double that raises Telethon's real error classes ----------------------
class ClientDouble:
    """Records the calls the transport makes; raises the queued Telethon errors first."""

    def __init__(self):
        self.calls: list[tuple[str, tuple, dict]] = []
        self.raises: list[Exception] = []
        self.next_id = 500

    def _maybe_raise(self):
        if self.raises:
            raise self.raises.pop(0)

    async def send_message(self, *args, **kwargs):
        self.calls.append(("send_message", args, kwargs))
        self._maybe_raise()
        self.next_id += 1
        return types.Message(id=self.next_id, peer_id=types.PeerUser(42), date=NOW, message=args[1])

    async def edit_message(self, *args, **kwargs):
        self.calls.append(("edit_message", args, kwargs))
        self._maybe_raise()

    async def delete_messages(self, *args, **kwargs):
        self.calls.append(("delete_messages", args, kwargs))
        self._maybe_raise()

    async def __call__(self, request):
        self.calls.append(("request", (request,), {}))
        self._maybe_raise()


@pytest.fixture
def outgoing(telegram_env):
    double = ClientDouble()
    return TelegramTransport(double, telegram_env), double


async def test_formatted_text_goes_out_with_entities(outgoing):
    transport, double = outgoing
    [part] = render("**Done** in `0.3 s`")
    sent = await transport.send_text(42, part, reply_to=7)
    assert sent == SentMessage(42, 501)
    _, args, kwargs = double.calls[0]
    assert args == (42, "Done in 0.3 s") and kwargs["reply_to"] == 7
    kinds = {type(e).__name__ for e in kwargs["formatting_entities"]}
    assert kinds == {"MessageEntityBold", "MessageEntityCode"}
    # Replies to what Valor sent are now recognised in that chat.
    assert 501 in transport._sent_ids[42]


async def test_rejected_entities_fall_back_to_plain_text(outgoing):
    transport, double = outgoing
    double.raises = [errors.EntityBoundsInvalidError(request=None)]
    [part] = render("**bold**")
    await transport.send_text(42, part)
    assert [c[2]["formatting_entities"] for c in double.calls] == [
        [types.MessageEntityBold(0, 4)],
        [],
    ]


async def test_flood_wait_becomes_a_rate_limit_error(outgoing):
    transport, double = outgoing
    double.raises = [errors.FloodWaitError(request=None, capture=42)]
    with pytest.raises(ValorError) as caught:
        await transport.send_text(42, "hi")
    assert caught.value.category is Category.RATE_LIMIT and caught.value.retry_after == 42


async def test_message_not_modified_is_ignored(outgoing):
    transport, double = outgoing
    double.raises = [errors.MessageNotModifiedError(request=None)]
    await transport.edit_text(SentMessage(42, 501), "same")  # no exception
    double.raises = [errors.MessageNotModifiedError(request=None)]
    [part] = render("**same**")
    await transport.edit_text(SentMessage(42, 501), part)


async def test_permanent_refusals_are_input_errors_and_name_no_secret(outgoing, telegram_env):
    transport, double = outgoing
    double.raises = [errors.UserIsBlockedError(request=None)]
    with pytest.raises(ValorError) as caught:
        await transport.send_text(42, "hi")
    assert caught.value.category is Category.INPUT and "UserIsBlocked" in str(caught.value)
    assert telegram_env.telegram_bot_token.get_secret_value() not in str(caught.value)


async def test_connection_failure_is_an_upstream_error(outgoing):
    transport, double = outgoing
    double.raises = [ConnectionError("Cannot send requests while disconnected")]
    with pytest.raises(ValorError) as caught:
        await transport.edit_text(SentMessage(42, 1), "x")
    assert caught.value.category is Category.UPSTREAM


async def test_signals_follow_the_settings(outgoing, monkeypatch):
    transport, double = outgoing
    await transport.signal(42, "received", message_id=7)
    await transport.signal(42, "typing")
    names = [type(c[1][0]).__name__ for c in double.calls]
    assert names == ["SendReactionRequest", "SetTypingRequest"]
    assert double.calls[0][1][0].reaction[0].emoticon == "👀"
    monkeypatch.setattr(transport.settings, "telegram_receipt_reaction", "")
    monkeypatch.setattr(transport.settings, "telegram_typing", False)
    await transport.signal(42, "received", message_id=8)
    await transport.signal(42, "typing")
    assert len(double.calls) == 2
    double.raises = [errors.ReactionInvalidError(request=None)]
    monkeypatch.setattr(transport.settings, "telegram_receipt_reaction", "🤖")
    await transport.signal(42, "received", message_id=9)  # a failed courtesy is not an error


def test_entities_map_to_telethon_types():
    [part] = render("[site](https://example.org) ```py\nx\n``` > q")
    mapped = to_telethon_entities(part.entities)
    assert any(
        isinstance(e, types.MessageEntityTextUrl) and e.url == "https://example.org" for e in mapped
    )


# --- settings, client and the persisted update position --------------------------------------
def test_client_is_built_without_network(telegram_env):
    client = build_client(telegram_env)
    assert client.flood_sleep_threshold == 0  # every flood wait reaches bridge.rate
    assert client._catch_up is True and not client.is_connected()


def test_missing_credentials_are_config_errors(monkeypatch):
    with pytest.raises(ValorError) as caught:
        build_client(get_settings())
    assert caught.value.category is Category.CONFIG and "TELEGRAM_API_ID" in str(caught.value)
    configure(monkeypatch, TELEGRAM_API_ID="1", TELEGRAM_API_HASH="abcdef")
    with pytest.raises(ValorError, match="valor login"):
        build_client(get_settings())
    configure(monkeypatch, TELEGRAM_SESSION="not-a-session")
    with pytest.raises(ValorError, match="not a valid"):
        build_client(get_settings())


def test_update_position_survives_a_restart(telegram_env):
    from telethon.crypto import AuthKey

    session = make_session(telegram_env)
    session.set_dc(2, "149.154.167.51", 443)
    session.auth_key = AuthKey(b"k" * 256)  # the bot's login, kept with its position
    session.set_update_state(0, types.updates.State(pts=10, qts=2, date=NOW, seq=5, unread_count=0))
    session.set_update_state(
        777, types.updates.State(pts=99, qts=0, date=NOW, seq=0, unread_count=0)
    )
    session._entities |= {
        (0, ME, None, None, None),
        (-1_000_000_000_777, 1234, "news", None, "News"),
        (42, 1, "ann", "+15550100", "Ann Lee"),
    }
    session.save()
    path = telegram_env.data_dir / "telegram" / "update_state.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    stored = json.loads(path.read_text())
    assert "+15550100" not in path.read_text() and "ann" not in path.read_text()
    # Ids and access hashes only: a bare chat id still resolves after a restart.
    assert sorted(map(tuple, stored["entities"])) == [(-1_000_000_000_777, 1234), (0, ME), (42, 1)]
    assert stored["account"] == "bot:123456" and stored["session"]

    again = make_session(telegram_env)
    states = dict(again.get_update_states())
    assert (states[0].pts, states[0].qts, states[0].seq) == (10, 2, 5)
    assert states[0].date == NOW and states[777].pts == 99
    assert again.get_input_entity(-1_000_000_000_777).access_hash == 1234
    assert again.auth_key.key == b"k" * 256
    # A recovered row or the outbox can send to a bare user id after a restart.
    assert again.get_input_entity(42).access_hash == 1


def test_unreadable_update_state_is_ignored(telegram_env):
    path: Path = telegram_env.data_dir / "telegram" / "update_state.json"
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    assert list(make_session(telegram_env).get_update_states()) == []


async def test_bridge_service_refuses_to_start_without_credentials():
    from bridge.service import run_bridge

    with pytest.raises(ValorError) as caught:
        await run_bridge(get_settings())
    assert caught.value.category is Category.CONFIG


async def test_live_reply_through_the_transport_honours_telethon_flood_waits(outgoing):
    from bridge.live import LiveReply
    from bridge.rate import Limits, RateController

    transport, double = outgoing
    transport.is_bot = False  # the live-message path (a bot streams drafts: test_drafts.py)
    rate = RateController(Limits(time_scale=0.02))
    live = LiveReply(transport, 42, 7, rate=rate)
    double.raises = [errors.FloodWaitError(request=None, capture=1)]  # the first preview
    asked_at = time.monotonic()
    await live.text("**partial**")
    await wait_until_async(lambda: live.flood_waits == 1)
    blocked_until = time.monotonic() + rate.blocked_for(42)
    assert blocked_until - asked_at >= 0.99  # the whole second Telegram asked for
    await live.finish("**final** answer")
    await live.settled()
    calls = [c[0] for c in double.calls]
    # refused preview, then (after the wait) the final as a fresh message; no preview to delete
    assert calls == ["send_message", "send_message"]
    assert double.calls[-1][1] == (42, "final answer")
    assert double.calls[-1][2]["reply_to"] == 7
