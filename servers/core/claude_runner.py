"""Run headless Claude Code (`claude -p --output-format stream-json --verbose`) as a subprocess.

Shared by the bridge, development-tools and promise-tools. The command is an argv list (never a
shell string) and the prompt goes on stdin. Every stream-json line becomes a typed event; a line
that is not JSON or has an unknown type is kept as an event, never fatal. Each run:

- is registered in the process registry (pid + create time) and marked ended afterwards;
- runs in its own process group; on timeout or cancellation the whole tree is ended;
- falls back once to a fresh session when ``--resume`` names a session Claude Code cannot find;
- checks the init line: an MCP server that is not "connected" is reported, not ignored.

The claude process's environment carries the chat it serves (``VALOR_CHAT_ID``,
``VALOR_USER_ID``, ``VALOR_USER_NAME``, ``VALOR_LAUNCHED_BY``) for hooks and stdio servers, and
never carries Valor's other secrets (Telegram session, OpenAI/Notion keys …).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from servers.core.errors import Category, ValorError, redact
from servers.core.store import Store

log = logging.getLogger("valor.claude")

STREAM_LIMIT_BYTES = 64 * 1024 * 1024  # one stream-json line can carry a large tool result
KILL_GRACE_SECONDS = 3.0
STDERR_TAIL_CHARS = 4_000
_RESUME_FAILURES = ("No conversation found", "requires a valid session ID", "is not a UUID")


# -- typed events ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class McpServerStatus:
    name: str
    status: str  # "connected", "failed", "needs-auth", "pending" …

    @property
    def connected(self) -> bool:
        return self.status == "connected"


@dataclass(frozen=True)
class InitEvent:
    session_id: str
    model: str
    tools: tuple[str, ...]
    mcp_servers: tuple[McpServerStatus, ...]

    @property
    def failed_servers(self) -> list[str]:
        return [server.name for server in self.mcp_servers if not server.connected]


@dataclass(frozen=True)
class TextEvent:
    """One block of assistant text (a whole block, not a token delta)."""

    text: str


@dataclass(frozen=True)
class ToolUseEvent:
    tool_use_id: str
    name: str
    input: dict[str, Any]


@dataclass(frozen=True)
class ToolResultEvent:
    tool_use_id: str
    content: str
    is_error: bool


@dataclass(frozen=True)
class PermissionDenialEvent:
    tool_name: str
    tool_use_id: str
    tool_input: dict[str, Any]


@dataclass(frozen=True)
class ApiRetryEvent:
    attempt: int
    max_retries: int
    retry_delay_ms: float
    error_status: int | None
    error: str


@dataclass(frozen=True)
class ResultEvent:
    subtype: str
    is_error: bool
    result: str
    session_id: str
    total_cost_usd: float
    num_turns: int
    duration_ms: float
    usage: dict[str, Any]
    api_error_status: int | None
    errors: tuple[str, ...]
    permission_denials: tuple[PermissionDenialEvent, ...]
    terminal_reason: str


@dataclass(frozen=True)
class UnknownEvent:
    """Valid JSON of a type this parser does not model; kept so nothing is lost."""

    data: dict[str, Any]


@dataclass(frozen=True)
class MalformedLine:
    line: str
    error: str


Event = (
    InitEvent
    | TextEvent
    | ToolUseEvent
    | ToolResultEvent
    | PermissionDenialEvent
    | ApiRetryEvent
    | ResultEvent
    | UnknownEvent
    | MalformedLine
)


def parse_stream_line(line: str) -> list[Event]:
    """Turn one stream-json line into events (an assistant message may hold several blocks)."""
    line = line.strip()
    if not line:
        return []
    try:
        data = json.loads(line)
    except json.JSONDecodeError as exc:
        return [MalformedLine(line[:2_000], f"not JSON: {exc.msg}")]
    if not isinstance(data, dict):
        return [MalformedLine(line[:2_000], "not a JSON object")]
    try:
        return _parse_object(data)
    except (TypeError, ValueError, AttributeError) as exc:
        return [MalformedLine(line[:2_000], f"unexpected shape: {exc}")]


def _parse_object(data: dict[str, Any]) -> list[Event]:
    kind, subtype = data.get("type"), data.get("subtype")
    if kind == "system" and subtype == "init":
        servers = tuple(
            McpServerStatus(str(s.get("name", "")), str(s.get("status", "unknown")))
            for s in data.get("mcp_servers") or []
        )
        return [
            InitEvent(
                session_id=str(data.get("session_id", "")),
                model=str(data.get("model", "")),
                tools=tuple(str(t) for t in data.get("tools") or []),
                mcp_servers=servers,
            )
        ]
    if kind == "system" and subtype == "api_retry":
        return [
            ApiRetryEvent(
                attempt=int(data.get("attempt") or 0),
                max_retries=int(data.get("max_retries") or 0),
                retry_delay_ms=float(data.get("retry_delay_ms") or 0),
                error_status=_int_or_none(data.get("error_status")),
                error=str(data.get("error", "")),
            )
        ]
    if kind == "assistant":
        events: list[Event] = []
        for block in (data.get("message") or {}).get("content") or []:
            if block.get("type") == "text" and block.get("text"):
                events.append(TextEvent(str(block["text"])))
            elif block.get("type") == "tool_use":
                events.append(
                    ToolUseEvent(
                        str(block.get("id", "")),
                        str(block.get("name", "")),
                        dict(block.get("input") or {}),
                    )
                )
        return events or [UnknownEvent(data)]
    if kind == "user":
        content = (data.get("message") or {}).get("content")
        results: list[Event] = [
            ToolResultEvent(
                str(block.get("tool_use_id", "")),
                _block_text(block.get("content")),
                bool(block.get("is_error")),
            )
            for block in content or []
            if isinstance(block, dict) and block.get("type") == "tool_result"
        ]
        return results or [UnknownEvent(data)]
    if kind == "result":
        denials = tuple(
            PermissionDenialEvent(
                str(d.get("tool_name", "")),
                str(d.get("tool_use_id", "")),
                dict(d.get("tool_input") or {}),
            )
            for d in data.get("permission_denials") or []
        )
        result = ResultEvent(
            subtype=str(subtype or ""),
            is_error=bool(data.get("is_error")),
            result=str(data.get("result") or ""),
            session_id=str(data.get("session_id", "")),
            total_cost_usd=float(data.get("total_cost_usd") or 0.0),
            num_turns=int(data.get("num_turns") or 0),
            duration_ms=float(data.get("duration_ms") or 0.0),
            usage=dict(data.get("usage") or {}),
            api_error_status=_int_or_none(data.get("api_error_status")),
            errors=tuple(str(e) for e in data.get("errors") or []),
            permission_denials=denials,
            terminal_reason=str(data.get("terminal_reason") or ""),
        )
        return [*denials, result]
    return [UnknownEvent(data)]


def _int_or_none(value: Any) -> int | None:
    return int(value) if isinstance(value, int | float | str) and str(value).isdigit() else None


def _block_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            str(b.get("text", "")) for b in content if isinstance(b, dict) and b.get("text")
        )
    return ""


# -- a run --------------------------------------------------------------------------------------
@dataclass
class ClaudeRun:
    """What to run. ``env`` is the base environment (default: this process's)."""

    prompt: str
    session_id: str | None = None
    chat_id: int | None = None
    user_id: int | None = None
    user_name: str = ""
    launched_by: str = "bridge"
    mcp_config: Path | None = None
    strict_mcp_config: bool = True
    expected_servers: Sequence[str] = ()
    allowed_tools: Sequence[str] = ()
    disallowed_tools: Sequence[str] = ()  # added to protected_path_rules(), never replacing them
    append_system_prompt: str | None = None
    workdir: Path | None = None
    timeout_seconds: float | None = None
    env: Mapping[str, str] | None = None
    extra_env: Mapping[str, str] = field(default_factory=dict)
    process_kind: str = "claude"


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

    @property
    def ok(self) -> bool:
        return self.status == "ok"


EventHandler = Callable[[Event], Awaitable[None]]


def protected_path_rules(settings: Any) -> list[str]:
    """Deny rules for files a run must never read: .env files (every secret) and the store,
    run configs and Telegram state in the data directory (other chats, tokens). Claude Code
    applies Read rules to Bash commands that read those paths too (measured with 2.1.332)."""
    from servers.core.settings import REPO_ROOT

    data = Path(settings.data_dir).resolve()
    return [
        "Read(./.env)",
        f"Read(/{REPO_ROOT}/.env)",
        f"Read(/{data}/valor.db*)",
        f"Read(/{data}/run/**)",
        f"Read(/{data}/telegram/**)",
    ]


def build_argv(claude_bin: str, run: ClaudeRun) -> list[str]:
    argv = [claude_bin, "-p", "--output-format", "stream-json", "--verbose"]
    if run.session_id:
        argv += ["--resume", run.session_id]
    if run.mcp_config is not None:
        argv += ["--mcp-config", str(run.mcp_config)]
    if run.strict_mcp_config:
        # Only the servers named here: a workdir's own .mcp.json would start eight stdio servers.
        argv.append("--strict-mcp-config")
    if run.allowed_tools:
        argv += ["--allowedTools", ",".join(run.allowed_tools)]
    if run.disallowed_tools:
        argv += ["--disallowedTools", ",".join(run.disallowed_tools)]
    if run.append_system_prompt:
        argv += ["--append-system-prompt", run.append_system_prompt]
    return argv


def secret_env_names() -> set[str]:
    """Environment names of every secret setting, so they never reach Claude Code's Bash."""
    from pydantic import SecretStr

    from servers.core.settings import Settings

    names: set[str] = set()
    for name, info in Settings.model_fields.items():
        if SecretStr not in getattr(info.annotation, "__args__", (info.annotation,)):
            continue
        names.add(f"VALOR_{name.upper()}")
        alias = info.validation_alias
        if alias is not None:
            names.update(str(choice) for choice in alias.choices)
    return names


def _clean_env_value(value: object, limit: int = 200) -> str:
    text = "".join(ch for ch in str(value) if ch.isprintable())
    return text[:limit]


def build_env(run: ClaudeRun, settings: Any) -> dict[str, str]:
    base = dict(os.environ if run.env is None else run.env)
    for name in secret_env_names() - {"ANTHROPIC_API_KEY"}:
        base.pop(name, None)
    if settings.anthropic_api_key is not None:
        base["ANTHROPIC_API_KEY"] = settings.anthropic_api_key.get_secret_value()
    if settings.anthropic_base_url:
        base["ANTHROPIC_BASE_URL"] = settings.anthropic_base_url
    base["CLAUDE_CODE_MAX_RETRIES"] = str(settings.claude_max_retries)
    base["VALOR_DATA_DIR"] = str(settings.data_dir)
    base["VALOR_LAUNCHED_BY"] = _clean_env_value(run.launched_by, 40)
    for name, value in (("VALOR_CHAT_ID", run.chat_id), ("VALOR_USER_ID", run.user_id)):
        if value is None:
            base.pop(name, None)
        else:
            base[name] = str(int(value))
    base["VALOR_USER_NAME"] = _clean_env_value(run.user_name)
    base.update({k: str(v) for k, v in run.extra_env.items()})
    return base


class ClaudeRunner:
    """Starts Claude Code runs; one instance can run many at once."""

    def __init__(
        self, store: Store | None = None, settings: Any = None, claude_bin: str | None = None
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
        if run.session_id and _resume_failed(outcome):
            log.warning("session %s could not be resumed; starting a fresh one", run.session_id)
            fresh = ClaudeRun(**{**run.__dict__, "session_id": None})
            outcome = await self._run_once(fresh, on_event, cancel)
            outcome.fresh_session_notice = (
                "The previous conversation session could not be resumed, so this reply "
                "started a fresh session."
            )
        return outcome

    async def _run_once(
        self, run: ClaudeRun, on_event: EventHandler | None, cancel: asyncio.Event | None
    ) -> RunOutcome:
        from servers.core.processes import mark_process_ended, register_process

        if not self.claude_bin:
            raise ValorError(
                Category.CONFIG,
                "Claude Code is not installed: run `bash .ci/setup` (installs the pinned CLI "
                "into node_modules/) or set VALOR_CLAUDE_BIN.",
            )
        protected = [*protected_path_rules(self.settings), *run.disallowed_tools]
        argv = build_argv(
            self.claude_bin, ClaudeRun(**{**run.__dict__, "disallowed_tools": protected})
        )
        timeout = run.timeout_seconds or self.settings.claude_timeout_seconds
        started = time.monotonic()
        outcome = RunOutcome(status="error")
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                cwd=str(run.workdir or self.settings.workdir),
                env=build_env(run, self.settings),
                start_new_session=True,  # its own process group: the tree ends together
                limit=STREAM_LIMIT_BYTES,
            )
        except OSError as exc:
            raise ValorError(
                Category.CONFIG, f"Could not start Claude Code ({argv[0]}): {exc.strerror}."
            ) from None
        create_time = _create_time(proc.pid)
        registration = None
        with contextlib.suppress(Exception):  # a registry hiccup must not orphan the process
            registration = register_process(
                self.store,
                proc.pid,
                run.process_kind,
                argv[:-2] if run.append_system_prompt else argv,
                chat_id=run.chat_id,
                create_time=create_time,
            )
        outcome.pids.append(proc.pid)
        stderr_task = asyncio.create_task(_read_tail(proc.stderr))
        consume = asyncio.create_task(self._consume(proc, run, outcome, on_event))
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
            outcome.pids += await end_process_tree(proc.pid, proc)
            for task in (consume, cancel_wait):
                if task is not None and not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
            with contextlib.suppress(Exception):
                outcome.stderr_tail = await asyncio.wait_for(stderr_task, timeout=1)
            if registration is not None:
                with contextlib.suppress(Exception):
                    mark_process_ended(self.store, proc.pid, create_time)
        outcome.seconds = time.monotonic() - started
        if outcome.status not in ("cancelled", "timeout"):
            self._conclude(outcome, proc.returncode, run)
        return outcome

    async def _consume(
        self,
        proc: asyncio.subprocess.Process,
        run: ClaudeRun,
        outcome: RunOutcome,
        on_event: EventHandler | None,
    ) -> None:
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
                if isinstance(event, MalformedLine):
                    outcome.malformed_lines += 1
                    log.warning("unparsable Claude Code output line: %s", event.error)
                elif isinstance(event, UnknownEvent):
                    outcome.unknown_events += 1
                elif isinstance(event, InitEvent):
                    outcome.init = event
                    outcome.session_id = event.session_id or outcome.session_id
                    outcome.failed_servers = _failed_servers(event, run.expected_servers)
                    if outcome.failed_servers:
                        log.warning("MCP servers not connected: %s", outcome.failed_servers)
                elif isinstance(event, TextEvent):
                    texts.append(event.text)
                elif isinstance(event, ResultEvent):
                    outcome.result = event
                    outcome.session_id = event.session_id or outcome.session_id
                if on_event is not None:
                    try:
                        await on_event(event)
                    except Exception:  # a display failure must not end the run
                        log.exception("event handler failed")
        outcome.text = texts[-1] if texts else ""

    def _conclude(self, outcome: RunOutcome, returncode: int | None, run: ClaudeRun) -> None:
        result = outcome.result
        if result is not None and not result.is_error:
            outcome.status = "ok"
            outcome.text = result.result or outcome.text
            return
        outcome.status = "error"
        outcome.error = classify_failure(result, returncode, outcome.stderr_tail)


def _resume_failed(outcome: RunOutcome) -> bool:
    if outcome.status != "error" or outcome.init is not None:
        return False
    detail = " ".join(outcome.result.errors) if outcome.result else ""
    detail += " " + outcome.stderr_tail
    return any(marker in detail for marker in _RESUME_FAILURES)


def _failed_servers(init: InitEvent, expected: Sequence[str]) -> list[str]:
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


def _create_time(pid: int) -> float:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return time.time()


async def _read_tail(stream: asyncio.StreamReader | None) -> str:
    if stream is None:
        return ""
    tail = b""
    while chunk := await stream.read(65536):
        tail = (tail + chunk)[-STDERR_TAIL_CHARS:]
    return tail.decode("utf-8", errors="replace")


async def end_process_tree(
    pid: int, proc: asyncio.subprocess.Process | None = None, grace: float = KILL_GRACE_SECONDS
) -> list[int]:
    """End pid and every descendant (TERM, then KILL after ``grace``). Returns the pids ended."""
    import psutil

    try:
        root = psutil.Process(pid)
        members = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        members = []
    descendants = [p.pid for p in members if p.pid != pid]
    alive = [p for p in members if _running(p)]
    if not alive and (proc is None or proc.returncode is not None):
        return descendants
    _signal_all(pid, alive, signal.SIGTERM)
    _, alive = await asyncio.to_thread(psutil.wait_procs, alive, timeout=grace)
    if alive:
        _signal_all(pid, alive, signal.SIGKILL)
        await asyncio.to_thread(psutil.wait_procs, alive, timeout=grace)
    if proc is not None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), timeout=grace)
    return descendants


