"""``valor worker`` on another machine: promise workers fed by Redis, using the daemon's tools.
The same threads run the bridge's replies when the daemon has ``VALOR_RUN_ON_WORKERS`` on (they
take those first; ``servers/core/remote_runs.py``); nothing to configure here for them.

It needs the Redis queue (``VALOR_PROMISE_QUEUE_URL``), the daemon's tools endpoint
(``VALOR_WORKER_TOOLS_URL``) and a worker token (``VALOR_WORKER_TOKEN``), and a data directory of
its own (its log, the Claude homes and run files of the runs it starts, ``worker.db`` with the
processes it started). It never opens the daemon's store, and schedules nothing: periodic jobs
belong to the one ``valor daemon``. See docs/scaling.md.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from servers.core.errors import ValorError

if TYPE_CHECKING:
    from servers.core.settings import Settings

log = logging.getLogger("valor.worker")

EXIT_CONFIG = 2  # bad settings, or the tool host refused the token


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def check_remote_settings(settings: Settings) -> str | None:
    """What a remote worker is missing, or None."""
    url = settings.promise_queue_url or ""
    if not url.startswith(("redis://", "rediss://", "unix://")):
        return "a remote worker takes its work from Redis: set VALOR_PROMISE_QUEUE_URL=redis://…"
    if settings.worker_token is None or not settings.worker_token.get_secret_value().strip():
        return (
            "set VALOR_WORKER_TOKEN to a worker token (`valor token create --worker` on the "
            "daemon's machine)"
        )
    tools = settings.worker_tools_url or ""
    if not tools.startswith(("http://", "https://")):
        return "VALOR_WORKER_TOOLS_URL must be the daemon's http(s) base URL"
    return None


def run_remote_worker(settings: Settings, workers: int, name: str | None = None) -> int:
    """Run until SIGTERM or SIGINT; then drain (see ``RemoteWorkerPool.stop``)."""
    from scheduler.daemon import end_children, quiet_noisy_loggers
    from servers.core import promises
    from servers.core.app import PRIVATE_UMASK
    from servers.core.safe_files import ensure_private_dir
    from servers.core.workers import RemoteWorkerPool, ToolHost, WorkerIdentity

    os.umask(PRIVATE_UMASK)
    quiet_noisy_loggers(settings)
    missing = check_remote_settings(settings)
    if missing:
        _say(f"valor worker: {missing}")
        return EXIT_CONFIG
    ensure_private_dir(settings.data_dir)
    try:
        identity = WorkerIdentity.current(name)
    except ValorError as exc:
        _say(f"valor worker: {exc.detail}")
        return EXIT_CONFIG
    assert settings.worker_token is not None and settings.worker_tools_url is not None
    host = ToolHost(settings.worker_tools_url, settings.worker_token)
    try:
        seen_as = host.hello()
    except ValorError as exc:
        host.close()
        _say(f"valor worker: {exc.detail}")
        log.error("%s", exc.detail)
        return EXIT_CONFIG
    except Exception as exc:
        host.close()
        _say(f"valor worker: cannot reach the tool host at {host.base_url}: {exc}")
        return 1
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    mark_ended = _register(settings)
    pool = RemoteWorkerPool(promises.get_queue(settings), host, settings, identity, max(1, workers))
    pool.start()
    log.info("remote worker %s (%s): %d thread(s)", identity.key, seen_as, pool.workers)
    _say(f"valor worker {identity.key} ready: {pool.workers} thread(s)")
    while not stop.wait(0.25) and not pool.stopping.is_set():
        pass
    log.info("stopping: %gs for running promises", settings.daemon_shutdown_grace_seconds)
    pool.stop(settings.daemon_shutdown_grace_seconds)
    asyncio.run(end_children())
    mark_ended()
    if pool.refused is not None:
        _say(f"valor worker: {pool.refused.detail}")
        return EXIT_CONFIG
    return 0


def _register(settings: Settings) -> Callable[[], None]:
    """This worker in its own process registry (``DATA_DIR/worker.db``), never the daemon's."""
    from servers.core.processes import mark_process_ended, process_create_time, register_process
    from servers.core.store import get_store

    store = get_store(settings.data_dir / "worker.db")
    pid = os.getpid()
    created = process_create_time(pid)
    register_process(store, pid, "worker", "valor worker", create_time=created)
    return lambda: mark_process_ended(store, pid, created)
