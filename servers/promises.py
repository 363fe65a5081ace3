"""promise-tools: background work Valor committed to, reported back to the chat when done."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field

from servers.core import promises
from servers.core.app import create_server, deferred
from servers.core.errors import ValorError
from servers.core.history import iso
from servers.core.model_results import more_note
from servers.core.settings import get_settings
from servers.core.store import get_store
from servers.core.trust import resolve_chat_id

mcp = create_server(
    "promise-tools",
    instructions="Queue long work (a Claude Code task, a research question) that reports back to "
    "the chat when done; check on it or cancel it. Promises run in `valor daemon` or `valor "
    "worker`.",
)

Kind = Literal["research", "claude_code"]
Status = Literal["waiting", "pending", "running", "completed", "failed", "cancelled"]


class PromiseInfo(BaseModel):
    id: int
    description: str
    kind: str
    chat_id: int | None
    status: str = Field(description="waiting → pending → running → completed | failed | cancelled")
    result: str | None = Field(description="The outcome text when completed")
    error: str | None = Field(description="Why it failed or was cancelled")
    recoveries: int = Field(description="Times a crashed worker's run was started again (max 1)")
    delivery: str | None = Field(description="How the outcome reached (or did not reach) the chat")
    note: str | None = Field(default=None, description="Why a promise waits, when it does")
    created_at: str
    started_at: str | None
    finished_at: str | None


class PromiseList(BaseModel):
    status: str | None
    promises: list[PromiseInfo]
    truncated: bool = Field(description="True when older promises were left out")
    how_to_see_more: str | None = Field(description="When truncated: how to see the others")


def _info(promise: promises.Promise) -> PromiseInfo:
    return PromiseInfo(
        id=promise.id,
        description=promise.description,
        kind=promise.kind,
        chat_id=promise.chat_id,
        status=promise.status,
        result=promise.result,
        error=promise.error,
        recoveries=promise.recoveries,
        delivery=promise.delivery,
        created_at=iso(promise.created_at),
        started_at=iso(promise.started_at) if promise.started_at else None,
        finished_at=iso(promise.finished_at) if promise.finished_at else None,
    )


def _visible(promise: promises.Promise) -> promises.Promise:
    """A chat session sees only its own chat's promises (trusted context)."""
    scope = resolve_chat_id(None, required=False)
    if scope is not None and promise.chat_id != scope:
        raise promises.missing_promise(promise.id)  # the same answer as for no such promise
    return promise


@mcp.tool(
    annotations={"readOnlyHint": False, "destructiveHint": False, "openWorldHint": True},
    meta=deferred("long or background work, do it later and report back, async job"),
)
def create_promise(
    description: Annotated[
        str,
        Field(
            description="The work, as the instruction for it: the research question or the "
            "Claude Code task.",
            min_length=1,
            max_length=8000,
        ),
    ],
    kind: Annotated[
        Kind,
        Field(
            description="research: a web question answered with sources; claude_code: a long "
            "development task run by headless Claude Code"
        ),
    ] = "research",
    chat_id: Annotated[
        int | str | None,
        Field(
            description="Chat to report to. Leave empty in a chat session (fixed by the bridge)."
        ),
    ] = None,
) -> PromiseInfo:
    """Commit to background work; it runs in the queue and reports back to the chat when done.
    Refused at once ([config]) when what its kind needs is not configured."""
    chat = resolve_chat_id(chat_id, required=False)
    promises.check_kind_configured(kind, get_settings())
    store = get_store()
    try:
        queue, note = promises.get_queue(), None
    except ValorError as exc:  # recorded anyway: a worker queues it when the queue is back
        queue, note = None, f"The queue is unavailable ({exc.detail}); the promise waits."
    info = _info(promises.create_promise(store, queue, description, kind, chat))
    if info.status == "waiting":
        info.note = note or "The queue refused it for now; a worker queues it when it starts."
    return info


@mcp.tool(
    annotations={"readOnlyHint": True, "openWorldHint": False},
    meta=deferred("background job progress, result of a promise"),
)
def promise_status(
    promise_id: Annotated[int, Field(ge=1, description="The id create_promise returned")],
) -> PromiseInfo:
    """Check one background job (promise): its state, and its result or error when finished."""
    return _info(_visible(promises.get_promise(get_store(), promise_id)))


@mcp.tool(
    annotations={"readOnlyHint": True, "openWorldHint": False},
    meta=deferred(
        "queued tasks, work in progress: pending, running, done", max_result_chars=100_000
    ),
)
def list_promises(
    status: Annotated[Status | None, Field(description="Only promises in this state")] = None,
    limit: Annotated[int, Field(ge=1, le=200, description="Newest N")] = 20,
) -> PromiseList:
    """List background jobs (promises), newest first; in a chat session that chat's only."""
    scope = resolve_chat_id(None, required=False)
    found = promises.list_promises(get_store(), status, limit + 1, chat_id=scope)
    more = len(found) > limit
    return PromiseList(
        status=status,
        promises=[_info(p) for p in found[:limit]],
        truncated=more,
        how_to_see_more=more_note(
            limit, more, "Filter by status, or raise limit (at most 200) to see older ones."
        ),
    )


@mcp.tool(
    annotations={"readOnlyHint": False, "destructiveHint": True, "openWorldHint": False},
    meta=deferred("stop or cancel a background job"),
)
def cancel_promise(
    promise_id: Annotated[int, Field(ge=1, description="The promise to cancel")],
) -> PromiseInfo:
    """Cancel a promise that has not finished; a running one is stopped and its result dropped."""
    store = get_store()
    _visible(promises.get_promise(store, promise_id))
    try:
        queue = promises.get_queue()
    except ValorError:  # cancelled in the store all the same; a worker skips it
        queue = None
    return _info(promises.cancel_promise(store, queue, promise_id))


if __name__ == "__main__":
    mcp.run(show_banner=False)
