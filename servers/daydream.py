"""daydream-tools: a periodic look at the workspaces, the promise queue and recent activity."""

from __future__ import annotations

from typing import Annotated, Any

from fastmcp import Context
from pydantic import BaseModel, Field

from servers.core import daydream
from servers.core.app import create_server, deferred
from servers.core.history import iso
from servers.core.model_results import duration_text, human_duration
from servers.core.principals import OPERATOR_TAG
from servers.core.progress import Steps, from_context
from servers.core.settings import get_settings
from servers.core.store import get_store

mcp = create_server(
    "daydream-tools",
    instructions="Run Valor's daydream (context of the configured workspaces, promise queue and "
    "recent activity, with a model's suggestions written to the insights file) and read past "
    "sessions.",
)

MONITORING_SERVER = "monitoring-tools"


class PhaseResult(BaseModel):
    name: str = Field(description="readiness, pre_cleanup, context, analysis, output, post_cleanup")
    status: str = Field(description="done, skipped or failed")
    seconds: float
    duration = duration_text("seconds")
    detail: str
    data: dict[str, Any] = Field(default_factory=dict)


class DaydreamSession(BaseModel):
    session_id: str = Field(description="Correlation id of the session (in logs and insights)")
    status: str = Field(description="completed, skipped, failed or interrupted")
    dry_run: bool
    started_at: str
    finished_at: str | None
    duration: str | None = Field(description="From start to finish, readable")
    skip_reason: str | None
    analysis_status: str | None = Field(description="done, or skipped (the reason is in phases)")
    insights_path: str | None
    summary: str
    phases: list[PhaseResult]


class DaydreamHistory(BaseModel):
    sessions: list[DaydreamSession]


def _session(item: dict[str, Any]) -> DaydreamSession:
    return DaydreamSession(
        session_id=item["id"],
        status=item["status"],
        dry_run=item["dry_run"],
        started_at=iso(item["started_at"]),
        finished_at=iso(item["finished_at"]) if item["finished_at"] else None,
        duration=human_duration(item["finished_at"] - item["started_at"])
        if item["finished_at"]
        else None,
        skip_reason=item["skip_reason"],
        analysis_status=item["analysis_status"],
        insights_path=item["insights_path"],
        summary=item["summary"],
        phases=[PhaseResult(**phase) for phase in item["phases"]],
    )


def _monitoring_cleanup() -> daydream.CleanupCall | None:
    """cleanup_resources as a real MCP tool call to monitoring-tools, when it is installed."""
    from servers import SERVERS, load_server

    if MONITORING_SERVER not in SERVERS:
        return None

    async def cleanup(dry_run: bool) -> dict[str, Any]:
        from fastmcp import Client

        async with Client(load_server(MONITORING_SERVER)) as client:
            result = await client.call_tool(
                "cleanup_resources", {"dry_run": dry_run}, raise_on_error=False
            )
        if result.is_error:
            text = " ".join(getattr(block, "text", "") for block in result.content)
            return {"_status": "failed", "_detail": f"cleanup_resources: {text[:300]}"}
        data = result.structured_content or {}
        return {"_detail": "cleanup_resources " + ("(dry run)" if dry_run else "done"), **data}

    return cleanup


@mcp.tool(
    tags={OPERATOR_TAG},
    annotations={"readOnlyHint": False, "destructiveHint": False, "openWorldHint": True},
    meta=deferred("daydream reflect on recent work, ideas and insights", max_result_chars=100_000),
)
async def run_daydream(
    workspaces: Annotated[
        list[str] | None,
        Field(
            description="Configured workspaces to look at, by name or path (default: all of "
            "them); others are refused."
        ),
    ] = None,
    dry_run: Annotated[
        bool, Field(description="Measure and analyse, but write no file and clean nothing")
    ] = False,
    force: Annotated[
        bool,
        Field(
            description="Run even when the machine is busy or promises are waiting (the reason "
            "is recorded in the readiness phase)"
        ),
    ] = False,
    ctx: Context | None = None,
) -> DaydreamSession:
    """One daydream session: readiness, pre-cleanup, context, analysis, output, post-cleanup.

    Reports progress at each phase (and while the model thinks); it can take minutes."""
    settings = get_settings()
    chosen = daydream.choose_workspaces(settings, workspaces)
    store = get_store()
    report = await daydream.run_session(
        store,
        settings,
        workspaces=chosen,
        dry_run=dry_run,
        cleanup=_monitoring_cleanup(),
        force=force,
        progress=Steps(from_context(ctx), 6),
    )
    return _session(daydream.history_item(store, report.session_id))


@mcp.tool(
    tags={OPERATOR_TAG},
    annotations={"readOnlyHint": True, "openWorldHint": False},
    meta=deferred("past daydreams, earlier insights", max_result_chars=100_000),
)
def daydream_history(
    limit: Annotated[int, Field(ge=1, le=100, description="Newest N sessions")] = 10,
) -> DaydreamHistory:
    """Past daydream sessions, newest first, with each phase's timing and outcome."""
    return DaydreamHistory(sessions=[_session(s) for s in daydream.history(get_store(), limit)])


if __name__ == "__main__":
    mcp.run(show_banner=False)
