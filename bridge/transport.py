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


@dataclass(frozen=True)
class SentMessage:
    chat_id: int
    message_id: int


@runtime_checkable
class Transport(Protocol):
    """What the bridge needs from a chat network."""

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
