"""The health figures in the Prometheus text exposition format (rendered by prometheus_client)."""

from __future__ import annotations

from servers.core.health import HealthReport

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def to_prometheus(report: HealthReport) -> str:
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import GaugeMetricFamily

    def gauge(name: str, doc: str, value: float | None = None, labels: list[str] | None = None):
        family = GaugeMetricFamily(f"valor_{name}", doc, labels=labels)
        if value is not None:
            family.add_metric([], value)
        return family

    def families():
        machine = report.machine
        yield gauge("health_score", "100 minus the penalties of the active alerts", report.score)
        status = gauge("health_status", "1 for the current status", labels=["status"])
        for name in ("healthy", "degraded", "critical"):
            status.add_metric([name], 1.0 if report.status == name else 0.0)
        yield status
        yield gauge("cpu_percent", "Machine CPU use", machine.cpu_percent)
        yield gauge("memory_percent", "Machine memory use", machine.memory_percent)
        yield gauge("memory_used_bytes", "Machine memory in use", machine.memory_used_bytes)
        yield gauge("disk_percent", "Disk use where the data dir lives", machine.disk_percent)
        yield gauge(
            "disk_free_bytes", "Free disk where the data dir lives", machine.disk_free_bytes
        )
        yield gauge("store_bytes", "SQLite store size with WAL", report.store_bytes)
        yield gauge("stale_processes", "Stale Valor-started processes", report.stale_processes)
        count = gauge("processes", "Valor processes by kind", labels=["kind"])
        rss = gauge("process_rss_bytes", "Resident memory by kind", labels=["kind"])
        cpu = gauge("process_cpu_percent", "CPU by kind (100 = one core)", labels=["kind"])
        for group in [*report.valor_processes, report.claude_processes]:
            count.add_metric([group.kind], group.count)
            rss.add_metric([group.kind], group.rss_bytes)
            cpu.add_metric([group.kind], group.cpu_percent)
        yield from (count, rss, cpu)
        sessions = gauge("claude_sessions", "Open Claude Code sessions", labels=["state"])
        for state in ("open", "live", "gone"):
            sessions.add_metric([state], getattr(report.sessions, state))
        yield sessions
        queues = gauge("queue_depth", "Pending work per queue", labels=["queue"])
        for name, depth in report.queues.items():
            queues.add_metric([name], depth)
        yield queues
        labels = ["server", "tool"]
        calls = gauge(
            "tool_calls", f"Tool calls in the last {report.window_hours:g} h", labels=labels
        )
        failures = gauge("tool_failures", "Failed tool calls in the window", labels=labels)
        latency = gauge(
            "tool_latency_ms", "Tool latency in the window", labels=[*labels, "quantile"]
        )
        for tool in report.tools:
            key = [tool.server, tool.tool]
            calls.add_metric(key, tool.calls)
            failures.add_metric(key, tool.failures)
            for quantile, value in (("0.5", tool.latency_p50_ms), ("0.95", tool.latency_p95_ms)):
                if value is not None:
                    latency.add_metric([*key, quantile], value)
        yield from (calls, failures, latency)
        alerts = gauge("alerts", "Active alerts by severity", labels=["severity"])
        for severity in ("warning", "critical"):
            alerts.add_metric([severity], sum(1 for a in report.alerts if a.severity == severity))
        yield alerts

    class _Snapshot:
        def collect(self):
            return families()

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot())
    return generate_latest(registry).decode("utf-8")
