"""Promise workers on other machines: the worker's side of the protocol (``valor worker``).

A remote worker knows three things: the Redis URL (``VALOR_PROMISE_QUEUE_URL``), the daemon's
tools endpoint (``VALOR_WORKER_TOOLS_URL``) and a worker token (``VALOR_WORKER_TOKEN``, from
``valor token create --worker``). It never opens the daemon's store. For each promise:

1. it takes the promise id off huey's Redis queue;
2. it asks the daemon's token service (``POST <tools>/workers/claim``, the worker token as
   bearer) to claim it: the daemon records the promise running on this worker and answers the
   work and a run token scoped to the promise's chat; 409 when the promise is no longer pending;
3. it runs the work: a Claude Code run sandboxed as on the daemon's machine, given the hosted
   tools at ``<tools>/<server>/mcp`` under the run token; meanwhile a heartbeat key stays alive in
   Redis and progress goes to the ``events`` stream;
4. it appends the outcome to the ``results`` stream, retried until Redis has it.

The daemon's side (``servers.core.worker_results``) applies each outcome once and recovers the
promises of workers whose heartbeat stopped.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import queue
import re
import socket
import threading
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from servers.core.errors import Category, ValorError, describe_exception, redact

if TYPE_CHECKING:
    from huey import Huey
    from pydantic import SecretStr

    from servers.core.claude_command import ClaudeRun
    from servers.core.claude_events import Event
    from servers.core.promises import Promise
    from servers.core.settings import Settings

log = logging.getLogger("valor.workers")

PREFIX = "valor-promises"  # every key Valor keeps in Redis besides huey's own
RESULTS_STREAM = f"{PREFIX}:results"
EVENTS_STREAM = f"{PREFIX}:events"
EVENTS_MAX_LEN = 10_000  # progress is for watching, not keeping: the stream is trimmed
CLAIM_PATH = "/workers/claim"
HELLO_PATH = "/workers/hello"
MAX_FORWARDED_SPOOL_BYTES = 1024 * 1024
MAX_SENT_RESULT_CHARS = 40_000  # the daemon keeps 20,000 (promises.MAX_RESULT_CHARS)
INTERRUPTED = "interrupted"  # a result status: the worker stopped before the work ended


WORKER_NAME = re.compile(r"^[A-Za-z0-9._-]{1,100}$")  # recorded as the promise's worker_host


def alive_key(worker: str) -> str:
    return f"{PREFIX}:alive:{worker}"


def cancel_key(work_id: int | str) -> str:
    """A promise's id, or ``run:<id>`` for a bridge run (``servers.core.remote_runs``)."""
    return f"{PREFIX}:cancel:{work_id if isinstance(work_id, str) else int(work_id)}"


def redis_of(queue: Huey) -> Any:
    """The redis-py client of a ``RedisHuey`` queue; None for other backends."""
    return getattr(queue.storage, "conn", None)


@dataclass(frozen=True)
class WorkerIdentity:
    """Who runs a promise: a name (default the host name; one per machine or container), the
    process id and its start time. Recorded as the promise's worker_host / worker_pid."""

    name: str
    pid: int
    started: float

    @classmethod
    def current(cls, name: str | None = None) -> WorkerIdentity:
        from servers.core.processes import process_create_time

        pid = os.getpid()
        name = name or socket.gethostname()
        if not WORKER_NAME.match(name):
            raise ValorError(
                Category.CONFIG,
                f"A worker's name is 1-100 letters, digits, dots, dashes or underscores, not "
                f"{name[:120]!r}: pass --name.",
            )
        return cls(name, pid, process_create_time(pid))

    @property
    def key(self) -> str:
        return f"{self.name}:{self.pid}"

    def wire(self) -> dict[str, Any]:
        return {"name": self.name, "pid": self.pid, "started": self.started}


class WorkerRefused(ValorError):
    """The tool host refused this worker's token (bad, expired, revoked, or not a worker's)."""


@dataclass(frozen=True)
class Claim:
    promise: Promise
    run_token: str
    servers: tuple[str, ...]


