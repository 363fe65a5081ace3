"""The bridge pipeline: receive → authorize → persist → per-chat FIFO → run Claude Code → stream
→ record → done.

- Authorization: private chats need the sender in ``VALOR_ALLOWED_USER_IDS`` (or the chat in
  ``VALOR_ALLOWED_CHAT_IDS``); groups need the chat allowed and answer only when Valor is
  mentioned or replied to. Everything else never reaches Claude Code and is not stored.
- Every authorized message is written to the inbox before anything else. On start, rows a
  previous bridge did not finish are processed again; a redelivered message is a duplicate.
- One FIFO per chat keeps order; a semaphore (``VALOR_MAX_CONCURRENT_RUNS``) bounds runs overall.
- Tools are hosted once over HTTP on loopback; each run gets a config with a token for its chat.
- Commands (``bridge/commands.py``): ``/stop`` ends the running reply (``/stop all``: the
  chat's waiting messages too), ``/new`` starts a fresh session, ``/status``, ``/cost`` (the
  chat's spend today and the caps).
- Spending (``servers.core.spending``): each run's cost is stored with its time; past a daily
  cap a message is held (its row stays open) and released when the day resets or the cap rises;
  the per-run cap is Claude Code's own ``--max-budget-usd``.
- Buttons: a transport that can show them (a Telegram bot, ``ButtonTransport``) gets approval
  questions with buttons and a Stop button on the live message; a press arrives as a message
  and passes the same checks as typed text.
- Approvals (``bridge/chat_approvals.py``): a run asks approval-tools about tools not allowed
  up front (``servers.core.approvals``); the bridge puts each pending question to its chat and
  an allowlisted user's ``yes CODE`` / ``always CODE`` / ``no CODE`` answers it at once.
- Warm sessions (``VALOR_WARM_*``): a chat's Claude Code stays resident between its messages
  (``servers.core.claude_resident``); a message that arrives mid-turn waits in the chat's queue,
  a process that dies mid-turn has the message re-run once in a fresh one (``--resume``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import logging
import os
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bridge import commands, inbox
from bridge.chat_approvals import ChatApprovals
from bridge.commands import buttons_of, in_topic, parse_command
from bridge.reply import editing_reply
from bridge.transport import IncomingMessage, ReplySink, Transport
from servers.core import approvals, history, outbox, spending
from servers.core.claude_command import ClaudeRun
from servers.core.claude_events import (
    ApiRetryEvent,
    Event,
    PermissionDenialEvent,
    TextEvent,
    ToolResultEvent,
    ToolUseEvent,
)
from servers.core.claude_resident import (
    ConversationKey,
    ResidentClaude,
    WarmLimits,
    WarmPool,
    conversation_key,
)
from servers.core.claude_runner import ClaudeRunner, RunOutcome
from servers.core.errors import (
    Category,
    ValorError,
    describe_exception,
    mask_unexpected,
    redact,
)
from servers.core.mcp_config import HostedTools, private_run_file, use_servers
from servers.core.store import Store

if TYPE_CHECKING:
    from servers.core.remote_runs import RemoteRunner
    from servers.core.settings import Settings

log = logging.getLogger("valor.bridge")

# (transport, chat, message answered) → sink; a factory is also given ``topic_id=`` for a
# message written in a forum topic (only then, so a factory that knows no topics still works)
ReplyFactory = Callable[..., ReplySink]
PROCESS_KIND = "claude-bridge"
PERSONA_PATH = Path(__file__).with_name("persona.md")
OUTBOX_POLL_SECONDS = 1.0
MAX_ATTEMPTS = 3  # runs of one message cut short by a bridge stop or crash before giving up
FRESH_SESSION_NOTICE = (
    "The previous conversation session could not be resumed, so this reply started a fresh session."
)
HIDDEN_TOOLS = {"ToolSearch"}  # Claude Code's own lookups are not progress a person cares about


def key_of(row: inbox.InboxRow | IncomingMessage) -> ConversationKey:
    """The conversation a message belongs to: its chat, or (chat, topic) in a forum topic."""
    return conversation_key(row.chat_id, row.topic_id)


def build_prompt(row: inbox.InboxRow, context_block: str | None = None) -> str:
    parts = [context_block] if context_block else []
    if row.topic_id is not None:  # the tools read the whole chat unless told the topic
        parts.append(
            f"(This conversation is forum topic {row.topic_id} of the chat: pass "
            f"topic_id={row.topic_id} to search_conversation_history or "
            "get_conversation_context to stay in it.)"
        )
    parts.append(row.text)
    if row.media_paths:
        parts.append("Attached files:\n" + "\n".join(f"- {path}" for path in row.media_paths))
    return "\n\n".join(parts)


def workdir_has_context_hook(workdir: Path) -> bool:
    """True when Claude Code in ``workdir`` runs Valor's UserPromptSubmit hook (context block)."""
    try:
        return "servers.hooks user-prompt-submit" in (
            workdir / ".claude" / "settings.json"
        ).read_text(encoding="utf-8")
    except OSError:
        return False


