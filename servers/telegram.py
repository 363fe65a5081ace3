"""telegram-tools: search and read the conversation history the bridge records."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, Field

from servers.core.app import always_loaded, create_server
from servers.core.trust import RequiredChatIdArg, resolve_chat_id

mcp = create_server(
    "telegram-tools",
    instructions="Search and read the Telegram conversation history of the chat Valor serves.",
)


class HistoryHit(BaseModel):
    chat_id: int
    message_id: int
    sender: str
    direction: str = Field(description="'in' from a person, 'out' from Valor")
    sent_at: str = Field(description="ISO 8601, UTC")
    snippet: str = Field(description="Matching text with [matches] marked")
    score: float = Field(description="BM25 relevance, higher is better")


class HistorySearch(BaseModel):
    query: str
    chat_id: int
    hits: list[HistoryHit]


class ConversationContext(BaseModel):
    chat_id: int
    hours_back: float
    message_count: int
    truncated: bool = Field(description="True when older or longer messages were cut to fit")
    context: str = Field(description="Messages oldest first, one per line, ready for a model")


@mcp.tool(
    annotations={"readOnlyHint": True, "openWorldHint": False},
    meta=always_loaded(max_result_chars=50_000),
)
def search_conversation_history(
    query: Annotated[
        str,
        Field(
            description='Words, "exact phrases", prefix* and AND / OR / NOT with parentheses.',
            min_length=1,
            max_length=500,
        ),
    ],
    chat_id: RequiredChatIdArg = None,
    max_results: Annotated[int, Field(ge=1, le=200, description="How many hits at most")] = 10,
) -> HistorySearch:
    """Full-text search of the chat's message history, best matches first, with snippets."""
    from servers.core import history
    from servers.core.settings import get_settings
    from servers.core.store import get_store

    chat = resolve_chat_id(chat_id)
    limit = min(max_results, get_settings().history_max_results)
    hits = history.search_history(get_store(), query, chat, limit)
    return HistorySearch(query=query, chat_id=chat, hits=[HistoryHit(**hit) for hit in hits])


@mcp.tool(
    annotations={"readOnlyHint": True, "openWorldHint": False},
    meta=always_loaded(max_result_chars=50_000),
)
def get_conversation_context(
    hours_back: Annotated[
        float, Field(gt=0, le=24 * 365, description="How far back to read, in hours")
    ] = 24,
    chat_id: RequiredChatIdArg = None,
    max_messages: Annotated[int, Field(ge=1, le=500, description="Newest N messages")] = 50,
) -> ConversationContext:
    """Read the chat's recent messages in order, to catch up; bounded in size."""
    from servers.core import history
    from servers.core.settings import get_settings
    from servers.core.store import get_store, now

    chat = resolve_chat_id(chat_id)
    settings = get_settings()
    rows = history.recent_messages(get_store(), chat, now() - hours_back * 3600, max_messages)
    text, count, truncated = history.format_for_model(rows, settings.history_max_chars)
    return ConversationContext(
        chat_id=chat,
        hours_back=hours_back,
        message_count=count,
        truncated=truncated or count < len(rows),
        context=text,
    )


if __name__ == "__main__":
    mcp.run(show_banner=False)
