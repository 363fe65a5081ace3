"""Health: how full a context is against a budget, what is wasted, and what to do about it."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from servers.core import tokens
from servers.core.context_markup import one_line
from servers.core.context_opt.conversation import (
    CRITICAL,
    PRIORITY_NAMES,
    RECENT_WINDOW,
    _Conversation,
)
from servers.core.context_opt.messages import ContextInputError
from servers.core.context_opt.planning import _tokens_before
from servers.core.context_opt.summaries import _clip


@dataclass
class Health:
    status: str  # "ok", "tight" (over 80 % of the budget) or "over"
    tokens: int
    tokens_exact: bool
    max_tokens: int
    utilization: float
    messages: int
    duplicate_messages: int
    duplicate_tokens: int
    stale_tool_results: int
    stale_tool_tokens: int
    oldest_critical: dict | None
    priority_counts: dict[str, int]
    recommendations: list[str]
    tokenizer: str = tokens.TOKENIZER_DESCRIPTION

    def as_dict(self) -> dict:
        return asdict(self)


def context_health(messages: list[dict], max_tokens: int, *, now: float | None = None) -> Health:
    """How full the context is, what is wasted, and what to do about it."""
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise ContextInputError("max_tokens must be a positive whole number of tokens.")
    conv = _Conversation(messages)
    now = time.time() if now is None else now
    total, exact = _tokens_before(conv, False) if conv.n else (0, True)
    utilization = total / max_tokens

    seen: set[str] = set()
    duplicates = []
    for i, text in enumerate(conv.texts):
        if len(text) < 20 or conv.roles[i] == "system":
            continue  # short acknowledgements repeat naturally
        key = " ".join(text.lower().split())
        if key in seen:
            duplicates.append(i)
        else:
            seen.add(key)
    duplicate_tokens = sum(conv.cost(i) for i in duplicates)
    stale_tokens = sum(conv.unit_cost(*conv.unit(i)) for i in conv.stale)

    oldest = None
    first_critical = conv.prio.find(CRITICAL)
    while first_critical != -1 and conv.roles[first_critical] == "system":
        first_critical = conv.prio.find(CRITICAL, first_critical + 1)
    if first_critical != -1:
        message = conv.messages[first_critical]
        timestamp = message.get("timestamp")
        age = now - timestamp if isinstance(timestamp, int | float) else None
        oldest = {
            "index": first_critical,
            "role": conv.roles[first_critical],
            "age_seconds": round(age, 1) if age is not None else None,
            "messages_ago": conv.n - 1 - first_critical,
            "preview": _clip(one_line(conv.texts[first_critical]))[:160],
        }

    advice = []
    if utilization > 1:
        advice.append(
            f"Over budget by {total - max_tokens:,} tokens: run optimize_context with "
            f"max_tokens={max_tokens}; it keeps critical messages and the latest turn and "
            "condenses the rest."
        )
    elif utilization > 0.8:
        advice.append(
            f"At {utilization:.0%} of the budget: optimize before the next long tool output, "
            f"or raise max_tokens above {total:,}."
        )
    if duplicates:
        advice.append(
            f"{len(duplicates)} message(s) repeat earlier ones word for word "
            f"({duplicate_tokens:,} tokens, first at #{duplicates[0]}): drop the repeats."
        )
    if conv.stale:
        advice.append(
            f"{len(conv.stale)} tool result(s) were superseded by a later identical call "
            f"({stale_tokens:,} tokens, first at #{min(conv.stale)}): drop the older results."
        )
    if oldest and (oldest["messages_ago"] > RECENT_WINDOW or (oldest["age_seconds"] or 0) > 86400):
        advice.append(
            f"The oldest critical message (#{oldest['index']}, {oldest['messages_ago']} messages "
            "ago) is far back: restate it in the current turn or save it to memory so it is not "
            "only in condensed history."
        )
    if not advice:
        advice.append("Healthy: nothing to do.")
    status = "over" if utilization > 1 else "tight" if utilization > 0.8 else "ok"
    return Health(
        status=status,
        tokens=total,
        tokens_exact=exact,
        max_tokens=max_tokens,
        utilization=round(utilization, 4),
        messages=conv.n,
        duplicate_messages=len(duplicates),
        duplicate_tokens=duplicate_tokens,
        stale_tool_results=len(conv.stale),
        stale_tool_tokens=stale_tokens,
        oldest_critical=oldest,
        priority_counts={name: conv.prio.count(k) for k, name in enumerate(PRIORITY_NAMES)},
        recommendations=advice,
        tokenizer=tokens.backend() if conv.n else tokens.TOKENIZER_DESCRIPTION,
    )
