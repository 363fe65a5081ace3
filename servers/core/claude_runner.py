"""Run headless Claude Code (`claude -p --output-format stream-json --verbose`) as a subprocess.

Shared by the bridge, development-tools and promise-tools. What to run and how its command line
and environment are built live in ``claude_command``; the stream-json events in
``claude_events``; this module starts the process and follows it to the end. Each run:

- is registered in the process registry (pid + create time) and marked ended afterwards;
- runs in its own process group; on timeout or cancellation the whole tree is ended;
- falls back once to a fresh session when ``--resume`` names a session Claude Code cannot find;
- checks the init line: an MCP server that is not "connected" is reported, not ignored;
- runs inside the OS sandbox (``servers.core.sandbox``; refused when bubblewrap is missing
  unless VALOR_SANDBOX=off): the registered process is ``bwrap``, whose tree holds the run, and
  the runner records what the hooks cannot reach from inside (the session, the spooled calls).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import shutil
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from servers.core import sandbox
from servers.core.claude_command import (
    ClaudeRun,
    build_env,
    run_argv,
)
from servers.core.claude_events import (
    Event,
    InitEvent,
    MalformedLine,
    ResultEvent,
    TextEvent,
    UnknownEvent,
    parse_stream_line,
)
from servers.core.errors import Category, ValorError, redact
from servers.core.processes import (
    KILL_GRACE_SECONDS,
    end_process_tree,
    mark_process_ended,
    process_create_time,
    register_process,
)
from servers.core.store import Store

if TYPE_CHECKING:
    from servers.core.settings import Settings

log = logging.getLogger("valor.claude")

STREAM_LIMIT_BYTES = 64 * 1024 * 1024  # one stream-json line can carry a large tool result
STDERR_TAIL_CHARS = 4_000
_RESUME_FAILURES = ("No conversation found", "requires a valid session ID", "is not a UUID")


# -- a run --------------------------------------------------------------------------------------
@dataclass
class RunOutcome:
    status: str  # "ok", "error", "timeout" or "cancelled"
    text: str = ""
    session_id: str | None = None
    init: InitEvent | None = None
    result: ResultEvent | None = None
    error: ValorError | None = None
    failed_servers: list[str] = field(default_factory=list)
    fresh_session_notice: str | None = None
    malformed_lines: int = 0
    unknown_events: int = 0
    pids: list[int] = field(default_factory=list)
    stderr_tail: str = ""
    seconds: float = 0.0
    started_at: float = 0.0  # wall clock, when the process was started

    @property
    def ok(self) -> bool:
        return self.status == "ok"


EventHandler = Callable[[Event], Awaitable[None]]


class ClaudeRunner:
    """Starts Claude Code runs; one instance can run many at once."""

    def __init__(
        self,
        store: Store | None = None,
        settings: Settings | None = None,
        claude_bin: str | None = None,
    ):
        from servers.core.settings import get_settings

        self.settings = settings or get_settings()
        if store is None:
            from servers.core.store import get_store

            store = get_store(self.settings.db_path)
        self.store = store
        self.claude_bin = claude_bin or self.settings.resolve_claude_bin()

    async def run(
        self,
        run: ClaudeRun,
        on_event: EventHandler | None = None,
        cancel: asyncio.Event | None = None,
    ) -> RunOutcome:
        """Run to the end (or timeout/cancel). A failed resume is retried once, fresh."""
        outcome = await self._run_once(run, on_event, cancel)
        if run.session_id and resume_failed(outcome):
            log.warning("session %s could not be resumed; starting a fresh one", run.session_id)
            fresh = dataclasses.replace(run, session_id=None)
            outcome = await self._run_once(fresh, on_event, cancel)
            outcome.fresh_session_notice = (
                "The previous conversation session could not be resumed, so this reply "
                "started a fresh session."
            )
        return outcome

    async def _run_once(
        self, run: ClaudeRun, on_event: EventHandler | None, cancel: asyncio.Event | None
    ) -> RunOutcome:
        require_claude_bin(self.claude_bin)
        argv = run_argv(self.claude_bin, run, self.settings)
        workdir = Path(run.workdir or self.settings.workdir)
        env = build_env(run, self.settings)
        with sandbox.launch(argv, env, run, self.settings, workdir, self.claude_bin) as launch:
            outcome = await self._run_launched(run, launch, workdir, on_event, cancel)
            if launch.spool is not None:
                self._after_sandboxed_run(run, launch.spool, outcome)
        return outcome

    async def _run_launched(
        self,
        run: ClaudeRun,
        launch: sandbox.Launch,
        workdir: Path,
        on_event: EventHandler | None,
        cancel: asyncio.Event | None,
    ) -> RunOutcome:

        timeout = run.timeout_seconds or self.settings.claude_timeout_seconds
        started = time.monotonic()
        outcome = RunOutcome(status="error")
        outcome.started_at = time.time()
        started_process = await start_launched(self.store, run, launch, workdir)
        proc, create_time = started_process.proc, started_process.create_time
        outcome.pids.append(proc.pid)
        stderr_task = asyncio.create_task(_read_tail(proc.stderr))
        consume = asyncio.create_task(
            self._consume(proc, run, outcome, on_event, workdir if launch.sandboxed else None)
        )
        waiters: set[asyncio.Future[Any]] = {consume}
        cancel_wait = asyncio.create_task(cancel.wait()) if cancel is not None else None
        if cancel_wait is not None:
            waiters.add(cancel_wait)
        try:
            assert proc.stdin is not None
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                proc.stdin.write(run.prompt.encode("utf-8", errors="replace"))
                await proc.stdin.drain()
                proc.stdin.close()
            done, _ = await asyncio.wait(
                waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
            if consume in done:
                consume.result()
                # If it printed its result but lingers, it is ended below.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(proc.wait(), timeout=KILL_GRACE_SECONDS)
            elif cancel_wait is not None and cancel_wait in done:
                outcome.status = "cancelled"
                outcome.error = ValorError(Category.INPUT, "The reply was stopped on request.")
            else:
                outcome.status = "timeout"
                outcome.error = ValorError(
                    Category.TIMEOUT,
                    f"The reply took longer than {timeout:g} s, so it was stopped. "
                    "Ask for a smaller step, or raise VALOR_CLAUDE_TIMEOUT_SECONDS.",
                )
        finally:
            ended = await end_process_tree(proc.pid, proc, create_time=create_time)
            outcome.pids += ended.members[1:] if ended is not None else []
            for task in (consume, cancel_wait):
                if task is not None and not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
            with contextlib.suppress(Exception):
                outcome.stderr_tail = await asyncio.wait_for(stderr_task, timeout=1)
            if started_process.registered:
                with contextlib.suppress(Exception):
                    mark_process_ended(self.store, proc.pid, create_time)
        outcome.seconds = time.monotonic() - started
        if outcome.status not in ("cancelled", "timeout"):
            self._conclude(outcome, proc.returncode, run)
            failure = sandbox.start_failure(outcome.stderr_tail) if launch.sandboxed else None
            if outcome.result is None and failure is not None:
                outcome.error = failure
        return outcome

    def _after_sandboxed_run(self, run: ClaudeRun, spool: Path, outcome: RunOutcome) -> None:
        """What the hooks cannot do from inside the sandbox: their spooled tool calls into the
        store (the chat is the run's), and the session closed."""
        try:
            sandbox.ingest_spool(
                self.store, spool, run.chat_id, outcome.started_at, self.settings.log_path
            )
            if outcome.session_id:
                sandbox.record_session_end(self.store, outcome.session_id, outcome.status)
        except Exception as exc:  # monitoring data must not turn an answer into a failure
            log.warning("recording a sandboxed run's hooks failed: %s", type(exc).__name__)

    async def _consume(
        self,
        proc: asyncio.subprocess.Process,
        run: ClaudeRun,
        outcome: RunOutcome,
        on_event: EventHandler | None,
        sandboxed_in: Path | None = None,
    ) -> None:
        """Read the events to the end; a sandboxed run's session is recorded at its init line
        (``sandboxed_in`` is its workdir), since its hooks cannot reach the store."""
        assert proc.stdout is not None
        texts: list[str] = []
        while True:
            try:
                raw = await proc.stdout.readline()
            except (ValueError, asyncio.LimitOverrunError):
                outcome.malformed_lines += 1  # a line beyond the limit: skip it, keep reading
                continue
            if not raw:
                break
            for event in parse_stream_line(raw.decode("utf-8", errors="replace")):
                record_event(event, outcome, texts, run.expected_servers)
                if isinstance(event, InitEvent) and sandboxed_in is not None and event.session_id:
                    self._record_session(proc.pid, event.session_id, run, sandboxed_in)
                await forward_event(on_event, event)
        outcome.text = texts[-1] if texts else ""

    def _record_session(self, root_pid: int, session_id: str, run: ClaudeRun, cwd: Path) -> None:
        try:
            pid, create_time = sandbox.run_process(root_pid)
            sandbox.record_session_start(self.store, session_id, run, pid, create_time, cwd)
        except Exception as exc:  # monitoring data must not end the run
            log.warning("recording a sandboxed session failed: %s", type(exc).__name__)

    def _conclude(self, outcome: RunOutcome, returncode: int | None, run: ClaudeRun) -> None:
        result = outcome.result
        if result is not None and not result.is_error:
            outcome.status = "ok"
            outcome.text = result.result or outcome.text
            return
        outcome.status = "error"
        outcome.error = classify_failure(result, returncode, outcome.stderr_tail)


def require_claude_bin(claude_bin: str | None) -> str:
    """``claude_bin``, or a [config] error saying how to install it (checked before the launch:
    inside bwrap a missing binary would fail late and vaguely)."""
    if not claude_bin:
        raise ValorError(
            Category.CONFIG,
            "Claude Code is not installed: run `bash .ci/setup` (installs the pinned CLI "
            "into node_modules/) or set VALOR_CLAUDE_BIN.",
        )
    if shutil.which(claude_bin) is None:
        raise ValorError(
            Category.CONFIG,
            f"Could not start Claude Code ({claude_bin}): not found or not executable. "
            "Run `bash .ci/setup` or set VALOR_CLAUDE_BIN.",
        )
    return claude_bin


@dataclass
class StartedProcess:
    proc: asyncio.subprocess.Process
    create_time: float
    registered: bool  # in the process registry: mark it ended when it ends


async def start_launched(
    store: Store, run: ClaudeRun, launch: sandbox.Launch, workdir: Path
) -> StartedProcess:
    """Spawn ``launch`` in its own process group (the tree ends together) and register it by
    pid and create time. Shared by one-shot runs and resident processes."""
    import psutil

    try:
        proc = await asyncio.create_subprocess_exec(
            *launch.argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=str(workdir),
            env=launch.env,
            start_new_session=True,
            limit=STREAM_LIMIT_BYTES,
        )
    except OSError as exc:
        raise ValorError(
            Category.CONFIG, f"Could not start Claude Code ({launch.argv[0]}): {exc.strerror}."
        ) from None
    try:
        create_time = process_create_time(proc.pid)
    except psutil.Error:  # gone already: registered and closed at once
        create_time = time.time()
    registered = False
    with contextlib.suppress(Exception):  # a registry hiccup must not orphan the process
        register_process(
            store,
            proc.pid,
            run.process_kind,
            launch.command_shown(persona=bool(run.append_system_prompt)),
            chat_id=run.chat_id,
            create_time=create_time,
        )
        registered = True
    return StartedProcess(proc, create_time, registered)


def record_event(
    event: Event, outcome: RunOutcome, texts: list[str], expected_servers: Sequence[str]
) -> None:
    """What one stream-json event says about the run, kept in ``outcome``; the assistant's
    texts are collected in ``texts``. Shared by one-shot runs and resident turns."""
    if isinstance(event, MalformedLine):
        outcome.malformed_lines += 1
        log.warning("unparsable Claude Code output line: %s", event.error)
    elif isinstance(event, UnknownEvent):
        outcome.unknown_events += 1
    elif isinstance(event, InitEvent):
        outcome.init = event
        outcome.session_id = event.session_id or outcome.session_id
        outcome.failed_servers = failed_servers(event, expected_servers)
        if outcome.failed_servers:
            log.warning("MCP servers not connected: %s", outcome.failed_servers)
    elif isinstance(event, TextEvent):
        texts.append(event.text)
    elif isinstance(event, ResultEvent):
        outcome.result = event
        outcome.session_id = event.session_id or outcome.session_id


async def forward_event(on_event: EventHandler | None, event: Event) -> None:
    """Hand ``event`` to the caller's handler; a display failure must not end the run."""
    if on_event is None:
        return
    try:
        await on_event(event)
    except Exception:
        log.exception("event handler failed")


def resume_failed(outcome: RunOutcome) -> bool:
    if outcome.status != "error" or outcome.init is not None:
        return False
    detail = " ".join(outcome.result.errors) if outcome.result else ""
    detail += " " + outcome.stderr_tail
    return any(marker in detail for marker in _RESUME_FAILURES)


def failed_servers(init: InitEvent, expected: Sequence[str]) -> list[str]:
    present = {server.name for server in init.mcp_servers}
    return init.failed_servers + [name for name in expected if name not in present]


def classify_failure(result: ResultEvent | None, returncode: int | None, stderr: str) -> ValorError:
    """A failed run as an error a person can act on (secrets redacted)."""
    if result is None:
        tail = redact(stderr.strip().splitlines()[-1] if stderr.strip() else "no output")
        return ValorError(
            Category.INTERNAL,
            f"Claude Code ended (exit code {returncode}) without an answer: {tail[:300]}",
        )
    status = result.api_error_status
    detail = redact((result.result or " ".join(result.errors) or result.subtype)[:400])
    if status in (401, 403):
        return ValorError(
            Category.CONFIG,
            f"The model API refused the credentials (HTTP {status}): check ANTHROPIC_API_KEY. "
            f"{detail}",
        )
    if status == 429:
        return ValorError(Category.RATE_LIMIT, f"The model API is rate limiting: {detail}")
    if status is not None:
        return ValorError(Category.UPSTREAM, f"The model API failed (HTTP {status}): {detail}")
    if result.subtype == "error_max_turns":
        return ValorError(Category.INPUT, "The reply needed more turns than allowed; it stopped.")
    return ValorError(Category.UPSTREAM, f"Claude Code could not finish the reply: {detail}")


async def _read_tail(stream: asyncio.StreamReader | None) -> str:
    if stream is None:
        return ""
    tail = b""
    while chunk := await stream.read(65536):
        tail = (tail + chunk)[-STDERR_TAIL_CHARS:]
    return tail.decode("utf-8", errors="replace")
