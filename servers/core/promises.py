"""The promise queue: background work Valor committed to, reported back to the chat when done.

A promise's state lives in Valor's store (waiting -> pending -> running -> completed | failed |
cancelled); the task queue (huey) only carries its id. The queue is ``SqliteHuey`` on its own file
in the data directory (so it never holds locks on the main database), or ``RedisHuey`` when
``VALOR_PROMISE_QUEUE_URL`` names a Redis server, for workers on several machines.

Side effects are never blindly repeated: the queue runs a task once (no retries). A worker that
crashed leaves its promise "running" with a dead worker; ``recover_interrupted`` re-queues such a
promise once and fails it the second time.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from servers.core.errors import Category, ValorError, describe_exception, input_error, redact
from servers.core.store import Store, now

if TYPE_CHECKING:
    from huey import Huey

    from servers.core.mcp_config import HostedTools
    from servers.core.settings import Settings

log = logging.getLogger("valor.promises")

STATES = ("waiting", "pending", "running", "completed", "failed", "cancelled")
OPEN_STATES = ("waiting", "pending", "running")
MAX_RESULT_CHARS = 20_000
CANCEL_POLL_SECONDS = 0.25


@dataclass(frozen=True)
class Promise:
    id: int
    description: str
    kind: str
    chat_id: int | None
    status: str
    task_id: str | None
    result: str | None
    error: str | None
    worker_host: str | None
    worker_pid: int | None
    worker_create_time: float | None
    recoveries: int
    delivery: str | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    updated_at: float


_COLUMNS = ", ".join(Promise.__dataclass_fields__)


# --- kinds of work ------------------------------------------------------------------------------

# (promise, set when it is cancelled, settings, the hosted tools a Claude Code run may use)
Executor = Callable[[Promise, threading.Event, "Settings", "HostedTools | None"], str]


class PromiseKind:
    def __init__(
        self,
        name: str,
        summary: str,
        executor: Executor,
        missing: Callable[[Settings], str | None] = lambda _: None,
    ):
        self.name = name
        self.summary = summary
        self.executor = executor
        self.missing = missing  # what the kind needs that is not configured, or None


def _research_missing(settings: Settings) -> str | None:
    key = settings.perplexity_api_key
    if key is None or not key.get_secret_value().strip():
        return "web search through Perplexity: set PERPLEXITY_API_KEY"
    return None


def _claude_code_missing(settings: Settings) -> str | None:
    import shutil

    binary = settings.resolve_claude_bin()
    if binary is None or shutil.which(binary) is None:
        return (
            "the Claude Code CLI: run `npm ci` in the repository (node_modules/.bin/claude), "
            "or set VALOR_CLAUDE_BIN"
        )
    return None


def check_kind_configured(kind: str, settings: Settings) -> None:
    """Refuse a promise whose work cannot run here, before it is recorded: accepted, it would
    only fail later in a worker. A ``[config]`` error naming what to set."""
    needed = KINDS[kind].missing(settings) if kind in KINDS else None
    if needed:
        raise ValorError(Category.CONFIG, f"A {kind} promise cannot run here: it needs {needed}.")


def _research(
    promise: Promise, cancelled: threading.Event, settings: Settings, tools: HostedTools | None
) -> str:
    """social-tools' web search (Perplexity) on the question; the answer with sources."""
    import asyncio

    from servers.core.openai_services import search_current_info

    found = asyncio.run(search_current_info(promise.description, max_results=10))
    sources = "".join(
        f"\n[{c['number']}] {c['title'] + ' ' if c['title'] else ''}{c['url']}"
        for c in found["citations"]
    )
    return found["answer"] + (f"\n\nSources:{sources}" if sources else "")


# A promise's run gets every tool but these (a promise must not queue promises of its own).
SERVERS_NOT_FOR_PROMISES = frozenset({"promise-tools"})


