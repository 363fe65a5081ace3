"""``valor daemon``: hosts every tool on loopback and runs maintenance as MCP tool calls.

Jobs (APScheduler 3.x ``AsyncIOScheduler``, memory job store so it never locks the main
database; fixed ids, ``replace_existing``, ``coalesce``, ``max_instances=1``, a misfire grace per
job) are tool calls made with a real MCP client — FastMCP's streamable-HTTP client against the
servers this process hosts (``servers.hosting.hosted``), with a signed operator token. That is the
same path the bridge's Claude Code runs take, so a job exercises what users use.

Also here: the promise workers (threads taking promise tasks off the queue, with crash recovery
at start), the bridge when Telegram is configured, ``/metrics`` and ``/healthz`` on a loopback port
of their own (``servers.core.scrape``; no token, no chat content), and a clean SIGTERM: no new
jobs, running jobs get a grace period and are then cancelled, promise workers stop, every child
process is ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from servers.core import sandbox, trust
from servers.core.doctor import capability_report
from servers.core.logs import adopt_library_loggers
from servers.core.mcp_config import HostedTools, endpoint

if TYPE_CHECKING:
    from servers.core.settings import Settings

log = logging.getLogger("valor.daemon")

JOBS = ("health", "cleanup", "daydream")
TOOL_CALL_TIMEOUT_SECONDS = {
    "system_health": 60.0,
    "cleanup_resources": 600.0,
    "run_daydream": 3600.0,
}
JOB_SERVERS = ("monitoring-tools", "daydream-tools")  # the servers jobs call: clients kept open
OPERATOR_TOKEN_TTL_SECONDS = 365 * 86400  # in memory only, never written anywhere
MONITORING = "monitoring-tools"


@dataclass
class JobOutcome:
    job: str
    ok: bool
    detail: str
    data: dict[str, Any] | None = None
    seconds: float = 0.0
    finished_at: float = 0.0  # epoch seconds


def parse_quiet_hours(text: str) -> tuple[int, int] | None:
    """ "22:00-07:00" or "22-7" -> minutes of the day (start, end); empty -> None."""
    text = text.strip()
    if not text:
        return None
    try:
        start, end = (part.strip() for part in text.split("-", 1))

        def minutes(value: str) -> int:
            hours, _, mins = value.partition(":")
            total = int(hours) * 60 + int(mins or 0)
            if not 0 <= total < 24 * 60:
                raise ValueError(value)
            return total

        return minutes(start), minutes(end)
    except ValueError:
        raise ValueError(
            f'VALOR_DAYDREAM_QUIET_HOURS must look like "22:00-07:00", not {text!r}'
        ) from None


def cron_trigger(text: str) -> Any:
    """A crontab line: five fields, or six with seconds first ("*/5 * * * * *")."""
    from apscheduler.triggers.cron import CronTrigger

    fields = text.split()
    if len(fields) == 5:
        return CronTrigger.from_crontab(text)
    if len(fields) == 6:
        second, minute, hour, day, month, day_of_week = fields
        return CronTrigger(
            second=second, minute=minute, hour=hour, day=day, month=month, day_of_week=day_of_week
        )
    raise ValueError(f"expected 5 or 6 fields, got {len(fields)}: {text!r}")


def in_quiet_hours(quiet: tuple[int, int] | None, moment: datetime) -> bool:
    if quiet is None:
        return False
    start, end = quiet
    minute = moment.hour * 60 + moment.minute
    if start <= end:
        return start <= minute < end
    return minute >= start or minute < end  # spans midnight


class Daemon:
    def __init__(
        self,
        settings: Settings,
        *,
        host: str | None = None,
        port: int | None = None,
        schedule: bool = True,
        workers: int | None = None,
        run_bridge: bool = True,
        owns_process: bool = False,
        serve_metrics: bool | None = None,
        metrics_port: int | None = None,
        remote_workers: bool | None = None,
    ):
        self.settings = settings
        self.host = host or settings.http_host
        self.port = settings.http_port if port is None else port
        self.schedule = schedule
        self.worker_count = settings.promise_workers if workers is None else workers
        self.run_bridge = run_bridge
        self.owns_process = owns_process  # the CLI: every child process is ours to end
        # /metrics and /healthz: the long-running daemon's, not a one-off `--once` run's
        self.serve_metrics = schedule if serve_metrics is None else serve_metrics
        self.metrics_port = settings.metrics_port if metrics_port is None else metrics_port
        self.metrics_url: str | None = None
        # On a Redis queue the long-running daemon serves remote workers (not a `--once` run).
        queue_url = settings.promise_queue_url or ""
        self.remote_workers = (schedule if remote_workers is None else remote_workers) and (
            queue_url.startswith(("redis://", "rediss://", "unix://"))
        )
        self.started_at = time.time()
        try:
            self.quiet_hours = parse_quiet_hours(settings.daydream_quiet_hours)
        except ValueError as exc:  # a typo must not stop the tools and the health checks
            log.error("%s; no quiet hours apply", exc)
            self.quiet_hours = None
        self.base_url: str | None = None
        # Persistent (settings or DATA_DIR/scope_secret): a restart keeps issued tokens valid.
        self._secret = trust.load_scope_secret(settings)
        self.tools: HostedTools | None = None  # set once hosted; the promise workers get it
        self._stack = contextlib.AsyncExitStack()
        self._scheduler: Any = None
        self._workers: Any = None
        self._remote_results: Any = None  # remote workers' outcomes (a Redis queue only)
        self.run_board: Any = None  # the bridge's runs queued for workers (VALOR_RUN_ON_WORKERS)
        self.lease: Any = None  # one daemon per Redis queue schedules and reads outcomes
        self._bridge_task: asyncio.Task[Any] | None = None
        self._running_jobs: set[asyncio.Task[Any]] = set()
        self.ready = asyncio.Event()
        self.last_outcomes: dict[str, JobOutcome] = {}
        self._last_alert_key: tuple[str, ...] = ()
        self._notified_alert_key: tuple[str, ...] = ()
        self._clients: dict[str, Any] = {}

    # -- start and stop ----------------------------------------------------------------------
    async def start(self) -> None:
        from servers import SERVERS
        from servers.hosting import hosted

        if self.owns_process:
            self._stack.callback(register_self(self.settings, "daemon"))
        self.base_url = await self._stack.enter_async_context(
            hosted(self._secret, self.host, self.port, extra_routes=self._worker_routes())
        )
        self.tools = HostedTools(self.base_url, self._secret, tuple(SERVERS))
        adopt_library_loggers()  # uvicorn just gave its loggers handlers of their own
        log.info("tools hosted at %s/<server>/mcp", self.base_url)
        if self.serve_metrics:
            await self._serve_scrape()
        sandbox.log_sandbox_mode(self.settings, log)  # a warning when runs are not sandboxed
        await self._open_job_clients()
        self._close_abandoned_sessions()
        await self._report_capabilities()
        self._start_promise_workers()
        self._start_remote_results()
        if self.run_bridge:
            self._start_bridge()
        if self.schedule and (self.lease is None or self._remote_results is not None):
            self._start_scheduler()
        self.ready.set()
        log.info("daemon ready")

    async def _serve_scrape(self) -> None:
        """/metrics and /healthz on loopback, no token (no chat content in either). A busy port
        costs the metrics, not the tools and jobs."""
        from servers.core.scrape import DaemonState, JobState, scrape_app
        from servers.core.store import get_store

        db_path = self.settings.db_path
        state = DaemonState(
            started_at=self.started_at,
            ready=self.ready.is_set,
            jobs=lambda: [
                JobState(o.job, o.ok, o.finished_at) for o in list(self.last_outcomes.values())
            ],
        )
        try:
            self.metrics_url = await self._stack.enter_async_context(
                serve_loopback(scrape_app(lambda: get_store(db_path), state), self.metrics_port)
            )
        except (OSError, SystemExit) as exc:
            log.error(
                "no /metrics and /healthz: cannot listen on 127.0.0.1:%s (%s); set "
                "VALOR_METRICS_PORT",
                self.metrics_port,
                exc,
            )
            return
        log.info("metrics and liveness at %s/metrics and /healthz", self.metrics_url)

    async def _report_capabilities(self) -> None:
        for item in capability_report(self.settings):
            if item.capability == "Telegram bridge":
                if item.ready:
                    log.info("bridge: Telegram is configured")
                else:
                    log.info("bridge off: %s", item.detail)
            elif not item.ready:
                log.info("%s off: %s", item.capability, item.detail)
        reason = await model_unreachable_reason(self.settings)
        if reason:
            log.info("daydream model off: %s; daydreams record context only", reason)
        else:
            log.info(
                "daydream model: %s at %s",
                self.settings.daydream_model,
                self.settings.daydream_base_url,
            )

    def _close_abandoned_sessions(self) -> None:
        from servers.core.daydream import close_abandoned
        from servers.core.store import get_store

        # No session outlives its model timeout by an hour; older 'running' rows are leftovers.
        limit = self.settings.daydream_timeout_seconds + 3600
        closed = close_abandoned(get_store(self.settings.db_path), limit)
        if closed:
            log.info("marked %d abandoned daydream session(s) interrupted", closed)

    def _start_promise_workers(self) -> None:
        from servers.core import promises
        from servers.core.store import get_store

        if not self.worker_count:
            log.info("promise workers off")
            return
        try:
            queue = promises.get_queue(self.settings)
            actions = promises.recover_interrupted(get_store(self.settings.db_path), queue)
        except Exception as exc:
            log.error("promise queue unavailable, promises will wait: %s", exc)
            return
        for promise_id, action in actions:
            log.info("promise %s %s at start-up", promise_id, action)
        self._workers = promises.WorkerPool(queue, self.worker_count, tools=self.tools)
        self._workers.start()
        log.info(
            "promise workers: %d on %s", self.worker_count, promises.queue_location(self.settings)
        )

    def _worker_routes(self) -> list[Any]:
        if not self.remote_workers:
            return []
        from servers import SERVERS
        from servers.core.worker_results import token_service_routes

        routes = token_service_routes(self._secret, self.settings, tuple(SERVERS))
        if self.settings.run_on_workers:  # bridge runs claimed through the same service
            from servers.core.remote_runs import RunBoard, run_claim_routes

            self.run_board = RunBoard()
            routes += run_claim_routes(self.run_board, self._secret, self.settings, tuple(SERVERS))
        return routes

    def _start_remote_results(self) -> None:
        if not self.remote_workers:
            return
        import os
        import socket

        from servers.core import promises
        from servers.core.store import get_store
        from servers.core.worker_results import Lease, RemoteResults
        from servers.core.workers import redis_of

        try:
            queue = promises.get_queue(self.settings)
            self.lease = Lease(redis_of(queue), f"{socket.gethostname()}:{os.getpid()}")
            if not self.lease.acquire():
                log.error(
                    "another daemon (%s) serves this Redis queue: this one runs no scheduled "
                    "jobs and reads no worker outcomes; stop one of them",
                    self.lease.current_holder(),
                )
                return
            store = get_store(self.settings.db_path)
            self._remote_results = RemoteResults(store, queue, self.settings, lease=self.lease)
        except Exception as exc:
            log.error("remote workers' outcomes will wait: %s", exc)
            return
        self._remote_results.start()
        log.info("remote workers: token service at %s/workers, outcomes from Redis", self.base_url)

    def _start_bridge(self) -> None:
        if not telegram_ready(self.settings):
            return
        from bridge.service import run_bridge

        if self.settings.run_on_workers and self.run_board is None:
            log.warning("VALOR_RUN_ON_WORKERS needs a Redis VALOR_PROMISE_QUEUE_URL and the "
                        "long-running daemon: bridge runs stay on this machine")  # fmt: skip
        self._bridge_task = asyncio.create_task(
            run_bridge(self.settings, self.base_url, self._secret, self.run_board)
        )
        self._bridge_task.add_done_callback(_log_bridge_end)
        log.info("bridge started")

    def _start_scheduler(self) -> None:
        from apscheduler.jobstores.memory import MemoryJobStore
        from apscheduler.schedulers.asyncio import AsyncIOScheduler
        from apscheduler.triggers.interval import IntervalTrigger

        scheduler = AsyncIOScheduler(
            jobstores={"default": MemoryJobStore()},  # never contends with valor.db for locks
            job_defaults={"coalesce": True, "max_instances": 1},
        )
        settings = self.settings
        scheduler.add_job(
            self._scheduled,
            IntervalTrigger(seconds=settings.health_interval_seconds),
            args=["health"],
            id="valor-health",
            name="health check",
            replace_existing=True,
            misfire_grace_time=max(5, int(settings.health_interval_seconds)),
            next_run_time=datetime.now().astimezone(),  # one health check at start
        )
        scheduler.add_job(
            self._scheduled,
            IntervalTrigger(minutes=settings.cleanup_interval_minutes),
            args=["cleanup"],
            id="valor-cleanup",
            name="cleanup",
            replace_existing=True,
            misfire_grace_time=300,
        )
        try:
            daydream_trigger = cron_trigger(settings.daydream_cron)
        except ValueError as exc:
            log.error("daydream not scheduled: VALOR_DAYDREAM_CRON is invalid (%s)", exc)
        else:
            scheduler.add_job(
                self._scheduled,
                daydream_trigger,
                args=["daydream"],
                id="valor-daydream",
                name="daydream",
                replace_existing=True,
                misfire_grace_time=1800,
            )
        scheduler.start()
        self._scheduler = scheduler
        for job in scheduler.get_jobs():
            log.info("job %s: next run %s", job.id, job.next_run_time)

    async def stop(self) -> None:
        """No new jobs; running jobs get the grace period, then are cancelled; workers stop;
        child processes end; the HTTP host shuts down."""
        grace = self.settings.daemon_shutdown_grace_seconds
        self.ready.clear()  # /healthz answers 503 from here on
        if self._scheduler is not None:
            self._scheduler.pause()
        running = [task for task in self._running_jobs if not task.done()]
        if running:
            log.info("waiting up to %gs for %d running job(s)", grace, len(running))
            _, still = await asyncio.wait(running, timeout=grace)
            for task in still:
                task.cancel()
            if still:
                await asyncio.wait(still, timeout=5)
                log.info("cancelled %d job(s) still running after the grace period", len(still))
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
        if self._bridge_task is not None:
            self._bridge_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._bridge_task, timeout=max(grace, 1))
        if self._workers is not None:
            busy = await asyncio.to_thread(self._workers.stop, grace)
            if busy:
                self._release_running_promises()
        if self._remote_results is not None:
            await asyncio.to_thread(self._remote_results.stop)
            with contextlib.suppress(Exception):  # it expires on its own otherwise
                await asyncio.to_thread(self.lease.release)
        if self.owns_process:
            await end_children()
        await self._stack.aclose()
        log.info("daemon stopped")

    def _release_running_promises(self) -> None:
        from servers.core import promises
        from servers.core.store import get_store

        released = promises.release_own_running(
            get_store(self.settings.db_path), self._workers.queue
        )
        for promise_id, action in released:
            log.info("promise %s interrupted by the shutdown: %s", promise_id, action)

    # -- jobs --------------------------------------------------------------------------------
    async def _scheduled(self, job: str) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._running_jobs.add(task)
        try:
            outcome = await self.run_job(job)
        finally:
            if task is not None:
                self._running_jobs.discard(task)
        level = logging.INFO if outcome.ok else logging.WARNING
        log.log(level, "job %s: %s (%.2fs)", job, outcome.detail, outcome.seconds)

    async def run_job(self, job: str, *, force: bool = False) -> JobOutcome:
        """Run one job now. ``force`` (daydream only): ignore quiet hours and a busy machine."""
        handlers: dict[str, Callable[[], Awaitable[JobOutcome]]] = {
            "health": self.job_health,
            "cleanup": self.job_cleanup,
            "daydream": lambda: self.job_daydream(force=force),
        }
        if job not in handlers:
            raise ValueError(f"unknown job {job!r}; jobs: {', '.join(JOBS)}")
        started = time.monotonic()
        try:
            outcome = await handlers[job]()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a failing job is logged and retried on its schedule
            from servers.core.errors import describe_exception

            # type and place only: an exception's text may quote what it worked on
            outcome = JobOutcome(job, False, f"failed: {describe_exception(exc)}")
        outcome.seconds = time.monotonic() - started
        outcome.finished_at = time.time()
        self.last_outcomes[job] = outcome
        return outcome

    async def job_health(self) -> JobOutcome:
        ok, data, text = await self.call_tool(MONITORING, "system_health", {})
        if not ok:
            return JobOutcome("health", False, f"system_health failed: {text}")
        status = str((data or {}).get("status", "unknown"))
        alerts = (data or {}).get("alerts") or []
        self._alert_on_change(status, alerts)
        return JobOutcome("health", True, f"status {status}, {len(alerts)} alert(s)", data)

    async def job_cleanup(self) -> JobOutcome:
        ok, data, text = await self.call_tool(MONITORING, "cleanup_resources", {"dry_run": False})
        return JobOutcome("cleanup", ok, "cleanup_resources done" if ok else text, data)

    async def job_daydream(self, *, force: bool = False) -> JobOutcome:
        if not force and in_quiet_hours(self.quiet_hours, datetime.now().astimezone()):
            return JobOutcome("daydream", True, "skipped: quiet hours")
        arguments = {"force": True} if force else {}
        ok, data, text = await self.call_tool("daydream-tools", "run_daydream", arguments)
        if not ok:
            return JobOutcome("daydream", False, f"run_daydream failed: {text}")
        return JobOutcome(
            "daydream", True, f"session {data['session_id']}: {data['summary']}", data
        )

    def _alert_on_change(self, status: str, alerts: list[Any]) -> None:
        """Tell the operator when the set of alerts changes and holds for two checks in a row
        (not every 30 s while it lasts, and not for a CPU spike that flaps), and once when
        health is back."""
        key = tuple(
            sorted(str(a.get("metric", a)) if isinstance(a, dict) else str(a) for a in alerts)
        )
        seen_before, self._last_alert_key = self._last_alert_key, key
        if key != seen_before or key == self._notified_alert_key:
            return  # new (wait for the next check to confirm it) or already told
        previous, self._notified_alert_key = self._notified_alert_key, key
        if not key:
            if previous:
                self._tell_operator(f"Valor health: {status} again; the earlier alerts cleared.")
            return
        lines = [f"Valor health: {status}"]
        for alert in alerts[:10]:
            if isinstance(alert, dict):
                lines.append(f"- {alert.get('message', '')} {alert.get('recommended_action', '')}")
            else:
                lines.append(f"- {alert}")
        self._tell_operator("\n".join(line.rstrip() for line in lines))

    def _tell_operator(self, text: str) -> None:
        chat = self.settings.operator_chat_id
        if chat is None or not telegram_ready(self.settings):
            log.warning(
                "%s (no operator chat to tell: set the bridge up and VALOR_OPERATOR_CHAT_ID)",
                text.replace("\n", " "),
            )
            return
        from servers.core.promises import queue_chat_message
        from servers.core.store import get_store

        note = queue_chat_message(get_store(self.settings.db_path), chat, text, "health")
        log.info("health alert for the operator: %s", note)

    async def _open_job_clients(self) -> None:
        """One MCP session per server the jobs call, kept for the daemon's life: a session
        handshake per job would cost more CPU than the health check itself."""
        from fastmcp import Client
        from fastmcp.client.transports import StreamableHttpTransport

        assert self.base_url is not None
        token = trust.mint_scope_token(self._secret, None, OPERATOR_TOKEN_TTL_SECONDS)
        for server in JOB_SERVERS:
            transport = StreamableHttpTransport(
                endpoint(self.base_url, server), headers={"Authorization": f"Bearer {token}"}
            )
            client = Client(transport)
            await self._stack.enter_async_context(client)
            self._clients[server] = client

    async def call_tool(
        self, server: str, tool: str, arguments: dict[str, Any]
    ) -> tuple[bool, dict[str, Any] | None, str]:
        """One tool call through FastMCP's streamable-HTTP client to the hosted server.

        Returns (ok, structured content, error text). Recorded in the tool metrics like a
        Claude Code call (session "valor-daemon")."""
        client = self._clients.get(server)
        if client is None:
            raise RuntimeError(f"no MCP session to {server}: is the daemon started?")
        started = time.monotonic()
        async with client:  # re-entrant: reuses the open session, reconnects if it dropped
            result = await client.call_tool(
                tool,
                arguments,
                timeout=TOOL_CALL_TIMEOUT_SECONDS.get(tool, 600.0),
                raise_on_error=False,
            )
        duration_ms = (time.monotonic() - started) * 1000
        text = " ".join(getattr(block, "text", "") for block in result.content)
        record_tool_call(server, tool, not result.is_error, duration_ms, text)
        return (not result.is_error), result.structured_content, text


def telegram_ready(settings: Settings) -> bool:
    return any(c.ready for c in capability_report(settings) if c.capability == "Telegram bridge")


def _log_bridge_end(task: asyncio.Task[Any]) -> None:
    """The bridge ending on its own is worth a line; the tools and jobs keep running."""
    if task.cancelled():
        return
    error = task.exception()
    if error is not None:
        from servers.core.errors import describe_exception

        log.error("bridge stopped: %s", describe_exception(error))
    else:
        log.warning("bridge stopped")


def register_self(settings: Settings, kind: str) -> Callable[[], None]:
    """Record this process in the registry (health shows it; cleanup keeps long-running kinds).
    Returns the function that marks it ended."""
    import os

    from servers.core.processes import mark_process_ended, process_create_time, register_process
    from servers.core.store import get_store

    store = get_store(settings.db_path)
    pid = os.getpid()
    created = process_create_time(pid)
    register_process(store, pid, kind, f"valor {kind}", create_time=created)
    return lambda: mark_process_ended(store, pid, created)


NOISY_LOGGERS = ("httpx", "httpx2", "mcp.server.streamable_http_manager", "apscheduler", "huey")


def quiet_noisy_loggers(settings: Settings) -> None:
    """Per-request and per-run INFO lines from libraries would drown the daemon's own log
    (``servers.core.logs.setup_logging`` already did this, unless -vv asked for them)."""
    from servers.core.logs import configured_kind

    if settings.log_level == "DEBUG" or configured_kind() is not None:
        return
    for name in NOISY_LOGGERS:
        if logging.getLogger(name).getEffectiveLevel() < logging.WARNING:
            logging.getLogger(name).setLevel(logging.WARNING)


def record_tool_call(server: str, tool: str, ok: bool, duration_ms: float, text: str) -> None:
    """Into the tool-call metrics, through the same recorder the PostToolUse hook uses."""
    from servers.hooks import record_tool_call as record

    response: Any = {"isError": True, "content": [{"type": "text", "text": text}]} if not ok else {}
    try:
        record(
            {
                "session_id": "valor-daemon",
                "tool_name": f"mcp__{server}__{tool}",
                "tool_response": response,
                "duration_ms": duration_ms,
            },
            failed=False,
        )
    except Exception as exc:  # metrics are best effort; the job itself succeeded or failed
        log.debug("tool call not recorded in metrics: %s", exc)


async def model_unreachable_reason(settings: Settings) -> str | None:
    """Why the daydream model cannot be used, or None when its endpoint answers.

    The standard library does this one GET: httpx would cost the idle daemon ~3 MB of RSS."""
    import urllib.error
    import urllib.request

    base = settings.daydream_base_url
    if not base.startswith(("http://", "https://")):
        return f"VALOR_DAYDREAM_BASE_URL must be an http(s) URL, not {base!r}"
    request = urllib.request.Request(base.rstrip("/") + "/models")  # noqa: S310 - checked above
    key = settings.daydream_api_key
    if key is not None:
        request.add_header("Authorization", f"Bearer {key.get_secret_value()}")

    def probe() -> int:
        try:
            with urllib.request.urlopen(request, timeout=3.0) as response:  # noqa: S310 - http(s) only
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code

    try:
        status = await asyncio.to_thread(probe)
    except (OSError, ValueError):
        return (
            f"nothing answers at {base} (start Ollama and `ollama pull "
            f"{settings.daydream_model}`, or set VALOR_DAYDREAM_BASE_URL)"
        )
    if status >= 400:
        return f"{base} answered HTTP {status}"
    return None


@contextlib.asynccontextmanager
async def serve_loopback(app: Any, port: int) -> Any:
    """Serve an ASGI app on 127.0.0.1 inside the running loop; yields its base URL. Like
    ``servers.hosting.hosted``: uvicorn's startup()/shutdown() only, so it never wakes idle."""
    import uvicorn

    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        log_config=None,  # its lines go through Valor's handlers (servers.core.logs)
        log_level="warning",
        lifespan="off",
        date_header=False,
    )
    config.load()
    server = uvicorn.Server(config)
    server.lifespan = config.lifespan_class(config)  # serve() would set it
    await server.startup()  # raises SystemExit when it cannot bind
    try:
        bound_port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{bound_port}"
    finally:
        await server.shutdown()