class ToolHost:
    """The daemon's tools endpoint, as a worker reaches it: its token service and its servers."""

    def __init__(self, base_url: str, token: SecretStr, timeout: float = 30.0):
        import httpx

        self.base_url = base_url.rstrip("/")
        self._client = httpx.Client(
            timeout=timeout, headers={"Authorization": f"Bearer {token.get_secret_value()}"}
        )

    def close(self) -> None:
        self._client.close()

    def _refused(self, response: Any) -> WorkerRefused:
        try:
            detail = str(response.json().get("detail") or response.json().get("error"))
        except ValueError:
            detail = response.reason_phrase
        return WorkerRefused(
            Category.CONFIG,
            f"The tool host at {self.base_url} refused this worker's token (HTTP "
            f"{response.status_code}: {redact(detail)[:200]}). Mint one with `valor token create "
            "--worker` on the daemon's machine and set VALOR_WORKER_TOKEN.",
        )

    def hello(self) -> str:
        """Check the token before taking any work; the principal the host sees."""
        response = self._client.get(self.base_url + HELLO_PATH)
        if response.status_code in (401, 403):
            raise self._refused(response)
        response.raise_for_status()
        return str(response.json().get("worker", ""))

    def post_json(self, path: str, body: dict[str, Any]) -> Any:
        return self._client.post(self.base_url + path, json=body)

    def claim(self, promise_id: int, identity: WorkerIdentity) -> Claim | None:
        """The promise claimed for this worker, or None when it is no longer pending."""
        from servers.core.promises import Promise

        response = self._client.post(
            self.base_url + CLAIM_PATH,
            json={"promise_id": int(promise_id), "worker": identity.wire()},
        )
        if response.status_code in (401, 403):
            raise self._refused(response)
        if response.status_code in (404, 409):
            return None
        response.raise_for_status()
        body = response.json()
        work, stamp = body["promise"], time.time()
        promise = Promise(
            id=int(work["id"]),
            description=str(work["description"]),
            kind=str(work["kind"]),
            chat_id=None if work["chat_id"] is None else int(work["chat_id"]),
            status="running",
            task_id=None,
            result=None,
            error=None,
            worker_host=identity.name,
            worker_pid=identity.pid,
            worker_create_time=identity.started,
            recoveries=int(work.get("recoveries", 0)),
            delivery=None,
            created_at=stamp,
            started_at=stamp,
            finished_at=None,
            updated_at=stamp,
        )
        return Claim(promise, str(body["run_token"]), tuple(body["servers"]))


class ResultChannel:
    """A worker's writes to Redis: progress events, outcomes, its heartbeat."""

    def __init__(self, redis: Any, identity: WorkerIdentity):
        self.redis = redis
        self.identity = identity
        # Progress is sent by a thread of its own, batched: a run never waits on Redis for it.
        self._events: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()
        self._publisher = threading.Thread(target=self._publish, name="events", daemon=True)
        self._publisher.start()

    def event(self, promise_id: int, what: dict[str, Any]) -> None:
        """Progress: best effort (a lost event costs a line of progress, never a result)."""
        self._events.put({"promise_id": promise_id, "worker": self.identity.key, **what})

    def _publish(self) -> None:
        while (first := self._events.get()) is not None:
            batch = [first]
            while len(batch) < 100:
                try:
                    batch.append(self._events.get_nowait())
                except queue.Empty:
                    break
            closing = batch[-1] is None
            pipe = self.redis.pipeline(transaction=False)
            for message in filter(None, batch):
                pipe.xadd(
                    EVENTS_STREAM,
                    {"m": json.dumps(message)},
                    maxlen=EVENTS_MAX_LEN,
                    approximate=True,
                )
            try:
                pipe.execute()
            except Exception as exc:
                log.debug("%d progress event(s) not sent: %s", len(batch), type(exc).__name__)
            if closing:
                return

    def close(self) -> None:
        """Send the progress still queued (a second at most), then stop the sender."""
        self._events.put(None)
        self._publisher.join(timeout=1.0)

    def result(self, outcome: dict[str, Any], stop: threading.Event, give_up_after: float) -> bool:
        """Append an outcome, retrying while Redis is away (restarting, unreachable) until it
        takes it; after ``stop`` is set, at most ``give_up_after`` seconds more."""
        delay, stopped_at = 0.1, None
        payload = {"m": json.dumps(outcome)}
        while True:
            try:
                self.redis.xadd(RESULTS_STREAM, payload)
                return True
            except Exception as exc:
                log.warning(
                    "outcome of promise %s not yet sent (%s); retrying",
                    outcome["promise_id"],
                    type(exc).__name__,
                )
            if stop.is_set():
                stopped_at = stopped_at or time.monotonic()
                if time.monotonic() - stopped_at > give_up_after:
                    log.error(
                        "outcome of promise %s lost: Redis unreachable", outcome["promise_id"]
                    )
                    return False
            time.sleep(delay)
            delay = min(delay * 2, 2.0)

    def beat(self, ttl_seconds: float) -> None:
        self.redis.set(alive_key(self.identity.key), "1", px=int(ttl_seconds * 1000))

    def gone(self) -> None:
        self.redis.delete(alive_key(self.identity.key))

    def cancelled(self, promise_ids: Collection[int]) -> set[int]:
        ids = list(promise_ids)
        if not ids:
            return set()
        found = self.redis.mget([cancel_key(i) for i in ids])
        return {i for i, value in zip(ids, found, strict=True) if value is not None}


