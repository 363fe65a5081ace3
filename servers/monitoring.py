"""monitoring-tools: honest health, safe cleanup, and the tool-call metrics the hooks record."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, Field

from servers.core.app import create_server, deferred
from servers.core.cleanup import CleanupReport, cleanup
from servers.core.health import HealthReport, collect_health
from servers.core.principals import OPERATOR_TAG
from servers.core.settings import get_settings
from servers.core.store import get_store

mcp = create_server(
    "monitoring-tools",
    instructions="Health of the machine and of Valor's own processes and tools; cleanup of what "
    "Valor started and left behind; metrics for a monitoring system.",
)

CPU_SAMPLE_SECONDS = 0.5

WindowArg = Annotated[
    float | None,
    Field(
        gt=0,
        le=24 * 90,
        description="Hours of tool-call history to judge (default VALOR_HEALTH_WINDOW_HOURS, 24)",
    ),
]


class MetricsExport(BaseModel):
    format: Literal["json", "prometheus"]
    content_type: str
    body: str = Field(description="The document to serve to the monitoring system as is")


def _health(window_hours: float | None) -> HealthReport:
    settings = get_settings()
    return collect_health(
        get_store(),
        settings.data_dir,
        window_hours=window_hours or settings.health_window_hours,
        max_age_hours=settings.process_max_age_hours,
        sample_seconds=CPU_SAMPLE_SECONDS,
        telegram_down_alert_seconds=settings.telegram_down_alert_seconds,
    )


@mcp.tool(
    tags={OPERATOR_TAG},
    annotations={"readOnlyHint": True, "openWorldHint": False},
    meta=deferred("health, status, errors, uptime, disk space, database size"),
)
def system_health(window_hours: WindowArg = None) -> HealthReport:
    """Check whether Valor and its machine are healthy: a 0-100 score with alerts and actions.

    Covers CPU, memory and disk, Valor's and its Claude Code runs' processes, tool success rate
    and latency per tool, queue depth and store size."""
    return _health(window_hours)


def valor_temp_dirs() -> list[Path]:
    """Valor's temporary directories: its own, and the bridge's per-run MCP configs."""
    settings = get_settings()
    return [settings.temp_path, settings.data_dir / "run"]


@mcp.tool(
    tags={OPERATOR_TAG},
    annotations={"readOnlyHint": False, "destructiveHint": True, "openWorldHint": False},
    meta=deferred("clean up old files, free disk space, temp media logs"),
)
def cleanup_resources(
    dry_run: Annotated[
        bool, Field(description="Only report what would be done (the default); false acts")
    ] = True,
    max_age_hours: Annotated[
        float,
        Field(
            ge=0,
            le=24 * 365,
            description="Valor-started runs and temporary files older than this are stale",
        ),
    ] = 24,
) -> CleanupReport:
    """Free resources Valor left behind: stale processes, old temporary files, old metrics.

    Ends stale processes Valor started (matched by pid and create time, whole tree, SIGTERM then
    SIGKILL), checkpoints and vacuums the store. Processes Valor did not start are never touched,
    whatever their name."""
    settings = get_settings()
    return cleanup(
        get_store(),
        valor_temp_dirs(),
        settings.data_dir,
        dry_run=dry_run,
        max_age_hours=max_age_hours,
        retention_days=settings.metrics_retention_days,
        grace_seconds=settings.cleanup_grace_seconds,
    )


@mcp.tool(
    tags={OPERATOR_TAG},
    annotations={"readOnlyHint": True, "openWorldHint": False},
    meta=deferred("metrics, Prometheus counters, usage statistics"),
)
def export_metrics(
    format: Annotated[
        Literal["json", "prometheus"],
        Field(description='"json" (the system_health report) or "prometheus" (text format)'),
    ] = "json",
    window_hours: WindowArg = None,
) -> MetricsExport:
    """The system_health figures for a monitoring system: JSON, or Prometheus text exposition."""
    report = _health(window_hours)
    if format == "prometheus":
        from servers.core.metrics_export import PROMETHEUS_CONTENT_TYPE, to_prometheus

        return MetricsExport(
            format="prometheus", content_type=PROMETHEUS_CONTENT_TYPE, body=to_prometheus(report)
        )
    return MetricsExport(
        format="json",
        content_type="application/json",
        body=json.dumps(report.model_dump(mode="json"), ensure_ascii=False),
    )


class ChatSpend(BaseModel):
    chat_id: int
    spent_usd: float = Field(description="What this chat's bridge runs cost today")
    runs: int = Field(description="Bridge runs that cost something today")
    share_of_cap: float | None = Field(
        description="spent_usd over VALOR_BUDGET_PER_CHAT_DAY_USD (1.0 = capped); null: no cap"
    )


class SpendingCaps(BaseModel):
    per_run_usd: float | None = Field(description="VALOR_BUDGET_PER_RUN_USD")
    per_chat_day_usd: float | None = Field(description="VALOR_BUDGET_PER_CHAT_DAY_USD")
    per_day_usd: float | None = Field(description="VALOR_BUDGET_PER_DAY_USD")


class SpendingReport(BaseModel):
    day: str = Field(description="The UTC day reported (caps reset at its end)")
    total_usd: float = Field(description="Every chat's spend today")
    caps: SpendingCaps
    held_messages: int = Field(description="Messages waiting because a cap was reached")
    chats: list[ChatSpend] = Field(description="Spend per chat, the biggest first")


@mcp.tool(
    tags={OPERATOR_TAG},
    annotations={"readOnlyHint": True, "openWorldHint": False},
    meta=deferred("spending, cost per chat, budget caps, dollars spent today"),
)
def spending_report() -> SpendingReport:
    """Today's Claude Code spend per chat and overall, against the spending caps, with how many
    messages wait for a cap to reset."""
    from servers.core import spending

    settings, store = get_settings(), get_store()
    window = spending.Window.containing()
    caps = spending.daily_caps(store, settings)  # `valor budget set` overrides the settings
    chat_cap = caps["per-chat-day"]
    chats = [
        ChatSpend(
            chat_id=chat,
            spent_usd=round(cost, 6),
            runs=runs,
            share_of_cap=round(cost / chat_cap, 4) if chat_cap else None,
        )
        for chat, cost, runs in spending.by_chat(store, window)
    ]
    return SpendingReport(
        day=window.day,
        total_usd=round(spending.spent(store, window), 6),
        caps=SpendingCaps(
            per_run_usd=settings.budget_per_run_usd,
            per_chat_day_usd=chat_cap,
            per_day_usd=caps["per-day"],
        ),
        held_messages=len(spending.held(store)),
        chats=chats,
    )


if __name__ == "__main__":
    mcp.run(show_banner=False)
