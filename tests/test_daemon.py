"""The daemon: jobs are real MCP tool calls over the hosted HTTP app; SIGTERM is clean."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime

import psutil
import pytest
from apscheduler.jobstores.memory import MemoryJobStore

from scheduler.daemon import Daemon, cron_trigger, in_quiet_hours, parse_quiet_hours
from servers.core import promises
from servers.core.outbox import pending_outbound
from servers.core.settings import REPO_ROOT, get_settings
from tests.support import INITIALIZE_REQUEST, configure, wait_until, wait_until_async

DEADLINE_SECONDS = 60.0  # generous: these tests must pass on a busy 2-core machine


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


async def test_scheduled_health_job_is_a_real_tool_call_in_the_metrics(store, settings):
    daemon = Daemon(settings, workers=0, run_bridge=False)
    await daemon.start()
    try:
        await wait_until_async(  # the health job runs once at start
            lambda: "health" in daemon.last_outcomes, DEADLINE_SECONDS, "the health job running"
        )
        outcome = daemon.last_outcomes["health"]
        jobs = {job.id: job for job in daemon._scheduler.get_jobs()}
        job_store = daemon._scheduler._lookup_jobstore("default")
    finally:
        await daemon.stop()
    assert outcome.ok, outcome.detail
    assert outcome.data["status"] in ("healthy", "degraded", "critical")
    assert outcome.data["machine"]["cpu_count"] >= 1  # measured by monitoring-tools
    rows = store.query("SELECT server, tool, success, duration_ms, session_id FROM tool_calls")
    assert [(r["server"], r["tool"], r["success"]) for r in rows] == [
        ("monitoring-tools", "system_health", 1)
    ]
    assert rows[0]["session_id"] == "valor-daemon" and rows[0]["duration_ms"] > 0
    assert set(jobs) == {"valor-health", "valor-cleanup", "valor-daydream"}
    assert all(job.coalesce and job.max_instances == 1 for job in jobs.values())
    assert jobs["valor-daydream"].misfire_grace_time == 1800
    assert isinstance(job_store, MemoryJobStore)  # no locks taken on valor.db


async def test_cleanup_and_daydream_jobs_through_the_tools(store, settings):
    daemon = Daemon(settings, schedule=False, workers=0, run_bridge=False)
    await daemon.start()
    try:
        cleanup = await daemon.run_job("cleanup")
        dream = await daemon.run_job("daydream")
    finally:
        await daemon.stop()
    assert cleanup.ok and "summary" in cleanup.data
    assert dream.ok and dream.data["status"] == "completed"
    assert "analysis skipped: no model answers" in dream.data["summary"]
    calls = {(r["server"], r["tool"]) for r in store.query("SELECT server, tool FROM tool_calls")}
    assert {("monitoring-tools", "cleanup_resources"), ("daydream-tools", "run_daydream")} <= calls


async def test_quiet_hours_skip_the_daydream(store, settings, monkeypatch):
    now = datetime.now().astimezone()
    start, end = (now.hour - 1) % 24, (now.hour + 1) % 24
    configure(monkeypatch, VALOR_DAYDREAM_QUIET_HOURS=f"{start:02d}:00-{end:02d}:00")
    daemon = Daemon(get_settings(), schedule=False, workers=0, run_bridge=False)
    await daemon.start()
    try:
        outcome = await daemon.run_job("daydream")
    finally:
        await daemon.stop()
    assert outcome.ok and outcome.detail == "skipped: quiet hours"
    assert store.query("SELECT COUNT(*) AS n FROM daydream_sessions")[0]["n"] == 0


def test_quiet_hours_and_cron_parsing():
    assert parse_quiet_hours("") is None
    quiet = parse_quiet_hours("22:00-07:00")
    assert in_quiet_hours(quiet, datetime(2026, 1, 1, 23, 30))
    assert in_quiet_hours(quiet, datetime(2026, 1, 1, 6, 59))
    assert not in_quiet_hours(quiet, datetime(2026, 1, 1, 7, 0))
    assert in_quiet_hours(parse_quiet_hours("9-17"), datetime(2026, 1, 1, 12))
    with pytest.raises(ValueError, match="22:00-07:00"):
        parse_quiet_hours("late")
    assert "second='*/5'" in str(cron_trigger("*/5 * * * * *"))
    with pytest.raises(ValueError):
        cron_trigger("every six hours")


def daemon_env(**extra):
    env = dict(os.environ)
    env.update(
        {
            "VALOR_HTTP_PORT": "0",
            "VALOR_METRICS_PORT": "0",
            "VALOR_PROMISE_WORKERS": "1",
            **extra,
        }
    )
    return env


class LogReader:
    """Collects a child's stderr lines on a thread so waiting never blocks the pipe."""

    def __init__(self, process):
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(process.stderr,), daemon=True)
        self._thread.start()

    def _read(self, stream):
        for line in stream:
            self.lines.append(line)

    def wait_or_show_log(self, predicate, what, timeout=DEADLINE_SECONDS):
        """``wait_until``, with the child's latest log lines in the failure."""
        try:
            return wait_until(predicate, timeout, what)
        except AssertionError as timed_out:
            raise AssertionError(f"{timed_out}:\n" + "".join(self.lines[-40:])) from None

    def wait_for(self, text, timeout=DEADLINE_SECONDS):
        self.wait_or_show_log(
            lambda: any(text in line for line in self.lines), f"{text!r} in the log", timeout
        )

    @property
    def text(self):
        return "".join(self.lines)


