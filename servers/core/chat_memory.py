"""Chat memory: the facts of a chat's whole history, kept as messages are recorded.

Every recording path goes through ``history.record_messages`` (the bridge's incoming messages and
replies, the outbox, ``valor history import``), which calls ``remember`` for the new rows in the
same transaction. The facts are what the context optimizer already finds (``context_opt``):
from CRITICAL messages (decisions, errors, "remember …") and HIGH ones (a user's questions and
requests) their fact-carrying sentences, or the first sentence; from any other message the
sentences with a name, number, path, URL, @handle or `code`. Extractive: no model is needed.

One row per distinct fact in a chat (case and spacing ignored), pointing at the newest message
that stated it (its id and date), with the message's priority (the most important it was ever
stated with) and how often it was stated. ``ranked`` reads them most important, then newest,
first; ``chat_block`` builds the context block from them and the recent turns — the same block
for the bridge, the UserPromptSubmit hook and context-tools' ``build_context_block``.
"""

from __future__ import annotations

import logging
import re
import sqlite3
import time
from collections.abc import Sequence
from itertools import compress

log = logging.getLogger("valor.memory")

CRITICAL, HIGH, MEDIUM = 0, 1, 2
PRIORITY_NAMES = ("critical", "high", "medium")
MIN_FACT_CHARS = 6  # "ok?" is not a fact
LINE_TOKENS_GUESS = 12  # a memory line is rarely shorter: how many rows a budget can use
_KEY_SPACES = re.compile(r"\s+")

# (chat_id, message_id, sender, sender_id, direction, text, sent_at): history's message rows
Row = tuple[int, int, str, int | None, str, str, float]


def fact_key(text: str) -> str:
    """What makes two facts the same: the words, ignoring case, spacing and final punctuation."""
    return _KEY_SPACES.sub(" ", text).strip().rstrip(".!?…").lower()


def extract(rows: Sequence[Row]) -> list[tuple]:
    """Memory rows (chat_id, message_id, sent_at, priority, sender, text, key) for ``rows``.

    One scan of all the texts with the optimizer's analysis (Aho-Corasick markers and byte
    classes), then sentence extraction only for the messages it flags."""
    if not rows:
        return []
    from servers.core.context_opt.conversation import _Conversation
    from servers.core.context_opt.summaries import message_facts

    roles = ["assistant" if row[4] == "out" else "user" for row in rows]
    conv = _Conversation.of_texts([row[5] for row in rows], roles)
    prio = conv.prio
    # flagged: CRITICAL or HIGH, or carrying a fact (bytewise, in C, as the analysis does)
    flagged = map(int.__or__, bytes(prio).translate(_IMPORTANT), conv.has_fact)
    found: dict[tuple[int, str], tuple] = {}
    for i in compress(range(conv.n), flagged):
        chat_id, message_id, sender, _sender_id, _direction, _text, sent_at = rows[i]
        level = min(prio[i], MEDIUM)
        for sentence in message_facts(conv, i):
            if len(sentence) < MIN_FACT_CHARS:
                continue
            key = fact_key(sentence)
            earlier = found.get((chat_id, key))
            if earlier is not None:  # stated again in this batch: the newest wins
                level = min(level, earlier[3])
            found[chat_id, key] = (chat_id, message_id, sent_at, level, sender, sentence, key)
    return list(found.values())


_IMPORTANT = bytes([1, 1] + [0] * 254)  # priority CRITICAL or HIGH -> 1


def remember(conn: sqlite3.Connection, rows: Sequence[Row]) -> int:
    """Extract the facts of ``rows`` into the chat memory (inside the caller's transaction).

    A fact already known gains a mention and moves to the newer message; its priority is the
    most important it was stated with. Returns how many memory rows were written."""
    try:
        items = extract(rows)
    except ImportError as exc:  # the analysis cannot load: recording the messages still must
        log.warning("chat memory skipped: the context optimizer cannot load (%s)", exc)
        return 0
    if not items:
        return 0
    conn.executemany(
        """
        INSERT INTO chat_memory (chat_id, message_id, sent_at, priority, sender, text, fact_key)
        VALUES (?, ?, ?, ?, ?, ?, ?)
        ON CONFLICT (chat_id, fact_key) DO UPDATE SET
            mentions = mentions + 1,
            priority = min(priority, excluded.priority),
            message_id = CASE WHEN excluded.sent_at >= sent_at
                THEN excluded.message_id ELSE message_id END,
            sender = CASE WHEN excluded.sent_at >= sent_at THEN excluded.sender ELSE sender END,
            text = CASE WHEN excluded.sent_at >= sent_at THEN excluded.text ELSE text END,
            sent_at = max(sent_at, excluded.sent_at)
        """,
        items,
    )
    return len(items)


