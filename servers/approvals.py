"""approval-tools: the permission prompt of a bridge run. Claude Code calls ``approve_tool_use``
(``--permission-prompt-tool mcp__approval-tools__approve_tool_use``) before a tool it was not
allowed up front; the chat the run serves (fixed by its token, never an argument) answers."""

from __future__ import annotations

from typing import Annotated, Any

from fastmcp import Context
from pydantic import Field

from servers.core import approvals
from servers.core.app import create_server, deferred
from servers.core.settings import get_settings
from servers.core.store import get_store
from servers.core.trust import current_scope

mcp = create_server(
    approvals.SERVER_NAME,
    instructions="Claude Code's permission prompt for a chat's run: asks the chat whether a "
    "tool may run. Claude Code calls it itself; it is not for the model.",
)


@mcp.tool(
    name=approvals.TOOL_NAME,
    annotations={"readOnlyHint": False, "openWorldHint": True, "idempotentHint": False},
    meta=deferred("permission prompt, approve tool use"),
    # One text block and no structured copy: Claude Code reads the decision from that block.
    output_schema=None,
)
async def approve_tool_use(
    tool_name: Annotated[str, Field(max_length=200, description="The tool Claude Code wants")],
    input: Annotated[dict[str, Any], Field(description="The input it wants to call it with")],
    tool_use_id: Annotated[str, Field(max_length=200, description="The tool use's id")] = "",
    ctx: Context | None = None,
) -> str:
    """Ask the chat this run serves whether a tool may run; answers Claude Code's permission
    prompt with `{"behavior": "allow", "updatedInput": ...}` or `{"behavior": "deny", ...}`.

    Never-ask and read-only Valor tools are allowed and always-deny tools refused at once; a
    tool allowed for this session earlier is allowed; otherwise the question waits for an
    allowlisted user's answer (progress notifications meanwhile) or the timeout."""

    async def still_waiting(seconds: float) -> None:
        if ctx is not None:
            await ctx.report_progress(
                seconds, None, f"waiting for the chat's answer ({seconds:.0f} s)"
            )

    return await approvals.decide_tool_use(
        get_store(),
        get_settings(),
        current_scope().chat_id,
        tool_name,
        input,
        tool_use_id,
        still_waiting,
        read_only=await read_only_valor_tools(),
    )


_read_only: frozenset[str] | None = None


async def read_only_valor_tools() -> frozenset[str]:
    """``mcp__<server>__<tool>`` of every Valor tool annotated read-only (listed once)."""
    global _read_only
    if _read_only is None:
        from servers import load_all

        names = set()
        for server_name, server in load_all().items():
            for tool in await server.list_tools(run_middleware=False):
                if tool.annotations is not None and tool.annotations.read_only_hint:
                    names.add(f"mcp__{server_name}__{tool.name}")
        _read_only = frozenset(names)
    return _read_only


if __name__ == "__main__":
    mcp.run(show_banner=False)
