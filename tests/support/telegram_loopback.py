"""Telegram's side of a conversation with Telethon's real client, offline.

``FakeTelegram`` answers the requests the bridge makes (login, get_me, update state and
difference, sending) the way Telegram does, and keeps what a test wants to count: logins,
connections, every request. ``LoopbackSender`` is Telethon's own ``MTProtoSender`` with only the
socket replaced: ``connect``, ``disconnect``, its reconnect loop (``connection_retries``) and the
``disconnected`` future are Telethon's code; requests are answered by the fake instead of a
data centre. Everything above the sender (``TelegramClient._call`` with its retries and flood
bookkeeping, ``MessageBox``, the update loop, catch-up, the dispatcher, the session) is real.

    server = FakeTelegram(bot_id=123456)
    client = attach(build_client(settings), server)
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
from collections import defaultdict
from typing import Any

from telethon import errors
from telethon.network.mtprotosender import MTProtoSender
from telethon.tl import functions, types

EPOCH = dt.datetime(2026, 11, 26, 7, 0, tzinfo=dt.UTC)

# Who the offline tests talk as: a bot's credentials, Ann (allowlisted in the tests), Eve (a
# stranger), and a forum supergroup.
API = {"TELEGRAM_API_ID": "12345", "TELEGRAM_API_HASH": "0123456789abcdef0123456789abcdef"}
BOT_TOKEN = "123456:" + "A" * 35
ANN = types.User(id=42, access_hash=1, first_name="Ann")
EVE = types.User(id=66, access_hash=6, first_name="Eve")
FORUM = types.Channel(
    id=900,
    title="Forum",
    photo=types.ChatPhotoEmpty(),
    date=EPOCH,
    access_hash=9,
    megagroup=True,
    forum=True,
)
FORUM_CHAT = -1_000_000_000_900  # FORUM's id as the bridge sees it (Telethon's marked id)


class FakeTelegram:
    def __init__(self, *, bot_id: int = 123456, username: str = "valorbot", bot: bool = True):
        self.me = types.User(
            id=bot_id, access_hash=77, first_name="Valor", username=username, bot=bot, is_self=True
        )
        self.users: dict[int, types.User] = {}
        self.chats: dict[int, Any] = {}
        self.files: dict[int, bytes] = {}  # photo / document id → its bytes (upload.getFile)
        self.pts = 1
        self.history: list[tuple[int, types.Message]] = []  # (pts, message)
        self.authorized_keys: set[bytes] = set()
        self.logins = 0
        self.connections = 0
        self.down = False
        self.requests: list[Any] = []
        self.sent: list[Any] = []  # SendMessage / SendMedia requests that went out
        self.fail: dict[type, list[BaseException]] = defaultdict(list)  # raised before answering
        self.senders: list[LoopbackSender] = []
        self._next_id = 1000

    # --- what a test does -----------------------------------------------------------------
    def user(self, user: types.User) -> None:
        self.users[user.id] = user

    def chat(self, chat: Any) -> None:
        self.chats[chat.id] = chat

    def post(self, message: types.Message) -> None:
        """A message arrives for Valor: stored for getDifference and pushed to every connected
        client, as Telegram pushes updates on the open connection."""
        self.pts += 1
        self.history.append((self.pts, message))
        update = types.Updates(
            updates=[types.UpdateNewMessage(message=message, pts=self.pts, pts_count=1)],
            users=list(self.users.values()),
            chats=list(self.chats.values()),
            date=EPOCH,
            seq=0,
        )
        for sender in self.senders:
            if sender.is_connected() and sender._transport_connected():
                sender._updates_queue.put_nowait(update)

    def push(self, update: Any) -> None:
        """Any other update (a button press) pushed on every open connection."""
        updates = types.Updates(
            updates=[update],
            users=list(self.users.values()),
            chats=list(self.chats.values()),
            date=EPOCH,
            seq=0,
        )
        for sender in self.senders:
            if sender.is_connected() and sender._transport_connected():
                sender._updates_queue.put_nowait(updates)

    def requested(self, kind: type) -> list[Any]:
        return [r for r in self.requests if isinstance(r, kind)]

    # --- answering ------------------------------------------------------------------------
    def _state(self) -> types.updates.State:
        return types.updates.State(pts=self.pts, qts=0, date=EPOCH, seq=1, unread_count=0)

    def _authorized(self, key: bytes | None, request: Any) -> None:
        if key not in self.authorized_keys:
            raise errors.AuthKeyUnregisteredError(request=request)

    async def answer(self, request: Any, key: bytes | None) -> Any:
        self.requests.append(request)
        if isinstance(request, functions.InvokeWithLayerRequest):
            return None  # the config is not used by the client
        pending = self.fail.get(type(request))
        if pending:
            raise pending.pop(0)
        if isinstance(request, functions.auth.ImportBotAuthorizationRequest):
            self.logins += 1
            self.authorized_keys.add(key)
            return types.auth.Authorization(user=self.me)
        self._authorized(key, request)
        if isinstance(request, functions.users.GetUsersRequest):
            return [self.me]
        if isinstance(request, functions.updates.GetStateRequest):
            return self._state()
        if isinstance(request, functions.updates.GetDifferenceRequest):
            missed = [m for pts, m in self.history if pts > request.pts]
            if not missed:
                return types.updates.DifferenceEmpty(date=EPOCH, seq=1)
            return types.updates.Difference(
                new_messages=missed,
                new_encrypted_messages=[],
                other_updates=[],
                chats=list(self.chats.values()),
                users=list(self.users.values()),
                state=self._state(),
            )
        if isinstance(
            request, functions.messages.SendMessageRequest | functions.messages.SendMediaRequest
        ):
            self.sent.append(request)
            self._next_id += 1
            return types.UpdateShortSentMessage(
                out=True, id=self._next_id, pts=self.pts, pts_count=0, date=EPOCH
            )
        if isinstance(request, functions.upload.GetFileRequest):
            data = self.files[request.location.id][request.offset : request.offset + request.limit]
            await asyncio.sleep(0.05)  # a download takes a while: later updates may overtake it
            return types.upload.File(type=types.storage.FileJpeg(), mtime=0, bytes=data)
        if isinstance(
            request,
            functions.messages.SetTypingRequest
            | functions.messages.SendReactionRequest
            | functions.messages.SetBotCallbackAnswerRequest,
        ):
            return True
        if isinstance(request, functions.messages.EditMessageRequest):
            return types.Updates(updates=[], users=[], chats=[], date=EPOCH, seq=0)
        raise errors.RPCError(request, f"the fake does not answer {type(request).__name__}", 400)


class LoopbackSender(MTProtoSender):
    """Telethon's sender with the socket replaced by ``FakeTelegram`` (see module docstring)."""

    def __init__(self, server: FakeTelegram, client: Any, *, retry_delay: float = 0.01):
        super().__init__(
            client.session.auth_key,
            loggers=client._log,
            retries=client._connection_retries,
            delay=retry_delay,
            auto_reconnect=client._auto_reconnect,
            connect_timeout=client._timeout,
            auth_key_callback=client._auth_key_callback,
            updates_queue=client._updates_queue,
            auto_reconnect_callback=client._handle_auto_reconnect,
        )
        self.server = server
        self._answering: set[asyncio.Task[None]] = set()
        server.senders.append(self)

    async def _connect(self) -> None:
        if self.server.down:
            raise ConnectionError("the network is down")
        if not self.auth_key:  # a new connection agrees a new key, as over MTProto
            self.auth_key.key = os.urandom(256)
            await self._auth_key_callback(self.auth_key)
        self.server.connections += 1
        self._connected_now = True
        if self._disconnected.done():
            self._MTProtoSender__disconnected = asyncio.get_running_loop().create_future()

    def _transport_connected(self) -> bool:
        return self._user_connected and not self._reconnecting

    def send(self, request: Any, ordered: bool = False) -> asyncio.Future:
        if not self._user_connected:
            raise ConnectionError("Cannot send requests while disconnected")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        key = self.auth_key.key

        async def answer() -> None:
            try:
                result = await self.server.answer(request, key)
            except BaseException as exc:
                if not future.done():
                    future.set_exception(exc)
            else:
                if not future.done():
                    future.set_result(result)

        task = loop.create_task(answer())
        self._answering.add(task)
        task.add_done_callback(self._answering.discard)
        return future

    def lose_network(self) -> None:
        """The connection drops and stays down: Telethon's own reconnect loop runs its
        ``connection_retries`` and gives up, resolving ``disconnected`` with the error."""
        self.server.down = True
        self._start_reconnect(ConnectionError("connection reset"))


def attach(client: Any, server: FakeTelegram) -> Any:
    """Give a real TelegramClient the loopback sender; returns the client."""
    client._sender = LoopbackSender(server, client)
    return client


def loopback_transport(settings: Any, server: FakeTelegram, authorize: Any = None) -> Any:
    """The real ``TelegramTransport`` over Telethon's real client, talking to ``server``, with
    reconnects quick enough for a test; ``authorize`` stands in for the bridge's allowlist."""
    from bridge.telegram import TelegramTransport
    from bridge.telegram_session import build_client

    transport = TelegramTransport(attach(build_client(settings), server), settings)
    transport.reconnect_delays = (0.05,)
    if authorize is not None:
        transport.authorize = authorize
    return transport
