"""system_health and export_metrics: real figures, a documented formula, two export formats."""

from __future__ import annotations

import json
import subprocess
import time

import pytest
from fastmcp import Client

from servers.core import health
from servers.core.health import THRESHOLDS, HealthReport, collect_health, score_report
from servers.core.processes import register_process
from servers.core.settings import get_settings
from servers.monitoring import mcp


def seed_tool_calls(store, now=None):
    now = now or time.time()
    rows = [
        ("telegram-tools", "search_conversation_history", 1, float(ms), now - 60)
        for ms in range(10, 210, 10)
    ]  # 20 calls, 10..200 ms
    rows += [("social-tools", "search_current_info", 0, 5000.0, now - 30)] * 3
    rows += [("social-tools", "search_current_info", 1, 1000.0, now - 30)]
    rows += [("social-tools", "search_current_info", 1, 1.0, now - 3 * 86400)]  # outside window
    with store.transaction() as conn:
        conn.executemany(
            "INSERT INTO tool_calls (server, tool, success, duration_ms, called_at) "
            "VALUES (?, ?, ?, ?, ?)",
            rows,
        )


@pytest.fixture
def claude_like_process(store):
    """A process this test starts and registers as a Claude Code run."""
    process = subprocess.Popen(["sleep", "30"])
    register_process(store, process.pid, "claude-bridge", ["claude", "-p", "x"], chat_id=7)
    yield process
    process.kill()
    process.wait()


async def test_system_health_shape_and_figures(store, claude_like_process):
    seed_tool_calls(store)
    with store.transaction() as conn:
        conn.execute(
            "INSERT INTO promises (description, kind, status, created_at, updated_at) "
            "VALUES ('later', 'task', 'pending', 0, 0)"
        )
        conn.executemany(
            "INSERT INTO bridge_inbox (chat_id, message_id, text, sent_at, status, received_at) "
            "VALUES (1, ?, 'hi', 0, ?, 0)",
            [(1, "pending"), (2, "running"), (3, "done"), (4, "failed")],
        )
        conn.execute(
            "INSERT INTO bridge_outbox (chat_id, text, status, created_at) "
            "VALUES (1, 'later', 'pending', 0)"
        )
    async with Client(mcp) as client:
        result = await client.call_tool("system_health", {})
    data = result.structured_content
    HealthReport.model_validate(data)
    assert data["machine"]["memory_total_bytes"] > 0
    assert 0 <= data["machine"]["cpu_percent"] <= 100
    assert data["machine"]["disk_percent"] > 0
    assert data["claude_processes"]["pids"] == [claude_like_process.pid]
    assert data["claude_processes"]["rss_bytes"] > 0
    own = {group["kind"]: group for group in data["valor_processes"]}
    assert own["this-server"]["rss_bytes"] > 10_000_000  # this Python process

    tools = {(t["server"], t["tool"]): t for t in data["tools"]}
    search = tools[("telegram-tools", "search_conversation_history")]
    assert (search["calls"], search["failures"], search["success_rate"]) == (20, 0, 1.0)
    assert (search["latency_p50_ms"], search["latency_p95_ms"]) == (100.0, 190.0)
    web = tools[("social-tools", "search_current_info")]
    assert (web["calls"], web["failures"], web["success_rate"]) == (4, 3, 0.25)
    assert data["tool_calls"] == 24
    assert data["tool_success_rate"] == round(21 / 24, 4)
    assert data["queues"] == {"promises": 1, "bridge_inbox": 2, "bridge_outbox": 1}
    assert data["queue_depth"] == 4
    assert data["store_bytes"] > 0

    # 21 of 24 succeeded (87.5 %): a warning, and the score is 100 minus the penalties.
    alerts = {alert["metric"]: alert for alert in data["alerts"]}
    assert alerts["tool_success_rate"]["severity"] == "warning"
    assert alerts["tool_success_rate"]["recommended_action"]
    assert data["score"] == max(0, 100 - sum(a["penalty"] for a in data["alerts"]))