def start_daemon(env):
    process = subprocess.Popen(
        [sys.executable, "-m", "scheduler.cli", "daemon", "-v"],  # -v: info lines on stderr
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    return process, LogReader(process)


def descendants(pid):
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def gone(process):
    """Ended, or a zombie only its parent has yet to reap."""
    try:
        return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.e2e
def test_fresh_daemon_starts_checks_health_says_what_is_off_and_stops(store):
    process, log = start_daemon(daemon_env())
    try:
        log.wait_for("daemon ready")
        log.wait_for("job health: status")
    finally:
        process.send_signal(signal.SIGTERM)
        returncode = process.wait(timeout=DEADLINE_SECONDS)
    text = log.text
    assert returncode == 0, text[-3000:]
    assert "bridge off: set TELEGRAM_API_ID" in text
    assert "daydream model off: nothing answers at http://127.0.0.1:11434/v1" in text
    assert "tools hosted at http://127.0.0.1:" in text
    assert "daemon stopped" in text
    registered = store.query("SELECT kind, ended_at FROM processes WHERE kind = 'daemon'")
    assert len(registered) == 1 and registered[0]["ended_at"] is not None


@pytest.mark.e2e
def test_sigterm_with_a_daydream_and_a_claude_promise_running(
    store, fake_openai, fake_anthropic, claude_bin, claude_env
):
    """Both hang in their model calls; SIGTERM cancels the job after the grace period, puts the
    promise back on the queue once, and ends Claude Code's process tree."""
    fake_openai.hang_seconds = 120  # both outlast every deadline below: only the stop ends them
    fake_openai.fail_next("timeout", path="/v1/chat/completions")
    fake_anthropic.hang_seconds = 120
    fake_anthropic.fail_next("timeout", count=10, path="/v1/messages")
    queue = promises.get_queue()
    promise = promises.create_promise(store, queue, "a long refactor", "claude_code", None)
    promises.close_queues()
    env = daemon_env(
        **claude_env,
        VALOR_CLAUDE_BIN=str(claude_bin),
        VALOR_CLAUDE_WORKDIR=str(store.path.parent),
        VALOR_DAYDREAM_BASE_URL=f"{fake_openai.url}/v1",
        VALOR_DAYDREAM_CRON="*/1 * * * * *",  # at once (six fields: seconds first)
        VALOR_DAYDREAM_BUSY_CPU_PERCENT="100",
        VALOR_DAYDREAM_MAX_PENDING_PROMISES="5",
        VALOR_DAEMON_SHUTDOWN_GRACE_SECONDS="1",
        VALOR_HEALTH_INTERVAL_SECONDS="3600",
    )
    process, log = start_daemon(env)
    try:
        log.wait_for("daemon ready")
        log.wait_or_show_log(
            lambda: fake_openai.chat_requests and fake_anthropic.message_requests,
            "both inside their hung model calls",
            2 * DEADLINE_SECONDS,
        )
        children = descendants(process.pid)
        assert any("claude" in " ".join(c.cmdline()) for c in children)
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        returncode = process.wait(timeout=DEADLINE_SECONDS)
        stop_seconds = time.monotonic() - started
    finally:
        if process.poll() is None:
            process.kill()
    text = log.text
    assert returncode == 0, text[-3000:]
    # A 1 s grace, not the model calls' hang: bounded even on a busy machine.
    assert stop_seconds < 45, text[-3000:]
    assert "cancelled 1 job(s) still running after the grace period" in text
    assert f"promise {promise.id} interrupted by the shutdown: recovered" in text
    wait_until(
        lambda: all(gone(child) for child in children),
        DEADLINE_SECONDS,
        "every child of the daemon ending with it",
    )
    sessions = store.query("SELECT status, phases FROM daydream_sessions")
    assert [row["status"] for row in sessions] == ["interrupted"]
    phases = [phase["name"] for phase in json.loads(sessions[0]["phases"])]
    assert phases[-1] == "context"  # stopped inside the analysis
    interrupted = promises.get_promise(store, promise.id)
    assert interrupted.status == "pending" and interrupted.recoveries == 1
    claude_runs = store.query("SELECT ended_at FROM processes WHERE kind = 'claude-promise'")
    assert claude_runs  # it was registered, and its process is gone (checked above)


def test_once_rejects_an_unknown_job():
    completed = subprocess.run(
        [sys.executable, "-m", "scheduler.cli", "daemon", "--once", "nap"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == 2 and "health, cleanup, daydream" in completed.stderr


def test_operator_hears_about_alert_changes_once(store, settings, monkeypatch):
    configure(
        monkeypatch,
        TELEGRAM_API_ID="12345",
        TELEGRAM_API_HASH="0123456789abcdef",
        TELEGRAM_BOT_TOKEN="123456:" + "A" * 35,
        VALOR_OPERATOR_CHAT_ID="99",
    )
    daemon = Daemon(get_settings(), schedule=False, workers=0, run_bridge=False)
    disk = {"metric": "disk_percent", "message": "Disk 97% full.", "recommended_action": "Free."}
    cpu = {"metric": "cpu_percent", "message": "CPU 99%.", "recommended_action": "Look."}
    # A flapping CPU alert is never sent; a lasting one is sent once; recovery once.
    for alerts in ([cpu], [], [cpu], [], [disk], [disk], [disk], [disk], [], [], []):
        daemon._alert_on_change("degraded" if alerts else "healthy", alerts)
    sent = pending_outbound(store)
    assert [m.chat_id for m in sent] == [99, 99]
    assert "Disk 97% full. Free." in sent[0].text and sent[0].source == "health"
    assert "cleared" in sent[1].text


def hosted_base_url(log: LogReader) -> str:
    log.wait_for("tools hosted at http://127.0.0.1:")
    line = next(line for line in log.lines if "tools hosted at " in line)
    return line.split("tools hosted at ", 1)[1].split("/<server>", 1)[0]


@pytest.mark.e2e
def test_the_daemons_host_demands_tokens_and_accepts_its_own_after_a_restart(store):
    """Every server path of the daemon refuses a request without a valid token (with the MCP
    spec's WWW-Authenticate), and a `valor token` token outlives a daemon restart."""
    import httpx

    from servers import SERVERS
    from servers.core import tokens_issued
    from servers.core.mcp_config import endpoint
    from servers.core.principals import OPERATOR
    from servers.core.trust import load_scope_secret

    accept = {"Accept": "application/json, text/event-stream"}
    token = None
    for start in range(2):  # the second start is a restart on the same data directory
        process, log = start_daemon(daemon_env())
        try:
            base_url = hosted_base_url(log)
            if token is None:  # the daemon made the persistent secret; sign with it
                secret = load_scope_secret(get_settings())
                token = tokens_issued.issue_token(store, secret, OPERATOR, 3600)[0]
            for server in SERVERS:
                url = endpoint(base_url, server)
                for bad in (None, "v2.forged.token", token + "x"):
                    headers = {**accept, **({"Authorization": f"Bearer {bad}"} if bad else {})}
                    refused = httpx.post(url, json=INITIALIZE_REQUEST, headers=headers, timeout=30)
                    assert refused.status_code == 401, (start, server, bad, refused.text)
                    assert "resource_metadata=" in refused.headers["www-authenticate"]
            accepted = httpx.post(
                endpoint(base_url, "monitoring-tools"),
                json=INITIALIZE_REQUEST,
                headers={**accept, "Authorization": f"Bearer {token}"},
                timeout=30,
            )
            assert accepted.status_code == 200, (start, accepted.text)
        finally:
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=DEADLINE_SECONDS) == 0, log.text[-3000:]


@pytest.mark.e2e
def test_a_daemon_asked_to_bind_beyond_loopback_exits_2_and_says_why():
    process, log = start_daemon(daemon_env(VALOR_HTTP_HOST="0.0.0.0"))
    assert process.wait(timeout=DEADLINE_SECONDS) == 2, log.text[-3000:]
    wait_until(lambda: "Refusing to host on 0.0.0.0" in log.text, 10, "the reason in the log")


async def test_once_daydream_force_runs_on_a_busy_machine(store, settings, monkeypatch):
    from scheduler.daemon import run_once

    configure(monkeypatch, VALOR_DAYDREAM_BUSY_MEMORY_PERCENT="0.1")  # always "busy"
    busy = get_settings()
    skipped = await run_once(busy, "daydream", owns_process=False)
    forced = await run_once(busy, "daydream", owns_process=False, force=True)
    assert skipped.ok and skipped.data["status"] == "skipped"
    assert forced.ok and forced.data["status"] == "completed", forced.detail
    assert forced.data["phases"][0]["detail"].startswith("forced; the machine is busy")


def test_force_is_only_for_once_daydream():
    completed = subprocess.run(
        [sys.executable, "-m", "scheduler.cli", "daemon", "--once", "health", "--force"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 2 and "only with --once daydream" in completed.stderr
