"""Bridge runs on remote workers (``VALOR_RUN_ON_WORKERS``): the bridge relays, a worker runs.

The bridge's side (``RemoteRunner``, used by ``bridge/pipeline.py``'s ``_run_claude``):

1. The run (prompt, context block, session id to resume, the chat and user, persona, allowed
   tools, permission prompt tool, budget) is put on the ``RunBoard`` in this process under a
   fresh id; only the id goes to Redis, onto ``valor-runs:queue``, which workers pop before the
   promise queue (a person is waiting for a reply).
2. A worker claims the id at ``POST <tools>/workers/runs/claim`` with its worker token; the
   daemon answers the run and a run token for the run's chat (workers never hold the signing
   key). One claim per id; a cancelled or unknown id answers 409.
3. The worker runs Claude Code sandboxed against the daemon's hosted tools and relays each raw
   stream-json line to the run's own stream ``valor-runs:<id>``, then an ``end`` entry.
4. The bridge reads that stream and feeds each line through ``record_event`` and
   ``forward_event``, exactly as a local run does, so the ReplySink streams the same progress;
   the ``end`` entry makes the ``RunOutcome`` the bridge delivers as today.

Failures: a worker whose heartbeat stops (killed) or that is stopped mid-run loses the attempt;
the message runs once more under a new id (the lost attempt's late lines are never read), and a
second loss is answered with a failure. ``/stop`` removes a queued run from the queue, or sets
the run's cancel key, which the worker's heartbeat thread polls.

Sessions: a chat's Claude Code session lives in the chats folder of the worker that ran it. A
worker resumes it when it has that session's transcript; otherwise (another worker took the
reply) it starts a fresh session, and the context block (chat memory, recent history) carries
the conversation. No session files move between machines.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from servers.core.claude_command import ClaudeRun
from servers.core.claude_events import parse_stream_line
from servers.core.claude_runner import ClaudeRunner, RunOutcome, forward_event, record_event
from servers.core.errors import Category, ValorError, describe_exception, redact
from servers.core.workers import INTERRUPTED, WORKER_NAME, alive_key, cancel_key

if TYPE_CHECKING:
    from servers.core.claude_runner import EventHandler
    from servers.core.settings import Settings
    from servers.core.workers import ToolHost, WorkerIdentity

log = logging.getLogger("valor.remote_runs")

RUN_PREFIX = "valor-runs"
RUNS_QUEUE = f"{RUN_PREFIX}:queue"  # run ids; workers pop it before the promise queue
RUN_CLAIM_PATH = "/workers/runs/claim"
STREAM_TTL_SECONDS = 3600  # a run's stream outlives a bridge that stopped reading it by this
STREAM_MAX_LEN = 20_000  # lines kept per run (a run's whole output, bounded)
MAX_RELAYED_LINE_BYTES = 4 * 1024 * 1024  # a longer line (a huge tool result) is not relayed
POLL_MS = 500
WATCH_TTL_SECONDS = 30.0  # a run no bridge has watched this long is ended by its worker
PROCESS_KIND = "claude-bridge"


def stream_key(run_id: str) -> str:
    return f"{RUN_PREFIX}:{run_id}"


def watch_key(run_id: str) -> str:
    return f"{RUN_PREFIX}:{run_id}:watched"


def abandoned(redis: Any, running: Collection[int | str]) -> set[str]:
    """The bridge runs among a worker's running work whose bridge stopped watching them."""
    runs = [work for work in running if isinstance(work, str) and work.startswith("run:")]
    if not runs:
        return set()
    found = redis.mget([watch_key(work.removeprefix("run:")) for work in runs])
    return {work for work, value in zip(runs, found, strict=True) if value is None}


def run_work_key(run_id: str) -> str:
    """A run's id among a worker's running work (its cancel key is ``cancel_key`` of this)."""
    return f"run:{run_id}"


# -- the bridge's side ---------------------------------------------------------------------------
@dataclass
class PendingRun:
    run_id: str
    chat_id: int
    spec: dict[str, Any]
    state: str = "queued"  # queued → claimed (by ``worker``), or cancelled
    worker: str | None = None  # name:pid, whose heartbeat says the run is alive
    claimed_at: float = 0.0