def _report(**changes) -> HealthReport:
    base = {
        "generated_at": "1970-01-01T00:00:00+00:00",
        "score": 100,
        "status": "healthy",
        "machine": {
            "cpu_percent": 10.0,
            "cpu_count": 2,
            "load_average_1m": 0.1,
            "memory_percent": 20.0,
            "memory_used_bytes": 2 * 1024**3,
            "memory_total_bytes": 16 * 1024**3,
            "disk_path": "/",
            "disk_percent": 30.0,
            "disk_free_bytes": 10**11,
        },
        "valor_processes": [
            {"kind": "daemon", "count": 1, "pids": [10], "rss_bytes": 10**8, "cpu_percent": 1.0}
        ],
        "claude_processes": {
            "kind": "claude",
            "count": 0,
            "pids": [],
            "rss_bytes": 0,
            "cpu_percent": 0.0,
        },
        "stale_processes": 0,
        "sessions": {"open": 0, "live": 0, "gone": 0, "bridge": 0, "interactive": 0},
        "window_hours": 24.0,
        "tool_calls": 0,
        "tool_success_rate": None,
        "tools": [],
        "queues": {},
        "queue_depth": 0,
        "store_bytes": 10**6,
        "alerts": [],
    }
    for key, value in changes.items():
        if key in base["machine"]:
            base["machine"][key] = value
        else:
            base[key] = value
    return HealthReport.model_validate(base)


def test_an_idle_healthy_machine_scores_100():
    scored = score_report(_report())
    assert (scored.score, scored.status, scored.alerts) == (100, "healthy", [])


def test_formula_penalties_add_up_and_pick_the_status():
    scored = score_report(
        _report(cpu_percent=96.0, memory_percent=86.0, disk_percent=96.0, stale_processes=2)
    )
    penalties = {alert.metric: (alert.severity, alert.penalty) for alert in scored.alerts}
    assert penalties == {
        "cpu_percent": ("critical", 25),
        "memory_percent": ("warning", 10),
        "disk_percent": ("critical", 30),
        "stale_processes": ("warning", 5),
    }
    assert scored.score == 100 - 25 - 10 - 30 - 5 == 30
    assert scored.status == "critical"
    assert all(alert.recommended_action and alert.message for alert in scored.alerts)

    degraded = score_report(_report(cpu_percent=80.0, queue_depth=100))
    assert degraded.score == 100 - 10 - 15 and degraded.status == "degraded"
    assert score_report(_report(cpu_percent=79.9)).alerts == []  # below the warning threshold


def test_tool_rate_needs_enough_calls_and_latency_uses_the_worst_tool():
    few = score_report(_report(tool_calls=9, tool_success_rate=0.0))
    assert few.alerts == []  # nine calls prove nothing
    tools = [
        {
            "server": "s",
            "tool": name,
            "calls": 10,
            "failures": 0,
            "success_rate": 1.0,
            "latency_p50_ms": p95 / 2,
            "latency_p95_ms": p95,
            "latency_max_ms": p95,
        }
        for name, p95 in (("fast", 50.0), ("slow", 150_000.0))
    ]
    many = score_report(_report(tool_calls=20, tool_success_rate=0.75, tools=tools))
    alerts = {alert.metric: alert for alert in many.alerts}
    assert alerts["tool_success_rate"].severity == "critical"
    assert alerts["tool_latency_p95_ms"].severity == "critical"
    assert "s/slow" in alerts["tool_latency_p95_ms"].message
    assert many.score == 100 - 25 - 15


def test_valor_memory_share_is_judged():
    report = _report(
        claude_processes={
            "kind": "claude",
            "count": 3,
            "pids": [1, 2, 3],
            "rss_bytes": 5 * 1024**3,
            "cpu_percent": 0.0,
        }
    )
    alert = next(a for a in score_report(report).alerts if a.metric == "valor_memory_percent")
    assert alert.severity == "warning" and alert.threshold == 25


def test_every_threshold_has_an_action():
    assert all(t.action and t.warning != t.critical for t in THRESHOLDS.values())


