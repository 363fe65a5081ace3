"""The Telegram transport: Telethon as a user account (session string) or a bot (token).

What reaches the bridge (``updates()``):
* private chats: every message from someone else;
* groups: only messages that mention Valor (@username, a text mention, or Telegram's own
  ``mentioned`` flag) or reply to a message Valor sent;
* never Valor's own messages (``out`` or sent by its own id), so it cannot answer itself;
* edited messages are ignored: the answer to the original is already under way, and a new
  message is the way to change the request;
* channel broadcasts and service messages are ignored.

Incoming photos and documents are saved into the chat's own media folder
(``settings.chat_media_path(chat)`` / ``telegram``, owner-only) under a safe name, up to
``VALOR_TELEGRAM_MAX_DOWNLOAD_MB``; their paths travel in ``IncomingMessage.media_paths`` so the
prompt can name them for ``analyze_shared_image``, which resolves names only in that folder.

Missed messages: Telethon catches up through Telegram's update difference when it knows where it
stopped. A string session does not keep that position, so ``PersistentStateSession`` stores it
(update state and the channels it needs, never the auth key) in the data directory; on connect
the difference is fetched and the missed messages arrive through the same handler as live ones.

Telethon's own flood sleeping is turned off (``flood_sleep_threshold=0``): every flood wait is
raised as ``ValorError(rate_limit, retry_after=…)`` so ``bridge.rate`` blocks just that chat.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bridge.formatting import Entity
from bridge.transport import IncomingMessage, SentMessage
from servers.core.approvals import parse_answer
from servers.core.errors import Category, ValorError, describe_exception
from servers.core.media import chat_folder

if TYPE_CHECKING:
    from servers.core.settings import Settings

log = logging.getLogger("valor.bridge.telegram")

_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")
_SENT_IDS_KEPT = 500  # per chat: enough to recognise replies to recent answers


# --- persisting the update position -------------------------------------------------------
def _state_session_class():
    from telethon.sessions import StringSession
    from telethon.tl import types

    class PersistentStateSession(StringSession):
        """A StringSession whose update position survives restarts (see module docstring)."""

        def __init__(self, string: str | None, state_path: Path):
            super().__init__(string or None)
            self.state_path = Path(state_path)
            self._load_state()

        def _load_state(self) -> None:
            try:
                data = json.loads(self.state_path.read_text())
            except FileNotFoundError:
                return
            except (OSError, ValueError) as exc:
                log.warning(
                    "ignoring unreadable Telegram update state %s: %s", self.state_path, exc
                )
                return
            for key, state in data.get("states", {}).items():
                self._update_states[int(key)] = types.updates.State(
                    pts=int(state["pts"]),
                    qts=int(state["qts"]),
                    date=datetime.fromtimestamp(float(state["date"]), UTC),
                    seq=int(state["seq"]),
                    unread_count=0,
                )
            for entity_id, entity_hash in data.get("entities", []):
                self._entities.add((int(entity_id), int(entity_hash), None, None, None))

        def save(self):
            states = {
                str(key): {
                    "pts": s.pts,
                    "qts": s.qts,
                    "date": s.date.timestamp() if s.date else 0,
                    "seq": s.seq,
                }
                for key, s in self._update_states.items()
            }
            channel_ids = {-1_000_000_000_000 - key for key in self._update_states if key}
            # Only what catch-up needs: our own id (Telethon keeps it as entity 0) and the
            # channels with a stored position. No names, usernames or phone numbers.
            entities = sorted(
                [e[0], e[1]] for e in self._entities if e[0] == 0 or e[0] in channel_ids
            )
            _write_private(self.state_path, json.dumps({"states": states, "entities": entities}))
            return super().save()

    return PersistentStateSession


def _write_private(path: Path, text: str) -> None:
    """Write atomically with owner-only permissions."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(tmp, path)


def make_session(settings: Settings):
    """The session a client should use: the user's string session, or an empty one for a bot."""
    cls = _state_session_class()
    string = settings.telegram_session.get_secret_value() if settings.telegram_session else None
    state_path = settings.data_dir / "telegram" / "update_state.json"
    try:
        return cls(string, state_path)
    except ValueError:
        raise ValorError(
            Category.CONFIG,
            "TELEGRAM_SESSION is not a valid Telethon string session: run `valor login` again.",
        ) from None