def _claude_code(
    promise: Promise, cancelled: threading.Event, settings: Settings, tools: HostedTools | None
) -> str:
    """A headless Claude Code run through the shared runner; cancelling ends its process tree.
    With hosted tools (the daemon's) it gets Valor's MCP servers, scoped to the promise's chat."""
    import asyncio
    import contextlib

    from servers.core.claude_command import ClaudeRun
    from servers.core.claude_runner import ClaudeRunner
    from servers.core.store import get_store

    request = ClaudeRun(
        prompt=promise.description,
        chat_id=promise.chat_id,
        launched_by="promise",
        allowed_tools=list(settings.claude_extra_allowed_tools),
        timeout_seconds=settings.promise_timeout_seconds,
        process_kind="claude-promise",
    )
    tool_config = (
        contextlib.nullcontext()
        if tools is None
        else tools.without(SERVERS_NOT_FOR_PROMISES).for_run(
            request,
            promise.chat_id,
            ttl_seconds=settings.promise_timeout_seconds + 300,
            run_dir=settings.data_dir / "run",
        )
    )

    async def run() -> str:
        stop = asyncio.Event()

        async def relay_cancel() -> None:
            while not cancelled.is_set():
                await asyncio.sleep(CANCEL_POLL_SECONDS)
            stop.set()

        relay = asyncio.create_task(relay_cancel())
        try:
            # A remote worker's tools bring their runner (its own store, events to Redis).
            make_runner = getattr(tools, "runner", None)
            runner = (
                make_runner(settings)
                if make_runner is not None
                else ClaudeRunner(get_store(settings.db_path), settings)
            )
            with tool_config:
                outcome = await runner.run(request, cancel=stop)
        finally:
            relay.cancel()
        if outcome.ok:
            return outcome.text or "(Claude Code finished without a text answer)"
        if outcome.error is not None:
            raise outcome.error
        raise ValorError(Category.UPSTREAM, f"Claude Code ended with status {outcome.status}.")

    return asyncio.run(run())


KINDS: dict[str, PromiseKind] = {
    "research": PromiseKind(
        "research",
        "a web research question answered with sources (Perplexity)",
        _research,
        _research_missing,
    ),
    "claude_code": PromiseKind(
        "claude_code",
        "a long headless Claude Code task in the workdir",
        _claude_code,
        _claude_code_missing,
    ),
}


# --- the queue ----------------------------------------------------------------------------------

HOSTED_TOOLS_ATTRIBUTE = "valor_hosted_tools"  # set on a dequeued task by the pool running it
_queues: dict[str, Huey] = {}
_queues_lock = threading.Lock()


def queue_location(settings: Settings) -> str:
    return settings.promise_queue_url or f"sqlite:{settings.promise_queue_path}"


def get_queue(settings: Settings | None = None) -> Huey:
    """The huey instance for the configured backend, with the promise task registered."""
    if settings is None:
        from servers.core.settings import get_settings

        settings = get_settings()
    location = queue_location(settings)
    with _queues_lock:
        queue = _queues.get(location)
        if queue is None:
            queue = _queues[location] = _build_queue(settings)
        return queue


def _build_queue(settings: Settings) -> Huey:
    url = settings.promise_queue_url
    if url:
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValorError(
                Category.CONFIG, "VALOR_PROMISE_QUEUE_URL must be a redis:// URL (or unset)."
            )
        try:
            import redis  # noqa: F401 - RedisHuey needs it
            from huey import RedisHuey
        except ImportError:
            raise ValorError(
                Category.CONFIG,
                "VALOR_PROMISE_QUEUE_URL names Redis but the redis package is missing: "
                "pip install -e '.[redis]' (the redis package).",
            ) from None
        queue: Huey = RedisHuey("valor-promises", url=url)
    else:
        from huey import SqliteHuey

        settings.promise_queue_path.parent.mkdir(parents=True, exist_ok=True)
        queue = SqliteHuey("valor-promises", filename=str(settings.promise_queue_path))
    # No retries: a promise with side effects must not run twice behind the person's back.
    # context=True hands the task to run_promise_task, for the tools its worker pool attached.
    queue.valor_run_promise = queue.task(name="run_promise", retries=0, context=True)(
        run_promise_task
    )
    return queue


def close_queues() -> None:
    with _queues_lock:
        for queue in _queues.values():
            close = getattr(queue.storage, "close", None)
            if close is not None:
                close()
        _queues.clear()


