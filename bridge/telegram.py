"""The Telegram transport: Telethon as a user account (session string) or a bot (token).

What reaches the bridge (``updates()``):
* private chats: every message from someone else;
* groups: only messages that mention Valor (a mention entity of exactly its @username, a
  ``/command@username``, a text mention of its id, or Telegram's own ``mentioned`` flag) or
  reply to a message Valor sent (a message merely posted in a forum topic is not a reply);
* never Valor's own messages (``out`` or sent by its own id), so it cannot answer itself;
* edited messages are ignored: the answer to the original is already under way, and a new
  message is the way to change the request;
* channel broadcasts and service messages are ignored.

Order and files: the Telethon handler only decides and queues, with updates dispatched one at a
time (``sequential_updates``), so messages keep Telegram's order. Files are fetched afterwards,
by ``updates()`` as each message's turn comes, and only when the bridge's allowlist check
(``authorize``, installed by bridge/service.py) accepts the sender: a stranger cannot make Valor
write anything. Only photos, documents and recordings (voice notes, audio files, video notes:
transcribed by the bridge) are fetched (not other video, stickers or animations), up to
``VALOR_TELEGRAM_MAX_DOWNLOAD_MB``, into the chat's own media folder
(``settings.chat_media_path(chat)`` / ``telegram``, owner-only) under a safe name; their paths
travel in ``IncomingMessage.media_paths``. An album (``grouped_id``) becomes one message.
Forum topics: ``IncomingMessage.topic_id``; answers, files and typing go to the same topic.
Drafts: a bot streams an answer into a private chat as a draft (``send_draft``; Telethon's layer
has ``SendMessageTextDraftAction``), a user account or a group gets the edited live message.

Sessions and missed messages: ``PersistentStateSession`` (bridge/telegram_session.py) keeps the
update position (and, for a bot, its login key) in ``data_dir/telegram/update_state.json``
(owner-only), tagged with the account; it is written on every stop and by Telethon's keep-alive.
A restarted bot reuses its login instead of logging in again, and on connect Telethon fetches
the difference from the stored position: missed messages arrive through the same handler as
live ones.

Connection: Telethon reconnects on its own a few times (``connection_retries``) and then gives
up; its update loop also disconnects on fatal errors. A watchdog awaits ``client.disconnected``,
reconnects with backoff and catches up; ``health`` (and ``data_dir/telegram/status.json``) show
the state to health checks and the operator. A login Telegram no longer accepts ends
``updates()`` with a config error.

Errors: every Telethon failure becomes a categorized ``ValorError`` (``translate_error``).
Telethon's own flood sleeping is turned off (``flood_sleep_threshold=0``): a flood wait is raised
as ``rate_limit`` with ``retry_after`` and ``flood_key``, the method Telethon then blocks for
the whole account, so ``bridge.rate`` holds that method for every chat.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bridge import telegram_buttons
from bridge.formatting import Entity
from bridge.telegram_session import build_client, write_private
from bridge.transport import Button, IncomingMessage, SentMessage
from servers.core.approvals import parse_answer
from servers.core.errors import Category, ValorError, describe_exception
from servers.core.media import chat_folder

if TYPE_CHECKING:
    from servers.core.settings import Settings

log = logging.getLogger("valor.bridge.telegram")

_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")
_SENT_IDS_KEPT = 500  # per chat: enough to recognise replies to recent answers
_PASSING_FAILURES = (Category.RATE_LIMIT, Category.UPSTREAM, Category.TIMEOUT, Category.INTERNAL)
_TOPICS_KEPT = 10_000  # (chat, message) → forum topic, for answers and typing in that topic
_ENTITIES_PER_PART = 100  # Telegram honours only the first 100 entities of a message
ALBUM_WINDOW = 0.6  # seconds to wait for the next part of an album (Telethon's AlbumHack: 0.5)


# --- entities -----------------------------------------------------------------------------
def to_telethon_entities(entities: tuple[Entity, ...] | list[Entity]) -> list[Any]:
    """bridge.formatting entities as Telethon TL objects; unknown kinds are dropped."""
    from telethon.tl import types

    simple = {
        "bold": types.MessageEntityBold,
        "italic": types.MessageEntityItalic,
        "underline": types.MessageEntityUnderline,
        "strikethrough": types.MessageEntityStrike,
        "spoiler": types.MessageEntitySpoiler,
        "code": types.MessageEntityCode,
        "url": types.MessageEntityUrl,
        "email": types.MessageEntityEmail,
        "mention": types.MessageEntityMention,
        "hashtag": types.MessageEntityHashtag,
        "cashtag": types.MessageEntityCashtag,
        "bot_command": types.MessageEntityBotCommand,
        "phone_number": types.MessageEntityPhone,
    }
    out: list[Any] = []
    for e in entities:
        if e.type in simple:
            out.append(simple[e.type](e.offset, e.length))
        elif e.type == "pre":
            out.append(types.MessageEntityPre(e.offset, e.length, e.language or ""))
        elif e.type == "text_link" and e.url:
            out.append(types.MessageEntityTextUrl(e.offset, e.length, e.url))
        elif e.type in ("blockquote", "expandable_blockquote"):
            collapsed = e.type == "expandable_blockquote"
            out.append(types.MessageEntityBlockquote(e.offset, e.length, collapsed=collapsed))
        elif e.type == "custom_emoji" and e.custom_emoji_id:
            out.append(types.MessageEntityCustomEmoji(e.offset, e.length, int(e.custom_emoji_id)))
    return out[:_ENTITIES_PER_PART]  # Telegram ignores the rest; the text itself is unchanged


# --- errors -------------------------------------------------------------------------------
def translate_error(exc: BaseException, action: str) -> ValorError | None:
    """A Telethon / network failure as a categorized ValorError; None for "not modified" and
    for exceptions that are not Telegram's or the network's (those are bugs: raised as they are).

    Rate limits carry ``flood_key``: the Telegram method Telethon blocks for the whole account
    (it keys flood waits by method and raises early for every chat while more than 3 s remain),
    or None when only this chat waits (slow mode)."""
    from telethon import errors

    if isinstance(exc, errors.MessageNotModifiedError):
        return None
    if isinstance(exc, errors.FloodError):
        seconds = float(getattr(exc, "seconds", 0) or 0) or 5.0
        error = ValorError(
            Category.RATE_LIMIT,
            f"Telegram asked Valor to wait {seconds:.0f} s before it can {action}.",
            retry_after=seconds,
        )
        request = getattr(exc, "request", None)
        chat_only = isinstance(exc, errors.SlowModeWaitError) or request is None
        error.flood_key = None if chat_only else type(request).__name__  # type: ignore[attr-defined]
        return error
    if isinstance(exc, errors.ServerError):
        return ValorError(
            Category.UPSTREAM, f"Telegram had a server error while trying to {action}."
        )
    if isinstance(exc, errors.TimedOutError | asyncio.TimeoutError):
        return ValorError(Category.TIMEOUT, f"Telegram did not answer in time to {action}.")
    if isinstance(exc, errors.UnauthorizedError | errors.AuthKeyError):
        return ValorError(
            Category.CONFIG,
            f"Telegram no longer accepts Valor's login ({type(exc).__name__}) and could not "
            f"{action}: run `valor login` (user) or check TELEGRAM_BOT_TOKEN (bot).",
        )
    if isinstance(exc, ConnectionError | OSError):
        return ValorError(Category.UPSTREAM, f"The connection to Telegram failed ({action}).")
    if isinstance(exc, errors.RPCError):
        # Bad requests and permissions (blocked by the user, cannot write in the chat, no such
        # message) will not succeed by retrying.
        return ValorError(Category.INPUT, f"Telegram refused to {action}: {type(exc).__name__}.")
    if isinstance(exc, ValueError):
        text = str(exc)
        if text.startswith("Request was unsuccessful"):
            # Telethon's own retries ran out (raise_last_call_error off): transient.
            return ValorError(Category.UPSTREAM, f"Telegram kept failing to {action}.")
        if "input entity" in text or "find any entity" in text:
            return ValorError(
                Category.INPUT,
                f"Telegram does not know this chat to Valor yet and cannot {action}; it will once "
                "the chat writes again.",
            )
    return None


def _is_entity_error(exc: BaseException) -> bool:
    from telethon import errors

    return isinstance(
        exc,
        errors.EntityBoundsInvalidError
        | errors.EntityMentionUserInvalidError
        | errors.MessageEmptyError,
    ) or "ENTIT" in str(getattr(exc, "message", ""))


def safe_file_name(name: str, fallback: str) -> str:
    """A file name that cannot climb directories, hide itself, or carry odd characters."""
    base = Path(name or "").name
    cleaned = _SAFE_NAME.sub("_", base).strip("._")[:80]
    return cleaned or fallback


# --- the transport ------------------------------------------------------------------------
@dataclass
class _Arrival:
    """A message the handler accepted that carries a file: ``updates()`` fetches the file (for
    allowed senders only) when the message's turn comes, so order holds and nothing is written
    for strangers."""

    incoming: IncomingMessage
    message: Any
    file_name: str
    grouped_id: int | None


@dataclass
class TransportHealth:
    """What a health check and the operator see (also written to ``telegram/status.json``)."""

    connected: bool = False
    since: float = 0.0
    last_error: str = ""
    reconnects: int = 0
    logged_out: bool = False
    stopped: bool = False  # closed by the bridge: not an outage (health checks tell them apart)


_LOGGED_OUT = object()  # queued when the login is gone for good: updates() raises


class TelegramTransport:
    """``bridge.transport.Transport`` over Telethon (see module docstring)."""

    reconnect_delays: tuple[float, ...] = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
    outage_notice_after = 60.0  # seconds down before the operator chat hears about it

    def __init__(self, client: Any, settings: Settings, *, queue_size: int = 1000):
        self.client = client
        self.settings = settings
        self.self_id: int | None = None
        self.username: str | None = None
        self.is_bot = settings.telegram_session is None and settings.telegram_bot_token is not None
        # Who may make Valor download a file: the bridge installs its allowlist check here
        # (bridge/service.py). Without one, no file is fetched at all.
        self.authorize: Callable[[IncomingMessage], bool] | None = None
        self.health = TransportHealth()
        self._queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=queue_size)
        self._held: deque[Any] = deque()  # taken from the queue while collecting an album
        self._early: list[Any] = []  # updates that came before we knew who we are
        self._sent_ids: OrderedDict[int, deque[int]] = OrderedDict()
        self._topics: OrderedDict[tuple[int, int], int] = OrderedDict()
        self._drafts_refused = False  # set once Telegram refuses a draft: live messages then
        self._handlers_added = False
        self._watchdog: asyncio.Task[None] | None = None
        self._closing = False
        self._taken: Any = None  # taken from the queue, not yet handed to the bridge

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> TelegramTransport:
        from servers.core.settings import get_settings

        settings = settings or get_settings()
        return cls(build_client(settings), settings)

    # --- lifecycle ------------------------------------------------------------------------
    def set_identity(self, self_id: int, username: str | None, *, bot: bool | None = None) -> None:
        """Who Valor is on Telegram (learnt from get_me on start; set directly in tests)."""
        self.self_id = self_id
        self.username = (username or "").lower() or None
        if bot is not None:
            self.is_bot = bot
        cache = getattr(self.client, "_mb_entity_cache", None)
        if cache is not None and not cache.self_id:  # offline: Telethon needs our id to dispatch
            cache.set_self_user(self_id, bool(self.is_bot), 0)

    def add_handlers(self) -> None:
        from telethon import events

        if not self._handlers_added:
            self.client.add_event_handler(self.on_new_message, events.NewMessage(incoming=True))
            self.client.add_event_handler(self.on_button_press, events.CallbackQuery())
            self._handlers_added = True

    async def start(self) -> None:
        """Connect, log in if needed (a bot with its token, once), learn who we are, catch up,
        and watch the connection from then on."""
        self.add_handlers()
        self._closing = False
        await self._connect_authorized()
        me = await self.client.get_me()
        if me is None:
            raise ValorError(Category.CONFIG, "Telegram did not accept Valor's login.")
        self.set_identity(me.id, getattr(me, "username", None), bot=bool(getattr(me, "bot", False)))
        session = self.client.session
        if hasattr(session, "me"):
            session.me = {"id": me.id, "bot": self.is_bot}
            session.position_held = lambda: self._unhanded() > 0
            # A fresh login's position on disk at once (what Telethon's keep-alive does).
            await self.client._save_states_and_entities()
            session.save()
        for event in self._early:  # arrived during catch-up, before we knew our own id
            await self._accept(event)
        self._early.clear()
        self._mark_up()
        self._catch_up_after_reconnects()
        log.info("connected to Telegram as %s", "a bot" if self.is_bot else "a user account")
        if self._watchdog is None or self._watchdog.done():
            self._watchdog = asyncio.create_task(self._watch(), name="telegram-watchdog")

    async def _connect_authorized(self) -> None:
        client, session = self.client, self.client.session
        token = self.settings.telegram_bot_token
        bot_login = self.settings.telegram_session is None and token is not None
        await client.connect()
        try:  # asked each time: Telethon caches is_user_authorized() for the client's life
            authorized = await client.get_me() is not None
        except ConnectionError:  # Telethon dropped a stored position it may not ask about
            authorized = False
        if authorized:
            return
        if not bot_login:
            raise ValorError(
                Category.CONFIG,
                "The Telegram session is not logged in (expired or revoked): run `valor login`.",
            )
        # A stored login Telegram no longer accepts: its position must go too, or Telethon asks
        # for the difference unauthorized and disconnects in the middle of the login.
        await client.disconnect()
        if hasattr(session, "forget"):
            from telethon._updates import MessageBox

            session.forget()
            session.auth_key = client._sender.auth_key  # the connection's key, not logged in
            # An interrupted catch-up leaves the old box mid-difference; start as a new client.
            client._message_box = MessageBox(client._log["messagebox"])
        await client.connect()
        secret = token.get_secret_value()
        try:
            me = await client.sign_in(bot_token=secret)
        except Exception as exc:
            error = translate_error(exc, "log in")
            if error is None or error.category is not Category.INPUT:
                raise error or exc from None
            raise ValorError(
                Category.CONFIG,
                f"Telegram refused the bot token ({type(exc).__name__}): check TELEGRAM_BOT_TOKEN.",
            ) from None
        if str(getattr(me, "id", "")) != secret.partition(":")[0]:
            raise ValorError(Category.CONFIG, "TELEGRAM_BOT_TOKEN logged in as another bot.")
        log.info("logged in to Telegram with the bot token (the login is kept for restarts)")

    async def close(self) -> None:
        self._closing = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._watchdog
            self._watchdog = None
        # Telethon stores the update position into the session, then closes it: the session's
        # close() writes it to disk, so the next start fetches only what came after. Unless
        # messages are still waiting here: then the older stored position stays (the session's
        # ``position_held``), they are fetched again, and the inbox drops any it already has.
        waiting = self._unhanded()
        if waiting:
            log.info("%d Telegram messages not yet taken: fetched again next start", waiting)
        await self.client.disconnect()
        self.health.connected, self.health.stopped = False, True
        self.health.since = time.time()
        self._write_status()

    # --- the connection watchdog ----------------------------------------------------------
    async def _watch(self) -> None:
        """Telethon gives up reconnecting after ``connection_retries`` and its update loop
        disconnects on fatal errors; either way ``client.disconnected`` resolves. Then reconnect
        with backoff (catching up on what was missed) until it works or the bridge stops."""
        while not self._closing:
            error: BaseException | None = None
            try:
                await self.client.disconnected
            except asyncio.CancelledError:
                raise
            except BaseException as exc:  # the reason Telethon gave up
                error = exc
            if self._closing:
                return
            error = error or getattr(self.client, "_updates_error", None)
            self._mark_down(error)
            if not await self._reconnect():
                return

    def _catch_up_after_reconnects(self) -> None:
        """When Telethon's own reconnect succeeds it only sends get_me (catching up is a TODO
        in Telethon 1.45): ask for the difference too, so a short drop loses nothing."""
        sender = getattr(self.client, "_sender", None)
        original = getattr(sender, "_auto_reconnect_callback", None)
        if original is None or getattr(original, "catches_up", False):
            return

        async def reconnected() -> None:
            await original()
            log.info("Telegram connection restored by Telethon; catching up")
            await self.client.catch_up()

        reconnected.catches_up = True  # type: ignore[attr-defined]
        sender._auto_reconnect_callback = reconnected

    async def _reconnect(self) -> bool:
        attempt = 0
        while not self._closing:
            delay = self.reconnect_delays[min(attempt, len(self.reconnect_delays) - 1)]
            attempt += 1
            try:
                await self.client.disconnect()  # clean up what is left; keeps the position
                await self._connect_authorized()
            except ValorError as exc:
                if exc.category is Category.CONFIG:  # logged out: retrying cannot help
                    self.health.logged_out = True
                    self._mark_down(exc)
                    log.error("Telegram transport stopped: %s", exc.detail)
                    await self._queue.put(_LOGGED_OUT)
                    return False
                if exc.retry_after:  # a flood wait on the login itself
                    delay = max(delay, exc.retry_after)
                self._mark_down(exc)
            except Exception as exc:
                self._mark_down(exc)
            else:
                self.health.reconnects += 1
                down_for, error = time.time() - self.health.since, self.health.last_error
                self._mark_up()
                log.info("reconnected to Telegram (attempt %d); catching up", attempt)
                await self._tell_operator(down_for, error)
                return True
            log.warning("reconnecting to Telegram in %.0f s (attempt %d)", delay, attempt)
            await asyncio.sleep(delay)
        return False

    async def _tell_operator(self, down_for: float, error: str) -> None:
        """After a long outage, a note in the operator chat (the log has the details)."""
        chat = self.settings.operator_chat_id
        if chat is None or down_for < self.outage_notice_after:
            return
        note = (
            f"⚠️ Telegram was unreachable for {down_for / 60:.0f} min ({error}). "
            "Reconnected; messages sent meanwhile are being answered now."
        )
        try:
            await self.send_text(chat, note)
        except Exception as exc:  # a courtesy: the log already says it all
            log.info("could not tell the operator about the outage: %s", describe_exception(exc))

    def _mark_up(self) -> None:
        self.health.connected, self.health.since = True, time.time()
        self.health.stopped = False
        self._write_status()

    def _mark_down(self, error: BaseException | None) -> None:
        described = (
            (error.detail if isinstance(error, ValorError) else describe_exception(error))
            if error is not None
            else "the connection closed"
        )
        if self.health.connected:
            log.error("lost the connection to Telegram: %s", described)
            self.health.connected, self.health.since = False, time.time()
        self.health.last_error = described
        self._write_status()

    def _write_status(self) -> None:
        with contextlib.suppress(OSError):
            write_private(
                self.settings.data_dir / "telegram" / "status.json",
                json.dumps(asdict(self.health)),
            )

    # --- incoming -------------------------------------------------------------------------
    async def updates(self) -> AsyncIterator[IncomingMessage]:
        while True:
            item = self._held.popleft() if self._held else await self._queue.get()
            if item is _LOGGED_OUT:
                raise ValorError(Category.CONFIG, self.health.last_error or "Logged out.")
            self._taken = item  # until handed over (a stop meanwhile must not skip past it)
            try:
                incoming = await self._complete(item)
            except Exception as exc:  # one odd update must not stop the others
                log.error("could not read a Telegram message: %s", describe_exception(exc))
                self._taken = None
                continue
            self._taken = None
            if incoming is not None:
                yield incoming

    def _unhanded(self) -> int:
        """Messages accepted from Telegram that the bridge has not been handed yet."""
        taken = 1 if self._taken is not None else 0
        return taken + self._queue.qsize() + len(self._held) + len(self._early)

    async def on_new_message(self, event: Any) -> None:
        """Telethon handler: only decides and queues (no download, no network), in order."""
        if self.self_id is None:  # catch-up before get_me: decide once we know who we are
            self._early.append(event)
            return
        await self._accept(event)

    async def _accept(self, event: Any) -> None:
        try:
            item = self.to_arrival(event)
        except Exception as exc:  # one odd update must not stop the others
            log.error("could not read a Telegram message: %s", describe_exception(exc))
            return
        if item is not None:
            await self._queue.put(item)

    def to_arrival(self, event: Any) -> IncomingMessage | _Arrival | None:
        """What an update means for the bridge (see module docstring), without any I/O."""
        message = event.message
        if message.out or (self.self_id is not None and message.sender_id == self.self_id):
            return None  # our own message: never answered
        if getattr(message, "post", False) or (event.is_channel and not event.is_group):
            return None  # channel broadcast
        chat_id = int(event.chat_id)
        is_group = not event.is_private
        mentions = self._mentions_me(message)
        replies = self._replies_to_me(chat_id, message)
        text = message.message or ""
        # An answer to an approval question (`yes CODE`) needs no mention: the bridge checks
        # who sent it.
        if is_group and not (mentions or replies) and parse_answer(text) is None:
            return None
        file_name = self._wanted_file(chat_id, message)
        if not text.strip() and file_name is None:
            return None
        sender = getattr(event, "sender", None) or getattr(message, "sender", None)
        from telethon import utils

        topic = topic_of(message)
        if topic is not None:
            self._remember_topic(chat_id, int(message.id), topic)
        incoming = IncomingMessage(
            chat_id=chat_id,
            message_id=int(message.id),
            sender_id=int(message.sender_id or chat_id),
            sender_name=utils.get_display_name(sender) if sender is not None else "",
            text=text,
            sent_at=message.date.timestamp() if message.date else 0.0,
            is_group=is_group,
            mentions_valor=mentions,
            replies_to_valor=replies,
            topic_id=topic,
        )
        if file_name is None:
            return incoming
        return _Arrival(incoming, message, file_name, getattr(message, "grouped_id", None))

    async def _complete(self, item: IncomingMessage | _Arrival) -> IncomingMessage | None:
        """Fetch an arrival's files (an album's parts together) if its sender is allowed."""
        if isinstance(item, IncomingMessage):
            return item
        parts = [item]
        if item.grouped_id is not None:
            parts += await self._album_rest(item)
        first = parts[0].incoming
        allowed = self.authorize is not None and self.authorize(first)
        paths: list[Path] = []
        if allowed:
            for part in parts:
                saved = await self._download(part)
                if saved is not None:
                    paths.append(saved)
        else:
            log.info("not fetching files from user %s in chat %s", first.sender_id, first.chat_id)
        text = "\n".join(p.incoming.text for p in parts if p.incoming.text.strip())
        if allowed and not text.strip() and not paths:
            return None  # nothing left to answer
        return replace(first, text=text, media_paths=tuple(paths))

    async def _album_rest(self, first: _Arrival) -> list[_Arrival]:
        """The album's other parts: Telegram sends them one after another."""
        rest: list[_Arrival] = []
        while True:
            if self._held:
                nxt = self._held.popleft()
            else:
                try:
                    nxt = await asyncio.wait_for(self._queue.get(), ALBUM_WINDOW)
                except TimeoutError:
                    return rest
            same = (
                isinstance(nxt, _Arrival)
                and nxt.grouped_id == first.grouped_id
                and nxt.incoming.chat_id == first.incoming.chat_id
            )
            if not same:
                self._held.appendleft(nxt)
                return rest
            rest.append(nxt)

    def _mentions_me(self, message: Any) -> bool:
        """Telegram's own flag, a mention entity of exactly our @username (or a /command
        addressed to us), or a text mention of our id; never a mere substring."""
        from telethon.tl import types

        if getattr(message, "mentioned", False) and not _is_real_reply(message):
            return True
        if not message.entities:
            return False
        me = f"@{self.username}" if self.username else None
        named = types.MessageEntityMentionName | types.InputMessageEntityMentionName
        for entity, text in message.get_entities_text():
            if isinstance(entity, named):
                user_id = getattr(entity, "user_id", None)
                if getattr(user_id, "user_id", user_id) == self.self_id:
                    return True
            elif me and isinstance(entity, types.MessageEntityMention) and text.lower() == me:
                return True
            elif (
                me
                and isinstance(entity, types.MessageEntityBotCommand)
                and text.lower().endswith(me)
            ):
                return True  # /command@valorbot
        return False

    def _replies_to_me(self, chat_id: int, message: Any) -> bool:
        if not _is_real_reply(message):
            return False
        if getattr(message, "mentioned", False):
            return True  # Telegram flags replies to our messages for user accounts
        reply_id = getattr(message.reply_to, "reply_to_msg_id", None)
        return reply_id is not None and reply_id in self._sent_ids.get(chat_id, ())

    def _wanted_file(self, chat_id: int, message: Any) -> str | None:
        """The name to save the message's file under, if it is a kind the bridge uses (photos,
        documents, and voice notes, audio and video notes, which it transcribes; not other
        video, stickers or animations) and not too large."""
        from telethon.tl import types

        media = message.media
        if isinstance(media, types.MessageMediaPhoto) and media.photo:
            name, size = f"{chat_id}_{message.id}.jpg", _photo_size(media.photo)
        elif isinstance(media, types.MessageMediaDocument) and media.document:
            document = media.document
            recording = _recording_name(document)  # voice, audio, video notes: transcribed
            unused = (
                types.DocumentAttributeAudio,
                types.DocumentAttributeVideo,
                types.DocumentAttributeSticker,
                types.DocumentAttributeAnimated,
            )
            if recording is None and any(isinstance(a, unused) for a in document.attributes):
                return None
            original = next(
                (
                    a.file_name
                    for a in document.attributes
                    if isinstance(a, types.DocumentAttributeFilename)
                ),
                "",
            )
            name = f"{chat_id}_{message.id}_" + (recording or safe_file_name(original, "file"))
            size = int(document.size or 0)
        else:
            return None
        limit = int(self.settings.telegram_max_download_mb * 1024 * 1024)
        if size > limit:
            log.info("not saving a %d byte file from chat %s (limit %d)", size, chat_id, limit)
            return None
        return name

    async def _download(self, arrival: _Arrival) -> Path | None:
        chat_id = arrival.incoming.chat_id
        folder = chat_folder(self.settings, chat_id, "telegram")  # no other chat reads it
        target = folder / arrival.file_name
        try:
            saved = await self.client.download_media(arrival.message, file=str(target))
        except Exception as exc:
            error = translate_error(exc, "download a file")
            log.warning(
                "could not save media from chat %s: %s", chat_id, error or describe_exception(exc)
            )
            return None
        if not saved:
            return None
        path = Path(saved).resolve()
        if not path.is_relative_to(folder.resolve()):  # defence in depth: only the chat's folder
            path.unlink(missing_ok=True)
            return None
        return path

    # --- topics ---------------------------------------------------------------------------
    def _remember_topic(self, chat_id: int, message_id: int, topic: int) -> None:
        self._topics[(chat_id, message_id)] = topic
        while len(self._topics) > _TOPICS_KEPT:
            self._topics.popitem(last=False)

    def topic_of(self, chat_id: int, message_id: int | None) -> int | None:
        """The forum topic an incoming message was written in (None: not in a topic, or not
        seen since this start)."""
        if message_id is None:
            return None
        return self._topics.get((chat_id, message_id))

    # --- outgoing -------------------------------------------------------------------------
    def _remember_sent(self, chat_id: int, message_id: int) -> None:
        ids = self._sent_ids.setdefault(chat_id, deque(maxlen=_SENT_IDS_KEPT))
        ids.append(message_id)
        self._sent_ids.move_to_end(chat_id)
        while len(self._sent_ids) > 10_000:
            self._sent_ids.popitem(last=False)

    async def _call(self, action: str, call: Callable[[], Awaitable[Any]]) -> Any:
        try:
            return await call()
        except Exception as exc:
            return _translated(exc, action)

    async def _with_entities(self, action: str, text: str, send: Callable[..., Awaitable[Any]]):
        """Send with the text's entities; if Telegram rejects them, the same text plain."""
        entities = to_telethon_entities(getattr(text, "entities", ()))
        plain = str.__str__(text)
        if not entities:
            return await self._call(action, lambda: send(plain, []))
        try:
            return await send(plain, entities)
        except Exception as exc:
            if not _is_entity_error(exc):
                return _translated(exc, action)
        log.info("Telegram rejected the formatting; sending plain text instead")
        return await self._call(action, lambda: send(plain, []))

    def _reply_target(self, chat_id: int, reply_to: int | None, topic_id: int | None) -> int | None:
        """Telethon takes one message id: the message answered, or else the topic's first
        message, which is how a message is posted into a forum topic."""
        if reply_to is not None:
            return reply_to
        return topic_id

    async def send_text(
        self,
        chat_id: int,
        text: str,
        *,
        reply_to: int | None = None,
        topic_id: int | None = None,
    ) -> SentMessage:
        target = self._reply_target(chat_id, reply_to, topic_id)

        stop = telegram_buttons.stop_for_send(self, chat_id, reply_to)  # a running reply's

        async def send(plain: str, entities: list[Any]):
            return await self.client.send_message(
                chat_id,
                plain,
                reply_to=target,
                formatting_entities=entities,
                link_preview=False,
                buttons=stop,
            )

        sent = await self._with_entities("send a message", text, send)
        self._remember_sent(chat_id, int(sent.id))
        telegram_buttons.note_sent(self, chat_id, reply_to, int(sent.id))
        return SentMessage(chat_id, int(sent.id))

    async def edit_text(self, message: SentMessage, text: str) -> None:
        # A live message keeps its Stop button while its run lasts; later edits drop it.
        stop = telegram_buttons.stop_for_edit(self, message.chat_id, message.message_id)

        async def edit(plain: str, entities: list[Any]):
            return await self.client.edit_message(
                message.chat_id,
                message.message_id,
                plain,
                formatting_entities=entities,
                link_preview=False,
                buttons=stop,
            )

        await self._with_entities("edit a message", text, edit)

    # --- inline buttons (a bot only; see bridge/telegram_buttons.py) -------------------------
    def buttons_enabled(self) -> bool:
        return self.is_bot  # a user session cannot send inline buttons: it keeps typed codes

    async def send_buttons(self, chat_id: int, text: str, buttons: Sequence[Button]) -> SentMessage:
        markup = telegram_buttons.to_telethon(buttons)
        sent = await self._call(
            "send a message",
            lambda: self.client.send_message(chat_id, text, buttons=markup, link_preview=False),
        )
        self._remember_sent(chat_id, int(sent.id))
        return SentMessage(chat_id, int(sent.id))

    async def on_button_press(self, event: Any) -> None:
        await telegram_buttons.on_press(self, event)

    async def answer_button(self, press: IncomingMessage, text: str) -> None:
        await telegram_buttons.answer(self, press, text)

    def show_stop_button(self, chat_id: int, reply_to: int, shown: bool) -> None:
        telegram_buttons.show_stop(self, chat_id, reply_to, shown)

    async def delete_message(self, message: SentMessage) -> None:
        await self._call(
            "delete a message",
            lambda: self.client.delete_messages(message.chat_id, [message.message_id]),
        )

    async def send_file(
        self,
        chat_id: int,
        path: Path,
        *,
        caption: str = "",
        reply_to: int | None = None,
        topic_id: int | None = None,
    ) -> SentMessage:
        target = self._reply_target(chat_id, reply_to, topic_id)
        sent = await self._call(
            "upload a file",
            lambda: self.client.send_file(
                chat_id, str(path), caption=caption, reply_to=target, formatting_entities=[]
            ),
        )
        self._remember_sent(chat_id, int(sent.id))
        return SentMessage(chat_id, int(sent.id))

    async def signal(
        self,
        chat_id: int,
        kind: str,
        *,
        message_id: int | None = None,
        topic_id: int | None = None,
    ) -> None:
        """The receipt reaction ("received") or the typing action ("typing", in ``topic_id``,
        else in the topic ``message_id`` was written in, if any); both optional."""
        from telethon import functions, types

        if kind == "received":
            emoji = self.settings.telegram_receipt_reaction.strip()
            if not emoji or message_id is None:
                return
            request = functions.messages.SendReactionRequest(
                peer=chat_id, msg_id=message_id, reaction=[types.ReactionEmoji(emoticon=emoji)]
            )
        elif kind == "typing":
            if not self.settings.telegram_typing:
                return
            request = functions.messages.SetTypingRequest(
                peer=chat_id,
                action=types.SendMessageTypingAction(),
                top_msg_id=topic_id if topic_id is not None else self.topic_of(chat_id, message_id),
            )
        else:
            raise ValueError(f"unknown signal {kind!r}: use 'received' or 'typing'")
        try:
            await self._call(f"show {kind}", lambda: self.client(request))
        except ValorError as exc:  # a signal is a courtesy, never worth failing a reply
            log.debug("signal %s failed in chat %s: %s", kind, chat_id, exc)

    # --- drafts (bridge.transport.DraftTransport) ------------------------------------------
    def drafts_enabled(self, chat_id: int) -> bool:
        """Telegram streams drafts from bots into private chats (messages.setTyping with
        sendMessageTextDraftAction, the Bot API's sendMessageDraft); a user account, a group,
        or an account Telegram refused a draft to keeps editing a live message."""
        return bool(self.is_bot) and chat_id > 0 and not self._drafts_refused

    async def send_draft(
        self, chat_id: int, draft_id: int, text: str, *, topic_id: int | None = None
    ) -> None:
        from telethon import functions, types

        async def send(plain: str, entities: list[Any]):
            action = types.SendMessageTextDraftAction(
                text=types.TextWithEntities(text=plain, entities=entities), random_id=draft_id
            )
            request = functions.messages.SetTypingRequest(
                peer=chat_id, action=action, top_msg_id=topic_id
            )
            return await self.client(request)

        try:
            await self._with_entities("stream a draft", text, send)
        except ValorError as exc:
            if exc.category not in _PASSING_FAILURES:
                # e.g. not allowed for this bot: every later reply edits a live message
                self._drafts_refused = True
                log.warning("Telegram refused a draft (%s); live messages are edited instead", exc)
            raise