@dataclass
class RunningReply:
    row: inbox.InboxRow
    cancel: asyncio.Event
    started: float


class BridgeLocked(ValorError):
    pass


class Bridge:
    """One bridge per data directory (a lock file enforces it)."""

    def __init__(
        self,
        transport: Transport,
        *,
        store: Store | None = None,
        settings: Settings | None = None,
        runner: ClaudeRunner | None = None,
        reply_factory: ReplyFactory = editing_reply,
        host_tools: bool = True,
        claude_env: Mapping[str, str] | None = None,
        persona: str | None = None,
        authorize_all: bool = False,
        stdio_mcp_config: Path | None = None,
        tools_base_url: str | None = None,
        tools_secret: bytes | None = None,
        remote_runs: RemoteRunner | None = None,
    ):
        from servers.core.settings import get_settings
        from servers.core.store import get_store

        self.transport = transport
        self.settings = settings or get_settings()
        self.store = store or get_store(self.settings.db_path)
        self.runner = runner or ClaudeRunner(self.store, self.settings)
        self.reply_factory = reply_factory
        self.host_tools = host_tools
        self.claude_env = claude_env
        self.persona = persona if persona is not None else self._load_persona()
        self.authorize_all = authorize_all  # the console: the person at the keyboard is the owner
        # Without hosting, runs may use a stdio config instead (servers read VALOR_CHAT_ID).
        self.stdio_mcp_config = stdio_mcp_config
        self._slots = asyncio.Semaphore(self.settings.max_concurrent_runs)
        # by conversation: a chat, or a chat's forum topic (each its own queue and session)
        self._queues: dict[ConversationKey, deque[int]] = {}
        self._workers: dict[ConversationKey, asyncio.Task[None]] = {}
        self._running: dict[ConversationKey, RunningReply] = {}
        self.warm = WarmPool(
            WarmLimits.from_settings(self.settings), self.settings.claude_timeout_seconds
        )
        # conversation → (session, its running total_cost_usd): a turn's cost is the difference
        self._session_costs: dict[ConversationKey, tuple[str, float]] = {}
        self._deliveries: dict[int, inbox.DeliveryLog] = {}  # rows being answered, by inbox id
        # Tools already hosted by this process (the daemon) are reused with their secret: the
        # scope secret is process-wide, so a second host here would replace the daemon's.
        if tools_base_url is not None and tools_secret is None:
            raise ValueError("tools_base_url needs the tools_secret its tokens are checked with")
        self._external_tools = tools_base_url
        self._secret = tools_secret  # else the persistent one, loaded when hosting
        self.tools: HostedTools | None = None  # while serving with hosted tools
        self._lock_file: Any = None
        self._outbox_task: asyncio.Task[None] | None = None
        self._approvals_task: asyncio.Task[None] | None = None
        self.chat_approvals = ChatApprovals(self)  # questions to the chat, answers from it
        self._prepend_context = not workdir_has_context_hook(self.settings.workdir)
        self.remote_runs = remote_runs  # VALOR_RUN_ON_WORKERS: runs go to remote workers

    def _load_persona(self) -> str:
        path = self.settings.persona_file or PERSONA_PATH
        try:
            return Path(path).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ValorError(
                Category.CONFIG, f"Cannot read the persona file {path}: {exc.strerror}."
            ) from None

    # -- lifecycle ---------------------------------------------------------------------------
    async def run(self) -> None:
        """Serve until the transport's updates end, then finish what was accepted."""
        async with self.serving():
            async for message in self.transport.updates():
                await self.receive(message)
            await self.drain()

    @asynccontextmanager
    async def serving(self) -> AsyncIterator[Bridge]:
        """Lock, host the tools, recover unfinished work and deliver the outbox while open."""
        self._acquire_lock()
        from servers.core.sandbox import log_sandbox_mode

        log_sandbox_mode(self.settings, log)  # a warning when runs are not sandboxed
        try:
            async with self._hosted_tools():
                await self.recover()
                self._outbox_task = asyncio.create_task(self._outbox_loop())
                self._approvals_task = asyncio.create_task(self.chat_approvals.loop())
                self.warm.start_sweeping()
                try:
                    yield self
                finally:
                    await self.stop()
        finally:
            self._release_lock()

    def _acquire_lock(self) -> None:
        path = self.settings.data_dir / "bridge.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a+")  # noqa: SIM115 - held for the bridge's lifetime
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise BridgeLocked(
                Category.CONFIG,
                f"Another bridge is already serving {self.settings.data_dir}; stop it first.",
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._lock_file = handle

    def _release_lock(self) -> None:
        if self._lock_file is not None:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    @asynccontextmanager
    async def _hosted_tools(self) -> AsyncIterator[None]:
        """The daemon's hosted tools when given, else our own host (none with host_tools off)."""
        from servers import SERVERS

        if self._external_tools is not None:
            self.tools = HostedTools(self._external_tools, self._secret, tuple(SERVERS))
            yield
            return
        if not self.host_tools:
            yield
            return
        from servers.core.trust import load_scope_secret
        from servers.hosting import hosted

        self._secret = self._secret or load_scope_secret(self.settings)
        async with hosted(self._secret, host=self.settings.http_host, port=0) as base_url:
            self.tools = HostedTools(base_url, self._secret, tuple(SERVERS))
            try:
                yield
            finally:
                self.tools = None

    async def stop(self) -> None:
        """Stop workers; replies cut short stay open in the inbox and run again next start."""
        if self._outbox_task is not None:
            self._outbox_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._outbox_task
            self._outbox_task = None
        if self._approvals_task is not None:
            self._approvals_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._approvals_task
            self._approvals_task = None
        workers = list(self._workers.values())
        for task in workers:
            task.cancel()
        for task in workers:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.warm.close_all()  # after the workers: no turn is running any more

    async def drain(self) -> None:
        """Wait until every accepted message has been answered."""
        while self._workers:
            await asyncio.gather(*list(self._workers.values()), return_exceptions=True)

    async def recover(self) -> int:
        """End Claude Code runs a crashed bridge left behind; queue its unfinished messages."""
        from servers.core.processes import end_process_tree, is_same_process, mark_process_ended
        from servers.core.processes import running_registrations as registrations

        for registration in registrations(self.store):
            if registration.kind != PROCESS_KIND:
                continue
            if is_same_process(registration):
                log.warning("ending Claude Code run %s left by a stopped bridge", registration.pid)
                await end_process_tree(registration.pid, create_time=registration.create_time)
            mark_process_ended(self.store, registration.pid, registration.create_time)
        approvals.expire_abandoned(self.store)
        rows = inbox.unfinished(self.store)
        for row in rows:
            self._enqueue(key_of(row), row.id)
        if rows:
            log.info("recovered %d unfinished messages", len(rows))
        return len(rows)

    # -- receiving ---------------------------------------------------------------------------
    def authorized(self, message: IncomingMessage) -> bool:
        if self.authorize_all:
            return True
        chat_allowed = message.chat_id in self.settings.allowed_chat_ids
        if message.is_group:
            return chat_allowed
        return chat_allowed or message.sender_id in self.settings.allowed_user_ids

    async def receive(self, message: IncomingMessage) -> str:
        """Accept one update. Returns what happened: queued, duplicate, command, ignored or
        unauthorized."""
        if not self.authorized(message):
            log.warning(
                "refused a message from user %s in chat %s (not in the allowlist)",
                message.sender_id,
                message.chat_id,
            )
            await commands.refuse_press(self.transport, message)
            return "unauthorized"
        answer = approvals.parse_answer(message.text)
        if answer is not None:  # no mention needed in a group: it answers Valor's question
            return await self.chat_approvals.answer(message, answer)
        if message.is_group and not (message.mentions_valor or message.replies_to_valor):
            return "ignored"
        command = parse_command(message.text)
        if command is not None:
            if not inbox.persist_incoming(self.store, message, status="command"):
                return "duplicate"
            await commands.run_command(self, command, message)
            return "command"
        row_id = inbox.persist_incoming(self.store, message)
        if not row_id:
            return "duplicate"
        history.record_message(
            self.store,
            history.Message(
                message.chat_id,
                message.message_id,
                message.text,
                message.sender_name,
                message.sender_id,
                "in",
                message.sent_at,
                topic_id=message.topic_id,
            ),
        )
        with contextlib.suppress(Exception):  # a receipt is nice to have, never required
            await self.transport.signal(message.chat_id, "received", message_id=message.message_id)
        self._enqueue(key_of(message), row_id)
        return "queued"

    # -- commands and approvals (bridge/commands.py, bridge/chat_approvals.py) ---------------
    async def cancel_queued(self, chat_id: int, topic_id: int | None = None) -> int:
        """``/stop all``: cancel the conversation's waiting messages; returns how many."""
        return await commands.cancel_queued(self, chat_id, topic_id)

    def status_text(self, chat_id: int, topic_id: int | None = None) -> str:
        return commands.status_text(self, chat_id, topic_id)

    def may_approve(self, message: IncomingMessage) -> bool:
        return self.chat_approvals.may_approve(message)

    async def ask_pending_approvals(self) -> int:
        """Ask every unasked question and report every unanswered one; returns how many."""
        return await self.chat_approvals.ask_pending()

    # -- the per-conversation queues ---------------------------------------------------------
    def _enqueue(self, chat_id: ConversationKey, row_id: int) -> None:
        self._queues.setdefault(chat_id, deque()).append(row_id)
        worker = self._workers.get(chat_id)
        if worker is None or worker.done():
            self._workers[chat_id] = asyncio.create_task(self._chat_worker(chat_id))

    async def _chat_worker(self, chat_id: ConversationKey) -> None:
        queue = self._queues[chat_id]
        try:
            while queue:
                row_id = queue[0]
                async with self._slots:
                    try:
                        await self._process(row_id)
                    except Exception as exc:  # e.g. the store is unwritable: the row stays open
                        log.error(
                            "message %s failed in the bridge: %s", row_id, describe_exception(exc)
                        )
                    finally:
                        self._deliveries.pop(row_id, None)
                queue.popleft()
        finally:
            if self._workers.get(chat_id) is asyncio.current_task():
                del self._workers[chat_id]
            if not queue:
                self._queues.pop(chat_id, None)

    async def _process(self, row_id: int) -> None:
        row = inbox.get_row(self.store, row_id)
        if row is None or row.status not in inbox.OPEN_STATUSES:
            return
        sink = self.reply_factory(
            self.transport, row.chat_id, row.message_id, **in_topic(row.topic_id)
        )
        record = self._track_delivery(row, sink)
        if record is not None and record.answer is not None:
            await self._resume_delivery(row, sink, record)  # the run is over; parts are missing
            return
        if row.attempts >= MAX_ATTEMPTS:  # it stopped the bridge every time: do not loop on it
            await self._fail(
                row,
                sink,
                f"This message was interrupted {row.attempts} times without an answer; "
                "send it again if it still matters.",
                "failed",
            )
            return
        if await self._held_by_spending(row):
            return
        inbox.mark_running(self.store, row_id)
        running = RunningReply(row, asyncio.Event(), time.monotonic())
        self._running[key_of(row)] = running
        if self.chat_approvals.wake is not None:  # a run may ask: the loop reads the store
            self.chat_approvals.wake.set()
        buttons = buttons_of(self.transport)
        if buttons is not None:  # a bot's live message carries Stop while the run lasts
            buttons.show_stop_button(row.chat_id, row.message_id, True)
        try:
            with contextlib.suppress(Exception):
                # typing shows in the message's forum topic (kept in the row across restarts)
                await self.transport.signal(
                    row.chat_id, "typing", message_id=row.message_id, **in_topic(row.topic_id)
                )
            heard = await self._hear(row, sink)
            if heard is None:
                return  # nothing left to answer; the chat was told why
            row, sink = heard
            outcome = await self._run_claude(row, sink, running.cancel)
        except ValorError as exc:
            await self._fail(row, sink, exc.detail, "failed")
            return
        except asyncio.CancelledError:
            raise  # the bridge is stopping: the row stays open and runs again on restart
        except Exception as exc:
            await self._fail(row, sink, mask_unexpected(exc, "bridge").detail, "failed")
            return
        finally:
            self._running.pop(key_of(row), None)
            if buttons is not None:
                buttons.show_stop_button(row.chat_id, row.message_id, False)
        await self._deliver(row, sink, outcome)
        await self._warn_spending(row.chat_id)

    async def _hear(
        self, row: inbox.InboxRow, sink: ReplySink
    ) -> tuple[inbox.InboxRow, ReplySink] | None:
        """Recordings become text before the run (bridge/attachments.py): the transcript joins
        the prompt and the message's history entry (searchable, marked), and the answer starts
        with a quote of what was heard. None: a recording alone could not be heard (the chat is
        told, the file stays)."""
        from bridge.attachments import QuotedReply, failure_text, first_hint, hear_recordings
        from servers.core.transcription import ENABLE_HINT, is_audio

        heard = await hear_recordings(row.media_paths, row.chat_id, self.settings)
        if not (heard.transcripts or heard.failures or heard.unconfigured):
            return row, sink
        if heard.unconfigured and first_hint(self.settings, row.chat_id):
            with contextlib.suppress(Exception):  # the run still goes on without the hint
                await self.transport.send_text(row.chat_id, ENABLE_HINT, reply_to=row.message_id)
        if heard.transcripts:
            history.record_message(  # the same message again: its text is updated
                self.store,
                history.Message(
                    row.chat_id,
                    row.message_id,
                    heard.with_transcripts(row.text),
                    row.sender_name,
                    row.sender_id,
                    "in",
                    row.sent_at,
                    topic_id=row.topic_id,
                ),
            )
        others = [p for p in row.media_paths if not is_audio(p)]
        if heard.failures and not (heard.transcripts or row.text.strip() or others):
            await self._fail(row, sink, failure_text(*heard.failures[0]), "failed")
            return None
        quote = heard.chat_quote()
        row = dataclasses.replace(row, text=heard.prompt_text(row.text))
        return row, QuotedReply(sink, quote) if quote else sink

    async def _held_by_spending(self, row: inbox.InboxRow) -> bool:
        """Past a daily spending cap the message is kept, not run: its row stays open with a
        hold, the chat is told once, and ``release_held`` queues it again later."""
        refusal = spending.refusal_text(spending.standing(self.store, self.settings, row.chat_id))
        if refusal is None:
            spending.release(self.store, row.id)
            older = [i for i, _ in spending.held(self.store, row.chat_id) if i < row.id]
            for older_id in older:  # kept from before the reset: answered first, in order
                spending.release(self.store, older_id)
                await self._process(older_id)
            return await self._held_by_spending(row) if older else False
        if spending.hold(self.store, row.id, row.chat_id, refusal):
            log.info("chat %s is past a spending cap; message %s held", row.chat_id, row.id)
            with contextlib.suppress(Exception):  # the hold stands; /cost tells it too
                await self.transport.send_text(row.chat_id, refusal, reply_to=row.message_id)
        return True

    def release_held(self) -> int:
        """Queue again the held messages whose chat is no longer past a cap (a new day, or a
        raised cap); returns how many."""
        released = 0
        verdicts: dict[int, bool] = {}
        for row_id, chat in spending.held(self.store):
            if chat not in verdicts:
                state = spending.standing(self.store, self.settings, chat)
                verdicts[chat] = state.reached() is None
            row = inbox.get_row(self.store, row_id)
            key = key_of(row) if row is not None else chat
            if verdicts[chat] and row_id not in self._queues.get(key, ()):
                spending.release(self.store, row_id)
                self._enqueue(key, row_id)
                released += 1
        return released

    async def _run_claude(
        self, row: inbox.InboxRow, sink: ReplySink, cancel: asyncio.Event
    ) -> RunOutcome:
        texts: list[str] = []
        tool_names: dict[str, str] = {}  # tool_use_id → name: create_image results carry images

        async def on_event(event: Event) -> None:
            if isinstance(event, ToolUseEvent):
                tool_names[event.tool_use_id] = event.name
            if isinstance(event, TextEvent):
                texts.append(event.text)
                await sink.text("\n\n".join(texts))
            elif isinstance(event, ToolUseEvent) and event.name not in HIDDEN_TOOLS:
                await sink.tool_progress(event.name, _tool_detail(event.input))
            elif isinstance(event, ApiRetryEvent):
                status = f"HTTP {event.error_status}" if event.error_status else event.error
                await sink.tool_progress(
                    "retrying", f"model API {status}, attempt {event.attempt}/{event.max_retries}"
                )
            elif isinstance(event, PermissionDenialEvent):
                log.warning("Claude Code was denied %s in chat %s", event.tool_name, row.chat_id)
            elif isinstance(event, ToolResultEvent) and not event.is_error:
                _attach_generated_images(
                    sink,
                    tool_names.get(event.tool_use_id, ""),
                    event.content,
                    self.settings.chat_media_path(row.chat_id),
                )

        # The hook adds the block to the prompt; building it here, in this long-lived process
        # with the tokenizer loaded, spares each prompt's hook process from loading it.
        block = self._context_block(row)
        request = ClaudeRun(
            prompt=build_prompt(row, block if self._prepend_context else None),
            session_id=inbox.session_for(self.store, row.chat_id, row.topic_id),
            chat_id=row.chat_id,
            user_id=row.sender_id,
            user_name=row.sender_name,
            launched_by="bridge",
            allowed_tools=[  # each run's MCP servers are allowed ahead of these (_run_with_tools)
                # Attached photos and documents live in the chat's own media folder, outside the
                # workdir; other chats' folders stay unreadable.
                f"Read(/{self.settings.chat_media_path(row.chat_id).resolve()}/**)",
                *self.settings.claude_extra_allowed_tools,
            ],
            append_system_prompt=self.persona or None,
            permission_prompt_tool=(
                approvals.PROMPT_TOOL if self.chat_approvals.asks_approval() else None
            ),
            max_budget_usd=self.settings.budget_per_run_usd,
            env=self.claude_env,
            process_kind=PROCESS_KIND,
        )
        if self.remote_runs is not None and not row.media_paths:
            # One-shot on a worker (servers/core/remote_runs.py), which places the block as its
            # workdir wants; attachments live here, so those runs and warm sessions stay local.
            request.prompt = build_prompt(row)
            return await self.remote_runs.run(request, block, on_event, cancel, texts.clear)
        if self.warm.enabled:
            return await self._run_warm(request, row, block, on_event, cancel, texts.clear)
        return await self._run_cold(request, row, block, on_event, cancel)

    async def _run_cold(
        self,
        request: ClaudeRun,
        row: inbox.InboxRow,
        block: str | None,
        on_event: Any,
        cancel: asyncio.Event,
    ) -> RunOutcome:
        """One ``claude -p`` process for this message."""
        with contextlib.ExitStack() as run_files:
            if block and not self._prepend_context:
                block_path = run_files.enter_context(
                    private_run_file(
                        block, self.settings.data_dir / "run", prefix="ctx-", suffix=".txt"
                    )
                )
                request.extra_env = {"VALOR_CONTEXT_BLOCK_FILE": str(block_path)}
            return await self._run_with_tools(request, row, on_event, cancel)

    # -- warm sessions -----------------------------------------------------------------------
    async def _run_warm(
        self,
        request: ClaudeRun,
        row: inbox.InboxRow,
        block: str | None,
        on_event: Any,
        cancel: asyncio.Event,
        restart_stream: Callable[[], None],
    ) -> RunOutcome:
        """The message as a turn of the chat's resident Claude Code (started when it has none;
        when every warm slot is busy, the message runs cold). If that process dies mid-turn,
        the message runs once more in a fresh one resuming the session; a second failure is
        the answer."""
        chat = key_of(row)
        outcome = await self._warm_or_cold(request, row, block, on_event, cancel)
        if isinstance(outcome, tuple):
            resident, outcome = outcome
            if resident.died:
                self.warm.discard(chat, "died")
                log.warning(
                    "the warm Claude Code of chat %s ended mid-turn (%s); running the message "
                    "again in a fresh process",
                    chat,
                    (outcome.error.detail if outcome.error else "no result")[:200],
                )
                restart_stream()
                retry = dataclasses.replace(
                    request, session_id=resident.session_id or request.session_id
                )
                outcome = await self._warm_or_cold(retry, row, block, on_event, cancel)
                if isinstance(outcome, tuple):
                    resident, outcome = outcome
                    if resident.died:
                        self.warm.discard(chat, "died")
        return outcome

    async def _warm_or_cold(
        self,
        request: ClaudeRun,
        row: inbox.InboxRow,
        block: str | None,
        on_event: Any,
        cancel: asyncio.Event,
    ) -> tuple[ResidentClaude, RunOutcome] | RunOutcome:
        """A turn in the chat's resident process (with it), or a cold run when no slot is free;
        a session that cannot be resumed is replaced by a fresh one, as the runner does."""
        resident = await self._resident_for(request, key_of(row))
        if resident is None:
            log.info("every warm process is busy; chat %s runs cold", row.chat_id)
            return await self._run_cold(request, row, block, on_event, cancel)
        outcome = await self._warm_turn(resident, request.prompt, block, on_event, cancel)
        if resident.resume_failed(outcome):
            log.warning("session %s could not be resumed; starting a fresh one", request.session_id)
            self.warm.discard(key_of(row), "resume failed")
            fresh = dataclasses.replace(request, session_id=None)
            resident = await self._resident_for(fresh, key_of(row))
            if resident is None:
                outcome = await self._run_cold(fresh, row, block, on_event, cancel)
                outcome.fresh_session_notice = FRESH_SESSION_NOTICE
                return outcome
            outcome = await self._warm_turn(resident, request.prompt, block, on_event, cancel)
            outcome.fresh_session_notice = FRESH_SESSION_NOTICE
        self.warm.after_turn(resident)
        cap = self.settings.budget_per_run_usd
        if cap is not None and outcome.result and outcome.result.total_cost_usd >= cap / 2:
            # A resident process's cap counts all its turns: renewed at half, each turn has
            # at least half the per-run cap.
            self.warm.discard(key_of(row), "spent half the per-run budget")
        return resident, outcome

    async def _resident_for(
        self, request: ClaudeRun, key: ConversationKey
    ) -> ResidentClaude | None:
        """The conversation's live resident process (a chat's, or a forum topic's), or a new
        one when a slot is free (else None)."""
        resident = self.warm.get(key)
        if resident is not None:
            return resident
        if not await self.warm.make_room():
            return None
        return await self._start_resident(request, key)

    async def _warm_turn(
        self,
        resident: ResidentClaude,
        prompt: str,
        block: str | None,
        on_event: Any,
        cancel: asyncio.Event,
    ) -> RunOutcome:
        if resident.context_file is not None:
            resident.write_context(block or "")
        return await resident.turn(prompt, on_event, cancel)

    async def _start_resident(self, request: ClaudeRun, key: ConversationKey) -> ResidentClaude:
        """A resident Claude Code for the request's chat, with everything a one-shot run gets:
        the hosted tools (a token bound to the chat, outliving the process's maximum age) or
        the stdio config, and a context block file of its own, rewritten before each turn."""
        chat = request.chat_id
        run = dataclasses.replace(request, prompt="", extra_env=dict(request.extra_env))
        resources = contextlib.ExitStack()
        try:
            context_file = None
            if not self._prepend_context:
                context_file = resources.enter_context(
                    private_run_file(
                        "", self.settings.data_dir / "run", prefix="ctx-", suffix=".txt"
                    )
                )
                run.extra_env["VALOR_CONTEXT_BLOCK_FILE"] = str(context_file)
            if self.tools is not None:
                resources.enter_context(
                    self.tools.for_run(
                        run,
                        chat,
                        ttl_seconds=self.warm.token_ttl_seconds,
                        run_dir=self.settings.data_dir / "run",
                    )
                )
            elif self.stdio_mcp_config is not None:
                use_servers(run, self.stdio_mcp_config, _server_names(self.stdio_mcp_config))
            resident = ResidentClaude(
                run,
                store=self.store,
                settings=self.settings,
                claude_bin=self.runner.claude_bin,
                resources=resources,
                context_file=context_file,
            )
            await resident.start()
        except BaseException:
            resources.close()
            self.warm.release_room()
            raise
        self.warm.add(resident, key)
        return resident

    async def _run_with_tools(
        self, request: ClaudeRun, row: inbox.InboxRow, on_event: Any, cancel: asyncio.Event
    ) -> RunOutcome:
        """Run with the hosted tools (a token for the chat), else the stdio config, else none."""
        if self.tools is None:
            if self.stdio_mcp_config is not None:
                use_servers(request, self.stdio_mcp_config, _server_names(self.stdio_mcp_config))
            return await self.runner.run(request, on_event, cancel)
        with self.tools.for_run(
            request,
            row.chat_id,
            ttl_seconds=self.settings.claude_timeout_seconds + 300,
            run_dir=self.settings.data_dir / "run",
        ):
            return await self.runner.run(request, on_event, cancel)

    def _context_block(self, row: inbox.InboxRow) -> str | None:
        """Chat, user and recent history, optimized to a budget (see context-tools): the block
        the UserPromptSubmit hook builds, from the same VALOR_HOOK_* settings."""
        from servers.core.context_markup import plain_block, recent_history

        conn = self.store.connection()
        try:  # the chat's memory and recent turns (servers/core/chat_memory.py)
            from servers.core.chat_memory import chat_block

            return chat_block(
                conn,
                row.chat_id,
                row.sender_name,
                str(row.sender_id or ""),
                max_messages=self.settings.hook_history_messages,
                max_tokens=self.settings.hook_context_max_tokens,
                exclude_message_id=row.message_id,  # the prompt carries it
                topic_id=row.topic_id,  # a forum topic's recent turns are its own
            )
        except Exception as exc:  # the optimizer is optional here: the plain block still works
            log.warning("context optimizer unavailable (%s); using the plain block", exc)
            messages = recent_history(
                conn,
                row.chat_id,
                self.settings.hook_history_messages,
                exclude_message_id=row.message_id,
                topic_id=row.topic_id,
            )
            return plain_block(
                row.chat_id,
                row.sender_name,
                str(row.sender_id or ""),
                messages,
                self.settings.hook_context_max_tokens,
            )

    async def _deliver(self, row: inbox.InboxRow, sink: ReplySink, outcome: RunOutcome) -> None:
        cost = self._turn_cost(key_of(row), outcome)
        if outcome.session_id and outcome.status in ("ok", "error"):
            duration = outcome.result.duration_ms if outcome.result else 0.0
            inbox.save_session(
                self.store, row.chat_id, outcome.session_id, cost, duration, row.topic_id
            )
        spending.record_spend(
            self.store, row.chat_id, cost, session_id=outcome.session_id, inbox_id=row.id
        )
        if outcome.result is not None and outcome.result.subtype == spending.RUN_CAP_SUBTYPE:
            await self._fail(
                row,
                sink,
                f"Stopped: this reply reached the spending cap for one reply "
                f"(${self.settings.budget_per_run_usd or 0:.2f}, VALOR_BUDGET_PER_RUN_USD) "
                f"after ${cost:.2f}. Ask for a smaller step, or the operator can raise the cap.",
                "failed",
            )
            return
        if not outcome.ok:
            error = outcome.error or ValorError(Category.INTERNAL, "The reply failed.")
            if outcome.status == "cancelled":
                await self._fail(row, sink, "Stopped.", "cancelled")
            else:
                await self._fail(row, sink, error.detail, "failed")
            return
        text = outcome.text.strip() or "(Claude Code finished without a text answer.)"
        notes = []
        if outcome.failed_servers:
            notes.append(
                "Some of my tools were unavailable for this reply: "
                + ", ".join(outcome.failed_servers)
                + "."
            )
        if outcome.fresh_session_notice:
            notes.append(outcome.fresh_session_notice)
        denied = sorted({d.tool_name for d in outcome.result.permission_denials if d.tool_name})
        if denied:
            notes.append("I was not allowed to use: " + ", ".join(denied) + ".")
        if notes:
            text += "\n\n" + "\n".join(f"ℹ️ {note}" for note in notes)
        try:
            await sink.finish(text)
        except Exception as exc:
            # The sink already retried (bridge/live.py); the row stays open, so the next start
            # answers it again (at most MAX_ATTEMPTS runs) instead of losing it.
            log.error(
                "could not deliver the reply in chat %s: %s", row.chat_id, describe_exception(exc)
            )
            return
        reply_id = sink.message_id or -row.id
        history.record_message(
            self.store,
            history.Message(
                row.chat_id, reply_id, text, "Valor", None, "out", time.time(), row.topic_id
            ),
        )
        inbox.mark_finished(self.store, row.id, "done")

    async def _warn_spending(self, chat_id: int) -> None:
        """After a reply: warn the chat once per day and cap past the warning share."""
        if any(spending.daily_caps(self.store, self.settings).values()):  # set live too
            state = spending.standing(self.store, self.settings, chat_id)
            for warning in spending.due_warnings(self.store, state):
                with contextlib.suppress(Exception):  # a warning is advice; /cost repeats it
                    await self.transport.send_text(chat_id, warning)

    def _turn_cost(self, chat_id: ConversationKey, outcome: RunOutcome) -> float:
        """This turn's cost: Claude Code reports the session's running total (it continues
        across ``--resume``), so the difference from the chat's previous total in the same
        session; a session first seen here counts its whole total."""
        if outcome.result is None or not outcome.session_id:
            return 0.0
        total = outcome.result.total_cost_usd
        previous = self._session_costs.get(chat_id)
        self._session_costs[chat_id] = (outcome.session_id, total)
        if previous is not None and previous[0] == outcome.session_id and total >= previous[1]:
            return total - previous[1]
        return total

    def _track_delivery(self, row: inbox.InboxRow, sink: ReplySink) -> inbox.DeliveryLog | None:
        """Sinks that can keep their progress in the store (bridge/live.py) do so per row."""
        track = getattr(sink, "track", None)
        if track is None:
            return None
        record = inbox.DeliveryLog(self.store, row.id)
        track(record)
        self._deliveries[row.id] = record
        return record

    async def _resume_delivery(
        self, row: inbox.InboxRow, sink: ReplySink, record: inbox.DeliveryLog
    ) -> None:
        """An earlier bridge stopped while sending this answer: send only what is missing."""
        if row.attempts >= 2 * MAX_ATTEMPTS:  # sending it stopped the bridge every time
            log.error("giving up delivering the answer to message %s", row.id)
            inbox.mark_finished(self.store, row.id, "failed", "the answer could not be delivered")
            return
        inbox.mark_running(self.store, row.id)
        log.info("message %s: %d part(s) already sent; sending the rest", row.id, record.parts_sent)
        try:
            await sink.finish(record.answer or "")
        except Exception as exc:  # still failing: the row stays open for the next start
            log.error(
                "could not deliver the reply in chat %s: %s", row.chat_id, describe_exception(exc)
            )
            return
        if record.status == "done":
            reply_id = sink.message_id or -row.id
            history.record_message(
                self.store,
                history.Message(
                    row.chat_id,
                    reply_id,
                    record.answer or "",
                    "Valor",
                    None,
                    "out",
                    time.time(),
                    row.topic_id,
                ),
            )
        inbox.mark_finished(self.store, row.id, record.status, record.error)

    async def _fail(self, row: inbox.InboxRow, sink: ReplySink, message: str, status: str) -> None:
        record = self._deliveries.pop(row.id, None)
        if record is not None:  # what the row becomes if a restart has to finish sending this
            record.outcome(status, message[:1000])
        try:
            await sink.fail(message)
        except Exception as exc:
            log.error("could not tell chat %s about a failure: %s", row.chat_id, exc)
        inbox.mark_finished(self.store, row.id, status, message[:1000])

    # -- the outbox --------------------------------------------------------------------------
    async def deliver_outbox(self) -> int:
        """Send pending outbox rows in order; returns how many were sent."""
        sent = 0
        # Each row's files are confined to its chat's media folder as it is read.
        for item in outbox.pending_outbound(self.store, settings=self.settings):
            try:
                message = None
                if item.text.strip():
                    message = await self.transport.send_text(
                        item.chat_id, item.text, reply_to=item.reply_to
                    )
                for path in item.files:
                    await self.transport.send_file(item.chat_id, path, reply_to=item.reply_to)
            except Exception as exc:
                outbox.mark_outbound_failed(self.store, item.id, redact(repr(exc)))
                continue
            outbox.mark_outbound_sent(self.store, item.id)
            if message is not None:
                history.record_message(
                    self.store,
                    history.Message(
                        item.chat_id, message.message_id, item.text, "Valor", None, "out"
                    ),
                )
            sent += 1
        return sent

    async def _outbox_loop(self) -> None:
        while True:
            try:
                await self.deliver_outbox()
            except Exception as exc:
                log.error("outbox delivery failed: %s", describe_exception(exc))
            try:
                self.release_held()
            except Exception as exc:
                log.error("releasing held messages failed: %s", describe_exception(exc))
            await asyncio.sleep(OUTBOX_POLL_SECONDS)


def _attach_generated_images(
    sink: ReplySink, tool_name: str, content: str, chat_media: Path
) -> None:
    """Hand images a tool made (create_image) in the chat's media folder to the sink, to go out
    with the final answer."""
    from bridge.attachments import generated_images

    images = generated_images(tool_name, content, chat_media)
    if images:
        sink.attach_files(images)


def _server_names(config_path: Path) -> list[str]:
    import json

    try:
        return list(json.loads(config_path.read_text(encoding="utf-8"))["mcpServers"])
    except (OSError, ValueError, KeyError) as exc:
        raise ValorError(
            Category.CONFIG, f"Cannot read the MCP config {config_path}: {exc}"
        ) from None


def _tool_detail(tool_input: dict[str, Any]) -> str:
    for key in ("query", "command", "description", "url", "file_path", "prompt"):
        value = tool_input.get(key)
        if isinstance(value, str) and value.strip():
            text = " ".join(value.split())
            return text[:60] + ("…" if len(text) > 60 else "")
    return ""