def _enqueue(queue: Huey, promise_id: int) -> str:
    task = queue.valor_run_promise.s(promise_id)  # type: ignore[attr-defined]
    queue.enqueue(task)
    return task.id


def run_promise_task(promise_id: int, task: Any = None) -> None:
    """What a queue worker executes. The queued task carries only the id; the ``WorkerPool``
    running it attaches its hosted tools to the task object (in memory, never serialized)."""
    from servers.core.settings import get_settings
    from servers.core.store import get_store

    tools = getattr(task, HOSTED_TOOLS_ATTRIBUTE, None)
    execute_promise(get_store(), promise_id, get_settings(), tools)


# --- state --------------------------------------------------------------------------------------


def missing_promise(promise_id: int) -> ValorError:
    """The one answer for a promise a caller may not see: missing, or another chat's (a chat
    must not learn that another chat's promise exists)."""
    return input_error(f"No promise with id {promise_id}; list_promises shows them.")


def get_promise(store: Store, promise_id: int) -> Promise:
    sql = f"SELECT {_COLUMNS} FROM promises WHERE id = ?"  # noqa: S608 - fixed column list
    rows = store.query(sql, (int(promise_id),))
    if not rows:
        raise missing_promise(promise_id)
    return Promise(*tuple(rows[0]))


def list_promises(
    store: Store, status: str | None = None, limit: int = 50, chat_id: int | None = None
) -> list[Promise]:
    if status is not None and status not in STATES:
        raise input_error(f"status must be one of {', '.join(STATES)}, not {status!r}.")
    conditions, params = ["1"], []
    if status:
        conditions.append("status = ?")
        params.append(status)
    if chat_id is not None:
        conditions.append("chat_id = ?")
        params.append(chat_id)
    rows = store.query(
        f"SELECT {_COLUMNS} FROM promises WHERE {' AND '.join(conditions)} "  # noqa: S608
        "ORDER BY id DESC LIMIT ?",
        (*params, limit),
    )
    return [Promise(*tuple(row)) for row in rows]


def create_promise(
    store: Store, queue: Huey | None, description: str, kind: str, chat_id: int | None
) -> Promise:
    """Record the promise first (waiting: nothing is lost), then hand it to the queue."""
    description = description.strip()
    if not description:
        raise input_error("Describe the work the promise is for.")
    if kind not in KINDS:
        raise input_error(f"kind must be one of {', '.join(sorted(KINDS))}, not {kind!r}.")
    stamp = now()
    with store.transaction() as conn:
        promise_id = conn.execute(
            "INSERT INTO promises (description, kind, chat_id, status, created_at, updated_at) "
            "VALUES (?, ?, ?, 'waiting', ?, ?) RETURNING id",
            (description, kind, chat_id, stamp, stamp),
        ).fetchone()[0]
    if queue is not None:
        enqueue_waiting(store, queue, promise_id)
    return get_promise(store, promise_id)


def enqueue_waiting(store: Store, queue: Huey, promise_id: int) -> bool:
    """waiting -> pending once the queue has the task. A queue that is down leaves it waiting."""
    try:
        task_id = _enqueue(queue, promise_id)
    except Exception as exc:  # Redis down, disk full: the promise stays waiting, not lost
        log.warning("promise %s stays waiting: the queue refused it (%s)", promise_id, exc)
        return False
    with store.transaction() as conn:
        changed = conn.execute(
            "UPDATE promises SET status = 'pending', task_id = ?, updated_at = ? "
            "WHERE id = ? AND status = 'waiting'",
            (task_id, now(), promise_id),
        ).rowcount
    # Not changed: cancelled between recording and queueing, or a worker already claimed it (a
    # blocking Redis pop can be quicker than this update).
    if not changed and get_promise(store, promise_id).status == "cancelled":
        queue.revoke_by_id(task_id)
    return bool(changed)


