"""One live message per reply, edited as the answer grows, and a final answer that always arrives.

``LiveReply`` implements ``bridge.transport.ReplySink``. The pipeline hands it the whole answer so
far and tool progress as they come; a background task sends the newest state whenever the rate
controller gives this chat a turn, so bursts of text coalesce into one edit and a busy minute
never floods. Telegram's "message not modified" is the transport's to swallow; a flood wait
(``ValorError`` with category ``rate_limit``) blocks only this chat for ``retry_after``.

Edits do not notify, so the final answer goes out as fresh message(s) whenever a preview was
shown, and the preview is removed (or, on a transport that cannot delete, reduced to the tool
summary). The final is retried through any number of flood waits and, for transient failures,
for ``final_retry_seconds``; only then does ``finish`` raise, so the pipeline keeps the inbox row
open and nothing is silently lost. Parts already delivered are never sent twice by a retry, and a
file that cannot be uploaded is reported in the chat instead of failing an answer already out.

Forum topics: every part, file and typing action goes to the topic the question came from.

Drafts: where the transport can stream a draft (``DraftTransport``: a Telegram bot in a private
chat), the answer grows as a draft instead of a sent-and-edited message; each draft update takes
a slot of the rate controller like an edit (and a flood wait on its method holds it), an unchanged
draft is shown again before Telegram lets it lapse, and the final answer is sent as message(s)
as always. A draft Telegram refuses (other than a flood wait) ends drafting for the reply, which
goes on with the live message.
Flood waits hold what Telethon holds: the Telegram method, for every chat (``bridge.rate``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from bridge.formatting import TELEGRAM_TEXT_LIMIT, FormattedText, preview, render, utf16_len
from bridge.rate import (
    PRIORITY_CLEANUP,
    PRIORITY_EDIT,
    PRIORITY_FILE,
    PRIORITY_FINAL,
    Limits,
    RateController,
)
from bridge.transport import DraftTransport, ReplySink, SentMessage, Transport
from servers.core.errors import Category, ValorError, describe_exception
from servers.core.media import sendable_file
from servers.core.safe_files import UnsafeFile

if TYPE_CHECKING:
    from bridge.inbox import DeliveryLog
    from servers.core.settings import Settings

log = logging.getLogger("valor.bridge.live")

_TRANSIENT = (Category.UPSTREAM, Category.TIMEOUT, Category.INTERNAL)
_TOOL_ICONS = {
    "search": "🔎",
    "image": "🎨",
    "notion": "📋",
    "link": "🔗",
    "history": "🗂",
    "context": "🗂",
    "screenshot": "📸",
    "bash": "💻",
    "edit": "✏️",
    "write": "✏️",
    "read": "📄",
}
_MAX_PROGRESS_LINES = 3
# The Telegram methods each kind of call uses: a flood wait on one holds it for every chat.
SEND_METHODS = ("SendMessageRequest",)
EDIT_METHODS = ("EditMessageRequest",)
DELETE_METHODS = ("DeleteMessagesRequest",)
DRAFT_METHODS = ("SetTypingRequest",)  # a draft is a chat action (sendMessageTextDraftAction)
DRAFT_REFRESH_SECONDS = 20.0  # an unchanged draft is shown again before it lapses
FILE_METHODS = (
    "SendMediaRequest",
    "UploadMediaRequest",
    "SaveFilePartRequest",
    "SaveBigFilePartRequest",
)
_TYPING_EVERY = 4.5  # Telegram shows "typing" for about five seconds


def tool_label(tool_name: str) -> str:
    """``mcp__social-tools__search_current_info`` → ``🔎 search_current_info``."""
    short = tool_name.rsplit("__", 1)[-1] if tool_name.startswith("mcp__") else tool_name
    icon = next((i for key, i in _TOOL_ICONS.items() if key in short.lower()), "🔧")
    return f"{icon} {short}"


def is_group_chat(chat_id: int) -> bool:
    """Telethon's marked ids: users are positive, groups and channels negative."""
    return chat_id < 0


