"""Context optimization: fit a conversation to a token budget and keep what matters.

Nothing here knows MCP. The context-tools server, the bridge and the UserPromptSubmit hook call
these functions directly, so importing this package loads nothing heavy; the tokenizer loads on
first use (see ``servers.core.tokens``) and the Aho-Corasick automata on the first analysis.

One module per concern, in the order the work flows:

- ``messages``: the text a model sees for a message, its tool calls and results; input errors.
- ``conversation``: each message's priority, facts and tool unit (the priority rules).
- ``summaries``: the fact-carrying sentences of a message, as one summary line.
- ``planning``: ``optimize_context``, which spends the budget (the budget rules).
- ``health``: ``context_health``, how full a context is and what to do about it.
- ``block``: ``build_context_block``, the block a Claude Code session gets (its markup and
  history rows are in ``servers.core.context_markup``, which the hook loads without the rest).
"""

from servers.core.context_opt.block import build_context_block
from servers.core.context_opt.conversation import CRITICAL, HIGH, LOW, MEDIUM, PRIORITY_NAMES
from servers.core.context_opt.health import Health, context_health
from servers.core.context_opt.messages import (
    MESSAGE_OVERHEAD_TOKENS,
    ContextBudgetError,
    ContextInputError,
    message_text,
)
from servers.core.context_opt.planning import (
    Optimized,
    Summarizer,
    count_messages,
    optimize_context,
)
from servers.core.context_opt.summaries import SUMMARY_NAME, fact_sentences

__all__ = [
    "CRITICAL",
    "HIGH",
    "LOW",
    "MEDIUM",
    "MESSAGE_OVERHEAD_TOKENS",
    "PRIORITY_NAMES",
    "SUMMARY_NAME",
    "ContextBudgetError",
    "ContextInputError",
    "Health",
    "Optimized",
    "Summarizer",
    "build_context_block",
    "context_health",
    "count_messages",
    "fact_sentences",
    "message_text",
    "optimize_context",
]