def _running(process: Any) -> bool:
    import psutil

    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _signal_all(group: int, members: list[Any], sig: signal.Signals) -> None:
    import psutil

    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(group, sig)  # the group Claude Code leads (start_new_session)
    for member in members:  # and any descendant that left the group
        with contextlib.suppress(psutil.Error):
            member.send_signal(sig)


def run_to_completion(
    prompt: str,
    *,
    chat_id: int | None = None,
    cancelled: Any = None,
    launched_by: str = "promise",
    timeout_seconds: float | None = None,
) -> str:
    """Blocking entry point for worker threads (promise-tools): the answer text, or raises
    ValorError. ``cancelled`` is a ``threading.Event``; setting it ends the run's process tree."""

    async def watch(cancel: asyncio.Event) -> None:
        while not cancelled.is_set():
            await asyncio.sleep(0.2)
        cancel.set()

    async def main() -> RunOutcome:
        cancel = asyncio.Event()
        watcher = asyncio.create_task(watch(cancel)) if cancelled is not None else None
        try:
            return await ClaudeRunner().run(
                ClaudeRun(
                    prompt=prompt,
                    chat_id=chat_id,
                    launched_by=launched_by,
                    timeout_seconds=timeout_seconds,
                    strict_mcp_config=False,  # the workdir's own .mcp.json gives it tools
                    process_kind=f"claude-{launched_by}",
                ),
                cancel=cancel,
            )
        finally:
            if watcher is not None:
                watcher.cancel()

    outcome = asyncio.run(main())
    if not outcome.ok:
        raise outcome.error or ValorError(Category.INTERNAL, "The Claude Code run failed.")
    return outcome.text