def summarize(event: Event) -> dict[str, Any] | None:
    """A stream-json event as a short progress record (no tool inputs: they may be long)."""
    from servers.core.claude_events import InitEvent, ResultEvent, TextEvent, ToolUseEvent

    if isinstance(event, InitEvent):
        return {
            "type": "init",
            "servers": {s.name: s.status for s in event.mcp_servers},
        }
    if isinstance(event, ToolUseEvent):
        return {"type": "tool", "name": event.name[:200]}
    if isinstance(event, TextEvent):
        return {"type": "text", "text": event.text[:500]}
    if isinstance(event, ResultEvent):
        return {"type": "result", "is_error": event.is_error, "turns": event.num_turns}
    return None


def _worker_runner_class() -> type:
    from servers.core.claude_runner import ClaudeRunner

    class WorkerRunner(ClaudeRunner):
        """The shared runner on a worker: its process registry is the worker's own store
        (``DATA_DIR/worker.db``); events go to Redis; the hooks' spool goes to the daemon with
        the outcome instead of into a local table."""

        def __init__(self, settings: Settings, channel: ResultChannel, promise_id: int):
            from servers.core.store import get_store

            super().__init__(get_store(settings.data_dir / "worker.db"), settings)
            self.channel = channel
            self.promise_id = promise_id
            self.spool_text = ""

        async def run(self, run: ClaudeRun, on_event: Any = None, cancel: Any = None) -> Any:
            return await super().run(run, self._publish, cancel)

        async def _publish(self, event: Event) -> None:
            what = summarize(event)
            if what is not None:
                self.channel.event(self.promise_id, what)

        def _after_sandboxed_run(self, run: ClaudeRun, spool: Path, outcome: Any) -> None:
            from servers.core.safe_files import read_regular

            try:
                data = read_regular(spool, MAX_FORWARDED_SPOOL_BYTES)
            except Exception as exc:
                log.warning("hook spool unreadable: %s", type(exc).__name__)
                return
            self.spool_text = data.decode("utf-8", errors="replace")

    return WorkerRunner


@dataclass(frozen=True)
class RemoteTools:
    """The daemon's hosted servers for one claimed promise: the same shape as ``HostedTools``
    (``without``, ``for_run``), with the run token the daemon minted instead of a secret."""

    base_url: str
    run_token: str
    servers: tuple[str, ...]
    channel: ResultChannel
    promise_id: int
    runners: list[Any] = dataclasses.field(default_factory=list)

    def without(self, names: Collection[str]) -> RemoteTools:
        kept = tuple(name for name in self.servers if name not in names)
        return dataclasses.replace(self, servers=kept)

    @contextmanager
    def for_run(
        self, run: ClaudeRun, chat_id: int | None, ttl_seconds: float, run_dir: Path | None
    ) -> Iterator[Path]:
        from servers.core.mcp_config import (
            endpoint,
            http_mcp_config,
            runtime_mcp_config,
            use_servers,
        )

        config = http_mcp_config(
            {name: endpoint(self.base_url, name) for name in self.servers}, self.run_token
        )
        with runtime_mcp_config(config, run_dir) as path:
            use_servers(run, path, self.servers)
            yield path

    def runner(self, settings: Settings) -> Any:
        """The runner ``promises``' claude_code executor uses on a worker."""
        runner = _worker_runner_class()(settings, self.channel, self.promise_id)
        self.runners.append(runner)
        return runner


