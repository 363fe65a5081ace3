"""Warm sessions: one resident Claude Code process per active chat, reused turn after turn.

A one-shot run (``claude_runner``) pays Claude Code's start-up on every message: Node, settings,
hooks, the MCP connections, the transcript reload. A ``ResidentClaude`` starts the same command
(``run_argv`` plus ``--input-format stream-json``), with the same environment (``build_env``),
sandbox (``sandbox.launch``) and registry entry (pid + create time), and keeps it: each turn is
one user message written to its stdin as a JSON line, answered by events ending in one
``result``, and returned as the ``RunOutcome`` a one-shot run returns. Facts of the pinned CLI
(2.1.332, measured against tests/fakes/anthropic_api.py):

- nothing is printed until the first message; every turn starts with its own ``init`` line;
- ``{"type":"control_request","request_id":…,"request":{"subtype":"interrupt"}}`` ends the
  running turn: a ``control_response`` (subtype ``success``) and the turn's ``result`` (subtype
  ``error_during_execution``) follow, and the process takes the next message;
- ``total_cost_usd`` is the session's running total (it continues after ``--resume``);
- closing stdin ends the process (exit code 0).

``WarmPool`` holds the processes of a bridge: at most ``VALOR_WARM_MAX_PROCESSES`` (the least
recently used idle one is closed for a newcomer), each closed after ``VALOR_WARM_IDLE_SECONDS``
idle, and renewed after ``VALOR_WARM_MAX_TURNS`` turns, ``VALOR_WARM_MAX_RSS_MB`` of resident
memory (the whole tree) or ``VALOR_WARM_MAX_AGE_SECONDS``. A renewed chat's next message resumes
its session (``--resume``) in a fresh process.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import time
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from servers.core import sandbox
from servers.core.claude_command import ClaudeRun, build_env, run_argv
from servers.core.claude_events import (
    Event,
    InitEvent,
    MalformedLine,
    ResultEvent,
    UnknownEvent,
    parse_stream_line,
)
from servers.core.claude_runner import (
    STDERR_TAIL_CHARS,
    EventHandler,
    RunOutcome,
    classify_failure,
    forward_event,
    record_event,
    require_claude_bin,
    resume_failed,
    start_launched,
)
from servers.core.errors import Category, ValorError
from servers.core.processes import (
    end_process_tree,
    mark_process_ended,
)

if TYPE_CHECKING:
    from servers.core.settings import Settings
    from servers.core.store import Store

log = logging.getLogger("valor.claude.warm")

STREAM_INPUT = ("--input-format", "stream-json")
INTERRUPT_GRACE_SECONDS = 10.0  # an interrupted turn's result follows in well under a second
CLOSE_GRACE_SECONDS = 3.0  # stdin closed: Claude Code runs its SessionEnd hooks and exits
MCP_READY_SECONDS = 30.0  # Claude Code's own MCP connect timeout is of this order
MCP_POLL_SECONDS = 0.02
TOKEN_MARGIN_SECONDS = 300.0


def resident_argv(claude_bin: str, run: ClaudeRun, settings: Settings) -> list[str]:
    """The one-shot argv (deny rules included) reading its messages from stdin as JSON lines.
    The flags go right after ``--verbose``: the persona stays last, where the registry's
    ``command_shown`` expects it."""
    argv = run_argv(claude_bin, run, settings)
    at = argv.index("--verbose") + 1
    return [*argv[:at], *STREAM_INPUT, *argv[at:]]


def user_line(prompt: str) -> bytes:
    message = {
        "type": "user",
        "message": {"role": "user", "content": prompt},
        "parent_tool_use_id": None,
        "session_id": "",
    }
    return (json.dumps(message) + "\n").encode("utf-8", errors="replace")


def tree_rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` and its descendants, in MB (0 when it is gone)."""
    import psutil

    try:
        root = psutil.Process(pid)
        members = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0
    for member in members:
        with contextlib.suppress(psutil.Error):
            total += member.memory_info().rss
    return total / 2**20


