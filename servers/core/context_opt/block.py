"""The context block for Claude Code sessions: chat, user and recent history, within a budget.

The markup, the escaping and the history rows come from ``servers.core.context_markup`` (which
needs no tokenizer, and also gives the plain block used without the optimizer); this module fits
the history to the token budget with the optimizer.
"""

from __future__ import annotations

from servers.core import tokens
from servers.core.context_markup import (
    NO_HISTORY,
    as_chat_message,
    escape,
    history_line,
    render_block,
)
from servers.core.context_opt.messages import ContextBudgetError, ContextInputError, message_text
from servers.core.context_opt.planning import optimize_context
from servers.core.context_opt.summaries import SUMMARY_NAME

HISTORY_OMITTED = "(history omitted: it does not fit the budget)"


def _history_lines(messages: list[dict], originals: set[int] = frozenset()) -> list[str]:
    """One escaped line per message; the optimizer's summary (not in ``originals``) indented."""
    lines = []
    for message in messages:
        text = message_text(message)
        if message.get("name") == SUMMARY_NAME and id(message) not in originals:
            lines.extend(f"  ~ {escape(line)}" for line in text.splitlines() if line.strip())
            continue
        lines.append(history_line(message, text))
    return lines


def build_context_block(
    chat_id: int | None,
    user_name: str,
    user_id: int | str | None,
    messages: list[dict],
    max_tokens: int = 2000,
) -> str:
    """The block the UserPromptSubmit hook adds to each prompt: chat, user, recent history.

    ``messages`` are oldest first, as chat messages ({role, content, name, timestamp}) or history
    rows ({sender, direction, text, sent_at}). User text is escaped onto single lines, so it
    cannot close the block or forge its fields. The whole block fits ``max_tokens`` (counted).
    """
    history = [as_chat_message(m) for m in messages if isinstance(m, dict)]

    originals = {id(m) for m in history}

    def render(lines: list[str], empty: str = NO_HISTORY) -> str:
        return render_block(chat_id, user_name, user_id, lines, empty)

    block = render(_history_lines(history, originals))
    if tokens.upper_bound(block) <= max_tokens:  # fits for sure: no tokenizer needed
        return block
    fixed = tokens.count(render([], HISTORY_OMITTED))
    if fixed > max_tokens:
        raise ContextInputError(
            f"max_tokens={max_tokens} cannot hold the context block's own fields ({fixed} tokens)."
        )
    budget = max_tokens - fixed
    for _ in range(6):
        try:
            result = optimize_context(history, max(budget, 1), recent_turns=2)
            lines = _history_lines(result.messages, originals)
        except ContextBudgetError:
            lines = []
        block = render(lines, HISTORY_OMITTED)
        overflow = tokens.count(block) - max_tokens
        if overflow <= 0:
            return block
        budget -= overflow + max(8, overflow // 4)  # rendering costs more than the message form
        if budget <= 0:
            break
    return render([], HISTORY_OMITTED)
