"""The daemon's side of remote promise workers (``servers.core.workers`` is the worker's side).

- The token service: two routes on the daemon's tool host, behind its ``HostGuard`` (so a token
  is verified, revocation included, before they run). ``GET /workers/hello`` answers a worker
  token; ``POST /workers/claim`` claims a pending promise for the calling worker and answers the
  work and a run token scoped to the promise's chat (a worker never holds the signing key).
- ``RemoteResults``: one thread reading the workers' ``results`` and ``events`` streams in a
  consumer group. An outcome is applied in one transaction (the promise finished, only while it
  is still running on that worker, and its outbox message queued) and acknowledged only after
  the commit: read again after a crash, it finds the promise finished and changes nothing, so
  each result reaches the chat exactly once. The same thread recovers the promises of workers
  that stopped answering (heartbeat expired, or on this host a pid that is gone): queued again
  once, failed with a message the second time, as on SQLite; and queues again a pending promise
  that is no longer in the queue (a worker died between taking it and claiming it).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

from servers.core import promises, trust
from servers.core.principals import WORKER_SCOPE
from servers.core.store import Store, now
from servers.core.workers import (
    CLAIM_PATH,
    EVENTS_STREAM,
    HELLO_PATH,
    INTERRUPTED,
    PREFIX,
    RESULTS_STREAM,
    WORKER_NAME,
    alive_key,
    redis_of,
)

if TYPE_CHECKING:
    from huey import Huey

    from servers.core.settings import Settings

log = logging.getLogger("valor.workers")

GROUP = "valor-daemon"
LOST_PENDING_SECONDS = 30.0  # a pending promise this old and not in the queue is queued again
RESULT_STATES = frozenset({"completed", "failed", INTERRUPTED})
PROGRESS_TOUCH_SECONDS = 10.0


# -- the token service ---------------------------------------------------------------------------
def token_service_routes(secret: bytes, settings: Settings, servers: tuple[str, ...]) -> list[Any]:
    """Starlette routes for the tool host (``servers.hosting.build_app(extra_routes=...)``)."""
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from servers.core.store import get_store

    db_path = settings.db_path
    offered = tuple(name for name in servers if name not in promises.SERVERS_NOT_FOR_PROMISES)
    ttl = settings.promise_timeout_seconds + 300

    def worker_of(request: Any) -> Any:
        principal = request.scope.get(trust.PRINCIPAL_SCOPE_KEY)
        if principal is None or WORKER_SCOPE not in principal.scopes:
            return None
        return principal

    async def hello(request: Any) -> Any:
        principal = worker_of(request)
        if principal is None:
            return JSONResponse({"error": "forbidden", "detail": "not a worker token"}, 403)
        return JSONResponse({"worker": principal.describe()})

    async def claim(request: Any) -> Any:
        principal = worker_of(request)
        if principal is None:
            return JSONResponse({"error": "forbidden", "detail": "not a worker token"}, 403)
        try:
            body = await request.json()
            promise_id = int(body["promise_id"])
            worker = body["worker"]
            name, pid, started = str(worker["name"]), int(worker["pid"]), float(worker["started"])
            if not WORKER_NAME.match(name):
                raise ValueError(name)
        except (ValueError, KeyError, TypeError):
            return JSONResponse({"error": "bad_request", "detail": "promise_id and worker"}, 400)
        store = get_store(db_path)
        claimed = await asyncio.to_thread(claim_for_worker, store, promise_id, name, pid, started)
        if claimed is None:
            return JSONResponse({"error": "not_pending"}, 409)
        token = trust.mint_scope_token(secret, claimed.chat_id, ttl_seconds=ttl)
        log.info("promise %s claimed by %s:%s (%s)", promise_id, name, pid, principal.describe())
        work = {
            "id": claimed.id,
            "kind": claimed.kind,
            "description": claimed.description,
            "chat_id": claimed.chat_id,
            "recoveries": claimed.recoveries,
        }
        return JSONResponse({"promise": work, "run_token": token, "servers": list(offered)})

    return [
        Route(HELLO_PATH, hello, methods=["GET"]),
        Route(CLAIM_PATH, claim, methods=["POST"]),
    ]


def claim_for_worker(
    store: Store, promise_id: int, name: str, pid: int, started: float
) -> promises.Promise | None:
    """pending -> running on that worker; None when it is not pending (cancelled, taken). A
    waiting promise is claimable too: a worker's blocking pop can take the task before the
    creator has marked it pending."""
    stamp = now()
    with store.transaction() as conn:
        claimed = conn.execute(
            "UPDATE promises SET status = 'running', started_at = ?, updated_at = ?, "
            "worker_host = ?, worker_pid = ?, worker_create_time = ? "
            "WHERE id = ? AND status IN ('waiting', 'pending')",  # promises.enqueue_waiting
            (stamp, stamp, name, pid, started, promise_id),
        ).rowcount
    return promises.get_promise(store, promise_id) if claimed else None


# -- outcomes ------------------------------------------------------------------------------------
def apply_result(store: Store, queue: Huey, settings: Settings, message: dict[str, Any]) -> str:
    """One worker's outcome into the store and the outbox, at most once; what was done."""
    from servers.core.outbox import MAX_TEXT_CHARS

    promise_id, status = int(message["promise_id"]), str(message["status"])
    worker, pid = str(message["worker"]), int(message["pid"])
    if status not in RESULT_STATES:
        raise ValueError(f"unknown status {status!r}")
    if status == INTERRUPTED:
        promise = promises.get_promise(store, promise_id)
        if promise.status != "running" or (promise.worker_host, promise.worker_pid) != (
            worker,
            pid,
        ):
            return "ignored: no longer running on that worker"
        return promises.recover_once(store, queue, promise, "was stopped")
    result, error = message.get("result"), message.get("error")
    result = promises.stored_result(result) if isinstance(result, str) else result
    stamp = now()
    with store.transaction() as conn:
        changed = conn.execute(
            "UPDATE promises SET status = ?, result = ?, error = ?, finished_at = ?, "
            "updated_at = ? WHERE id = ? AND status = 'running' AND worker_host = ? "
            "AND worker_pid = ?",
            (status, result, error, stamp, stamp, promise_id, worker, pid),
        ).rowcount
        if not changed:  # cancelled, recovered or already applied: the outcome is dropped
            return "ignored: no longer running on that worker"
        row = conn.execute(
            "SELECT id, kind, status, description, chat_id, result, error FROM promises "
            "WHERE id = ?",
            (promise_id,),
        ).fetchone()
        if row["chat_id"] is None:
            note = "no chat: the result is kept for promise_status"
        else:
            text = promises.delivery_text(
                row["id"], row["kind"], row["status"], row["description"], row["result"],
                row["error"],
            )  # fmt: skip
            outbox_id = conn.execute(
                "INSERT INTO bridge_outbox (chat_id, text, files, reply_to, source, created_at) "
                "VALUES (?, ?, '[]', NULL, 'promise', ?) RETURNING id",
                (row["chat_id"], text[:MAX_TEXT_CHARS], stamp),
            ).fetchone()[0]
            note = f"queued for chat {row['chat_id']} (outbox #{outbox_id})"
        conn.execute("UPDATE promises SET delivery = ? WHERE id = ?", (note, promise_id))
    record_spool(store, settings, row["chat_id"], message)
    return status