async def end_children(grace: float = 3.0) -> list[int]:
    """End every process this daemon started that is still running (no orphans)."""
    import os

    from servers.core.processes import end_process_tree

    own = os.getpid()
    ended = await end_process_tree(own, grace=grace)  # its tree, never the daemon itself
    children = [pid for pid in ended.members if pid != own] if ended is not None else []
    if children:
        log.info("ended %d child process(es)", len(children))
    return children


async def run_daemon(settings: Settings) -> int:
    """Run until SIGTERM or SIGINT."""
    import os

    from servers.core.app import PRIVATE_UMASK
    from servers.core.store import secure_data_dir

    os.umask(PRIVATE_UMASK)  # every file the daemon and its workers create is owner-only
    secure_data_dir(settings.data_dir, settings.db_path)  # tightened, with a log line, if loose
    quiet_noisy_loggers(settings)
    daemon = Daemon(settings, owns_process=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    from servers.hosting import RemoteBindRefused

    try:
        await daemon.start()
    except RemoteBindRefused as exc:
        log.error("%s", exc.detail)
        await daemon.stop()
        return 2
    except (OSError, SystemExit) as exc:  # uvicorn exits when it cannot bind
        log.error(
            "could not host the tools on %s:%s (%s): is another `valor daemon` running? "
            "Stop it or set VALOR_HTTP_PORT.",
            daemon.host,
            daemon.port,
            exc,
        )
        await daemon.stop()
        return 1
    await stop.wait()
    log.info("stopping")
    await daemon.stop()
    return 0


async def run_once(
    settings: Settings, job: str, *, owns_process: bool = True, force: bool = False
) -> JobOutcome:
    """Host the tools on a free loopback port, run one job through them, stop."""
    quiet_noisy_loggers(settings)
    daemon = Daemon(
        settings, port=0, schedule=False, workers=0, run_bridge=False, owns_process=owns_process
    )
    await daemon.start()
    try:
        return await daemon.run_job(job, force=force)
    finally:
        await daemon.stop()


def outcome_json(outcome: JobOutcome) -> str:
    return json.dumps(
        {"job": outcome.job, "ok": outcome.ok, "detail": outcome.detail, "result": outcome.data},
        indent=2,
        ensure_ascii=False,
        default=str,
    )


def run_workers(settings: Settings, workers: int) -> int:
    """``valor worker``: promise workers only, until SIGTERM or SIGINT."""
    import threading

    from servers.core import promises
    from servers.core.store import get_store

    quiet_noisy_loggers(settings)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    mark_ended = register_self(settings, "worker")
    queue = promises.get_queue(settings)
    for promise_id, action in promises.recover_interrupted(get_store(settings.db_path), queue):
        log.info("promise %s %s at start-up", promise_id, action)
    pool = promises.WorkerPool(queue, max(1, workers))
    pool.start()
    log.info("promise workers: %d on %s", pool.workers, promises.queue_location(settings))
    stop.wait()
    if pool.stop(settings.daemon_shutdown_grace_seconds):
        for promise_id, action in promises.release_own_running(get_store(settings.db_path), queue):
            log.info("promise %s interrupted by the shutdown: %s", promise_id, action)
        asyncio.run(end_children())
    mark_ended()
    return 0
