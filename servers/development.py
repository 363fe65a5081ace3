"""development-tools: workspace screenshots and the bug-report workflow."""

from __future__ import annotations

from typing import Annotated, Literal

from fastmcp import Context
from pydantic import BaseModel, Field

from servers.core import bug_reports, screenshots
from servers.core.app import create_server, deferred
from servers.core.model_results import bytes_text, duration_text, more_note
from servers.core.settings import get_settings
from servers.core.trust import ChatIdArg, resolve_chat_id

mcp = create_server(
    "development-tools",
    instructions=(
        "Workspace screenshots saved under a task id (SCREENSHOTS_DIR/chats/<chat>/<task_id>/, "
        "each chat its own), analyzed by "
        "the vision model, and a bug-report workflow that has headless Claude Code reproduce a "
        "bug, capture a Playwright screenshot and report steps, observed and expected behaviour."
    ),
)

TaskIdArg = Annotated[
    str,
    Field(
        min_length=1,
        max_length=200,
        description="Task id: 1-128 letters, digits, '-' or '_' (a Notion page id works); "
        "screenshots live in the chat's screenshots folder under <task_id>/.",
    ),
]


class ScreenshotInfo(BaseModel):
    task_id: str
    path: str = Field(description="Absolute path of the image file")
    relative_path: str = Field(
        description="<task_id>/<file name>, relative to the chat's screenshots folder"
    )
    size_bytes: int
    size = bytes_text("size_bytes")
    modified_at: str = Field(description="Last written, ISO 8601 UTC")
    age_seconds: float
    age = duration_text("age_seconds")


class ScreenshotList(BaseModel):
    directory: str = Field(
        description="The chat's screenshots folder (the operator with no chat: the root of all)"
    )
    task_id: str | None = Field(description="The task listed; null means every task")
    screenshots: list[ScreenshotInfo] = Field(description="Newest first")
    truncated: bool = Field(description="True when older screenshots were left out")
    how_to_see_more: str | None = Field(description="When truncated: how to see the others")


class WorkspaceScreenshot(ScreenshotInfo):
    mime_type: str = Field(description="Detected from the file's bytes")
    analysis: str = Field(description="What the vision model sees in the screenshot")
    model: str
    chat_id: int | None = Field(description="The chat this was for, if any")


class BugReportResult(BaseModel):
    status: Literal["complete", "no_screenshot", "run_failed"] = Field(
        description="complete: a screenshot was captured during the run; no_screenshot: the "
        "run finished without one; run_failed: the run failed and left none"
    )
    notion_task_id: str
    task_description: str
    steps: list[str] = Field(description="Steps to reproduce, as Claude Code reported them")
    observed: str
    expected: str
    screenshot_path: str | None = Field(description="The screenshot captured during this run")
    screenshot_age_seconds: float | None = None
    screenshot_age = duration_text("screenshot_age_seconds")
    analysis: str = Field(description="The vision model's reading of the screenshot")
    analysis_model: str = ""
    claude_status: str = Field(description="ok, error, timeout or cancelled")
    claude_session_id: str | None = None
    claude_seconds: float
    claude_duration = duration_text("claude_seconds")
    notes: list[str] = Field(description="Anything that went partly wrong, in words")
    chat_id: int | None = None
    delivery: str = Field(description="What happened to the chat delivery; empty: none asked")
    report: str = Field(description="The whole report as text, ready to send")


def _info(shot: screenshots.Screenshot) -> dict:
    return {
        "task_id": shot.task_id,
        "path": str(shot.path),
        "relative_path": shot.relative,
        "size_bytes": shot.size,
        "modified_at": shot.modified_iso,
        "age_seconds": round(shot.age_seconds(), 3),
    }