def test_dead_registration_counts_as_stale(store):
    gone = subprocess.Popen(["true"])
    gone.wait()
    register_process(store, gone.pid, "claude", "claude -p gone", create_time=time.time() - 10)
    report = collect_health(store, get_settings().data_dir, sample_seconds=0.05)
    assert report.stale_processes == 1
    assert "stale_processes" in {alert.metric for alert in report.alerts}
    assert (
        health.is_stale(
            health.RegisteredProcess(1, 1, 0.0, "daemon", "", None, 0.0, None), True, 10**9, 24
        )
        is False
    )  # a daemon is never stale by age


async def test_export_metrics_json_and_prometheus(store):
    from prometheus_client.parser import text_string_to_metric_families

    seed_tool_calls(store)
    async with Client(mcp) as client:
        as_json = (await client.call_tool("export_metrics", {})).structured_content
        as_text = (
            await client.call_tool("export_metrics", {"format": "prometheus"})
        ).structured_content
        bad = await client.call_tool("export_metrics", {"format": "xml"}, raise_on_error=False)
    assert as_json["content_type"] == "application/json"
    document = json.loads(as_json["body"])
    HealthReport.model_validate(document)

    assert as_text["content_type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for family in text_string_to_metric_families(as_text["body"]):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    # Each call measures afresh (CPU moves), so check the exposition against itself.
    assert 0 <= samples[("valor_health_score", ())] <= 100
    status = [samples[("valor_health_status", (("status", s),))] for s in ("healthy", "degraded")]
    assert sum(status) + samples[("valor_health_status", (("status", "critical"),))] == 1
    key = (("server", "social-tools"), ("tool", "search_current_info"))
    assert samples[("valor_tool_calls", key)] == 4
    assert samples[("valor_tool_failures", key)] == 3
    latency_key = (("quantile", "0.95"), *key)
    assert samples[("valor_tool_latency_ms", latency_key)] == 5000.0
    assert samples[("valor_queue_depth", (("queue", "promises"),))] == 0
    assert bad.is_error and "[input]" in bad.content[0].text and "prometheus" in bad.content[0].text


async def test_tool_annotations():
    async with Client(mcp) as client:
        tools = {tool.name: tool for tool in await client.list_tools()}
    assert set(tools) == {"system_health", "cleanup_resources", "export_metrics", "spending_report"}
    assert tools["system_health"].annotations.read_only_hint is True
    assert tools["spending_report"].annotations.read_only_hint is True
    assert tools["export_metrics"].annotations.read_only_hint is True
    assert tools["cleanup_resources"].annotations.destructive_hint is True
    assert tools["cleanup_resources"].input_schema["properties"]["dry_run"]["default"] is True


async def test_stdio_entry_answers_the_official_client(store, stdio_client_for):
    seed_tool_calls(store)
    async with stdio_client_for("monitoring-tools") as session:
        result = await session.call_tool("system_health", {"window_hours": 1})
    assert result.structured_content["tool_calls"] == 24
    assert result.structured_content["window_hours"] == 1


def test_sessions_are_counted_live_or_gone(store, claude_like_process):
    import psutil

    gone = subprocess.Popen(["true"])
    gone.wait()
    live_time = psutil.Process(claude_like_process.pid).create_time()
    with store.transaction() as conn:
        conn.executemany(
            "INSERT INTO claude_sessions (session_id, launched_by, pid, create_time, started_at) "
            "VALUES (?, ?, ?, ?, 0)",
            [
                ("live", "bridge", claude_like_process.pid, live_time),
                ("gone", "interactive", gone.pid, time.time() - 5),
                ("reused", "interactive", claude_like_process.pid, live_time - 100),
            ],
        )
        conn.execute(
            "INSERT INTO claude_sessions (session_id, started_at, ended_at) VALUES ('done', 0, 1)"
        )
    stats = health.session_stats(store)
    assert stats.model_dump() == {"open": 3, "live": 1, "gone": 2, "bridge": 1, "interactive": 2}
