"""An in-memory Transport for tests: feed messages in, read what the bridge sent."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

from bridge.transport import IncomingMessage, SentMessage


@dataclass
class ChatMessage:
    """A message the bridge sent; ``history`` holds every version (the first send, then edits)."""

    chat_id: int
    message_id: int
    reply_to: int | None
    history: list[str] = field(default_factory=list)
    file: Path | None = None
    topic_id: int | None = None  # the forum topic it was posted in, if any

    @property
    def text(self) -> str:
        return self.history[-1] if self.history else ""


class MemoryTransport:
    def __init__(self, first_message_id: int = 10_000):
        self._incoming: asyncio.Queue[IncomingMessage | None] = asyncio.Queue()
        self._ids = itertools.count(first_message_id)
        self.sent: list[ChatMessage] = []
        self.signals: list[tuple[int, str, int | None]] = []
        self.signal_topics: list[int | None] = []  # the topic of each signal, in order
        self._changed = asyncio.Condition()

    # -- the test's side -----------------------------------------------------------------------
    def deliver(self, message: IncomingMessage) -> None:
        self._incoming.put_nowait(message)

    def close(self) -> None:
        """End ``updates()`` once everything delivered so far has been read."""
        self._incoming.put_nowait(None)

    def messages_in(self, chat_id: int) -> list[ChatMessage]:
        return [m for m in self.sent if m.chat_id == chat_id]

    def replies_to(self, chat_id: int, message_id: int) -> list[ChatMessage]:
        return [m for m in self.messages_in(chat_id) if m.reply_to == message_id]

    async def wait_for(self, condition: Callable[[], bool], timeout: float = 30.0) -> None:
        """Wait until ``condition()`` holds; it is checked on every change and every 50 ms."""
        async with asyncio.timeout(timeout):
            while not condition():
                async with self._changed:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._changed.wait(), 0.05)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    # -- the Transport interface ---------------------------------------------------------------
    async def updates(self) -> AsyncIterator[IncomingMessage]:
        while (message := await self._incoming.get()) is not None:
            yield message

    async def send_text(
        self, chat_id: int, text: str, *, reply_to: int | None = None, topic_id: int | None = None
    ) -> SentMessage:
        message = ChatMessage(chat_id, next(self._ids), reply_to, [text], topic_id=topic_id)
        self.sent.append(message)
        await self._notify()
        return SentMessage(chat_id, message.message_id)

    async def edit_text(self, message: SentMessage, text: str) -> None:
        for sent in self.sent:
            if (sent.chat_id, sent.message_id) == (message.chat_id, message.message_id):
                sent.history.append(text)
                await self._notify()
                return
        raise LookupError(f"no message {message.message_id} in chat {message.chat_id}")

    async def send_file(
        self,
        chat_id: int,
        path: Path,
        *,
        caption: str = "",
        reply_to: int | None = None,
        topic_id: int | None = None,
    ) -> SentMessage:
        message = ChatMessage(
            chat_id, next(self._ids), reply_to, [caption], file=Path(path), topic_id=topic_id
        )
        self.sent.append(message)
        await self._notify()
        return SentMessage(chat_id, message.message_id)

    async def signal(
        self, chat_id: int, kind: str, *, message_id: int | None = None, topic_id: int | None = None
    ) -> None:
        self.signals.append((chat_id, kind, message_id))
        self.signal_topics.append(topic_id)


def incoming(
    chat_id: int,
    message_id: int,
    text: str,
    *,
    sender_id: int = 1,
    sender_name: str = "tester",
    **extra: object,
) -> IncomingMessage:
    """A convenient IncomingMessage for tests and scripts."""
    return IncomingMessage(
        chat_id=chat_id,
        message_id=message_id,
        sender_id=sender_id,
        sender_name=sender_name,
        text=text,
        sent_at=time.time(),
        **extra,  # type: ignore[arg-type]
    )