def execute_claim(
    claim: Claim,
    cancelled: threading.Event,
    settings: Settings,
    channel: ResultChannel,
    tools_url: str,
) -> dict[str, Any]:
    """Run a claimed promise here; the outcome to send to the daemon."""
    from servers.core.promises import KINDS

    promise = claim.promise
    tools = RemoteTools(tools_url, claim.run_token, claim.servers, channel, promise.id)
    started = time.time()
    channel.event(promise.id, {"type": "started"})
    status, result, error = "completed", None, None
    try:
        result = KINDS[promise.kind].executor(promise, cancelled, settings, tools)
    except ValorError as exc:
        status, error = "failed", exc.args[0]
    except Exception as exc:
        log.error("promise %s failed unexpectedly: %s", promise.id, describe_exception(exc))
        status, error = "failed", f"[internal] {type(exc).__name__}: {redact(str(exc))[:500]}"
    if result is not None and len(result) > MAX_SENT_RESULT_CHARS:
        result = result[:MAX_SENT_RESULT_CHARS]
    spool = "".join(getattr(runner, "spool_text", "") for runner in tools.runners)
    return {
        "promise_id": promise.id,
        "worker": claim.promise.worker_host,
        "pid": claim.promise.worker_pid,
        "status": status,
        "result": result,
        "error": error,
        "spool": spool,
        "started_at": started,
    }


