"""The daemon's ``/metrics`` (Prometheus text) and ``/healthz``, on loopback, without a token.

Neither carries chat content: ``/metrics`` holds counts by server, tool, outcome, queue, status
and process kind, and the daemon's uptime; ``/healthz`` the daemon's state, its uptime and each
job's last outcome (ok or not, and when; never a job's text). So both may be read without a
token, by a scraper or a service manager's probe. The app answers only to a loopback ``Host`` on
its own port (421 otherwise), so a web page cannot read it through DNS rebinding.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from servers.core.store import Store

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})


@dataclass(frozen=True)
class JobState:
    job: str
    ok: bool
    finished_at: float  # epoch seconds


@dataclass
class DaemonState:
    """What the daemon tells the scrape app (read on every request)."""

    started_at: float  # epoch seconds
    ready: Callable[[], bool]
    jobs: Callable[[], Iterable[JobState]] = tuple


def tool_call_counts(store: Store) -> list[tuple[str, str, str, int]]:
    """(server, tool, outcome, calls) for every call recorded in ``tool_calls``."""
    rows = store.query(
        "SELECT server, tool, success, count(*) FROM tool_calls GROUP BY server, tool, success"
    )
    return [(r[0], r[1], "ok" if r[2] else "error", int(r[3])) for r in rows]


def promise_counts(store: Store) -> dict[str, int]:
    rows = store.query("SELECT status, count(*) FROM promises GROUP BY status")
    return {str(r[0]): int(r[1]) for r in rows}


def live_processes(store: Store) -> dict[str, int]:
    """Registered processes still running (pid and create time both match), by kind."""
    from servers.core.processes import is_same_process, running_registrations

    counts: dict[str, int] = {}
    for registration in running_registrations(store):
        if is_same_process(registration):
            counts[registration.kind] = counts.get(registration.kind, 0) + 1
    return counts


def render_metrics(store: Store, state: DaemonState) -> str:
    """The Prometheus text exposition of the daemon and the store's counts."""
    from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    from servers.core.health import queue_depths

    def families() -> Iterator[Any]:
        calls = CounterMetricFamily(
            "valor_tool_calls",
            "Tool calls recorded in the store (Claude Code hooks and the daemon's jobs), by "
            "outcome; rows older than VALOR_METRICS_RETENTION_DAYS are pruned (a counter reset)",
            labels=["server", "tool", "outcome"],
        )
        for server, tool, outcome, count in tool_call_counts(store):
            calls.add_metric([server, tool, outcome], count)
        yield calls
        queues = GaugeMetricFamily(
            "valor_queue_depth", "Work waiting or running, per queue", labels=["queue"]
        )
        for name, depth in queue_depths(store).items():
            queues.add_metric([name], depth)
        yield queues
        promises = GaugeMetricFamily("valor_promises", "Promises by status", labels=["status"])
        for status, count in promise_counts(store).items():
            promises.add_metric([status], count)
        yield promises
        processes = GaugeMetricFamily(
            "valor_processes", "Running processes Valor started, by kind", labels=["kind"]
        )
        for kind, count in live_processes(store).items():
            processes.add_metric([kind], count)
        yield processes
        yield GaugeMetricFamily(
            "valor_daemon_start_time_seconds", "When the daemon started (epoch)", state.started_at
        )
        yield GaugeMetricFamily(
            "valor_daemon_uptime_seconds", "Seconds since the daemon started", _uptime(state)
        )
        yield GaugeMetricFamily("valor_daemon_ready", "1 once the daemon serves", _ready(state))
        last_ok = GaugeMetricFamily(
            "valor_job_last_ok", "1 when the job's last run succeeded", labels=["job"]
        )
        last_run = GaugeMetricFamily(
            "valor_job_last_run_timestamp_seconds", "When the job last finished", labels=["job"]
        )
        for job in state.jobs():
            last_ok.add_metric([job.job], 1.0 if job.ok else 0.0)
            last_run.add_metric([job.job], job.finished_at)
        yield from (last_ok, last_run)

    class _Snapshot:
        def collect(self) -> Iterator[Any]:
            return families()

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot())
    ProcessCollector(registry=registry)  # the daemon's own CPU, memory, open files
    return generate_latest(registry).decode("utf-8")


def health(state: DaemonState) -> tuple[int, dict[str, Any]]:
    ready = _ready(state) == 1.0
    body = {
        "status": "ok" if ready else "unavailable",  # starting or stopping
        "pid": os.getpid(),
        "uptime_seconds": round(_uptime(state), 3),
        "jobs": {
            job.job: {"ok": job.ok, "finished_at": round(job.finished_at, 3)}
            for job in state.jobs()
        },
    }
    return (200 if ready else 503), body


def _uptime(state: DaemonState) -> float:
    return max(0.0, time.time() - state.started_at)


def _ready(state: DaemonState) -> float:
    try:
        return 1.0 if state.ready() else 0.0
    except Exception:
        return 0.0


def scrape_app(store_factory: Callable[[], Store], state: DaemonState) -> Any:
    """The ASGI app: ``GET /metrics``, ``GET /healthz``; anything else 404."""
    import anyio
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    async def metrics(_: Request) -> Response:
        text = await anyio.to_thread.run_sync(render_metrics, store_factory(), state)
        return Response(text, media_type=PROMETHEUS_CONTENT_TYPE)

    async def healthz(_: Request) -> Response:
        status, body = health(state)
        return JSONResponse(body, status_code=status)

    inner = Starlette(
        routes=[
            Route("/metrics", metrics, methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
        ]
    )

    async def app(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and not _loopback_host(scope):
            response = JSONResponse({"error": "misdirected_request"}, status_code=421)
            await response(scope, receive, send)
            return
        await inner(scope, receive, send)

    return app


def _loopback_host(scope: dict) -> bool:
    """``Host`` names a loopback address on the port this app is bound to."""
    host = ""
    for key, value in scope.get("headers") or ():
        if key.lower() == b"host":
            host = value.decode("latin-1").lower()
            break
    name, _, port = host.rpartition(":")
    if not name:
        return False
    bound = (scope.get("server") or (None, None))[1]
    try:
        return name in LOOPBACK_NAMES and int(port) == bound
    except ValueError:
        return False
