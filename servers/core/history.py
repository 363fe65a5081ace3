"""Conversation history: recording messages (the bridge) and reading them (telegram-tools).

Full-text search uses SQLite FTS5. A user's query is translated, never passed raw: words and
"phrases" become quoted FTS5 strings (so a colon or hyphen in a word cannot act as FTS5 syntax),
prefix* stays a prefix query, AND/OR/NOT and parentheses keep their meaning, and the chat filter is
both part of the FTS5 expression (fast) and a SQL condition (a guarantee).
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from servers.core import chat_memory
from servers.core.errors import input_error
from servers.core.model_results import iso_time
from servers.core.store import Store, now

OPERATORS = {"AND", "OR", "NOT"}
MIN_PREFIX = 2
_WORD_CHARS = re.compile(r"\w", re.UNICODE)
TRUNCATION_MARK = "… [{} more characters]"


@dataclass(frozen=True)
class Message:
    chat_id: int
    message_id: int
    text: str
    sender: str = ""
    sender_id: int | None = None
    direction: str = "in"
    sent_at: float | None = None
    topic_id: int | None = None  # the forum topic it was written in (Telegram), if any


def record_message(store: Store, message: Message) -> bool:
    """Store one message; the same (chat_id, message_id) again updates it. True if new."""
    return record_messages(store, [message]) == 1


def record_messages(store: Store, messages: Iterable[Message]) -> int:
    """Store many messages in one transaction; returns how many were new."""
    messages = list(messages)
    rows = message_rows(messages)
    with store.transaction() as conn:
        added = write_rows(conn, rows)
        # Forum topics are rare next to plain chats: marked after the insert, so the bulk
        # path (imports, catch-up) keeps its row shape.
        conn.executemany(
            "UPDATE messages SET topic_id = ? WHERE chat_id = ? AND message_id = ?",
            [(m.topic_id, m.chat_id, m.message_id) for m in messages if m.topic_id is not None],
        )
        return added


def message_rows(messages: Iterable[Message]) -> list[tuple]:
    """The rows ``write_rows`` takes, checked."""
    rows = [
        (
            m.chat_id,
            m.message_id,
            m.sender,
            m.sender_id,
            m.direction,
            m.text,
            m.sent_at if m.sent_at is not None else now(),
        )
        for m in messages
    ]
    for row in rows:
        if row[4] not in ("in", "out"):
            raise ValueError(f"direction must be 'in' or 'out', not {row[4]!r}")
    return rows


def write_rows(conn: sqlite3.Connection, rows: list[tuple]) -> int:
    """Insert ``message_rows`` inside the caller's transaction (an import writes many batches
    in one, so a failure leaves nothing half-imported); returns how many were new."""
    with _page_cache_for(conn, len(rows)):
        (last_id,) = conn.execute("SELECT coalesce(max(id), 0) FROM messages").fetchone()
        cursor = conn.executemany(
            """
            INSERT INTO messages (chat_id, message_id, sender, sender_id, direction, text, sent_at)
            VALUES (?, ?, ?, ?, ?, ?, ?)
            ON CONFLICT (chat_id, message_id) DO NOTHING
            """,
            rows,
        )
        inserted = cursor.rowcount
        # Index the new rows in one statement (see migrations: no per-row insert trigger).
        conn.execute(
            "INSERT INTO messages_fts (rowid, text, chat_key) "
            "SELECT id, text, chat_key FROM messages WHERE id > ?",
            (last_id,),
        )
        # The chat memory learns from the new rows in the same transaction (chat_memory.py).
        new_rows = rows if inserted == len(rows) else _rows_after(conn, last_id)
        chat_memory.remember(conn, new_rows)
        if inserted < len(rows):
            # Redelivered or edited messages: update only rows whose text actually changed.
            conn.executemany(
                """
                UPDATE messages SET text = ?, sender = ?
                WHERE chat_id = ? AND message_id = ? AND (text != ? OR sender != ?)
                """,
                [(r[5], r[2], r[0], r[1], r[5], r[2]) for r in rows],
            )
    return inserted


def _rows_after(conn: sqlite3.Connection, last_id: int) -> list[tuple]:
    """The rows inserted after ``last_id``, in the order ``record_messages`` builds them."""
    return conn.execute(
        "SELECT chat_id, message_id, sender, sender_id, direction, text, sent_at FROM messages "
        "WHERE id > ? ORDER BY id",
        (last_id,),
    ).fetchall()


BULK_ROWS = 1_000
BULK_CACHE_KIB = 65_536


@contextmanager
def _page_cache_for(conn: sqlite3.Connection, row_count: int) -> Iterator[None]:
    """A bulk ingest (catch-up, imports) gets a 64 MiB page cache while it runs; the default
    small cache stays for everything else, so long-lived processes do not grow by it."""
    if row_count < BULK_ROWS:
        yield
        return
    (previous,) = conn.execute("PRAGMA cache_size").fetchone()
    conn.execute(f"PRAGMA cache_size=-{BULK_CACHE_KIB}")
    try:
        yield
    finally:
        conn.execute(f"PRAGMA cache_size={int(previous)}")


def to_fts_query(user_query: str) -> str:
    """Translate what a person types into a safe FTS5 expression (see module docstring)."""
    parts: list[str] = []
    depth = 0
    i, n = 0, len(user_query)
    while i < n:
        ch = user_query[i]
        if ch.isspace():
            i += 1
        elif ch == '"':
            end = user_query.find('"', i + 1)
            if end == -1:
                raise input_error('Unbalanced quote in the search: close every "phrase".')
            phrase = user_query[i + 1 : end]
            if _WORD_CHARS.search(phrase):
                prefix = end + 1 < n and user_query[end + 1] == "*"
                parts.append(_quote(phrase) + ("*" if prefix else ""))
                end += 1 if prefix else 0
            i = end + 1
        elif ch in "()":
            depth += 1 if ch == "(" else -1
            if depth < 0:
                raise input_error("Unbalanced parentheses in the search: a ')' has no '('.")
            parts.append(ch)
            i += 1
        else:
            j = i
            while j < n and not user_query[j].isspace() and user_query[j] not in '"()':
                j += 1
            word = user_query[i:j]
            i = j
            if word in OPERATORS:
                parts.append(word)
            elif _WORD_CHARS.search(word):
                prefix = word.endswith("*")
                stem = word.rstrip("*")
                if prefix and len(stem) < MIN_PREFIX:
                    raise input_error(
                        f"A prefix search needs at least {MIN_PREFIX} characters before '*'."
                    )
                parts.append(_quote(stem) + ("*" if prefix else ""))
    if depth != 0:
        raise input_error("Unbalanced parentheses in the search: a '(' is never closed.")
    if not any(p not in OPERATORS and p not in "()" for p in parts):
        raise input_error("The search has no words to look for.")
    return " ".join(parts)


def fts_query(store: Store, sql: str, params: tuple | list) -> list[sqlite3.Row]:
    """Run a full-text search; FTS5 syntax errors become an [input] error a person can act on."""
    try:
        return store.query(sql, tuple(params))
    except sqlite3.OperationalError as exc:
        if "fts5" in str(exc) or "syntax error" in str(exc):
            raise input_error(
                f'The search could not be parsed ({exc}). Use words, "exact phrases", '
                "prefix* and AND / OR / NOT between terms, with balanced parentheses."
            ) from None
        raise


def _quote(text: str) -> str:
    return '"' + text.replace('"', '""') + '"'


def search_history(
    store: Store, query: str, chat_id: int, max_results: int = 20, topic_id: int | None = None
) -> list[dict[str, object]]:
    """Best matches in the chat, or only in its forum topic ``topic_id``."""
    expression = f'chat_key:"c{int(chat_id)}" AND {{text}}:({to_fts_query(query)})'
    in_topic = "" if topic_id is None else "AND m.topic_id = ?"
    topic = () if topic_id is None else (int(topic_id),)
    rows = fts_query(
        store,
        f"""
        SELECT m.chat_id, m.message_id, m.sender, m.direction, m.sent_at,
               snippet(messages_fts, 0, '[', ']', '…', 12) AS snippet,
               bm25(messages_fts) AS rank
        FROM messages_fts JOIN messages m ON m.id = messages_fts.rowid
        WHERE messages_fts MATCH ? AND m.chat_id = ? {in_topic}
        ORDER BY rank
        LIMIT ?
        """,  # noqa: S608 (only the fixed condition is formatted in; values are bound)
        (expression, int(chat_id), *topic, int(max_results)),
    )
    return [
        {
            "chat_id": row["chat_id"],
            "message_id": row["message_id"],
            "sender": row["sender"],
            "direction": row["direction"],
            "sent_at": iso(row["sent_at"]),
            "snippet": row["snippet"],
            "score": round(-row["rank"], 4),
        }
        for row in rows
    ]


def recent_messages(
    store: Store, chat_id: int, since: float, max_messages: int, topic_id: int | None = None
) -> list[sqlite3.Row]:
    """The newest ``max_messages`` messages since ``since`` (of forum topic ``topic_id`` when
    given), oldest first."""
    in_topic = "" if topic_id is None else "AND topic_id = ?"
    rows = store.query(
        f"""
        SELECT message_id, sender, direction, text, sent_at FROM messages
        WHERE chat_id = ? AND sent_at >= ? {in_topic}
        ORDER BY sent_at DESC, id DESC LIMIT ?
        """,  # noqa: S608 (only the fixed condition is formatted in; values are bound)
        (int(chat_id), since, *(() if topic_id is None else (int(topic_id),)), int(max_messages)),
    )
    rows.reverse()
    return rows


def format_for_model(
    rows: list[sqlite3.Row], max_chars: int, max_message_chars: int = 2_000
) -> tuple[str, int, bool]:
    """Lines like ``[2026-11-26 06:00 UTC] Alice: text``, newest kept when the budget binds.

    Returns (text, messages included, whether anything was cut).
    """
    lines: list[str] = []
    total = 0
    cut = False
    for row in reversed(rows):
        text = row["text"]
        if len(text) > max_message_chars:
            omitted = len(text) - max_message_chars
            text = text[:max_message_chars] + TRUNCATION_MARK.format(omitted)
            cut = True
        who = row["sender"] or ("Valor" if row["direction"] == "out" else "user")
        line = f"[{iso(row['sent_at'], minutes=True)}] {who}: {text}"
        if total + len(line) + 1 > max_chars:
            cut = True
            break
        lines.append(line)
        total += len(line) + 1
    lines.reverse()
    return "\n".join(lines), len(lines), cut


iso = iso_time  # one reading of times for every result (servers/core/model_results.py)
