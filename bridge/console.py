"""A console transport behind ``valor chat``: type a message, watch tool progress and the answer.

The person at the keyboard is the machine's owner, so the allowlist does not apply. Lines are read
from stdin; end of input (Ctrl-D, or the end of a piped file) finishes the replies already
accepted and exits. Message ids come from the clock so they stay unique across restarts (the
inbox dedupes on them).
"""

from __future__ import annotations

import asyncio
import getpass
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import TextIO

from bridge.transport import IncomingMessage, ReplySink, SentMessage, Transport

PROMPT_MARK = "you ▸ "
VALOR_MARK = "valor ▸ "


class ConsoleTransport:
    def __init__(
        self,
        chat_id: int = 0,
        user_name: str | None = None,
        stdin: TextIO | None = None,
        stdout: TextIO | None = None,
    ):
        self.chat_id = chat_id
        self.user_name = user_name or getpass.getuser()
        self.stdin = stdin or sys.stdin
        self.stdout = stdout or sys.stdout
        self._last_id = 0
        self._texts: dict[int, str] = {}

    def _next_id(self) -> int:
        self._last_id = max(self._last_id + 1, int(time.time() * 1000))
        return self._last_id

    def write(self, text: str) -> None:
        self.stdout.write(text)
        self.stdout.flush()

    async def _lines(self) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        try:
            reader = asyncio.StreamReader()
            await loop.connect_read_pipe(
                lambda: asyncio.StreamReaderProtocol(reader), self.stdin.buffer
            )
        except (ValueError, AttributeError, OSError):  # a regular file or a test's StringIO
            while line := await asyncio.to_thread(self.stdin.readline):
                yield line
            return
        while raw := await reader.readline():
            yield raw.decode("utf-8", errors="replace")

    async def updates(self) -> AsyncIterator[IncomingMessage]:
        async for line in self._lines():
            text = line.strip()
            if not text:
                continue
            yield IncomingMessage(
                chat_id=self.chat_id,
                message_id=self._next_id(),
                sender_id=0,
                sender_name=self.user_name,
                text=text,
                sent_at=time.time(),
            )

    async def send_text(
        self, chat_id: int, text: str, *, reply_to: int | None = None
    ) -> SentMessage:
        message_id = self._next_id()
        self._texts[message_id] = text
        self.write(f"{VALOR_MARK}{text}\n")
        return SentMessage(chat_id, message_id)

    async def edit_text(self, message: SentMessage, text: str) -> None:
        old = self._texts.get(message.message_id, "")
        self._texts[message.message_id] = text
        if text.startswith(old):
            self.write(text[len(old) :] + "\n")
        else:
            self.write(f"{VALOR_MARK}(edited) {text}\n")

    async def send_file(
        self, chat_id: int, path: Path, *, caption: str = "", reply_to: int | None = None
    ) -> SentMessage:
        self.write(f"{VALOR_MARK}[file] {path} {caption}".rstrip() + "\n")
        return SentMessage(chat_id, self._next_id())

    async def signal(self, chat_id: int, kind: str, *, message_id: int | None = None) -> None:
        return None


class ConsoleReply:
    """Prints the answer as it grows (only what is new) and tool progress on its own lines."""

    def __init__(self, transport: ConsoleTransport, chat_id: int, reply_to: int | None = None):
        self.transport = transport
        self._printed = ""  # the answer text printed so far
        self._line_open = False
        self._attached: list[Path] = []

    @property
    def message_id(self) -> int | None:
        return None  # printed lines have no ids to reply to

    def attach_files(self, paths: Sequence[Path]) -> None:
        self._attached.extend(paths)

    def _print_new(self, text: str) -> None:
        if text.startswith(self._printed):
            new = text[len(self._printed) :]
        elif self._printed.endswith(text):
            new = ""  # the final answer is the last part of what was streamed
        else:
            new, self._line_open = text, False
        if not new:
            return
        if not self._line_open:
            self.transport.write(VALOR_MARK + new.lstrip("\n"))
            self._line_open = True
        else:
            self.transport.write(new)
        self._printed = self._printed + new if text.startswith(self._printed) else text

    async def text(self, text: str) -> None:
        self._print_new(text)

    async def tool_progress(self, tool_name: str, detail: str = "") -> None:
        label = tool_name.removeprefix("mcp__").replace("__", " › ")
        prefix = "\n" if self._line_open else ""
        self.transport.write(f"{prefix}  ⚙ {label} {detail}".rstrip() + "\n")
        self._line_open = False

    async def finish(self, final_text: str, files: list[Path] | None = None) -> None:
        self._print_new(final_text)
        self.transport.write("\n")
        for path in [*self._attached, *(files or [])]:
            self.transport.write(f"{VALOR_MARK}[file] {path}\n")

    async def fail(self, message: str) -> None:
        prefix = "\n" if self._line_open else ""
        self.transport.write(f"{prefix}⚠ {message}\n")


def console_reply(transport: Transport, chat_id: int, reply_to: int | None) -> ReplySink:
    assert isinstance(transport, ConsoleTransport)
    return ConsoleReply(transport, chat_id, reply_to)


async def run_console(chat_id: int = 0) -> None:
    from bridge.pipeline import Bridge

    transport = ConsoleTransport(chat_id)
    bridge = Bridge(transport, reply_factory=console_reply, authorize_all=True)
    sys.stderr.write(
        "Valor chat: type a message and press Enter; /stop (/stop all), /new, /status, /cost; "
        "Ctrl-D to quit.\n"
        "Answer a 🔐 question with yes CODE, always CODE (this session) or no CODE.\n"
    )
    await bridge.run()