class ResidentClaude:
    """One resident Claude Code process serving one chat, one turn at a time.

    ``resources`` holds what lives as long as the process (its MCP config with the chat's token,
    its context block file); ``context_file`` is rewritten in place before each turn (the
    sandbox binds that inode read-only, so the hook reads the new block).
    """

    def __init__(
        self,
        run: ClaudeRun,
        *,
        store: Store,
        settings: Settings,
        claude_bin: str | None,
        resources: contextlib.ExitStack | None = None,
        context_file: Path | None = None,
    ):
        self.run = run
        self.chat_id = run.chat_id
        self.pool_key: ConversationKey | None = run.chat_id  # WarmPool.add sets a topic's key
        self.store = store
        self.settings = settings
        self.claude_bin = claude_bin
        self.context_file = context_file
        self.session_id = run.session_id
        self.resumed = run.session_id is not None
        self.turns = 0
        self.started = time.monotonic()
        self.last_used = self.started
        self.busy = False
        self.died = False  # ended without a result while a turn was running
        self.rss_mb = 0.0
        self._resources = resources or contextlib.ExitStack()
        self._launch: sandbox.Launch | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._create_time = 0.0
        self._registered = False
        self._events: asyncio.Queue[Event | None] = asyncio.Queue()
        self._tasks: list[asyncio.Task[Any]] = []
        self._stderr_tail = b""
        self._session_recorded = False
        self._requests = 0
        self._closed = False
        self._last_status: str | None = None  # the last turn's, as a one-shot run records it

    # -- state -----------------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def alive(self) -> bool:
        return not self._closed and self._proc is not None and self._proc.returncode is None

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def age(self) -> float:
        return time.monotonic() - self.started

    @property
    def stderr_tail(self) -> str:
        return self._stderr_tail.decode("utf-8", errors="replace")

    def write_context(self, block: str) -> None:
        """The turn's context block, in place (same inode: the sandbox's bind sees it)."""
        if self.context_file is not None:
            with open(self.context_file, "w", encoding="utf-8") as handle:
                handle.write(block)

    # -- start -----------------------------------------------------------------------------------
    async def start(self) -> None:

        claude_bin = require_claude_bin(self.claude_bin)
        run, settings = self.run, self.settings
        workdir = Path(run.workdir or settings.workdir)
        argv = resident_argv(claude_bin, run, settings)
        env = build_env(run, settings)
        launch = self._resources.enter_context(
            sandbox.launch(argv, env, run, settings, workdir, claude_bin)
        )
        self._launch = launch
        try:
            started = await start_launched(self.store, run, launch, workdir)
        except ValorError:
            self._resources.close()
            raise
        self._proc, self._create_time = started.proc, started.create_time
        self._registered = started.registered
        self._tasks = [
            asyncio.create_task(self._read_events()),
            asyncio.create_task(self._read_stderr()),
        ]
        self.started = self.last_used = time.monotonic()
        await self._wait_for_mcp_servers()

    async def _wait_for_mcp_servers(self) -> None:
        """Until no MCP server is "pending". A one-shot ``-p`` run connects them before its
        first request; a resident process would start its first turn without the slow ones,
        so it is asked (control request ``mcp_status``) until they connected or failed."""
        if self.run.mcp_config is None:
            return
        deadline = time.monotonic() + MCP_READY_SECONDS
        while time.monotonic() < deadline:
            response = await self._control({"subtype": "mcp_status"}, deadline)
            if response is None:  # gone, or no answer: the first turn reports what happened
                return
            servers = (response.get("response") or {}).get("mcpServers") or []
            if not any(server.get("status") == "pending" for server in servers):
                return
            await asyncio.sleep(MCP_POLL_SECONDS)
        log.warning("MCP servers of chat %s still pending after %g s", self.chat_id,
                    MCP_READY_SECONDS)  # fmt: skip

    async def _control(self, request: dict[str, Any], deadline: float) -> dict[str, Any] | None:
        """Send a control request between turns and return its response (None: no answer)."""
        self._requests += 1
        request_id = f"valor-{self._requests}"
        line = {"type": "control_request", "request_id": request_id, "request": request}
        await self._write((json.dumps(line) + "\n").encode())
        while (left := deadline - time.monotonic()) > 0:
            try:
                event = await asyncio.wait_for(self._events.get(), timeout=left)
            except TimeoutError:
                return None
            if event is None:
                self._events.put_nowait(None)  # the end stays visible to the first turn
                return None
            if isinstance(event, UnknownEvent) and event.data.get("type") == "control_response":
                response = event.data.get("response") or {}
                if response.get("request_id") == request_id:
                    return response
        return None

    async def _read_events(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        stdout = self._proc.stdout
        while True:
            try:
                raw = await stdout.readline()
            except (ValueError, asyncio.LimitOverrunError):
                self._events.put_nowait(MalformedLine("", "a line beyond the stream limit"))
                continue
            if not raw:
                break
            for event in parse_stream_line(raw.decode("utf-8", errors="replace")):
                self._events.put_nowait(event)
        self._events.put_nowait(None)  # the end of the stream: the process is gone

    async def _read_stderr(self) -> None:
        assert self._proc is not None and self._proc.stderr is not None
        while chunk := await self._proc.stderr.read(65536):
            self._stderr_tail = (self._stderr_tail + chunk)[-STDERR_TAIL_CHARS:]

    # -- a turn ----------------------------------------------------------------------------------
    async def turn(
        self,
        prompt: str,
        on_event: EventHandler | None = None,
        cancel: asyncio.Event | None = None,
        timeout: float | None = None,
    ) -> RunOutcome:
        """One message, answered to its ``result`` (or timeout / cancel / the process's end)."""
        if self.busy:
            raise RuntimeError("a resident Claude Code takes one message at a time")
        self.busy = True
        outcome = RunOutcome(status="error", session_id=self.session_id)
        outcome.started_at = time.time()
        outcome.pids = [self.pid] if self.pid else []
        started = time.monotonic()
        timeout = timeout or self.run.timeout_seconds or self.settings.claude_timeout_seconds
        try:
            while not self._events.empty():  # nothing belongs to a turn not yet asked
                if self._events.get_nowait() is None:
                    self._events.put_nowait(None)  # but the end of the stream does
                    break
            await self._write(user_line(prompt))
            await self._follow(outcome, on_event, cancel, started + timeout)
        except asyncio.CancelledError:
            await self.close("bridge stopping")  # the row stays open; the next start re-runs it
            raise
        finally:
            self.busy = False
            self.turns += 1
            self.last_used = time.monotonic()
            outcome.seconds = time.monotonic() - started
        self._ingest_spool(outcome.started_at)
        if outcome.status in ("cancelled", "timeout"):
            outcome.stderr_tail = self.stderr_tail
            return outcome
        if outcome.result is not None and not outcome.result.is_error:
            outcome.status = "ok"
            outcome.text = outcome.result.result or outcome.text
        else:
            outcome.status = "error"
            outcome.stderr_tail = self.stderr_tail
            returncode = self._proc.returncode if self._proc is not None else None
            outcome.error = classify_failure(outcome.result, returncode, outcome.stderr_tail)
            sandboxed = self._launch is not None and self._launch.sandboxed
            failure = sandbox.start_failure(outcome.stderr_tail) if sandboxed else None
            if outcome.result is None and failure is not None:
                outcome.error = failure
        if self.alive:
            self.rss_mb = tree_rss_mb(self.pid or 0)
        self._last_status = outcome.status
        return outcome

    def resume_failed(self, outcome: RunOutcome) -> bool:
        """The session this process was started to resume does not exist (any more)."""
        return self.resumed and self.turns == 1 and resume_failed(outcome)

    async def _write(self, line: bytes) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self._proc.stdin.write(line)
            await self._proc.stdin.drain()

    async def _follow(
        self,
        outcome: RunOutcome,
        on_event: EventHandler | None,
        cancel: asyncio.Event | None,
        deadline: float,
    ) -> None:
        texts: list[str] = []
        interrupt_deadline: float | None = None
        cancel_wait = asyncio.create_task(cancel.wait()) if cancel is not None else None
        try:
            while True:
                now = time.monotonic()
                limit = deadline if interrupt_deadline is None else interrupt_deadline
                if now >= limit:
                    break
                get = asyncio.create_task(self._events.get())
                waiters: set[asyncio.Future[Any]] = {get}
                if cancel_wait is not None and interrupt_deadline is None:
                    waiters.add(cancel_wait)
                done, _ = await asyncio.wait(
                    waiters, timeout=limit - now, return_when=asyncio.FIRST_COMPLETED
                )
                if get not in done:
                    get.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await get
                    if cancel_wait is not None and cancel_wait in done:
                        outcome.status = "cancelled"
                        interrupt_deadline = time.monotonic() + INTERRUPT_GRACE_SECONDS
                        await self._interrupt()
                    continue
                event = get.result()
                if event is None:  # the process ended mid-turn
                    self.died = outcome.status != "cancelled"
                    if not self.died:
                        outcome.error = ValorError(
                            Category.INPUT, "The reply was stopped on request."
                        )
                    return
                await self._handle(event, outcome, texts, on_event)
                if isinstance(event, ResultEvent):
                    outcome.text = texts[-1] if texts else ""
                    if outcome.status == "cancelled":
                        outcome.error = ValorError(
                            Category.INPUT, "The reply was stopped on request."
                        )
                    return
            # The deadline passed (or an interrupt went unanswered): end the process.
            if outcome.status != "cancelled":
                outcome.status = "timeout"
                outcome.error = ValorError(
                    Category.TIMEOUT,
                    f"The reply took longer than {self._timeout_text()} s, so it was stopped. "
                    "Ask for a smaller step, or raise VALOR_CLAUDE_TIMEOUT_SECONDS.",
                )
            else:
                outcome.error = ValorError(Category.INPUT, "The reply was stopped on request.")
            await self.close(outcome.status)
        finally:
            if cancel_wait is not None and not cancel_wait.done():
                cancel_wait.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await cancel_wait
        if outcome.status == "cancelled" and outcome.error is None:
            outcome.error = ValorError(Category.INPUT, "The reply was stopped on request.")

    def _timeout_text(self) -> str:
        return f"{self.run.timeout_seconds or self.settings.claude_timeout_seconds:g}"

    async def _handle(
        self,
        event: Event,
        outcome: RunOutcome,
        texts: list[str],
        on_event: EventHandler | None,
    ) -> None:
        # The turn's outcome starts from the process's session; init and result may move it.
        record_event(event, outcome, texts, self.run.expected_servers)
        self.session_id = outcome.session_id
        if isinstance(event, InitEvent):
            self._record_session(event.session_id)
        await forward_event(on_event, event)

    async def _interrupt(self) -> None:
        """Ask Claude Code to end the running turn (its ``result`` follows)."""
        self._requests += 1
        request = {
            "type": "control_request",
            "request_id": f"valor-interrupt-{self._requests}",
            "request": {"subtype": "interrupt"},
        }
        await self._write((json.dumps(request) + "\n").encode())

    # -- what the hooks cannot record from inside the sandbox ------------------------------------
    def _record_session(self, session_id: str) -> None:
        if self._session_recorded or not session_id or self._launch is None:
            return
        if not self._launch.sandboxed or self._proc is None:
            return
        self._session_recorded = True
        try:
            pid, create_time = sandbox.run_process(self._proc.pid)
            workdir = Path(self.run.workdir or self.settings.workdir)
            sandbox.record_session_start(self.store, session_id, self.run, pid, create_time,
                                         workdir)  # fmt: skip
        except Exception as exc:  # monitoring data must not end the turn
            log.warning("recording a sandboxed session failed: %s", type(exc).__name__)

    def _ingest_spool(self, since: float) -> None:
        """The turn's spooled tool calls into the store, then the spool emptied in place (the
        hooks append to that inode), so the next turn's ingestion counts none twice."""
        spool = self._launch.spool if self._launch is not None else None
        if spool is None:
            return
        try:
            if not spool.exists() or spool.stat().st_size == 0:
                return  # removed with the process (its last turn was ingested at close)
            sandbox.ingest_spool(self.store, spool, self.chat_id, since, self.settings.log_path)
            os.truncate(spool, 0)
        except Exception as exc:  # monitoring data must not turn an answer into a failure
            log.warning("recording a warm turn's hooks failed: %s", type(exc).__name__)

    # -- the end ---------------------------------------------------------------------------------
    async def close(self, reason: str = "closed") -> None:
        """End the process: stdin closed (it exits on its own), then its tree ended in any case;
        the session recorded as ended and the process's files removed."""
        if self._closed:
            return
        self._closed = True
        proc = self._proc
        if proc is not None:
            if proc.returncode is None and proc.stdin is not None and not self.busy:
                with contextlib.suppress(Exception):
                    proc.stdin.close()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(proc.wait(), timeout=CLOSE_GRACE_SECONDS)
            await end_process_tree(proc.pid, proc, create_time=self._create_time)
            for task in self._tasks:
                if not task.done():
                    task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            if self._registered:
                with contextlib.suppress(Exception):
                    mark_process_ended(self.store, proc.pid, self._create_time)
        since = time.time() - self.age
        self._ingest_spool(since)
        if self._session_recorded and self.session_id:
            # As after a one-shot run: how its last run ended (why the process closed is logged).
            with contextlib.suppress(Exception):
                sandbox.record_session_end(self.store, self.session_id, self._last_status or reason)
        self._resources.close()
        log.info("warm Claude Code of chat %s closed (%s)", self.chat_id, reason)


# -- the pool --------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class WarmLimits:
    max_processes: int
    idle_seconds: float
    max_turns: int
    max_rss_mb: float
    max_age_seconds: float

    @classmethod
    def from_settings(cls, settings: Settings) -> WarmLimits:
        on = settings.warm_sessions == "on"
        return cls(
            max_processes=settings.warm_max_processes if on else 0,
            idle_seconds=settings.warm_idle_seconds,
            max_turns=settings.warm_max_turns,
            max_rss_mb=settings.warm_max_rss_mb,
            max_age_seconds=settings.warm_max_age_seconds,
        )


ConversationKey = int | tuple[int, int]


def conversation_key(chat_id: int, topic_id: int | None = None) -> ConversationKey:
    """What a warm process is kept by: the chat, or (chat, topic) for a forum topic, which is a
    conversation of its own (its own session, so its own process)."""
    return chat_id if topic_id is None else (chat_id, topic_id)


class WarmPool:
    """The warm processes of one bridge, by conversation (a chat, or a chat's forum topic:
    ``conversation_key``), least recently used first."""

    def __init__(self, limits: WarmLimits, token_ttl_margin: float):
        self.limits = limits
        # A process's tools token outlives it: its age is capped, and a turn started just
        # before the cap may run a whole timeout more.
        self.token_ttl_seconds = limits.max_age_seconds + token_ttl_margin + TOKEN_MARGIN_SECONDS
        self._processes: OrderedDict[ConversationKey, ResidentClaude] = OrderedDict()
        self._closing: set[asyncio.Task[None]] = set()
        self._starting = 0  # slots reserved by processes being started
        self._sweeper: asyncio.Task[None] | None = None
        self.peak = 0
        self.started_total = 0
        self.closed_reasons: dict[str, int] = {}

    @property
    def enabled(self) -> bool:
        return self.limits.max_processes > 0

    def __len__(self) -> int:
        return len(self._processes)

    def get(self, chat_id: ConversationKey) -> ResidentClaude | None:
        """The chat's live process, marked most recently used; None when there is none (or it
        ended, or is due for renewal: it is closed first)."""
        resident = self._processes.get(chat_id)
        if resident is None:
            return None
        reason = self.renewal_reason(resident)
        if reason is not None:
            self.discard(chat_id, reason)
            return None
        self._processes.move_to_end(chat_id)
        return resident

    def renewal_reason(self, resident: ResidentClaude) -> str | None:
        if not resident.alive:
            return "ended"
        if resident.turns >= self.limits.max_turns:
            return "turns"
        if resident.rss_mb > self.limits.max_rss_mb:
            return "memory"
        if resident.age >= self.limits.max_age_seconds:
            return "age"
        return None

    async def make_room(self) -> bool:
        """Reserve a slot for a process about to start (``add`` or ``release_room`` ends the
        reservation). Processes still closing count against the limit, so at the limit the
        least recently used idle process is closed, and waited for, first. False when every
        slot is busy with a turn (the message then runs cold)."""
        while (
            len(self._processes) + self._starting + len(self._closing) >= self.limits.max_processes
        ):
            if not self._closing:
                idle = next((c for c, r in self._processes.items() if not r.busy), None)
                if idle is None:
                    return False
                self.discard(idle, "evicted")
            await asyncio.wait(set(self._closing), return_when=asyncio.FIRST_COMPLETED)
        self._starting += 1
        return True

    def release_room(self) -> None:
        self._starting = max(0, self._starting - 1)

    def add(self, resident: ResidentClaude, key: ConversationKey | None = None) -> None:
        """Keep ``resident`` under ``key`` (default: its chat)."""
        assert resident.chat_id is not None
        resident.pool_key = key if key is not None else resident.chat_id
        self.release_room()
        self._processes[resident.pool_key] = resident
        self._processes.move_to_end(resident.pool_key)
        self.started_total += 1
        self.peak = max(self.peak, len(self._processes) + len(self._closing))  # all alive

    def after_turn(self, resident: ResidentClaude) -> None:
        """Renew a process that reached a limit now, so the next message starts fresh."""
        chat_id = resident.pool_key
        if self._processes.get(chat_id) is not resident:  # type: ignore[arg-type]
            self._close_later(resident, "replaced")  # taken out mid-turn (``/new``)
            return
        reason = self.renewal_reason(resident)
        if reason is not None:
            self.discard(chat_id, reason)  # type: ignore[arg-type]

    def discard(self, chat_id: ConversationKey, reason: str) -> None:
        """Take the chat's process out of the pool and close it in the background."""
        resident = self._processes.pop(chat_id, None)
        if resident is not None:
            self._close_later(resident, reason)

    def _close_later(self, resident: ResidentClaude, reason: str) -> None:
        if resident.closed:
            return
        self.closed_reasons[reason] = self.closed_reasons.get(reason, 0) + 1
        task = asyncio.create_task(resident.close(reason))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close_chat(self, chat_id: ConversationKey, reason: str) -> None:
        """Take the chat's process out and wait until it has ended (``/new``); one running a
        turn finishes it first (``after_turn`` closes it then)."""
        resident = self._processes.pop(chat_id, None)
        if resident is not None and not resident.busy:
            self.closed_reasons[reason] = self.closed_reasons.get(reason, 0) + 1
            await resident.close(reason)

    def sweep(self) -> None:
        """Close idle processes past the idle time, and idle ones past their age."""
        now = time.monotonic()
        for chat_id, resident in list(self._processes.items()):
            if resident.busy:
                continue
            if now - resident.last_used >= self.limits.idle_seconds:
                self.discard(chat_id, "idle")
            elif (reason := self.renewal_reason(resident)) is not None:
                self.discard(chat_id, reason)

    def start_sweeping(self) -> None:
        if self.enabled and self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep_loop())

    async def _sweep_loop(self) -> None:
        interval = min(5.0, max(0.05, self.limits.idle_seconds / 4))
        while True:
            await asyncio.sleep(interval)
            try:
                self.sweep()
            except Exception:
                log.exception("sweeping warm processes failed")

    async def close_all(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        for chat_id in list(self._processes):
            self.discard(chat_id, "bridge stopped")
        while self._closing:
            await asyncio.gather(*list(self._closing), return_exceptions=True)

    def chats(self) -> list[ConversationKey]:
        return list(self._processes)

    def process_of(self, chat_id: ConversationKey) -> ResidentClaude | None:
        return self._processes.get(chat_id)