@mcp.tool(
    annotations={"readOnlyHint": True, "openWorldHint": True},
    meta=deferred("screenshot of a web page or local app, browser capture"),
)
async def retrieve_workspace_screenshot(
    task_id: TaskIdArg,
    chat_id: ChatIdArg = "",
    max_age_minutes: Annotated[
        float,
        Field(gt=0, le=7 * 24 * 60, description="Refuse a newest screenshot older than this"),
    ] = 10,
) -> WorkspaceScreenshot:
    """Find the task's newest screenshot, refuse it if missing or stale, and analyze it."""
    chat = resolve_chat_id(chat_id, required=False)
    settings = get_settings()
    # Only the caller's chat folder is searched: another chat's task reads as one with no shot.
    bases = screenshots.screenshot_bases(settings, chat)
    shot = screenshots.newest_screenshot(bases, task_id, max_age_minutes)
    question = screenshots.screenshot_question(shot.task_id)
    analysis = await screenshots.analyze_screenshot(shot, question, settings)
    return WorkspaceScreenshot(**_info(shot), **analysis, chat_id=chat)


@mcp.tool(
    annotations={"readOnlyHint": True, "openWorldHint": False},
    meta=deferred("screenshots taken earlier", max_result_chars=100_000),
)
def list_workspace_screenshots(
    task_id: Annotated[
        str | None,
        Field(max_length=200, description="Only this task's screenshots; empty: every task"),
    ] = None,
    limit: Annotated[int, Field(ge=1, le=500, description="How many at most")] = 50,
    chat_id: ChatIdArg = None,
) -> ScreenshotList:
    """List saved workspace screenshots, newest first (in a chat session: that chat's only)."""
    chat = resolve_chat_id(chat_id, required=False)
    settings = get_settings()
    wanted = task_id or None
    shots = screenshots.list_screenshots(
        screenshots.screenshot_bases(settings, chat), wanted, limit=limit + 1
    )
    more = len(shots) > limit
    directory = settings.screenshots_path if chat is None else settings.chat_screenshots_path(chat)
    return ScreenshotList(
        directory=str(directory),
        task_id=wanted,
        screenshots=[ScreenshotInfo(**_info(s)) for s in shots[:limit]],
        truncated=more,
        how_to_see_more=more_note(
            limit, more, "Give a task_id, or raise limit (at most 500) to see older ones."
        ),
    )


@mcp.tool(
    annotations={"readOnlyHint": False, "destructiveHint": True, "openWorldHint": True},
    meta=deferred("file a bug report or issue with a screenshot", max_result_chars=100_000),
)
async def execute_bug_report_with_screenshot(
    task_description: Annotated[
        str,
        Field(min_length=1, max_length=8000, description="The bug: what to do and what goes wrong"),
    ],
    notion_task_id: Annotated[
        str,
        Field(
            min_length=1,
            max_length=200,
            description="The Notion task this bug belongs to; also the screenshot task id",
        ),
    ],
    ctx: Context,
    chat_id: ChatIdArg = "",
) -> BugReportResult:
    """Have headless Claude Code reproduce a bug and capture a Playwright screenshot, then
    analyze it and return a bug report (sent to the chat too when one is given or fixed).
    Reports progress while it runs; it can take minutes."""
    chat = resolve_chat_id(chat_id, required=False)

    async def progress(value: float, message: str) -> None:
        await ctx.report_progress(value, bug_reports.PROGRESS_TOTAL, message)

    report = await bug_reports.run_bug_report(
        task_description, notion_task_id, chat_id=chat, progress=progress
    )
    shot = report.screenshot
    return BugReportResult(
        status=report.status,  # type: ignore[arg-type]
        notion_task_id=report.task_id,
        task_description=report.task_description,
        steps=report.findings.steps,
        observed=report.findings.observed,
        expected=report.findings.expected,
        screenshot_path=str(shot.path) if shot else None,
        screenshot_age_seconds=round(shot.age_seconds(), 3) if shot else None,
        analysis=report.analysis,
        analysis_model=report.analysis_model,
        claude_status=report.claude_status,
        claude_session_id=report.claude_session_id,
        claude_seconds=report.claude_seconds,
        notes=report.notes,
        chat_id=chat,
        delivery=report.delivery,
        report=report.as_text(),
    )


if __name__ == "__main__":
    mcp.run(show_banner=False)