class RunBoard:
    """The runs this bridge has queued for workers, by id: what a claim answers. In the daemon's
    process, shared by its tool host (the claim route) and its bridge."""

    def __init__(self) -> None:
        self._runs: dict[str, PendingRun] = {}
        self._lock = threading.Lock()

    def add(self, run: PendingRun) -> None:
        with self._lock:
            self._runs[run.run_id] = run

    def get(self, run_id: str) -> PendingRun | None:
        with self._lock:
            return self._runs.get(run_id)

    def remove(self, run_id: str) -> None:
        with self._lock:
            self._runs.pop(run_id, None)

    def claim(self, run_id: str, worker: str) -> PendingRun | None:
        """Queued → claimed by ``worker``; None when unknown, cancelled or claimed already."""
        with self._lock:
            run = self._runs.get(run_id)
            if run is None or run.state != "queued":
                return None
            run.state, run.worker, run.claimed_at = "claimed", worker, time.monotonic()
            return run

    def cancel_queued(self, run_id: str) -> bool:
        """Cancel a run no worker has claimed; False when one has (or it is gone)."""
        with self._lock:
            run = self._runs.get(run_id)
            if run is None or run.state != "queued":
                return False
            run.state = "cancelled"
            return True


def run_claim_routes(
    board: RunBoard, secret: bytes, settings: Settings, servers: tuple[str, ...]
) -> list[Any]:
    """The claim route for bridge runs (on the tool host, behind its guard, beside
    ``worker_results.token_service_routes``)."""
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from servers.core import trust
    from servers.core.principals import WORKER_SCOPE

    ttl = settings.claude_timeout_seconds + 300

    async def claim(request: Any) -> Any:
        principal = request.scope.get(trust.PRINCIPAL_SCOPE_KEY)
        if principal is None or WORKER_SCOPE not in principal.scopes:
            return JSONResponse({"error": "forbidden", "detail": "not a worker token"}, 403)
        try:
            body = await request.json()
            run_id = str(body["run_id"])
            worker = body["worker"]
            name, pid = str(worker["name"]), int(worker["pid"])
            if not WORKER_NAME.match(name) or not run_id.isalnum():
                raise ValueError(name)
        except (ValueError, KeyError, TypeError):
            return JSONResponse({"error": "bad_request", "detail": "run_id and worker"}, 400)
        run = board.claim(run_id, f"{name}:{pid}")
        if run is None:
            return JSONResponse({"error": "not_pending"}, 409)
        token = trust.mint_scope_token(secret, run.chat_id, ttl_seconds=ttl)
        log.info("bridge run %s (chat %s) claimed by %s:%s", run_id, run.chat_id, name, pid)
        return JSONResponse({"run": run.spec, "run_token": token, "servers": list(servers)})

    return [Route(RUN_CLAIM_PATH, claim, methods=["POST"])]


def run_spec(run: ClaudeRun, context_block: str | None) -> dict[str, Any]:
    """What a worker needs to run ``run`` (the bridge's prompt without the context block: the
    worker puts the block where its own workdir wants it)."""
    return {
        "prompt": run.prompt,
        "context_block": context_block,
        "session_id": run.session_id,
        "chat_id": run.chat_id,
        "user_id": run.user_id,
        "user_name": run.user_name,
        "allowed_tools": list(run.allowed_tools),
        "append_system_prompt": run.append_system_prompt,
        "permission_prompt_tool": run.permission_prompt_tool,
        "max_budget_usd": run.max_budget_usd,
        "timeout_seconds": run.timeout_seconds,
    }


