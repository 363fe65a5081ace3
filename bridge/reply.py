"""The default ReplySink: one message per answer, edited as the answer grows.

It edits on every change; a transport with rate limits (Telegram) plugs in bridge/live.py's
rate-controlled sink through the pipeline's reply factory instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from bridge.transport import ReplySink, SentMessage, Transport

WORKING_MARK = "⏳"


class EditingReply:
    """Sends the first text, edits it as more arrives, and ends with the final answer."""

    def __init__(
        self,
        transport: Transport,
        chat_id: int,
        reply_to: int | None = None,
        topic_id: int | None = None,
    ):
        self.transport = transport
        self.chat_id = chat_id
        self.reply_to = reply_to
        # a forum topic's answers go to that topic (passed only to transports that know topics)
        self._topic = {"topic_id": topic_id} if topic_id is not None else {}
        self.message: SentMessage | None = None
        self._shown = ""
        self._answer = ""
        self._progress = ""
        self._attached: list[Path] = []

    @property
    def message_id(self) -> int | None:
        return self.message.message_id if self.message else None

    def attach_files(self, paths: Sequence[Path]) -> None:
        self._attached.extend(path for path in paths if path not in self._attached)

    async def _show(self, text: str) -> None:
        text = text.strip() or WORKING_MARK
        if text == self._shown:
            return
        if self.message is None:
            self.message = await self.transport.send_text(
                self.chat_id, text, reply_to=self.reply_to, **self._topic
            )
        else:
            await self.transport.edit_text(self.message, text)
        self._shown = text

    def _compose(self) -> str:
        progress = f"\n\n{WORKING_MARK} {self._progress}" if self._progress else ""
        return self._answer + progress

    async def text(self, text: str) -> None:
        self._answer = text
        await self._show(self._compose())

    async def tool_progress(self, tool_name: str, detail: str = "") -> None:
        self._progress = f"{tool_name} {detail}".strip()
        await self._show(self._compose())

    async def finish(self, final_text: str, files: list[Path] | None = None) -> None:
        self._progress = ""
        self._answer = final_text
        await self._show(final_text)
        for path in [*self._attached, *(files or [])]:
            await self.transport.send_file(
                self.chat_id, path, reply_to=self.reply_to, **self._topic
            )

    async def fail(self, message: str) -> None:
        self._progress = ""
        text = f"{self._answer}\n\n⚠️ {message}" if self._answer else f"⚠️ {message}"
        await self._show(text)


def editing_reply(
    transport: Transport, chat_id: int, reply_to: int | None, topic_id: int | None = None
) -> ReplySink:
    return EditingReply(transport, chat_id, reply_to, topic_id)