class RemoteWorkerPool:
    """Threads that take promise ids off the Redis queue and run them as described above, plus
    one heartbeat thread (which also notices cancellations)."""

    def __init__(
        self,
        queue: Huey,
        host: ToolHost,
        settings: Settings,
        identity: WorkerIdentity,
        workers: int,
    ):
        redis = redis_of(queue)
        if redis is None:
            raise ValorError(
                Category.CONFIG,
                "A remote worker needs the Redis queue: set VALOR_PROMISE_QUEUE_URL=redis://…",
            )
        self.queue = queue
        self.host = host
        self.settings = settings
        self.identity = identity
        self.workers = workers
        self.channel = ResultChannel(redis, identity)
        self.heartbeat_seconds = settings.worker_heartbeat_seconds
        self.refused: WorkerRefused | None = None
        self._stop = threading.Event()  # no new work
        self._drain = threading.Event()  # the grace period is over: interrupt running work
        self._running: dict[int | str, threading.Event] = {}  # promise ids, run:<id>
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        try:
            self.channel.beat(self.heartbeat_seconds)
        except Exception as exc:  # Redis not up yet: the heartbeat thread keeps trying
            log.warning("Redis unreachable at start: %s", type(exc).__name__)
        targets = [self._heartbeat] + [self._loop] * self.workers
        for index, target in enumerate(targets):
            name = "worker-heartbeat" if index == 0 else f"remote-worker-{index}"
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    @property
    def stopping(self) -> threading.Event:
        return self._stop

    def _loop(self) -> None:
        delay = 0.1
        while not self._stop.is_set():
            try:
                task = self._next()  # blocks up to a second on Redis
            except Exception as exc:  # Redis restarting or unreachable: wait and retry
                log.warning("promise queue unreachable: %s", type(exc).__name__)
                self._stop.wait(delay)
                delay = min(delay * 2, 2.0)
                continue
            delay = 0.1
            if task is not None and self._stop.is_set():
                self._give_back(task)  # popped as the worker began to stop: for another worker
            elif task is not None:
                self._take(task)

    def _next(self) -> Any:
        """A bridge run's ticket (first: a person waits for it) or a promise task, or None."""
        from servers.core.remote_runs import RUNS_QUEUE, RunTicket

        popped = self.channel.redis.brpop([RUNS_QUEUE, self.queue.storage.queue_key], timeout=1)
        if not popped:
            return None
        key, data = popped
        if (key.decode() if isinstance(key, bytes) else key) == RUNS_QUEUE:
            return RunTicket(data.decode() if isinstance(data, bytes) else str(data))
        return self.queue.deserialize_task(data)

    def _take_run(self, ticket: Any) -> None:
        from servers.core.remote_runs import claim_run, execute_run, run_work_key

        claimed, claim = self._claim(
            ticket, lambda: claim_run(self.host, ticket.run_id, self.identity),
            f"bridge run {ticket.run_id}",
        )  # fmt: skip
        if not claimed:
            return
        if claim is None:
            log.info("bridge run %s is no longer waiting; skipped", ticket.run_id)
            return
        work, cancelled = run_work_key(ticket.run_id), threading.Event()
        with self._lock:
            self._running[work] = cancelled
        try:
            status = execute_run(claim, cancelled, self.settings, self.channel.redis,
                                 self.host.base_url, self.identity, self._drain)  # fmt: skip
        finally:
            with self._lock:
                self._running.pop(work, None)
        log.info("bridge run %s %s", ticket.run_id, status)

    def _take(self, task: Any) -> None:
        from servers.core.remote_runs import RunTicket

        if isinstance(task, RunTicket):
            self._take_run(task)
            return
        try:
            promise_id = int(task.args[0])
        except (AttributeError, IndexError, TypeError, ValueError):
            log.warning("skipped a queue item that is not a promise task")
            return
        claimed, claim = self._claim(
            task, lambda: self.host.claim(promise_id, self.identity), f"promise {promise_id}"
        )
        if not claimed:
            return
        if claim is None:
            log.info("promise %s is no longer pending; skipped", promise_id)
            return
        cancelled = threading.Event()
        with self._lock:
            self._running[promise_id] = cancelled
        try:
            outcome = execute_claim(
                claim, cancelled, self.settings, self.channel, self.host.base_url
            )
        finally:
            with self._lock:
                self._running.pop(promise_id, None)
        if self._drain.is_set() and cancelled.is_set():
            outcome.update(status=INTERRUPTED, result=None, error="the worker was stopped")
        self.channel.result(outcome, self._drain, give_up_after=10.0)
        log.info("promise %s %s", promise_id, outcome["status"])

    def _claim(self, item: Any, claim: Callable[[], Any], what: str) -> tuple[bool, Any]:
        """(True, the daemon's answer: the claim, or None when the work is no longer waiting),
        or (False, None) when the daemon could not answer: the item is back in the queue, and
        a refused worker token also stops this pool."""
        try:
            return True, claim()
        except WorkerRefused as exc:
            self._give_back(item)
            self.refused = exc
            log.error("%s", exc.detail)
            self._stop.set()
        except Exception as exc:  # the daemon is restarting or unreachable: back in the queue
            log.warning("could not claim %s (%s); queued again", what, exc)
            self._give_back(item)
            self._stop.wait(1.0)
        return False, None

    def _give_back(self, task: Any) -> None:
        from servers.core.remote_runs import RUNS_QUEUE, RunTicket

        try:
            if isinstance(task, RunTicket):  # next in line again
                self.channel.redis.rpush(RUNS_QUEUE, task.run_id)
                return
            self.queue.enqueue(task)
        except Exception as exc:  # the daemon's sweep queues it again from its store
            log.warning("could not queue a task again: %s", type(exc).__name__)

    def _heartbeat(self) -> None:
        """The heartbeat key (expiring after ``heartbeat_seconds``) refreshed four times per
        period; cancellations polled twice a second."""
        from servers.core.remote_runs import abandoned

        refresh = self.heartbeat_seconds / 4
        last_beat = time.monotonic()
        while not self._drain.is_set() or self.busy():
            try:
                if time.monotonic() - last_beat >= refresh:
                    self.channel.beat(self.heartbeat_seconds)
                    last_beat = time.monotonic()
                with self._lock:
                    running = dict(self._running)
                for promise_id in self.channel.cancelled(running):
                    running[promise_id].set()
                for work in abandoned(self.channel.redis, running):  # its bridge went away
                    running[work].set()
            except Exception as exc:
                log.debug("heartbeat failed: %s", type(exc).__name__)
            time.sleep(min(0.5, refresh))

    def busy(self) -> bool:
        with self._lock:
            return bool(self._running)

    def stop(self, grace: float) -> None:
        """Take no new work; running promises get ``grace`` seconds, then are interrupted
        (their runs end) and reported as interrupted, so the daemon queues them once more."""
        self._stop.set()
        deadline = time.monotonic() + grace
        while self.busy() and time.monotonic() < deadline:
            time.sleep(0.05)
        self._drain.set()
        with self._lock:
            for cancelled in self._running.values():
                cancelled.set()
        for thread in self._threads:
            thread.join(timeout=30.0)
        try:
            self.channel.gone()
        except Exception as exc:
            log.debug("heartbeat key not removed: %s", type(exc).__name__)
        self.channel.close()
        self.host.close()
