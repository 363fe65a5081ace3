"""The bridge's view of a chat network. Telegram is one implementation; tests use an in-memory one
and ``valor chat`` a console one. The pipeline depends only on this interface."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class IncomingMessage:
    chat_id: int
    message_id: int
    sender_id: int
    sender_name: str
    text: str
    sent_at: float
    is_group: bool = False
    mentions_valor: bool = False
    replies_to_valor: bool = False
    media_paths: tuple[Path, ...] = field(default_factory=tuple)
    topic_id: int | None = None  # the forum topic it was written in (Telegram), if any
    button_press: int | None = None  # a pressed inline button (Telegram's query id), not text


@dataclass(frozen=True)
class SentMessage:
    chat_id: int
    message_id: int


@runtime_checkable
class Transport(Protocol):
    """What the bridge needs from a chat network. A transport that knows forum topics (Telegram,
    the in-memory one) also takes ``topic_id=`` on ``send_text``, ``send_file`` and ``signal``;
    the bridge passes it only for a message written in a topic."""

    def updates(self) -> AsyncIterator[IncomingMessage]:
        """Incoming messages, including those missed while offline (caught up on connect)."""
        ...

    async def send_text(
        self, chat_id: int, text: str, *, reply_to: int | None = None
    ) -> SentMessage: ...

    async def edit_text(self, message: SentMessage, text: str) -> None: ...

    async def send_file(
        self, chat_id: int, path: Path, *, caption: str = "", reply_to: int | None = None
    ) -> SentMessage: ...

    async def signal(self, chat_id: int, kind: str, *, message_id: int | None = None) -> None:
        """A receipt or progress signal: kind is "received" (reaction) or "typing"."""
        ...


@dataclass(frozen=True)
class Button:
    """An inline button; pressing it is the same as sending ``answer`` (e.g. ``yes abcde``)."""

    label: str
    answer: str


@runtime_checkable
class ButtonTransport(Protocol):
    """Optional: a transport that can put buttons under a message (a Telegram bot). A press
    arrives as an IncomingMessage with ``button_press`` set and ``answer_button`` replies to
    it; the bridge checks who pressed exactly as it checks who typed."""

    def buttons_enabled(self) -> bool: ...

    async def send_buttons(
        self, chat_id: int, text: str, buttons: Sequence[Button]
    ) -> SentMessage: ...

    async def answer_button(self, press: IncomingMessage, text: str) -> None: ...

    def show_stop_button(self, chat_id: int, reply_to: int, shown: bool) -> None:
        """While shown, the reply to message ``reply_to`` (the live message) carries a Stop
        button; edits after ``shown=False`` drop it."""
        ...


@runtime_checkable
class DraftTransport(Protocol):
    """Optional: a transport that can stream an answer as a draft the chat sees being written
    (Telegram: a bot, in a private chat), instead of sending and editing a message. A draft is
    no message: the final answer is still sent as one."""

    def drafts_enabled(self, chat_id: int) -> bool: ...

    async def send_draft(
        self, chat_id: int, draft_id: int, text: str, *, topic_id: int | None = None
    ) -> None:
        """Show ``text`` as draft ``draft_id`` (the same id again replaces it, animated)."""
        ...


@runtime_checkable
class ReplySink(Protocol):
    """Where one streamed answer goes. The pipeline calls these in order; an implementation
    decides how often the chat actually sees an edit (bridge/live.py rate-controls Telegram)."""

    @property
    def message_id(self) -> int | None:
        """The chat's id of the answer's first message once sent (None before, or if none)."""
        ...

    def attach_files(self, paths: Sequence[Path]) -> None:
        """Files a tool made during the run (images), to go out with the final answer."""
        ...

    async def text(self, text: str) -> None:
        """The whole answer text so far (not a delta)."""
        ...

    async def tool_progress(self, tool_name: str, detail: str = "") -> None: ...

    async def finish(self, final_text: str, files: list[Path] | None = None) -> None: ...

    async def fail(self, message: str) -> None:
        """The run failed: tell the user plainly (never silence)."""
        ...