def build_client(settings: Settings):
    """A TelegramClient for the configured account; does no network I/O until started."""
    from telethon import TelegramClient

    if settings.telegram_api_id is None or settings.telegram_api_hash is None:
        raise ValorError(
            Category.CONFIG,
            "Telegram needs TELEGRAM_API_ID and TELEGRAM_API_HASH (from my.telegram.org).",
        )
    if settings.telegram_session is None and settings.telegram_bot_token is None:
        raise ValorError(
            Category.CONFIG,
            "Set TELEGRAM_SESSION (run `valor login`) for a user account, or TELEGRAM_BOT_TOKEN "
            "for a bot.",
        )
    client = TelegramClient(
        make_session(settings),
        settings.telegram_api_id,
        settings.telegram_api_hash.get_secret_value(),
        catch_up=settings.telegram_catch_up,
        flood_sleep_threshold=0,
        receive_updates=True,
    )
    client.parse_mode = None  # text is formatted by bridge.formatting, never re-parsed
    return client


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
    return out


# --- errors -------------------------------------------------------------------------------
def translate_error(exc: BaseException, action: str) -> ValorError | None:
    """A Telethon / network failure as a categorized ValorError; None for "not modified"."""
    from telethon import errors

    if isinstance(exc, errors.MessageNotModifiedError):
        return None
    if isinstance(exc, errors.FloodWaitError | errors.SlowModeWaitError):
        seconds = float(getattr(exc, "seconds", 1) or 1)
        return ValorError(
            Category.RATE_LIMIT,
            f"Telegram asked Valor to wait {seconds:.0f} s before it can {action}.",
            retry_after=seconds,
        )
    if isinstance(exc, errors.FloodError):
        return ValorError(Category.RATE_LIMIT, f"Telegram rate-limited {action}.", retry_after=5)
    if isinstance(exc, errors.ServerError):
        return ValorError(
            Category.UPSTREAM, f"Telegram had a server error while trying to {action}."
        )
    if isinstance(exc, errors.TimedOutError | asyncio.TimeoutError):
        return ValorError(Category.TIMEOUT, f"Telegram did not answer in time to {action}.")
    if isinstance(exc, ConnectionError | OSError):
        return ValorError(Category.UPSTREAM, f"The connection to Telegram failed ({action}).")
    if isinstance(exc, errors.RPCError):
        # Bad requests and permissions (blocked by the user, cannot write in the chat, no such
        # message) will not succeed by retrying.
        return ValorError(Category.INPUT, f"Telegram refused to {action}: {type(exc).__name__}.")
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
class TelegramTransport:
    """``bridge.transport.Transport`` over Telethon (see module docstring)."""

    def __init__(self, client: Any, settings: Settings, *, queue_size: int = 1000):
        self.client = client
        self.settings = settings
        self.self_id: int | None = None
        self.username: str | None = None
        self.is_bot = settings.telegram_session is None and settings.telegram_bot_token is not None
        self._queue: asyncio.Queue[IncomingMessage] = asyncio.Queue(maxsize=queue_size)
        self._sent_ids: OrderedDict[int, deque[int]] = OrderedDict()
        self._handlers_added = False

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
            self._handlers_added = True

    async def start(self) -> None:
        """Connect, log in (a bot with its token), learn who we are, then catch up."""
        self.add_handlers()
        token = self.settings.telegram_bot_token
        if self.settings.telegram_session is None and token is not None:
            await self.client.start(bot_token=token.get_secret_value())
        else:
            await self.client.connect()
            if not await self.client.is_user_authorized():
                raise ValorError(
                    Category.CONFIG,
                    "The Telegram session is not logged in (expired or revoked): "
                    "run `valor login`.",
                )
        me = await self.client.get_me()
        self.set_identity(me.id, getattr(me, "username", None), bot=bool(getattr(me, "bot", False)))
        log.info("connected to Telegram as %s", "a bot" if self.is_bot else "a user account")

    async def close(self) -> None:
        await self.client.disconnect()  # also saves the update position

    async def updates(self) -> AsyncIterator[IncomingMessage]:
        while True:
            yield await self._queue.get()

    # --- incoming -------------------------------------------------------------------------
    async def on_new_message(self, event: Any) -> None:
        """Telethon handler: turn an event into an IncomingMessage, or drop it (see docstring)."""
        try:
            incoming = await self.to_incoming(event)
        except Exception as exc:  # one odd update must not stop the others
            log.error("could not read a Telegram message: %s", describe_exception(exc))
            return
        if incoming is not None:
            await self._queue.put(incoming)

    async def to_incoming(self, event: Any) -> IncomingMessage | None:
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
        media_paths = await self._save_media(chat_id, message)
        if not text.strip() and not media_paths:
            return None
        sender = getattr(event, "sender", None) or getattr(message, "sender", None)
        from telethon import utils

        sender_name = utils.get_display_name(sender) if sender is not None else ""
        return IncomingMessage(
            chat_id=chat_id,
            message_id=int(message.id),
            sender_id=int(message.sender_id or chat_id),
            sender_name=sender_name,
            text=text,
            sent_at=message.date.timestamp() if message.date else 0.0,
            is_group=is_group,
            mentions_valor=mentions,
            replies_to_valor=replies,
            media_paths=tuple(media_paths),
        )

    def _mentions_me(self, message: Any) -> bool:
        from telethon.tl import types

        if getattr(message, "mentioned", False) and not getattr(message, "reply_to", None):
            return True
        text = message.message or ""
        if self.username and f"@{self.username}" in text.lower():
            return True
        for entity in message.entities or []:
            if (
                isinstance(entity, types.MessageEntityMentionName)
                and entity.user_id == self.self_id
            ):
                return True
        return False

    def _replies_to_me(self, chat_id: int, message: Any) -> bool:
        reply_to = getattr(message, "reply_to", None)
        if reply_to is None:
            return False
        if getattr(message, "mentioned", False):
            return True  # Telegram flags replies to our messages for user accounts
        reply_id = getattr(reply_to, "reply_to_msg_id", None)
        return reply_id is not None and reply_id in self._sent_ids.get(chat_id, ())

    async def _save_media(self, chat_id: int, message: Any) -> list[Path]:
        from telethon.tl import types

        media = message.media
        if isinstance(media, types.MessageMediaPhoto) and media.photo:
            name, size = f"{chat_id}_{message.id}.jpg", _photo_size(media.photo)
        elif isinstance(media, types.MessageMediaDocument) and media.document:
            document = media.document
            original = next(
                (
                    a.file_name
                    for a in document.attributes
                    if isinstance(a, types.DocumentAttributeFilename)
                ),
                "",
            )
            name = f"{chat_id}_{message.id}_" + safe_file_name(original, "file")
            size = int(document.size or 0)
        else:
            return []
        limit = int(self.settings.telegram_max_download_mb * 1024 * 1024)
        if size > limit:
            log.info("not saving a %d byte file from chat %s (limit %d)", size, chat_id, limit)
            return []
        folder = chat_folder(self.settings, chat_id, "telegram")  # no other chat reads it
        target = folder / name
        try:
            saved = await self.client.download_media(message, file=str(target))
        except Exception as exc:
            error = translate_error(exc, "download a file")
            log.warning(
                "could not save media from chat %s: %s", chat_id, error or describe_exception(exc)
            )
            return []
        if not saved:
            return []
        path = Path(saved).resolve()
        if not path.is_relative_to(folder.resolve()):  # defence in depth: only the chat's folder
            path.unlink(missing_ok=True)
            return []
        return [path]

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

    async def send_text(
        self, chat_id: int, text: str, *, reply_to: int | None = None
    ) -> SentMessage:
        async def send(plain: str, entities: list[Any]):
            return await self.client.send_message(
                chat_id, plain, reply_to=reply_to, formatting_entities=entities, link_preview=False
            )

        sent = await self._with_entities("send a message", text, send)
        self._remember_sent(chat_id, int(sent.id))
        return SentMessage(chat_id, int(sent.id))

    async def edit_text(self, message: SentMessage, text: str) -> None:
        async def edit(plain: str, entities: list[Any]):
            return await self.client.edit_message(
                message.chat_id,
                message.message_id,
                plain,
                formatting_entities=entities,
                link_preview=False,
            )

        await self._with_entities("edit a message", text, edit)

    async def delete_message(self, message: SentMessage) -> None:
        await self._call(
            "delete a message",
            lambda: self.client.delete_messages(message.chat_id, [message.message_id]),
        )

    async def send_file(
        self, chat_id: int, path: Path, *, caption: str = "", reply_to: int | None = None
    ) -> SentMessage:
        sent = await self._call(
            "upload a file",
            lambda: self.client.send_file(
                chat_id, str(path), caption=caption, reply_to=reply_to, formatting_entities=[]
            ),
        )
        self._remember_sent(chat_id, int(sent.id))
        return SentMessage(chat_id, int(sent.id))

    async def signal(self, chat_id: int, kind: str, *, message_id: int | None = None) -> None:
        """The receipt reaction ("received") or the typing action ("typing"); both optional."""
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
                peer=chat_id, action=types.SendMessageTypingAction()
            )
        else:
            raise ValueError(f"unknown signal {kind!r}: use 'received' or 'typing'")
        try:
            await self._call(f"show {kind}", lambda: self.client(request))
        except ValorError as exc:  # a signal is a courtesy, never worth failing a reply
            log.debug("signal %s failed in chat %s: %s", kind, chat_id, exc)


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
