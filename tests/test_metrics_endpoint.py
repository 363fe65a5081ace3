"""The daemon's /metrics (Prometheus text) and /healthz: no token, loopback, no chat content."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import urllib.error
import urllib.request

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from scheduler.daemon import Daemon
from servers.core import promises
from servers.core.history import Message, record_message
from servers.core.processes import register_process
from servers.core.settings import REPO_ROOT, get_settings
from servers.hooks import record_tool_call
from tests.support import configure, free_port, wait_until, wait_until_async

DEADLINE_SECONDS = 120.0  # a busy two-core machine starting a daemon
SECRET_WORDS = "the-launch-code-is-swordfish"


@pytest.fixture
def settings(monkeypatch):
    configure(
        monkeypatch,
        VALOR_HTTP_PORT="0",
        VALOR_METRICS_PORT="0",
        VALOR_DAYDREAM_BASE_URL="http://127.0.0.1:9/v1",  # no model
        VALOR_DAYDREAM_BUSY_CPU_PERCENT="100",
    )
    return get_settings()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


async def test_metrics_parse_and_count_tool_calls_by_outcome(store, settings):
    # Calls as the PostToolUse hook records them, one failing; chat content in other tables.
    for failed in (False, False, True):
        record_tool_call(
            {
                "session_id": "s1",
                "tool_name": "mcp__social-tools__search_current_info",
                "tool_input": {"query": SECRET_WORDS},
                "tool_response": {"isError": failed, "content": [{"type": "text", "text": "x"}]},
                "duration_ms": 12,
            },
            failed=failed,
        )
    record_message(store, Message(chat_id=42, message_id=1, text=SECRET_WORDS))
    register_process(store, os.getpid(), "bridge", "valor bridge")  # a live registered process
    promises.create_promise(store, promises.get_queue(), SECRET_WORDS, "research", 42)
    promises.close_queues()

    daemon = Daemon(settings, workers=0, run_bridge=False)
    await daemon.start()
    try:
        assert daemon.metrics_url is not None
        await wait_until_async(lambda: "health" in daemon.last_outcomes, DEADLINE_SECONDS)
        async with httpx.AsyncClient(base_url=daemon.metrics_url) as client:
            metrics = await client.get("/metrics")  # no Authorization header
            health = await client.get("/healthz")
            misdirected = await client.get("/metrics", headers={"Host": "evil.example"})
            tools = await client.get(f"{daemon.base_url}/monitoring-tools/mcp")
    finally:
        await daemon.stop()
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain; version=0.0.4")
    found = samples(metrics.text)
    search = (("outcome", "ok"), ("server", "social-tools"), ("tool", "search_current_info"))
    assert found[("valor_tool_calls_total", search)] == 2
    failed = (("outcome", "error"), ("server", "social-tools"), ("tool", "search_current_info"))
    assert found[("valor_tool_calls_total", failed)] == 1
    health_job = (("outcome", "ok"), ("server", "monitoring-tools"), ("tool", "system_health"))
    assert found[("valor_tool_calls_total", health_job)] >= 1  # the daemon's own job
    assert found[("valor_queue_depth", (("queue", "promises"),))] == 1
    assert found[("valor_promises", (("status", "pending"),))] == 1
    assert found[("valor_processes", (("kind", "bridge"),))] == 1
    assert found[("valor_daemon_uptime_seconds", ())] >= 0
    assert found[("valor_daemon_ready", ())] == 1
    assert found[("valor_job_last_ok", (("job", "health"),))] == 1
    assert ("process_resident_memory_bytes", ()) in found
    assert health.status_code == 200
    body = health.json()
    assert body["status"] == "ok" and body["jobs"]["health"]["ok"] is True
    for text in (metrics.text, health.text):
        assert SECRET_WORDS not in text and "swordfish" not in text
    assert misdirected.status_code == 421  # DNS rebinding cannot read it
    assert tools.status_code == 401  # the tools still want a token


@pytest.mark.e2e  # the daemon's command line in a subprocess
def test_healthz_answers_while_the_real_daemon_runs(store, valor_env):
    metrics_port = free_port()
    env = dict(os.environ)
    env.update(
        VALOR_HTTP_PORT="0",
        VALOR_METRICS_PORT=str(metrics_port),
        VALOR_PROMISE_WORKERS="0",
        VALOR_DAYDREAM_BASE_URL="http://127.0.0.1:9/v1",
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "scheduler.cli", "daemon"],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{metrics_port}/healthz"

    def healthy():
        assert process.poll() is None, process.stderr.read()[-3000:]
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return json.loads(response.read()) if response.status == 200 else None
        except (OSError, urllib.error.HTTPError):
            return None

    try:
        body = wait_until(healthy, DEADLINE_SECONDS, "/healthz answering 200")
        assert body["status"] == "ok" and body["pid"] == process.pid
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics") as response:
            names = {
                family.name for family in text_string_to_metric_families(response.read().decode())
            }
        assert {"valor_tool_calls", "valor_queue_depth", "valor_daemon_uptime_seconds"} <= names
    finally:
        process.send_signal(signal.SIGTERM)
        returncode = process.wait(timeout=DEADLINE_SECONDS)
        stderr = process.stderr.read()
    assert returncode == 0, stderr[-3000:]
    # The console stays quiet (no INFO lines); the file has the story, owner-only.
    assert "daemon ready" not in stderr
    log_file = get_settings().log_path / "daemon.log"
    assert stat.S_IMODE(log_file.stat().st_mode) == 0o600
    text = log_file.read_text()
    assert "daemon ready" in text and "metrics and liveness at http://127.0.0.1:" in text
    assert "daemon stopped" in text