def ranked(conn: sqlite3.Connection, chat_id: int, limit: int) -> list[dict]:
    """The chat's memory, most important first, newest first within a priority (none from a
    store older than chat memory: the hook opens stores without migrating them)."""
    try:
        cursor = conn.execute(
            "SELECT message_id, sent_at, priority, sender, text, mentions FROM chat_memory "
            "WHERE chat_id = ? ORDER BY priority, sent_at DESC LIMIT ?",
            (int(chat_id), max(0, int(limit))),
        )
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return []
        raise
    names = [column[0] for column in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def rebuild(conn: sqlite3.Connection, chat_id: int | None = None, batch: int = 20_000) -> int:
    """Extract the memory again from the stored messages (of one chat, or all): for messages
    recorded before chat memory existed. Idempotent (facts are deduplicated)."""
    chat = None if chat_id is None else int(chat_id)
    cursor = conn.execute(
        "SELECT chat_id, message_id, sender, sender_id, direction, text, sent_at FROM messages "
        "WHERE ? IS NULL OR chat_id = ? ORDER BY sent_at, id",
        (chat, chat),
    )
    written = 0
    while chunk := cursor.fetchmany(batch):
        written += remember(conn, [tuple(row) for row in chunk])
    return written


def memory_line(item: dict) -> str:
    """``[YYYY-MM-DD #id] who: fact``, escaped like every line of the block."""
    from servers.core.context_markup import escape

    day = time.strftime("%Y-%m-%d", time.gmtime(item["sent_at"])) if item["sent_at"] else "-"
    who = escape(item.get("sender") or "user")
    return f"[{day} #{int(item['message_id'])}] {who}: {escape(item['text'])}"


def _in_topic(conn: sqlite3.Connection, chat_id: int, topic_id: int) -> set[int]:
    rows = conn.execute(
        "SELECT message_id FROM messages WHERE chat_id = ? AND topic_id = ?", (chat_id, topic_id)
    )
    return {row[0] for row in rows}


def chat_block(
    conn: sqlite3.Connection,
    chat_id: int,
    user_name: str,
    user_id: int | str | None,
    *,
    max_messages: int,
    max_tokens: int,
    exclude_message_id: int | None = None,
    topic_id: int | None = None,
) -> str:
    """The context block for a chat: its memory and recent turns within ``max_tokens`` (the
    turns of forum topic ``topic_id`` only, when given; the memory is the chat's).

    What the bridge precomputes for a run (excluding the message being answered, which the
    prompt carries), what the hook builds when it has no precomputed block, and what
    context-tools' ``build_context_block`` returns for a chat and no messages."""
    from servers.core.context_markup import recent_history
    from servers.core.context_opt import build_context_block

    messages = recent_history(
        conn, chat_id, max_messages, exclude_message_id=exclude_message_id, topic_id=topic_id
    )
    # the recent turns speak for themselves (verbatim or in the optimizer's summary), and the
    # prompt carries the message being answered: memory is for what is older
    recent = {row["message_id"] for row in messages} | {exclude_message_id}
    memory = [
        item
        for item in ranked(conn, chat_id, max(1, max_tokens // LINE_TOKENS_GUESS) + len(recent))
        if item["message_id"] not in recent
    ]
    if topic_id is not None:  # a topic remembers what was said in it, not in its neighbours
        said_here = _in_topic(conn, chat_id, topic_id)
        memory = [item for item in memory if item["message_id"] in said_here]
    return build_context_block(chat_id, user_name, user_id, messages, max_tokens, memory=memory)
