"""telegram-tools: search and read the conversation history the bridge records."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, Field

from servers.core.app import always_loaded, create_server
from servers.core.model_results import iso_time, more_note
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


TopicArg = Annotated[
    int | None,
    Field(
        description="A forum topic of the chat: only its messages (the prompt names the topic "
        "a conversation is in); omit for the whole chat",
        ge=1,
    ),
]


class HistorySearch(BaseModel):
    query: str
    chat_id: int
    topic_id: int | None = Field(None, description="The forum topic searched, if one was")
    hits: list[HistoryHit]
    truncated: bool = Field(description="True when more messages match than are shown")
    how_to_see_more: str | None = Field(description="When truncated: how to narrow or widen")


class ConversationContext(BaseModel):
    chat_id: int
    topic_id: int | None = Field(None, description="The forum topic read, if one was")
    hours_back: float
    message_count: int
    oldest_at: str | None = Field(description="The first message shown, ISO 8601 UTC")
    newest_at: str | None = Field(description="The last message shown, ISO 8601 UTC")
    time_zone: str = Field(description="The zone of the [YYYY-MM-DD HH:MM] times in context")
    truncated: bool = Field(description="True when older or longer messages were cut to fit")
    how_to_see_more: str | None = Field(description="When truncated: how to read the rest")
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
    topic_id: TopicArg = None,
) -> HistorySearch:
    """Full-text search of the chat's message history, best matches first, with snippets."""
    from servers.core import history
    from servers.core.settings import get_settings
    from servers.core.store import get_store

    chat = resolve_chat_id(chat_id)
    limit = min(max_results, get_settings().history_max_results)
    # one more than shown: are there more?
    hits = history.search_history(get_store(), query, chat, limit + 1, topic_id=topic_id)
    more = len(hits) > limit
    return HistorySearch(
        query=query,
        chat_id=chat,
        topic_id=topic_id,
        hits=[HistoryHit(**hit) for hit in hits[:limit]],
        truncated=more,
        how_to_see_more=more_note(
            limit,
            more,
            'Narrow the query (more words, an "exact phrase", NOT a word) or raise max_results '
            f"(at most {min(200, get_settings().history_max_results)}).",
        ),
    )


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
    topic_id: TopicArg = None,
) -> ConversationContext:
    """Read the chat's recent messages in order, to catch up; bounded in size."""
    from servers.core import history
    from servers.core.settings import get_settings
    from servers.core.store import get_store, now

    chat = resolve_chat_id(chat_id)
    settings = get_settings()
    since = now() - hours_back * 3600
    rows = history.recent_messages(get_store(), chat, since, max_messages, topic_id=topic_id)
    text, count, cut = history.format_for_model(rows, settings.history_max_chars)
    truncated = cut or count < len(rows)
    shown = rows[len(rows) - count :] if count else []  # the newest are the ones kept
    return ConversationContext(
        chat_id=chat,
        topic_id=topic_id,
        hours_back=hours_back,
        message_count=count,
        oldest_at=iso_time(shown[0]["sent_at"]) if shown else None,
        newest_at=iso_time(shown[-1]["sent_at"]) if shown else None,
        time_zone="UTC",
        truncated=truncated,
        how_to_see_more=(
            "Older or long messages were cut to fit "
            f"{settings.history_max_chars:,} characters: use a smaller hours_back or "
            "max_messages, or search_conversation_history for a topic."
            if truncated
            else None
        ),
        context=text,
    )


if __name__ == "__main__":
    mcp.run(show_banner=False)