def cancel_promise(store: Store, queue: Huey | None, promise_id: int) -> Promise:
    promise = get_promise(store, promise_id)
    if promise.status not in OPEN_STATES:
        raise input_error(f"Promise {promise_id} is already {promise.status}; nothing to cancel.")
    stamp = now()
    with store.transaction() as conn:
        changed = conn.execute(
            "UPDATE promises SET status = 'cancelled', finished_at = ?, updated_at = ?, "
            "error = 'cancelled on request' WHERE id = ? AND status IN "
            "('waiting', 'pending', 'running')",
            (stamp, stamp, promise_id),
        ).rowcount
    if not changed:
        latest = get_promise(store, promise_id)
        raise input_error(f"Promise {promise_id} became {latest.status} before it was cancelled.")
    if queue is not None and promise.task_id and promise.status == "pending":
        queue.revoke_by_id(promise.task_id)  # the worker would skip it anyway
    if queue is not None and promise.status == "running":
        _signal_cancel(queue, promise_id)
    return get_promise(store, promise_id)


def _signal_cancel(queue: Huey, promise_id: int) -> None:
    """A remote worker cannot watch the store: on Redis, a key tells it (it polls twice a
    second). Local workers see the status change in the store."""
    from servers.core.workers import cancel_key, redis_of

    redis = redis_of(queue)
    if redis is None:
        return
    try:
        redis.set(cancel_key(promise_id), "1", ex=7 * 86400)
    except Exception as exc:  # cancelled in the store all the same; its result will be dropped
        log.warning("promise %s: the cancel did not reach Redis (%s)", promise_id, exc)


def _worker_identity() -> tuple[str, int, float]:
    from servers.core.processes import process_create_time

    pid = os.getpid()
    return socket.gethostname(), pid, process_create_time(pid)


def execute_promise(
    store: Store, promise_id: int, settings: Settings, tools: HostedTools | None = None
) -> str:
    """Claim (pending -> running), run, and record the outcome. Returns the final status.
    ``tools``: the hosted servers a Claude Code promise may use (None: it runs without them)."""
    host, pid, create_time = _worker_identity()
    stamp = now()
    with store.transaction() as conn:
        claimed = conn.execute(
            "UPDATE promises SET status = 'running', started_at = ?, updated_at = ?, "
            "worker_host = ?, worker_pid = ?, worker_create_time = ? "
            "WHERE id = ? AND status IN ('waiting', 'pending')",  # waiting: see enqueue_waiting
            (stamp, stamp, host, pid, create_time, promise_id),
        ).rowcount
    if not claimed:
        return get_promise(store, promise_id).status  # cancelled (or already taken)
    promise = get_promise(store, promise_id)
    cancelled = threading.Event()
    watcher = threading.Thread(
        target=_watch_for_cancel,
        args=(store, promise_id, cancelled),
        name=f"promise-{promise_id}-watch",
        daemon=True,
    )
    watcher.start()
    try:
        result = KINDS[promise.kind].executor(promise, cancelled, settings, tools)
    except ValorError as exc:
        return _finish(store, promise_id, "failed", error=exc.args[0], cancelled=cancelled)
    except Exception as exc:
        log.error("promise %s failed unexpectedly: %s", promise_id, describe_exception(exc))
        error = f"[internal] {type(exc).__name__}: {redact(str(exc))[:500]}"
        return _finish(store, promise_id, "failed", error=error, cancelled=cancelled)
    return _finish(store, promise_id, "completed", result=result, cancelled=cancelled)


def _watch_for_cancel(store: Store, promise_id: int, cancelled: threading.Event) -> None:
    """Tell a running executor when someone cancelled its promise (it may stop its process)."""
    while not cancelled.wait(CANCEL_POLL_SECONDS):
        try:
            status = store.query("SELECT status FROM promises WHERE id = ?", (promise_id,))
        except Exception:  # the store is closing: stop watching
            return
        if not status or status[0]["status"] != "running":
            cancelled.set()


def stored_result(result: str | None) -> str | None:
    """A result as the store keeps it: at most MAX_RESULT_CHARS, with what was cut said."""
    if result is not None and len(result) > MAX_RESULT_CHARS:
        return result[:MAX_RESULT_CHARS] + f"… [{len(result) - MAX_RESULT_CHARS} more characters]"
    return result