class RemoteRunner:
    """Runs a bridge request on a worker and follows it through Redis (see the module). Its
    client is redis-py's asyncio one: a reply waiting on its stream holds no thread."""

    def __init__(self, board: RunBoard, redis: Any, settings: Settings):
        self.board, self.redis, self.settings = board, redis, settings

    @classmethod
    def from_settings(cls, board: RunBoard, settings: Settings) -> RemoteRunner:
        import redis.asyncio

        url = settings.promise_queue_url or ""
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValorError(
                Category.CONFIG,
                "VALOR_RUN_ON_WORKERS needs the Redis queue: set VALOR_PROMISE_QUEUE_URL=redis://…",
            )
        return cls(board, redis.asyncio.Redis.from_url(url), settings)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.redis.aclose()

    async def run(
        self,
        request: ClaudeRun,
        context_block: str | None,
        on_event: EventHandler | None,
        cancel: asyncio.Event,
        restart_stream: Callable[[], None] = lambda: None,
    ) -> RunOutcome:
        """The run's outcome; a lost attempt (its worker died or was stopped) runs once more."""
        outcome = await self._attempt(request, context_block, on_event, cancel)
        if outcome is not None:
            return outcome
        log.warning("the worker running a reply in chat %s went away; running it once more",
                    request.chat_id)  # fmt: skip
        if cancel.is_set():  # /stop came as the worker went away: nothing to run again
            return _stopped()
        restart_stream()  # the lost attempt's texts are not part of the answer
        outcome = await self._attempt(request, context_block, on_event, cancel)
        if outcome is not None:
            return outcome
        return RunOutcome(
            status="error",
            error=ValorError(
                Category.UPSTREAM,
                "The worker running this reply stopped twice before it finished, so it was not "
                "started again. Send the message again if it still matters.",
            ),
        )

    async def _attempt(
        self,
        request: ClaudeRun,
        context_block: str | None,
        on_event: EventHandler | None,
        cancel: asyncio.Event,
    ) -> RunOutcome | None:
        """The attempt's outcome; None when its worker went away before the end."""
        run_id = uuid.uuid4().hex
        assert request.chat_id is not None
        self.board.add(PendingRun(run_id, request.chat_id, run_spec(request, context_block)))
        try:
            try:
                await self.watch(run_id)
                await self.redis.lpush(RUNS_QUEUE, run_id)
            except Exception as exc:
                raise ValorError(
                    Category.UPSTREAM,
                    f"Redis (VALOR_PROMISE_QUEUE_URL) is unreachable, so the reply could not be "
                    f"handed to a worker ({type(exc).__name__}). Send it again in a moment.",
                ) from None
            return await self._follow(run_id, request, on_event, cancel)
        finally:
            self.board.remove(run_id)
            with contextlib.suppress(Exception):  # expiring keys: a failure only delays cleanup
                await asyncio.shield(self._forget(run_id))  # done even as the bridge stops

    async def watch(self, run_id: str) -> None:
        """The run is still wanted: a worker ends a run whose watch key expired (this bridge
        stopped or crashed; the message runs again when it is back)."""
        await self.redis.set(watch_key(run_id), "1", ex=int(WATCH_TTL_SECONDS))

    async def _forget(self, run_id: str) -> None:
        """The run is over for this bridge (answered, lost, or the bridge is stopping): out of
        the queue, its stream gone, and a worker still running it told to end it."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.lrem(RUNS_QUEUE, 0, run_id)
        pipe.delete(stream_key(run_id), watch_key(run_id))
        pipe.set(cancel_key(run_work_key(run_id)), "1", ex=STREAM_TTL_SECONDS)
        await pipe.execute()

    async def _follow(
        self,
        run_id: str,
        request: ClaudeRun,
        on_event: EventHandler | None,
        cancel: asyncio.Event,
    ) -> RunOutcome | None:
        timeout = request.timeout_seconds or self.settings.claude_timeout_seconds
        patience = self.settings.worker_heartbeat_seconds / 2  # Redis may just have restarted
        queued_at, missing_since, cancel_sent = time.monotonic(), None, False
        watched_at = time.monotonic()
        outcome, texts, expected = RunOutcome(status="error"), [], ()  # type: ignore[var-annotated]
        last, delay = "0-0", 0.1
        while True:
            pending = self.board.get(run_id)
            assert pending is not None
            if cancel.is_set() and not cancel_sent:
                cancel_sent = True
                if self.board.cancel_queued(run_id):  # no worker has it: it never starts
                    return _stopped()
                try:
                    await self.redis.set(
                        cancel_key(run_work_key(run_id)), "1", ex=STREAM_TTL_SECONDS
                    )
                except Exception:  # Redis is away: tried again on the next round
                    cancel_sent = False
            if time.monotonic() - watched_at > WATCH_TTL_SECONDS / 6:
                with contextlib.suppress(Exception):  # a failure: the next round renews it
                    await self.watch(run_id)
                    watched_at = time.monotonic()
            try:
                answer = await self.redis.xread(
                    {stream_key(run_id): last}, count=500, block=POLL_MS
                )
                delay = 0.1
            except Exception as exc:  # Redis restarting: the worker's lines wait in the stream
                log.warning("reading a worker's run failed (%s); retrying", type(exc).__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                answer = []
            for _stream, entries in answer or []:
                for entry_id, fields in entries:
                    last = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                    message = _decode(fields)
                    kind = message.get("kind")
                    if kind == "start":
                        expected = tuple(message.get("servers") or ())
                    elif kind == "attempt":  # a fresh session after a failed resume: start over
                        outcome, texts = RunOutcome(status="error"), []
                    elif kind == "line":
                        for event in parse_stream_line(str(message.get("line", ""))):
                            record_event(event, outcome, texts, expected)
                            await forward_event(on_event, event)
                    elif kind == "end":
                        return _concluded(outcome, texts, message, self.settings, request)
            unclaimed_too_long = time.monotonic() - queued_at > timeout
            if unclaimed_too_long and self.board.cancel_queued(run_id):
                return RunOutcome(
                    status="error",
                    error=ValorError(
                        Category.TIMEOUT,
                        f"No worker took this reply within {timeout:g} s: is `valor worker` "
                        "running and reaching Redis?",
                    ),
                )
            if pending.state == "claimed" and pending.worker is not None:
                try:
                    alive = await self.redis.exists(alive_key(pending.worker))
                except Exception:
                    alive = True  # Redis is away: judged when it is back
                if alive:
                    missing_since = None
                else:
                    missing_since = missing_since or time.monotonic()
                    if time.monotonic() - missing_since >= patience:
                        log.warning("worker %s stopped answering mid-run", pending.worker)
                        return None
                if time.monotonic() - pending.claimed_at > timeout + 120:  # it should have ended
                    log.warning("worker %s never ended run %s", pending.worker, run_id)
                    return None


def _stopped() -> RunOutcome:
    return RunOutcome(
        status="cancelled", error=ValorError(Category.INPUT, "The reply was stopped on request.")
    )


def _decode(fields: dict[Any, Any]) -> dict[str, Any]:
    try:
        message = json.loads(fields.get(b"m") or fields.get("m") or b"")
    except ValueError:
        return {}
    return message if isinstance(message, dict) else {}


def _concluded(
    outcome: RunOutcome,
    texts: list[str],
    end: dict[str, Any],
    settings: Settings,
    request: ClaudeRun,
) -> RunOutcome | None:
    """The outcome the relayed lines and the worker's ``end`` entry describe (None: the worker
    was stopped before the end, the attempt is lost)."""
    status = str(end.get("status"))
    if status == INTERRUPTED:
        return None
    if status == "cancelled":
        return _stopped()
    outcome.text = texts[-1] if texts else ""
    outcome.stderr_tail = str(end.get("stderr_tail") or "")
    outcome.seconds = float(end.get("seconds") or 0.0)
    outcome.started_at = float(end.get("started_at") or 0.0)
    if end.get("fresh_session_notice"):
        outcome.fresh_session_notice = str(end["fresh_session_notice"])
    if status == "ok" and outcome.result is not None and not outcome.result.is_error:
        outcome.status = "ok"
        outcome.text = outcome.result.result or outcome.text
    else:
        outcome.status = status if status in ("error", "timeout") else "error"
        error = end.get("error") or {}
        try:
            category = Category(error.get("category"))
        except ValueError:
            category = Category.INTERNAL
        outcome.error = ValorError(category, str(error.get("detail") or "The reply failed."))
    spool = end.get("spool")
    if isinstance(spool, str) and spool:  # the hooks' tool-call records, as a local run's
        from servers.core.store import get_store
        from servers.core.worker_results import record_spool

        record_spool(get_store(settings.db_path), settings, request.chat_id, end)
    return outcome


# -- the worker's side ---------------------------------------------------------------------------
@dataclass(frozen=True)
class RunTicket:
    """A run id popped from ``RUNS_QUEUE`` (beside huey's promise tasks)."""

    run_id: str


@dataclass(frozen=True)
class RunClaim:
    run_id: str
    spec: dict[str, Any]
    run_token: str
    servers: tuple[str, ...]


def claim_run(host: ToolHost, run_id: str, identity: WorkerIdentity) -> RunClaim | None:
    """The run claimed for this worker, or None when it is no longer waiting."""
    response = host.post_json(RUN_CLAIM_PATH, {"run_id": run_id, "worker": identity.wire()})
    if response.status_code in (401, 403):
        raise host._refused(response)
    if response.status_code in (404, 409):
        return None
    response.raise_for_status()
    body = response.json()
    return RunClaim(run_id, dict(body["run"]), str(body["run_token"]), tuple(body["servers"]))


class RunStream:
    """A worker's writes to one run's stream: the raw lines (sent in order by a thread of their
    own, so the run never waits on Redis), then the end entry."""

    def __init__(self, redis: Any, run_id: str):
        self.redis, self.key = redis, stream_key(run_id)
        self._lines: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()
        self._sender = threading.Thread(target=self._send, name="run-lines", daemon=True)
        self._sender.start()

    def put(self, message: dict[str, Any]) -> None:
        self._lines.put(message)

    def line(self, raw: bytes) -> None:
        if len(raw) > MAX_RELAYED_LINE_BYTES:
            log.warning("a %d-byte output line was not relayed", len(raw))
            return
        self.put({"kind": "line", "line": raw.decode("utf-8", errors="replace")})

    def _send(self) -> None:
        while (first := self._lines.get()) is not None:
            batch = [first]
            while len(batch) < 200:
                try:
                    batch.append(self._lines.get_nowait())
                except queue.Empty:
                    break
            closing = batch[-1] is None
            self._write([m for m in batch if m is not None], give_up_after=30.0)
            if closing:
                return

    def _write(self, messages: list[dict[str, Any]], give_up_after: float) -> bool:
        """Append in order, retried while Redis is away (the bridge needs every line)."""
        started, delay = time.monotonic(), 0.1
        while True:
            pipe = self.redis.pipeline(transaction=False)
            for message in messages:
                pipe.xadd(self.key, {"m": json.dumps(message)}, maxlen=STREAM_MAX_LEN,
                          approximate=True)  # fmt: skip
            pipe.expire(self.key, STREAM_TTL_SECONDS)
            try:
                pipe.execute()
                return True
            except Exception as exc:
                if time.monotonic() - started > give_up_after:
                    log.error("%d line(s) of a run lost: Redis unreachable", len(messages))
                    return False
                log.warning("run lines not yet sent (%s); retrying", type(exc).__name__)
            time.sleep(delay)
            delay = min(delay * 2, 2.0)

    def end(self, message: dict[str, Any], give_up_after: float) -> bool:
        """Send the lines still queued, then the end entry after them."""
        self._lines.put(None)
        self._sender.join(timeout=give_up_after + 30.0)
        return self._write([{"kind": "end", **message}], give_up_after)


class _TeeReader:
    """Claude Code's stdout as the runner reads it, each line also relayed."""

    def __init__(self, reader: Any, relay: Callable[[bytes], None]):
        self.reader, self.relay = reader, relay

    async def readline(self) -> bytes:
        raw = await self.reader.readline()
        if raw:
            self.relay(raw)
        return raw


@dataclass
class _TeeProcess:
    pid: int
    stdout: _TeeReader


class RelayRunner(ClaudeRunner):
    """The shared runner on a worker for a bridge run: its process registry is the worker's own
    store (``DATA_DIR/worker.db``); each raw stream-json line goes to the run's stream; the
    hooks' spool goes back with the end entry."""

    def __init__(self, settings: Settings, stream: RunStream):
        from servers.core.store import get_store

        super().__init__(get_store(settings.data_dir / "worker.db"), settings)
        self.stream = stream
        self.spool_text = ""

    async def _run_once(self, run: ClaudeRun, on_event: Any, cancel: Any) -> RunOutcome:
        self.stream.put({"kind": "attempt", "session_id": run.session_id})
        return await super()._run_once(run, on_event, cancel)

    async def _consume(self, proc: Any, run: ClaudeRun, outcome: RunOutcome, on_event: Any,
                       sandboxed_in: Path | None = None) -> None:  # fmt: skip
        tee = _TeeProcess(proc.pid, _TeeReader(proc.stdout, self.stream.line))
        await super()._consume(tee, run, outcome, on_event, sandboxed_in)  # type: ignore[arg-type]

    def _after_sandboxed_run(self, run: ClaudeRun, spool: Path, outcome: RunOutcome) -> None:
        from servers.core.safe_files import read_regular
        from servers.core.workers import MAX_FORWARDED_SPOOL_BYTES

        with contextlib.suppress(Exception):
            data = read_regular(spool, MAX_FORWARDED_SPOOL_BYTES)
            self.spool_text = data.decode("utf-8", errors="replace")


def session_here(settings: Settings, chat_id: int | None, session_id: str) -> bool:
    """True when this machine holds the session's transcript (the chat's Claude home)."""
    from servers.core.sandbox import claude_home

    if not session_id.replace("-", "").isalnum():
        return False
    return any((claude_home(settings, chat_id) / "projects").glob(f"*/{session_id}.jsonl"))


def workdir_runs_context_hook(workdir: Path) -> bool:
    """The workdir's Claude Code runs Valor's UserPromptSubmit hook, which reads the block file."""
    try:
        text = (workdir / ".claude" / "settings.json").read_text(encoding="utf-8")
    except OSError:
        return False
    return "servers.hooks user-prompt-submit" in text


def execute_run(
    claim: RunClaim,
    cancelled: threading.Event,
    settings: Settings,
    redis: Any,
    tools_url: str,
    identity: WorkerIdentity,
    stopping: threading.Event,
) -> str:
    """Run a claimed bridge run here, relaying it; the status sent in its end entry."""
    stream = RunStream(redis, claim.run_id)
    stream.put({"kind": "start", "worker": identity.key, "servers": list(claim.servers)})
    end: dict[str, Any]
    try:
        runner = RelayRunner(settings, stream)
        outcome = asyncio.run(_run_here(claim, cancelled, settings, tools_url, runner))
        end = {
            "status": outcome.status,
            "error": None
            if outcome.error is None
            else {"category": outcome.error.category.value, "detail": outcome.error.detail},
            "fresh_session_notice": outcome.fresh_session_notice,
            "stderr_tail": redact(outcome.stderr_tail)[-2000:],
            "seconds": outcome.seconds,
            "started_at": outcome.started_at,
            "spool": runner.spool_text,
        }
    except ValorError as exc:
        end = {"status": "error", "error": {"category": exc.category.value, "detail": exc.detail}}
    except Exception as exc:
        log.error("bridge run %s failed unexpectedly: %s", claim.run_id, describe_exception(exc))
        detail = f"The worker failed to run the reply ({type(exc).__name__})."
        end = {"status": "error", "error": {"category": "internal", "detail": detail}}
    if stopping.is_set() and cancelled.is_set():
        end = {"status": INTERRUPTED}  # the worker is stopping, not the person: run it elsewhere
    stream.end(end, give_up_after=10.0 if stopping.is_set() else 300.0)
    return str(end["status"])


async def _run_here(
    claim: RunClaim,
    cancelled: threading.Event,
    settings: Settings,
    tools_url: str,
    runner: RelayRunner,
) -> RunOutcome:
    from servers.core.mcp_config import (
        endpoint,
        http_mcp_config,
        private_run_file,
        runtime_mcp_config,
        use_servers,
    )

    spec = claim.spec
    chat_id = int(spec["chat_id"])
    session = spec.get("session_id")
    if session and not session_here(settings, chat_id, str(session)):
        log.info("session %s of chat %s is not on this worker: a fresh session", session, chat_id)
        session = None  # the context block carries the conversation
    run = ClaudeRun(
        prompt=str(spec["prompt"]),
        session_id=session,
        chat_id=chat_id,
        user_id=None if spec.get("user_id") is None else int(spec["user_id"]),
        user_name=str(spec.get("user_name") or ""),
        launched_by="bridge",
        allowed_tools=[str(t) for t in spec.get("allowed_tools") or ()],
        append_system_prompt=spec.get("append_system_prompt"),
        permission_prompt_tool=spec.get("permission_prompt_tool"),
        max_budget_usd=spec.get("max_budget_usd"),
        timeout_seconds=spec.get("timeout_seconds"),
        process_kind=PROCESS_KIND,
    )
    block = spec.get("context_block")
    run_dir = settings.data_dir / "run"
    cancel = asyncio.Event()

    async def watch_cancel() -> None:  # the heartbeat thread sets ``cancelled``
        while not cancelled.is_set():
            await asyncio.sleep(0.1)
        cancel.set()

    watcher = asyncio.create_task(watch_cancel())
    config = http_mcp_config({name: endpoint(tools_url, name) for name in claim.servers},
                             claim.run_token)  # fmt: skip
    try:
        with contextlib.ExitStack() as files:
            if block and workdir_runs_context_hook(settings.workdir):
                path = files.enter_context(
                    private_run_file(str(block), run_dir, prefix="ctx-", suffix=".txt")
                )
                run.extra_env = {"VALOR_CONTEXT_BLOCK_FILE": str(path)}
            elif block:
                run.prompt = f"{block}\n\n{run.prompt}"
            path = files.enter_context(runtime_mcp_config(config, run_dir))
            use_servers(run, path, claim.servers)
            return await runner.run(run, None, cancel)
    finally:
        watcher.cancel()
