"""notion-tools: answer questions about the projects in configured Notion workspaces."""

from __future__ import annotations

from typing import Annotated, Literal

from fastmcp import Context
from pydantic import BaseModel, Field

from servers.core import notion_projects
from servers.core.app import create_server, deferred
from servers.core.progress import Steps, from_context
from servers.core.settings import get_settings

mcp = create_server(
    "notion-tools",
    instructions=(
        "Read project databases in Notion: list the configured workspaces and answer questions "
        "about a workspace's projects (status, priority, title, link)."
    ),
)


class ProjectRow(BaseModel):
    title: str
    status: str = Field(description="Empty when the database has no status")
    priority: str = Field(description="Empty when the database has no priority")
    url: str = Field(description="The row's Notion page")
    last_edited: str = Field(description="ISO 8601, as Notion reports it")


class ProjectAnswer(BaseModel):
    workspace: str
    question: str
    answer: str
    answer_source: Literal["model", "listing"] = Field(
        description="'model' when the configured OpenAI model wrote the answer"
    )
    total_rows: int = Field(description="Rows read from the workspace's database")
    rows: list[ProjectRow] = Field(description="Rows matching the question (all if none did)")
    filtered: bool = Field(description="True when rows were narrowed by the question's terms")
    note: str = Field(default="", description="Anything that went partly wrong")


class Workspace(BaseModel):
    name: str
    database_id: str


class WorkspaceList(BaseModel):
    workspaces: list[Workspace]
    configured: bool = Field(description="True when NOTION_API_KEY is set")


@mcp.tool(
    annotations={"readOnlyHint": True, "openWorldHint": True},
    meta=deferred("notion projects tasks status priorities roadmap", max_result_chars=100_000),
)
async def query_notion_projects(
    workspace: Annotated[
        str,
        Field(
            min_length=1,
            max_length=200,
            description="Workspace name as listed by list_notion_workspaces (any case)",
        ),
    ],
    question: Annotated[
        str,
        Field(
            min_length=1,
            max_length=2000,
            description="What to find out, e.g. 'which high priority tasks are in progress?'",
        ),
    ],
    ctx: Context | None = None,
) -> ProjectAnswer:
    """Answer a question from a Notion workspace's project rows (title, status, priority, link)."""
    steps = Steps(from_context(ctx), notion_projects.QUERY_STEPS)
    result = await notion_projects.query_projects(workspace, question, progress=steps)
    return ProjectAnswer(**result)


@mcp.tool(
    annotations={"readOnlyHint": True, "openWorldHint": False},
    meta=deferred("notion workspaces configured databases"),
)
def list_notion_workspaces() -> WorkspaceList:
    """The workspace names query_notion_projects accepts, with their Notion database ids."""
    settings = get_settings()
    workspaces = [
        Workspace(name=name, database_id=database_id)
        for name, database_id in sorted(notion_projects.known_workspaces(settings).items())
    ]
    return WorkspaceList(workspaces=workspaces, configured=settings.notion_api_key is not None)


if __name__ == "__main__":
    mcp.run(show_banner=False)