def _finish(
    store: Store,
    promise_id: int,
    status: str,
    *,
    result: str | None = None,
    error: str | None = None,
    cancelled: threading.Event,
) -> str:
    stamp = now()
    result = stored_result(result)
    with store.transaction() as conn:
        changed = conn.execute(
            "UPDATE promises SET status = ?, result = ?, error = ?, finished_at = ?, "
            "updated_at = ? WHERE id = ? AND status = 'running'",
            (status, result, error, stamp, stamp, promise_id),
        ).rowcount
    cancelled.set()  # stops the watcher
    if not changed:  # cancelled while running: the cancellation stands, the result is dropped
        return get_promise(store, promise_id).status
    deliver(store, get_promise(store, promise_id))
    return status


def deliver(store: Store, promise: Promise) -> str:
    """Put the outcome in the bridge's outbox for the promise's chat; record what happened."""
    if promise.chat_id is None:
        note = "no chat: the result is kept for promise_status"
    else:
        text = delivery_text(
            promise.id,
            promise.kind,
            promise.status,
            promise.description,
            promise.result,
            promise.error,
        )
        note = queue_chat_message(store, promise.chat_id, text)
    with store.transaction() as conn:
        conn.execute("UPDATE promises SET delivery = ? WHERE id = ?", (note, promise.id))
    return note


def delivery_text(
    promise_id: int,
    kind: str,
    status: str,
    description: str,
    result: str | None,
    error: str | None,
) -> str:
    """The chat's message for a finished promise."""
    return f"Promise #{promise_id} ({kind}) {status}: {description}\n\n" + (result or error or "")


def queue_chat_message(store: Store, chat_id: int, text: str, source: str = "promise") -> str:
    """Hand a message for a chat to the bridge's outbox; returns what happened, for the record."""
    from servers.core.outbox import enqueue_outbound

    try:
        row = enqueue_outbound(store, chat_id, text, source=source)
    except Exception as exc:  # the outbox table missing or locked: say so, lose nothing else
        return f"not delivered: the outbox refused it ({type(exc).__name__})"
    return f"queued for chat {chat_id} (outbox #{row})"


def recover_interrupted(store: Store, queue: Huey) -> list[tuple[int, str]]:
    """Re-queue waiting promises; recover a crashed worker's running promise once.

    Returns (promise id, what was done). A running promise is only touched when its worker is
    known to be gone: same host, and that pid with that create time no longer exists.
    """
    from servers.core.processes import RegisteredProcess, is_same_process

    actions: list[tuple[int, str]] = []
    host = socket.gethostname()
    for promise in list_promises(store, "running", limit=10_000):
        if promise.worker_host != host or promise.worker_pid is None:
            continue  # another machine's worker: only it can tell
        worker = RegisteredProcess(
            0, promise.worker_pid, promise.worker_create_time or 0.0, "", "", None, 0.0, None
        )
        if is_same_process(worker):
            continue
        actions.append((promise.id, recover_once(store, queue, promise, "crashed")))
    for promise in list_promises(store, "waiting", limit=10_000):
        if enqueue_waiting(store, queue, promise.id):
            actions.append((promise.id, "queued"))
    return actions


def release_own_running(store: Store, queue: Huey) -> list[tuple[int, str]]:
    """At shutdown, after the grace period: this process's running promises are interrupted.
    Each goes back to the queue once (the same rule as a crash), before its process is ended."""
    pid = os.getpid()
    return [
        (promise.id, recover_once(store, queue, promise, "was stopped"))
        for promise in list_promises(store, "running", limit=10_000)
        if promise.worker_pid == pid and promise.worker_host == socket.gethostname()
    ]


def recover_once(store: Store, queue: Huey, promise: Promise, what: str) -> str:
    """A running promise whose worker ``what`` (crashed, was stopped): queued again the first
    time, failed with a message the second. Returns "recovered" or "failed"."""
    stamp = now()
    if promise.recoveries >= 1:
        error = (
            f"the worker running it {what} twice; not started again so its side effects are "
            "not repeated — create a new promise to retry"
        )
        with store.transaction() as conn:
            conn.execute(
                "UPDATE promises SET status = 'failed', error = ?, finished_at = ?, "
                "updated_at = ? WHERE id = ? AND status = 'running'",
                (error, stamp, stamp, promise.id),
            )
        deliver(store, get_promise(store, promise.id))
        return "failed"
    with store.transaction() as conn:
        conn.execute(
            "UPDATE promises SET status = 'waiting', recoveries = recoveries + 1, "
            "worker_pid = NULL, worker_create_time = NULL, updated_at = ? "
            "WHERE id = ? AND status = 'running'",
            (stamp, promise.id),
        )
    enqueue_waiting(store, queue, promise.id)
    return "recovered"


