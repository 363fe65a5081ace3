"""System health: what the machine, Valor's own processes and its tools are doing.

The score is honest arithmetic over alerts, not a mood: every threshold crossed raises an alert
carrying a penalty, and

    score = max(0, 100 - sum(alert.penalty))
    status: healthy when score >= 80, degraded when >= 50, else critical

| metric                 | warning (penalty)  | critical (penalty) |
|------------------------|--------------------|--------------------|
| cpu_percent (machine)  | >= 80 (10)         | >= 95 (25)         |
| memory_percent         | >= 85 (10)         | >= 95 (25)         |
| disk_percent (data dir)| >= 85 (10)         | >= 95 (30)         |
| tool_success_rate      | < 0.95 (10)        | < 0.80 (25)        |  (>= 10 calls in the window)
| tool_latency_p95_ms    | >= 30 000 (5)      | >= 120 000 (15)    |  (worst tool, >= 5 calls)
| stale_processes        | >= 1 (5)           | >= 5 (15)          |
| queue_depth            | >= 20 (5)          | >= 100 (15)        |
| store_bytes            | >= 1 GiB (5)       | >= 5 GiB (10)      |
| valor_memory_percent   | >= 25 (5)          | >= 50 (15)         |  Valor + its Claude Code runs
| telegram_down_seconds  | >= setting (25)    | >= 4x setting (40) |  see below
| telegram_logged_out    |                    | logged out (40)    |

The Telegram rows read ``DATA_DIR/telegram/status.json``, which the bridge's transport writes on
every connect, loss and stop (bridge/telegram.py): down means not connected and not stopped by
the bridge; the setting is VALOR_TELEGRAM_DOWN_ALERT_SECONDS.

Each alert says what was seen and what to do about it.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from servers.core.model_results import (
    bytes_text,
    duration_text,
    human_bytes,
    human_duration,
    human_percent,
    iso_time,
    percent_text,
)
from servers.core.processes import RegisteredProcess, matching_process, running_registrations
from servers.core.store import Store

# Kinds that are meant to run for days: age alone never makes them stale.
LONG_RUNNING_KINDS = frozenset({"daemon", "bridge", "server", "host", "worker"})
HEALTHY_AT, DEGRADED_AT = 80, 50
MIN_CALLS_FOR_RATE, MIN_CALLS_FOR_LATENCY = 10, 5
GIB = 1024**3


@dataclass(frozen=True)
class Threshold:
    metric: str
    warning: float
    critical: float
    warning_penalty: int
    critical_penalty: int
    higher_is_worse: bool
    action: str

    def check(self, value: float) -> tuple[str, float, int] | None:
        """(severity, threshold crossed, penalty) or None."""
        if self.higher_is_worse:
            if value >= self.critical:
                return "critical", self.critical, self.critical_penalty
            if value >= self.warning:
                return "warning", self.warning, self.warning_penalty
        else:
            if value < self.critical:
                return "critical", self.critical, self.critical_penalty
            if value < self.warning:
                return "warning", self.warning, self.warning_penalty
        return None


THRESHOLDS: dict[str, Threshold] = {
    t.metric: t
    for t in (
        Threshold(
            "cpu_percent",
            80,
            95,
            10,
            25,
            True,
            "Find the busy process (top); Valor's share is in valor_processes. Pause the "
            "daydream or lower VALOR_MAX_CONCURRENT_RUNS if Claude Code runs are the cause.",
        ),
        Threshold(
            "memory_percent",
            85,
            95,
            10,
            25,
            True,
            "Free memory: end stale runs with cleanup_resources(dry_run=False) or lower "
            "VALOR_MAX_CONCURRENT_RUNS.",
        ),
        Threshold(
            "disk_percent",
            85,
            95,
            10,
            30,
            True,
            "Free disk space where VALOR_DATA_DIR lives: run cleanup_resources(dry_run=False) "
            "and remove old media and screenshots.",
        ),
        Threshold(
            "tool_success_rate",
            0.95,
            0.80,
            10,
            25,
            False,
            "Look at the failing tools in `tools` (errors by category in the server log) and "
            "fix their configuration with `valor doctor`.",
        ),
        Threshold(
            "tool_latency_p95_ms",
            30_000,
            120_000,
            5,
            15,
            True,
            "A tool is slow: check the upstream service it calls and its timeout setting.",
        ),
        Threshold(
            "stale_processes",
            1,
            5,
            5,
            15,
            True,
            "Run cleanup_resources(dry_run=True) to review, then dry_run=False to end them.",
        ),
        Threshold(
            "queue_depth",
            20,
            100,
            5,
            15,
            True,
            "Work is piling up: check that the bridge and promise workers are running "
            "(`valor daemon`) and raise VALOR_MAX_CONCURRENT_RUNS if the machine allows.",
        ),
        Threshold(
            "store_bytes",
            1 * GIB,
            5 * GIB,
            5,
            10,
            True,
            "Run cleanup_resources(dry_run=False) to prune old metrics and vacuum the store.",
        ),
        Threshold(
            "valor_memory_percent",
            25,
            50,
            5,
            15,
            True,
            "Valor and its Claude Code runs use much of the machine's memory: end stale runs "
            "with cleanup_resources or lower VALOR_MAX_CONCURRENT_RUNS.",
        ),
    )
}


# -- the report ----------------------------------------------------------------------------------
class MachineStats(BaseModel):
    cpu_percent: float = Field(description="Whole machine, sampled over sample_seconds")
    cpu_count: int
    load_average_1m: float | None
    memory_percent: float
    memory_used_bytes: int
    memory_total_bytes: int
    disk_path: str = Field(description="The filesystem holding the data directory")
    disk_percent: float
    disk_free_bytes: int
    memory_used = bytes_text("memory_used_bytes")
    memory_total = bytes_text("memory_total_bytes")
    disk_free = bytes_text("disk_free_bytes")


class ProcessGroup(BaseModel):
    kind: str = Field(description='Registered kind ("claude", "daemon", ...) or "this-server"')
    count: int
    pids: list[int]
    rss_bytes: int = Field(description="Resident memory of the processes and their children")
    cpu_percent: float = Field(description="Summed over processes and children (100 = one core)")
    rss = bytes_text("rss_bytes")


class ToolStats(BaseModel):
    server: str
    tool: str
    calls: int
    failures: int
    success_rate: float
    success = percent_text("success_rate")
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    latency_max_ms: float | None


class SessionStats(BaseModel):
    open: int = Field(description="Sessions started and not ended")
    live: int = Field(description="Open sessions whose Claude Code process is alive")
    gone: int = Field(description="Open sessions whose process is gone (ended without SessionEnd)")
    bridge: int = Field(description="Open sessions launched by the bridge")
    interactive: int


class TransportStats(BaseModel):
    connected: bool
    stopped: bool = Field(description="Closed by the bridge (a stop, not an outage)")
    logged_out: bool = Field(description="Telegram ended the login: needs the operator")
    changed_at: str | None = Field(description="ISO 8601: when it connected, went down or stopped")
    down_seconds: float | None = Field(description="How long it has been down (None: up/stopped)")
    down = duration_text("down_seconds")
    reconnects: int = Field(description="Reconnections by Valor's watchdog since the bridge began")
    last_error: str


class Alert(BaseModel):
    metric: str
    severity: Literal["warning", "critical"]
    value: float
    threshold: float
    penalty: int = Field(description="Points taken off the score")
    message: str
    recommended_action: str


class HealthReport(BaseModel):
    generated_at: str = Field(description="ISO 8601, UTC")
    score: int = Field(description="100 - sum of alert penalties, at least 0")
    status: Literal["healthy", "degraded", "critical"]
    machine: MachineStats
    valor_processes: list[ProcessGroup] = Field(
        description="Valor's own processes (servers, bridge, daemon) by kind"
    )
    claude_processes: ProcessGroup = Field(description="Claude Code runs Valor started")
    stale_processes: int = Field(
        description="Registrations past their age, or whose process is gone"
    )
    sessions: SessionStats
    window_hours: float
    tool_calls: int
    tool_success_rate: float | None = Field(description="None with no calls in the window")
    tool_success = percent_text("tool_success_rate")
    tools: list[ToolStats]
    queues: dict[str, int] = Field(description="Pending work per queue (absent: no such queue)")
    queue_depth: int
    store_bytes: int
    store = bytes_text("store_bytes")
    telegram: TransportStats | None = Field(
        default=None, description="The bridge's Telegram connection; None: no bridge has run"
    )
    telegram_down_alert_seconds: float = Field(
        default=300.0, description="Down this long raises an alert (a setting)"
    )
    telegram_down_alert = duration_text("telegram_down_alert_seconds")
    alerts: list[Alert]


# -- measuring -----------------------------------------------------------------------------------
def percentile(sorted_values: list[float], fraction: float) -> float | None:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return None
    rank = max(1, -(-int(fraction * 1000) * len(sorted_values) // 1000))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def tool_stats(store: Store, since: float) -> list[ToolStats]:
    """Per tool: calls, failures, success rate and latency since ``since`` (from the hooks)."""
    rows = store.query(
        "SELECT server, tool, success, duration_ms FROM tool_calls WHERE called_at >= ? "
        "ORDER BY server, tool",
        (since,),
    )
    grouped: dict[tuple[str, str], list[sqlite3.Row]] = {}
    for row in rows:
        grouped.setdefault((row["server"], row["tool"]), []).append(row)
    stats = []
    for (server, tool), calls in grouped.items():
        failures = sum(1 for call in calls if not call["success"])
        durations = sorted(c["duration_ms"] for c in calls if c["duration_ms"] is not None)
        stats.append(
            ToolStats(
                server=server,
                tool=tool,
                calls=len(calls),
                failures=failures,
                success_rate=round((len(calls) - failures) / len(calls), 4),
                latency_p50_ms=percentile(durations, 0.50),
                latency_p95_ms=percentile(durations, 0.95),
                latency_max_ms=durations[-1] if durations else None,
            )
        )
    return stats


def queue_depths(store: Store) -> dict[str, int]:
    """Pending work in the queues that exist in this store (their tables come with other issues)."""
    queries = {
        "promises": "SELECT count(*) FROM promises "
        "WHERE status IN ('waiting', 'pending', 'running')",
        "bridge_inbox": "SELECT count(*) FROM bridge_inbox WHERE status IN ('pending', 'running')",
        "bridge_outbox": "SELECT count(*) FROM bridge_outbox WHERE status = 'pending'",
    }
    depths = {}
    for name, sql in queries.items():
        try:
            depths[name] = int(store.query(sql)[0][0])
        except sqlite3.OperationalError:  # table or column not in this store (yet)
            continue
    return depths


def session_stats(store: Store) -> SessionStats:
    rows = store.query(
        "SELECT launched_by, pid, create_time FROM claude_sessions WHERE ended_at IS NULL"
    )
    live = gone = 0
    for row in rows:
        if row["pid"] is None or row["create_time"] is None:
            continue
        if matching_process(row["pid"], row["create_time"]) is not None:
            live += 1
        else:
            gone += 1
    bridge = sum(1 for row in rows if row["launched_by"] == "bridge")
    return SessionStats(
        open=len(rows), live=live, gone=gone, bridge=bridge, interactive=len(rows) - bridge
    )


def is_claude_kind(kind: str) -> bool:
    """The runner registers Claude Code as "claude" or "claude-<launcher>" (e.g. claude-promise)."""
    return kind == "claude" or kind.startswith("claude-")


def is_stale(
    registration: RegisteredProcess, alive: bool, now: float, max_age_hours: float
) -> bool:
    """Gone without being marked ended, or a bounded run alive past its age.

    The exact age is compared (no rounding), and a limit of 0 makes every bounded run stale, even
    one whose create time reads a little after ``now`` (the OS reports starts in 1/100 s ticks).
    """
    if not alive:
        return True
    if registration.kind in LONG_RUNNING_KINDS:
        return False
    return max_age_hours <= 0 or now - registration.create_time > max_age_hours * 3600


@dataclass
class _Tracked:
    kind: str
    root: object  # psutil.Process
    members: list  # root and its descendants


def _tree(process) -> list:  # psutil.Process
    import psutil

    try:
        return [process, *process.children(recursive=True)]
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return [process]


def _group(kind: str, tracked: list[_Tracked]) -> ProcessGroup:
    import psutil

    rss = 0
    cpu = 0.0
    for item in tracked:
        for member in item.members:
            try:
                rss += member.memory_info().rss
                cpu += member.cpu_percent(None)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
    return ProcessGroup(
        kind=kind,
        count=len(tracked),
        pids=[item.root.pid for item in tracked],  # type: ignore[attr-defined]
        rss_bytes=rss,
        cpu_percent=round(cpu, 1),
    )


def collect_health(
    store: Store,
    data_dir: Path,
    window_hours: float = 24.0,
    max_age_hours: float = 24.0,
    sample_seconds: float = 0.5,
    now: float | None = None,
    telegram_down_alert_seconds: float = 300.0,
) -> HealthReport:
    """Measure everything once (CPU over ``sample_seconds``) and score it."""
    import psutil

    now = time.time() if now is None else now
    tracked: list[_Tracked] = []
    stale = 0
    own_pid = os.getpid()
    for registration in running_registrations(store):
        process = matching_process(registration.pid, registration.create_time)
        if is_stale(registration, process is not None, now, max_age_hours):
            stale += 1
        if process is not None:
            tracked.append(_Tracked(registration.kind, process, _tree(process)))
    if all(item.root.pid != own_pid for item in tracked):  # type: ignore[attr-defined]
        this = psutil.Process(own_pid)
        tracked.append(_Tracked("this-server", this, [this]))

    # One sampling window for the machine and every process (cpu_percent needs two readings).
    for item in tracked:
        for member in item.members:
            try:
                member.cpu_percent(None)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
    machine_cpu = psutil.cpu_percent(interval=sample_seconds)

    by_kind: dict[str, list[_Tracked]] = {}
    for item in tracked:
        by_kind.setdefault(item.kind, []).append(item)
    claude_runs = [
        item for kind in list(by_kind) if is_claude_kind(kind) for item in by_kind.pop(kind)
    ]
    claude = _group("claude", claude_runs)
    valor = [_group(kind, items) for kind, items in sorted(by_kind.items())]

    memory = psutil.virtual_memory()
    disk_path = _existing_parent(data_dir)
    disk = psutil.disk_usage(str(disk_path))
    try:
        load = round(os.getloadavg()[0], 2)
    except OSError:
        load = None
    machine = MachineStats(
        cpu_percent=machine_cpu,
        cpu_count=psutil.cpu_count() or 1,
        load_average_1m=load,
        memory_percent=memory.percent,
        memory_used_bytes=memory.total - memory.available,
        memory_total_bytes=memory.total,
        disk_path=str(disk_path),
        disk_percent=disk.percent,
        disk_free_bytes=disk.free,
    )
    tools = tool_stats(store, now - window_hours * 3600)
    calls = sum(t.calls for t in tools)
    failures = sum(t.failures for t in tools)
    queues = queue_depths(store)
    report = HealthReport(
        generated_at=iso_time(now),
        score=100,
        status="healthy",
        machine=machine,
        valor_processes=valor,
        claude_processes=claude,
        stale_processes=stale,
        sessions=session_stats(store),
        window_hours=window_hours,
        tool_calls=calls,
        tool_success_rate=round((calls - failures) / calls, 4) if calls else None,
        tools=tools,
        queues=queues,
        queue_depth=sum(queues.values()),
        store_bytes=store.size_bytes(),
        telegram=transport_status(data_dir, now),
        telegram_down_alert_seconds=telegram_down_alert_seconds,
        alerts=[],
    )
    return score_report(report)


def transport_status(data_dir: Path, now: float | None = None) -> TransportStats | None:
    """The Telegram transport as its bridge last wrote it (None: no bridge has run here)."""
    now = time.time() if now is None else now
    try:
        raw = json.loads((Path(data_dir) / "telegram" / "status.json").read_text())
        connected, stopped = bool(raw["connected"]), bool(raw.get("stopped", False))
        since = float(raw.get("since") or 0) or None
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:  # half-written or foreign
        return TransportStats(
            connected=False,
            stopped=False,
            logged_out=False,
            changed_at=None,
            down_seconds=None,
            reconnects=0,
            last_error=f"telegram/status.json unreadable: {exc}",
        )
    down = not connected and not stopped
    return TransportStats(
        connected=connected,
        stopped=stopped,
        logged_out=bool(raw.get("logged_out", False)),
        changed_at=iso_time(since),
        down_seconds=round(max(0.0, now - since), 1) if down and since else None,
        reconnects=int(raw.get("reconnects", 0)),
        last_error=str(raw.get("last_error", "")),
    )


def transport_alerts(report: HealthReport) -> list[Alert]:
    """A dead Telegram transport: logged out, or down past the configured time."""
    telegram = report.telegram
    if telegram is None:
        return []
    if telegram.logged_out:
        return [
            Alert(
                metric="telegram_logged_out",
                severity="critical",
                value=1,
                threshold=1,
                penalty=40,
                message=f"Telegram ended Valor's login: {telegram.last_error or 'logged out'}",
                recommended_action="Run `valor login` (user account) or check "
                "TELEGRAM_BOT_TOKEN (bot), then restart the bridge (`valor daemon`).",
            )
        ]
    after = report.telegram_down_alert_seconds
    down = telegram.down_seconds
    if down is None or down < after:
        return []
    critical = down >= 4 * after
    crossed = 4 * after if critical else after
    return [
        Alert(
            metric="telegram_down_seconds",
            severity="critical" if critical else "warning",
            value=down,
            threshold=crossed,
            penalty=40 if critical else 25,
            message=f"Telegram has been unreachable for {human_duration(down)} "
            f"(alert after {human_duration(crossed)}): {telegram.last_error or 'no connection'}",
            recommended_action="The bridge keeps reconnecting by itself and answers what was "
            "sent meanwhile. Check the machine's network and Telegram's status; the bridge log "
            "(`valor daemon`) has each attempt.",
        )
    ]


def _existing_parent(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


# -- scoring -------------------------------------------------------------------------------------
def observed_metrics(report: HealthReport) -> dict[str, tuple[float, str]]:
    """metric -> (value, what it is) for every metric the thresholds judge."""
    observed: dict[str, tuple[float, str]] = {
        "cpu_percent": (report.machine.cpu_percent, "machine CPU use"),
        "memory_percent": (report.machine.memory_percent, "machine memory use"),
        "disk_percent": (report.machine.disk_percent, f"disk use at {report.machine.disk_path}"),
        "stale_processes": (report.stale_processes, "stale Valor-started processes"),
        "queue_depth": (report.queue_depth, "pending work in the queues"),
        "store_bytes": (report.store_bytes, "store size"),
    }
    if report.tool_success_rate is not None and report.tool_calls >= MIN_CALLS_FOR_RATE:
        observed["tool_success_rate"] = (
            report.tool_success_rate,
            f"tool-call success rate over {report.tool_calls} calls",
        )
    slow = [
        t for t in report.tools if t.calls >= MIN_CALLS_FOR_LATENCY and t.latency_p95_ms is not None
    ]
    if slow:
        worst = max(slow, key=lambda t: t.latency_p95_ms or 0)
        observed["tool_latency_p95_ms"] = (
            worst.latency_p95_ms or 0.0,
            f"p95 latency of {worst.server}/{worst.tool} in ms",
        )
    if report.machine.memory_total_bytes:
        used = sum(g.rss_bytes for g in report.valor_processes) + report.claude_processes.rss_bytes
        observed["valor_memory_percent"] = (
            round(100 * used / report.machine.memory_total_bytes, 2),
            "share of machine memory used by Valor and its Claude Code runs",
        )
    return observed


def _read(metric: str, value: float) -> str:
    """A judged figure as the alert's message shows it: sizes and rates in a person's units."""
    if metric.endswith("_bytes"):
        return str(human_bytes(value))
    if metric.endswith("_rate"):
        return str(human_percent(value))
    if metric.endswith("_seconds"):
        return str(human_duration(value))
    return f"{value:g}"


def score_report(report: HealthReport) -> HealthReport:
    """Fill in alerts, score and status from the measured figures (see the module docstring)."""
    alerts = []
    for metric, (value, what) in observed_metrics(report).items():
        threshold = THRESHOLDS[metric]
        verdict = threshold.check(value)
        if verdict is None:
            continue
        severity, crossed, penalty = verdict
        comparison = ">=" if threshold.higher_is_worse else "<"
        alerts.append(
            Alert(
                metric=metric,
                severity=severity,  # type: ignore[arg-type]
                value=value,
                threshold=crossed,
                penalty=penalty,
                message=f"{what} is {_read(metric, value)} ({severity}: {comparison} "
                f"{_read(metric, crossed)})",
                recommended_action=threshold.action,
            )
        )
    alerts += transport_alerts(report)
    score = max(0, 100 - sum(alert.penalty for alert in alerts))
    status = (
        "healthy" if score >= HEALTHY_AT else "degraded" if score >= DEGRADED_AT else "critical"
    )
    return report.model_copy(update={"alerts": alerts, "score": score, "status": status})