def record_spool(
    store: Store, settings: Settings, chat_id: int | None, message: dict[str, Any]
) -> None:
    """The run's hook records (untrusted, as on this machine) as the promise's chat's rows."""
    spool = message.get("spool")
    if not isinstance(spool, str) or not spool:
        return
    from servers.core.mcp_config import private_run_file
    from servers.core.sandbox import ingest_spool

    try:
        with private_run_file(
            spool, settings.data_dir / "run", prefix="spool-", suffix=".jsonl"
        ) as path:
            ingest_spool(
                store, path, chat_id, float(message.get("started_at") or 0), settings.log_path
            )
    except Exception as exc:  # monitoring data must not undo a delivered result
        log.warning("a worker's hook records were not stored: %s", type(exc).__name__)


# -- the daemon's reader -------------------------------------------------------------------------
class RemoteResults:
    """The thread that applies workers' outcomes and progress and recovers dead workers'
    promises (see the module's docstring)."""

    def __init__(
        self,
        store: Store,
        queue: Huey,
        settings: Settings,
        poll_seconds: float = 1.0,
        lease: Lease | None = None,
    ):
        redis = redis_of(queue)
        if redis is None:
            raise ValueError("remote workers need the Redis queue")
        self.store, self.queue, self.settings, self.redis = store, queue, settings, redis
        self.lease = lease  # renewed here while the daemon holds it
        self.poll_seconds = poll_seconds
        self.consumer = f"{socket.gethostname()}:{os.getpid()}"
        self.host = socket.gethostname()
        self._missing_since: dict[int, float] = {}
        self._touched: dict[int, float] = {}  # promise id -> when its progress was last stored
        self._last_sweep = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="remote-results", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _ensure_groups(self) -> None:
        import redis

        for stream in (RESULTS_STREAM, EVENTS_STREAM):
            try:  # from the stream's start: outcomes sent while no daemon read are kept
                self.redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    def _loop(self) -> None:
        delay, replay = 0.1, True
        while not self._stop.is_set():
            try:
                self._ensure_groups()
                if replay:  # what this consumer read but did not acknowledge (a crash, a restart)
                    replay = self.read_once(pending=True)
                self.read_once(block_ms=int(self.poll_seconds * 1000))
                self.reap()
                if self.lease is not None and not self.lease.renew():
                    # Redis lost the key (restarted without persistence) or another daemon took
                    # it after an outage: take it back if free, and say so.
                    log.error("the daemon lease on Redis was lost; current holder: %s",
                              self.lease.current_holder())  # fmt: skip
                    self.lease.acquire()
                delay = 0.1
            except Exception as exc:  # Redis restarting, the store locked: retry
                log.warning("reading workers' outcomes failed (%s); retrying", describe(exc))
                replay = True
                self._stop.wait(delay)
                delay = min(delay * 2, 5.0)

    def read_once(self, *, pending: bool = False, block_ms: int | None = None) -> bool:
        """Apply what the streams hold; True when something stayed unacknowledged."""
        start = "0" if pending else ">"
        answer = self.redis.xreadgroup(
            GROUP,
            self.consumer,
            {RESULTS_STREAM: start, EVENTS_STREAM: start},
            count=50,
            block=None if pending else block_ms,
        )
        left = False
        for stream, entries in answer or []:
            name = stream.decode() if isinstance(stream, bytes) else stream
            for entry_id, fields in entries:
                if not self._handle(name, fields):
                    left = True
                    continue
                self.redis.xack(name, GROUP, entry_id)
                if name == RESULTS_STREAM:
                    self.redis.xdel(name, entry_id)
        return left

    def _handle(self, stream: str, fields: dict[Any, Any]) -> bool:
        """Apply one entry; False to leave it unacknowledged (the store refused: retried)."""
        try:
            message = json.loads(fields.get(b"m") or fields.get("m") or b"")
            if not isinstance(message, dict):
                raise ValueError("not an object")
            if stream == EVENTS_STREAM:
                self._progress(message)
                return True
            done = apply_result(self.store, self.queue, self.settings, message)
        except (ValueError, KeyError, TypeError) as exc:  # malformed: acknowledged and dropped
            log.warning("dropped a malformed worker message on %s: %s", stream, type(exc).__name__)
            return True
        except promises.ValorError as exc:  # no such promise
            log.warning("dropped a worker outcome: %s", exc.detail)
            return True
        except Exception as exc:
            log.warning("a worker outcome waits (%s)", describe(exc))
            return False
        log.info("promise %s from worker %s: %s", message["promise_id"], message["worker"], done)
        return True

    def _progress(self, message: dict[str, Any]) -> None:
        """A running promise's progress marks it alive (``updated_at``), once per period at
        most: a store write per event would compete with the outcomes for the write lock."""
        promise_id = int(message["promise_id"])
        log.debug("promise %s on %s: %s", promise_id, message.get("worker"), message.get("type"))
        if time.monotonic() - self._touched.get(promise_id, 0.0) < PROGRESS_TOUCH_SECONDS:
            return
        self._touched[promise_id] = time.monotonic()
        if len(self._touched) > 10_000:  # finished promises' marks, dropped now and then
            self._touched.clear()
        with self.store.transaction() as conn:
            conn.execute(
                "UPDATE promises SET updated_at = ? WHERE id = ? AND status = 'running'",
                (now(), promise_id),
            )

    def reap(self) -> list[tuple[int, str]]:
        """Recover running promises whose worker is gone; queue lost pending ones again."""
        from servers.core.processes import RegisteredProcess, is_same_process

        actions: list[tuple[int, str]] = []
        ttl = self.settings.worker_heartbeat_seconds
        running = promises.list_promises(self.store, "running", limit=10_000)
        for promise in running:
            if promise.worker_pid is None or (
                promise.worker_host == self.host and promise.worker_pid == os.getpid()
            ):
                continue  # this daemon's own workers
            if promise.worker_host == self.host:
                process = RegisteredProcess(
                    0, promise.worker_pid, promise.worker_create_time or 0.0, "", "", None, 0, None
                )
                gone = not is_same_process(process)
            elif self.redis.exists(alive_key(f"{promise.worker_host}:{promise.worker_pid}")):
                self._missing_since.pop(promise.id, None)
                gone = False
            else:  # expired; waited half a period more in case Redis itself just restarted
                first = self._missing_since.setdefault(promise.id, time.monotonic())
                gone = time.monotonic() - first >= ttl / 2
            if gone:
                self._missing_since.pop(promise.id, None)
                action = promises.recover_once(self.store, self.queue, promise, "stopped answering")
                log.warning("promise %s: its worker stopped answering; %s", promise.id, action)
                actions.append((promise.id, action))
        if time.monotonic() - self._last_sweep >= LOST_PENDING_SECONDS / 3:
            self._last_sweep = time.monotonic()
            actions += self._queue_lost_pending()
        return actions

    def _queue_lost_pending(self) -> list[tuple[int, str]]:
        old = [
            p
            for p in promises.list_promises(self.store, "pending", limit=10_000)
            if p.updated_at < now() - LOST_PENDING_SECONDS
        ]
        if not old:
            return []
        queued = {task.args[0] for task in self.queue.pending() if task.args}
        actions = []
        for promise in old:
            if promise.id not in queued:
                promises.requeue_pending(self.store, self.queue, promise.id)
                actions.append((promise.id, "queued again"))
        return actions