def requeue_pending(store: Store, queue: Huey, promise_id: int) -> None:
    """Queue a pending promise's task again (it left the queue but no worker claimed it); a
    duplicate is harmless: only one claim of a pending promise succeeds."""
    task_id = _enqueue(queue, promise_id)
    with store.transaction() as conn:
        conn.execute(
            "UPDATE promises SET task_id = ?, updated_at = ? WHERE id = ? AND status = 'pending'",
            (task_id, now(), promise_id),
        )


def queue_statistics(store: Store, since: float | None = None) -> dict[str, Any]:
    """Success rate, counts by state and kind, and a weekly trend (daydream context)."""
    by_status = {
        row["status"]: row["n"]
        for row in store.query("SELECT status, COUNT(*) AS n FROM promises GROUP BY status")
    }
    by_kind = {
        row["kind"]: {"total": row["n"], "completed": row["done"], "failed": row["failed"]}
        for row in store.query(
            "SELECT kind, COUNT(*) AS n, SUM(status = 'completed') AS done, "
            "SUM(status = 'failed') AS failed FROM promises GROUP BY kind"
        )
    }
    finished = by_status.get("completed", 0) + by_status.get("failed", 0)
    week = 7 * 86400
    start = now() - 4 * week
    trend = []
    for index in range(4):
        lo, hi = start + index * week, start + (index + 1) * week
        row = store.query(
            "SELECT COUNT(*) AS n, SUM(status = 'completed') AS done FROM promises "
            "WHERE created_at >= ? AND created_at < ?",
            (lo, hi),
        )[0]
        trend.append({"weeks_ago": 3 - index, "created": row["n"], "completed": row["done"] or 0})
    return {
        "total": sum(by_status.values()),
        "by_status": by_status,
        "by_kind": by_kind,
        "success_rate": round(by_status.get("completed", 0) / finished, 3) if finished else None,
        "weekly_trend": trend,
    }


def open_count(store: Store) -> int:
    """Promises not yet started (waiting or pending)."""
    rows = store.query("SELECT COUNT(*) AS n FROM promises WHERE status IN ('waiting', 'pending')")
    return rows[0]["n"]


class WorkerPool:
    """Threads that take promise tasks off the queue and run them (inside the daemon, or
    ``valor worker`` on any machine that shares the Redis queue). ``tools``: the hosted servers
    its Claude Code promises get (the daemon's); None runs them without Valor's servers."""

    def __init__(
        self,
        queue: Huey,
        workers: int,
        poll_seconds: float = 2.0,
        tools: HostedTools | None = None,
    ):
        self.queue = queue
        self.workers = workers
        self.poll_seconds = poll_seconds  # the longest wait between polls of an empty queue
        self.tools = tools
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for index in range(self.workers):
            thread = threading.Thread(
                target=self._loop, name=f"promise-worker-{index + 1}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def _loop(self) -> None:
        delay = min(0.1, self.poll_seconds)
        while not self._stop.is_set():
            try:
                task = self.queue.dequeue()
            except Exception as exc:
                log.warning("promise queue unreachable: %s", exc)
                task = None
            if task is None:
                # Back off while idle (an idle daemon should cost next to nothing).
                self._stop.wait(delay)
                delay = min(delay * 1.5, self.poll_seconds)
                continue
            delay = min(0.1, self.poll_seconds)
            setattr(task, HOSTED_TOOLS_ATTRIBUTE, self.tools)
            self.queue.execute(task)

    def stop(self, timeout: float) -> list[str]:
        """Stop taking work; wait up to ``timeout`` for running promises. Returns threads still
        busy (their promises stay running and are recovered at the next start)."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return [thread.name for thread in self._threads if thread.is_alive()]