def topic_of(message: Any) -> int | None:
    """The forum topic a message belongs to: Telegram marks it in the reply header
    (``forum_topic``), with the topic's id as the replied-to id, or as the top id when the
    message also answers another message in that topic."""
    header = getattr(message, "reply_to", None)
    if header is None or not getattr(header, "forum_topic", False):
        return None
    return getattr(header, "reply_to_top_id", None) or getattr(header, "reply_to_msg_id", None)


def _is_real_reply(message: Any) -> bool:
    """A reply to a message, not merely a message posted in a forum topic (which carries a reply
    header pointing at the topic)."""
    header = getattr(message, "reply_to", None)
    if header is None or getattr(header, "reply_to_msg_id", None) is None:
        return False
    return not (getattr(header, "forum_topic", False) and header.reply_to_top_id is None)


def _translated(exc: Exception, action: str) -> None:
    """None for "message not modified"; otherwise raise the categorized error (or the original
    exception when it is not a Telegram or network failure)."""
    if _is_not_modified(exc):
        return None
    error = translate_error(exc, action)
    if error is None:
        raise exc
    raise error from None


def _is_not_modified(exc: BaseException) -> bool:
    from telethon import errors

    return isinstance(exc, errors.MessageNotModifiedError)


_AUDIO_MIME_SUFFIXES = {
    "audio/ogg": ".ogg",
    "audio/opus": ".ogg",
    "audio/mpeg": ".mp3",
    "audio/mp3": ".mp3",
    "audio/mp4": ".m4a",
    "audio/m4a": ".m4a",
    "audio/x-m4a": ".m4a",
    "audio/wav": ".wav",
    "audio/x-wav": ".wav",
    "audio/flac": ".flac",
    "audio/webm": ".webm",
}


