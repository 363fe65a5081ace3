"""The context block for Claude Code sessions: chat, user and recent history, within a budget.

The markup, the escaping and the history rows come from ``servers.core.context_markup`` (which
needs no tokenizer, and also gives the plain block used without the optimizer); this module fits
the history to the token budget with the optimizer.
"""

from __future__ import annotations

from servers.core import tokens
from servers.core.context_markup import (
    HISTORY_HEADING,
    MEMORY_HEADING,
    NO_HISTORY,
    as_chat_message,
    escape,
    history_line,
    render_block,
)
from servers.core.context_opt.messages import ContextBudgetError, ContextInputError, message_text
from servers.core.context_opt.planning import optimize_context
from servers.core.context_opt.summaries import SUMMARY_NAME, condense

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
    *,
    memory: list[dict] | tuple[dict, ...] = (),
) -> str:
    """The block the UserPromptSubmit hook adds to each prompt: chat, user, the chat's memory
    and its recent history.

    ``messages`` are oldest first, as chat messages ({role, content, name, timestamp}) or history
    rows ({sender, direction, text, sent_at}). ``memory`` is the chat's memory, ranked (most
    important, then newest, first: ``servers.core.chat_memory.ranked``). User text is escaped
    onto single lines, so it cannot close the block or forge its fields. The whole block fits
    ``max_tokens`` (counted exactly).

    How the budget is shared: the history may use what the memory leaves, but at least
    ``HISTORY_SHARE`` of it; the memory then takes the room the history did not use, its items
    in rank order (a fact the history shows verbatim is not repeated), shown oldest first.
    """
    history = [as_chat_message(m) for m in messages if isinstance(m, dict)]
    originals = {id(m) for m in history}
    remembered = []
    if memory:  # imported only then: the hook's plain path stays as light as it was
        from servers.core.chat_memory import memory_line

        remembered = [memory_line(item) for item in memory]

    def render(lines: list[str], empty: str = NO_HISTORY, facts: list[str] = ()) -> str:
        return render_block(chat_id, user_name, user_id, lines, empty, memory=facts)

    full_history = _history_lines(history, originals)
    if remembered:  # a fact the history shows verbatim is not repeated
        shown = "\n".join(full_history)
        kept = [k for k, item in enumerate(memory) if escape(item["text"]) not in shown]
        facts = [remembered[k] for k in sorted(kept, key=lambda k: memory[k]["sent_at"] or 0)]
    else:
        facts = []
    block = render(full_history, facts=facts)
    if tokens.upper_bound(block) <= max_tokens:  # fits for sure: no tokenizer needed
        return block
    fixed = tokens.count(render([], HISTORY_OMITTED))
    if fixed > max_tokens:
        raise ContextInputError(
            f"max_tokens={max_tokens} cannot hold the context block's own fields ({fixed} tokens)."
        )
    if not remembered:
        return _fit_history(history, originals, render, max_tokens, fixed)
    costs = tokens.counts(remembered)
    heading = tokens.count(MEMORY_HEADING) + 1
    wanted = heading + sum(costs) + len(costs)
    room = max_tokens - fixed
    history_room = max(int(room * HISTORY_SHARE), room - wanted)
    with_history = _fit_history(history, originals, render, fixed + history_room, fixed)
    shown = with_history  # the history as rendered: facts it shows are not repeated
    lines = _history_part(with_history)
    free = max_tokens - tokens.count(with_history) - heading
    chosen = _choose_facts(memory, remembered, costs, shown, free)
    empty = NO_HISTORY if lines or not history else HISTORY_OMITTED
    while chosen:
        # shown in the order they were said; dropped, when the exact count is over, by rank
        order = sorted(chosen, key=lambda k: memory[k]["sent_at"] or 0)
        block = render(lines, empty, [chosen[k] for k in order])
        if tokens.count(block) <= max_tokens:
            return block
        chosen.popitem()
    return with_history


def _choose_facts(
    memory: list[dict], remembered: list[str], costs: list[int], shown: str, free: int
) -> dict[int, str]:
    """Memory lines for ``free`` tokens, in rank order: all as they are when they fit; else
    each condensed (filler dropped, entities kept) while they fit, then given back its full
    text in rank order while room lasts, as ``optimize_context`` does with its lines."""
    from servers.core.chat_memory import memory_line

    candidates = [k for k, item in enumerate(memory) if escape(item["text"]) not in shown]
    if sum(costs[k] + 1 for k in candidates) <= free:
        return {k: remembered[k] for k in candidates}
    chosen: dict[int, tuple[str, int]] = {}
    for k in candidates:
        short = memory_line({**memory[k], "text": condense(memory[k]["text"])})
        cost = tokens.count(short) + 1
        if cost <= free:
            chosen[k] = (short, cost)
            free -= cost
    for k, (short, cost) in chosen.items():
        if costs[k] + 1 - cost <= free and short != remembered[k]:
            free -= costs[k] + 1 - cost
            chosen[k] = (remembered[k], costs[k] + 1)
    return {k: line for k, (line, _) in chosen.items()}


HISTORY_SHARE = 0.4


def _history_part(block: str) -> list[str]:
    """The history lines of a block rendered without memory (empty when it shows none)."""
    lines = block.splitlines()
    body = lines[lines.index(HISTORY_HEADING) + 1 : -1]
    return [] if body in ([NO_HISTORY], [HISTORY_OMITTED]) else body


def _fit_history(history, originals, render, max_tokens: int, fixed: int) -> str:
    """The block without memory, its history optimized to fit ``max_tokens``."""
    block = render(_history_lines(history, originals))
    if tokens.upper_bound(block) <= max_tokens or tokens.count(block) <= max_tokens:
        return block
    budget = max_tokens - fixed
    for _ in range(6):
        if budget <= 0:
            break
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
    return render([], HISTORY_OMITTED)