class Lease:
    """One daemon per Redis queue: the lease on ``<prefix>:daemon`` (a key with an expiry, set only
    when absent, renewed and released only by its holder). Its holder runs the scheduled jobs and
    reads the workers' outcomes; another daemon on the same queue hosts its tools only."""

    KEY = f"{PREFIX}:daemon"
    _RENEW = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end"  # noqa: E501
    _RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"  # noqa: E501

    def __init__(self, redis: Any, holder: str, ttl_seconds: float = 30.0):
        self.redis, self.holder, self.ttl_ms = redis, holder, int(ttl_seconds * 1000)

    def acquire(self) -> bool:
        if self.redis.set(self.KEY, self.holder, nx=True, px=self.ttl_ms):
            return True
        return self.renew()  # already ours (a restart within the expiry keeps the same holder)

    def renew(self) -> bool:
        return bool(self.redis.eval(self._RENEW, 1, self.KEY, self.holder, self.ttl_ms))

    def release(self) -> None:
        self.redis.eval(self._RELEASE, 1, self.KEY, self.holder)

    def current_holder(self) -> str | None:
        value = self.redis.get(self.KEY)
        return value.decode() if isinstance(value, bytes) else value


def describe(exc: BaseException) -> str:
    from servers.core.errors import describe_exception

    return describe_exception(exc)