def _recording_name(document: Any) -> str | None:
    """The file name of a recording the bridge transcribes (its extension tells the
    transcription endpoint the format), or None when the document is not one."""
    from telethon.tl import types

    from servers.core.transcription import is_audio

    attributes = document.attributes
    if any(
        isinstance(a, types.DocumentAttributeSticker | types.DocumentAttributeAnimated)
        for a in attributes
    ):
        return None
    if any(isinstance(a, types.DocumentAttributeVideo) and a.round_message for a in attributes):
        return "video_note.mp4"
    audio = next((a for a in attributes if isinstance(a, types.DocumentAttributeAudio)), None)
    if audio is None or any(isinstance(a, types.DocumentAttributeVideo) for a in attributes):
        return None
    if audio.voice:
        return "voice.ogg"
    original = next(
        (a.file_name for a in attributes if isinstance(a, types.DocumentAttributeFilename)), ""
    )
    named = safe_file_name(original, "audio")
    if is_audio(Path(named)):
        return named
    suffix = _AUDIO_MIME_SUFFIXES.get((document.mime_type or "").lower())
    return f"audio{suffix}" if suffix else None


def _photo_size(photo: Any) -> int:
    sizes = []
    for size in getattr(photo, "sizes", []) or []:
        if hasattr(size, "size"):
            sizes.append(int(size.size))
        elif hasattr(size, "sizes") and size.sizes:  # progressive: the largest step
            sizes.append(int(max(size.sizes)))
        elif hasattr(size, "bytes"):
            sizes.append(len(size.bytes))
    return max(sizes, default=0)