class LiveReply(ReplySink):
    def __init__(
        self,
        transport: Transport,
        chat_id: int,
        reply_to: int | None = None,
        *,
        rate: RateController,
        is_group: bool | None = None,
        typing: bool = False,
        final_retry_seconds: float = 3600.0,
        allowed_file_roots: Sequence[Path] = (),
        retry_backoff: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        topic_id: int | None = None,
        draft_refresh_seconds: float = DRAFT_REFRESH_SECONDS,
    ):
        self.transport = transport
        self.chat_id = chat_id
        self.reply_to = reply_to
        if topic_id is None and hasattr(transport, "topic_of"):
            topic_id = transport.topic_of(chat_id, reply_to)
        self.topic_id = topic_id
        self.rate = rate
        self.is_group = is_group_chat(chat_id) if is_group is None else is_group
        self.typing = typing
        self.final_retry_seconds = final_retry_seconds
        self.allowed_file_roots = [Path(p).resolve() for p in allowed_file_roots]
        self.retry_backoff = retry_backoff
        self._clock = clock
        self._text = ""
        self._progress: list[str] = []
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._tidy_task: asyncio.Task[None] | None = None
        self._live: SentMessage | None = None
        self._shown: str | None = None
        self._shown_state: tuple[str, list[str]] | None = None
        self._in_call = False
        self._last_typing = float("-inf")
        self._done = False
        self.edits_sent = 0
        self.flood_waits = 0
        # Drafts instead of a live message, where the transport offers them for this chat.
        drafts = transport if isinstance(transport, DraftTransport) else None
        self._drafts = drafts if drafts is not None and drafts.drafts_enabled(chat_id) else None
        self.draft_id = secrets.randbits(62) + 1  # non-zero; the same id animates the updates
        self.draft_refresh_seconds = draft_refresh_seconds
        self.drafts_sent = 0
        self.delivered: list[SentMessage] = []
        self._parts_out = 0  # parts of the final answer already delivered (never sent twice)
        self._files_out: set[Path] = set()
        self._attached: list[Path] = []
        self._record: DeliveryLog | None = None

    def track(self, record: DeliveryLog) -> None:
        """Keep delivery progress in the store: parts a stopped bridge already sent are not
        sent again by the next one (``bridge.inbox.DeliveryLog``)."""
        self._record = record
        self._parts_out = max(self._parts_out, record.parts_sent)
        self._files_out.update(record.files_sent)

    @property
    def message_id(self) -> int | None:
        """The first message of the final answer (what the pipeline records as the reply)."""
        if self._record is not None and self._record.message_ids:
            return self._record.message_ids[0]  # possibly sent by an earlier bridge
        return self.delivered[0].message_id if self.delivered else None

    def attach_files(self, paths: Sequence[Path]) -> None:
        """Files a tool produced during the run (create_image): uploaded with the final answer."""
        self._attached.extend(p for p in paths if p not in self._attached)

    # --- ReplySink ------------------------------------------------------------------------
    async def text(self, text: str) -> None:
        if self._done:
            return
        self._text = text
        self._kick()

    async def tool_progress(self, tool_name: str, detail: str = "") -> None:
        if self._done:
            return
        line = tool_label(tool_name) + (f" {detail}" if detail else "") + "…"
        self._progress = [*self._progress, line][-_MAX_PROGRESS_LINES:]
        await self._maybe_typing()
        self._kick()

    async def finish(self, final_text: str, files: list[Path] | None = None) -> None:
        await self._stop_preview()
        wanted = [*self._attached, *(files or [])]
        if self._record is not None:  # an answer an earlier bridge began wins
            final_text, wanted = self._record.begin(final_text, wanted)
        parts = render(final_text) if final_text.strip() else []
        uploads = self._checked_files(wanted)
        if not parts and not uploads:
            parts = [FormattedText("(Valor finished without a written answer.)")]
        for index, part in enumerate(parts):
            if index < self._parts_out:
                continue  # delivered by an earlier attempt of this finish
            # The first part answers the question; the rest follow it in the same topic.
            reply_to = self.reply_to if index == 0 else None
            sent = await self._deliver(
                PRIORITY_FINAL,
                lambda p=part, r=reply_to: self.transport.send_text(
                    self.chat_id, p, reply_to=r, **self._topic()
                ),
                SEND_METHODS,
            )
            self.delivered.append(sent)
            self._parts_out = index + 1
            if self._record is not None:
                self._record.part_sent(index, sent.message_id)
        failed_files = []
        for path in uploads:
            if path in self._files_out:
                continue
            try:
                sent = await self._deliver(
                    PRIORITY_FILE,
                    lambda p=path: self.transport.send_file(
                        self.chat_id, p, reply_to=self.reply_to, **self._topic()
                    ),
                    FILE_METHODS,
                )
            except Exception as exc:  # the answer is out: say so rather than send it again
                log.warning(
                    "could not upload %s to chat %s: %s",
                    path.name,
                    self.chat_id,
                    describe_exception(exc),
                )
                failed_files.append(path.name)
            else:
                self.delivered.append(sent)
            self._files_out.add(path)
            if self._record is not None:
                self._record.file_sent(path)
        if failed_files:
            note = "⚠️ Could not send: " + ", ".join(failed_files)
            with contextlib.suppress(Exception):
                await self._deliver(
                    PRIORITY_FINAL,
                    lambda: self.transport.send_text(self.chat_id, note, **self._topic()),
                    SEND_METHODS,
                )
        if self._live is not None:
            # Tidying waits for this chat's next slot; the pipeline need not wait for it.
            self._tidy_task = asyncio.create_task(self._remove_preview())

    def _topic(self) -> dict[str, int]:
        """The topic keyword for transports that know topics (only passed when there is one)."""
        return {"topic_id": self.topic_id} if self.topic_id is not None else {}

    async def settled(self) -> None:
        """Wait until the preview is tidied away (tests, shutdown)."""
        if self._tidy_task is not None:
            await self._tidy_task

    async def fail(self, message: str) -> None:
        """The failure, after whatever answer was already written (it is not thrown away)."""
        partial = self._text.strip()
        await self.finish(f"{partial}\n\n⚠️ {message}" if partial else f"⚠️ {message}")

    # --- preview --------------------------------------------------------------------------
    def _kick(self) -> None:
        self._changed.set()
        if self._task is None:
            self._task = asyncio.create_task(self._preview_loop(), name=f"live-{self.chat_id}")

    def _body(self) -> FormattedText:
        formatted = preview(self._text) if self._text.strip() else FormattedText("")
        if not self._progress:
            return formatted
        tail = "\n".join(self._progress)
        joined = formatted.plain() + ("\n\n" if formatted else "") + tail
        if utf16_len(joined) > TELEGRAM_TEXT_LIMIT:  # a full preview leaves no room for progress
            return formatted
        return FormattedText(joined, formatted.entities)

    @property
    def drafting(self) -> bool:
        """True while the answer streams as a draft (not as a live message)."""
        return self._drafts is not None

    async def _next_change(self) -> bool:
        """Wait for a change; True when instead a shown draft is due to be shown again."""
        if self._drafts is None or self._shown is None:
            await self._changed.wait()
            return False
        try:
            await asyncio.wait_for(self._changed.wait(), self.draft_refresh_seconds)
        except TimeoutError:
            return True
        return False

    async def _preview_loop(self) -> None:
        while not self._done:
            refresh = await self._next_change()
            self._changed.clear()
            if self._done:
                return
            if not refresh and (self._text, self._progress) == self._shown_state:
                continue  # nothing new: do not spend a slot
            drafts = self._drafts
            if drafts is not None:
                methods = DRAFT_METHODS
            else:
                methods = SEND_METHODS if self._live is None else EDIT_METHODS
            slot = await self.rate.acquire(
                self.chat_id, is_group=self.is_group, priority=PRIORITY_EDIT, methods=methods
            )
            body = self._body()  # the newest state, taken after waiting: coalescing
            if self._done or not body.strip() or (body.plain() == self._shown and not refresh):
                continue
            state = (self._text, self._progress)
            self._in_call = True
            try:
                if drafts is not None:
                    await drafts.send_draft(self.chat_id, self.draft_id, body, **self._topic())
                    self.drafts_sent += 1
                elif self._live is None:
                    self._live = await self.transport.send_text(
                        self.chat_id, body, reply_to=self.reply_to, **self._topic()
                    )
                else:
                    await self.transport.edit_text(self._live, body)
                    self.edits_sent += 1
                self._shown = body.plain()
                self._shown_state = state
            except ValorError as exc:
                if exc.category is Category.RATE_LIMIT:
                    self._flood(exc)
                    self._changed.set()  # try again once the chat may send
                elif drafts is not None and exc.category not in _TRANSIENT:
                    # Refused (not for this account or chat): the live message takes over.
                    log.info("no drafts in chat %s (%s); editing a message", self.chat_id, exc)
                    self._drafts = None
                    self._shown = self._shown_state = None
                    self._changed.set()
                elif exc.category is Category.INPUT and self._live is not None:
                    # The preview is gone (deleted by the user) or may not be edited: stop
                    # previewing rather than failing on every change; the final still comes.
                    log.info("preview in chat %s cannot be edited: %s", self.chat_id, exc)
                    self._live = None
                    return
                else:
                    log.warning("preview update failed in chat %s: %s", self.chat_id, exc)
            except Exception as exc:  # a preview is best effort; the final answer is not
                log.warning(
                    "preview update failed in chat %s: %s", self.chat_id, describe_exception(exc)
                )
            finally:
                self._in_call = False
                slot.done()

    async def _stop_preview(self) -> None:
        """Stop previews. A call already on its way is let finish, so that a preview Telegram
        has shown is known (and removed later) rather than left behind."""
        self._done = True
        self._changed.set()
        task, self._task = self._task, None
        if task is None:
            return
        if not self._in_call:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task

    async def _remove_preview(self) -> None:
        if self._live is None:
            return
        live, self._live = self._live, None
        delete = getattr(self.transport, "delete_message", None)  # not in every transport
        slot = await self.rate.acquire(
            self.chat_id,
            is_group=self.is_group,
            priority=PRIORITY_CLEANUP,
            methods=DELETE_METHODS if delete is not None else EDIT_METHODS,
        )
        try:
            if delete is not None:
                await delete(live)
            elif self._progress:
                summary = "\n".join(line.removesuffix("…") + " ✓" for line in self._progress)
                await self.transport.edit_text(live, summary)
            else:
                await self.transport.edit_text(live, "⬇️")
        except Exception as exc:  # tidying up is best effort; the answer is out
            log.info(
                "could not tidy the preview in chat %s: %s", self.chat_id, describe_exception(exc)
            )
        finally:
            slot.done()

    async def _maybe_typing(self) -> None:
        now = self._clock()
        if not self.typing or now - self._last_typing < _TYPING_EVERY:
            return
        if self._drafts is not None and self._shown is not None:
            return  # the draft shows the answer being written; typing would replace it
        self._last_typing = now
        try:
            await self.transport.signal(
                self.chat_id, "typing", message_id=self.reply_to, **self._topic()
            )
        except Exception as exc:  # a courtesy, never worth failing a reply
            log.debug("typing signal failed: %s", describe_exception(exc))

    # --- delivery that does not give up ---------------------------------------------------
    def _flood(self, exc: ValorError) -> None:
        self.flood_waits += 1
        seconds = exc.retry_after if exc.retry_after else 1.0
        self.rate.flood_wait(self.chat_id, seconds, method=getattr(exc, "flood_key", None))

    async def _deliver(
        self, priority: int, call: Callable[[], object], methods: tuple[str, ...] = ()
    ) -> SentMessage:
        started = self._clock()
        backoff = self.retry_backoff
        while True:
            slot = await self.rate.acquire(
                self.chat_id, is_group=self.is_group, priority=priority, methods=methods
            )
            try:
                return await call()  # type: ignore[misc]
            except ValorError as exc:
                if exc.category is Category.RATE_LIMIT:
                    self._flood(exc)
                    continue
                if exc.category not in _TRANSIENT:
                    raise
                error: Exception = exc
            except (TimeoutError, OSError) as exc:
                error = exc
            finally:
                slot.done()
            if self._clock() - started > self.final_retry_seconds:
                raise ValorError(
                    Category.UPSTREAM,
                    f"Telegram kept failing for {self.final_retry_seconds:.0f} s; "
                    f"the answer stays queued: {error}",
                )
            log.warning(
                "delivery to chat %s failed, retrying in %.0f s: %s", self.chat_id, backoff, error
            )
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 60.0)

    def _checked_files(self, files: list[Path]) -> list[Path]:
        """Only regular files inside the allowed roots (the chat's media folder) leave the
        machine: symlinks resolved, opened without following or blocking (``sendable_file``)."""
        checked = []
        for raw in files:
            path, reasons = None, []
            for root in self.allowed_file_roots:
                try:
                    path = sendable_file(raw, root)
                    break
                except UnsafeFile as exc:
                    reasons.append(str(exc))
            if path is None:
                why = "; ".join(dict.fromkeys(reasons)) or "no folder may be uploaded from"
                log.warning("not uploading a file to chat %s: %s", self.chat_id, why)
                continue
            if path not in checked:
                checked.append(path)
        return checked


def limits_from_settings(settings: Settings | None = None) -> Limits:
    from servers.core.settings import get_settings

    s = settings or get_settings()
    return Limits(
        per_chat_per_second=s.telegram_per_chat_per_second,
        group_per_minute=s.telegram_group_per_minute,
        global_per_second=s.telegram_global_per_second,
        margin=s.telegram_rate_margin,
    )


def live_reply_factory(
    rate: RateController | None = None, settings: Settings | None = None
) -> Callable[..., LiveReply]:
    """The pipeline's reply factory for Telegram: one shared rate controller per account."""
    from servers.core.settings import get_settings

    settings = settings or get_settings()
    controller = rate or RateController(limits_from_settings(settings))

    def make(
        transport: Transport, chat_id: int, reply_to: int | None, topic_id: int | None = None
    ) -> LiveReply:
        return LiveReply(
            transport,
            chat_id,
            reply_to,
            topic_id=topic_id,  # kept in the inbox row: right after a restart too
            rate=controller,
            typing=settings.telegram_typing,
            final_retry_seconds=settings.telegram_final_retry_seconds,
            allowed_file_roots=[settings.chat_media_path(chat_id)],  # this chat's files only
        )

    return make
