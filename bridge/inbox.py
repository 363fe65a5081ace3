"""The bridge's durable state: the inbox (every authorized message, persisted before anything
else) and the Claude Code session each chat resumes.

A message is answered once: (chat_id, message_id) is unique, a redelivered update is a duplicate,
and on restart every row not finished is processed again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from bridge.transport import IncomingMessage
from servers.core.store import Store, now

OPEN_STATUSES = ("pending", "running")


@dataclass(frozen=True)
class InboxRow:
    id: int
    chat_id: int
    message_id: int
    sender_id: int | None
    sender_name: str
    text: str
    sent_at: float
    is_group: bool
    media_paths: tuple[Path, ...]
    status: str
    attempts: int


def persist_incoming(store: Store, message: IncomingMessage, *, status: str = "pending") -> int:
    """Insert the message; returns its row id, or 0 when it was already there (a duplicate)."""
    with store.transaction() as conn:
        row = conn.execute(
            """
            INSERT INTO bridge_inbox (chat_id, message_id, sender_id, sender_name, text, sent_at,
                                      is_group, media_paths, status, received_at)
            VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
            ON CONFLICT (chat_id, message_id) DO NOTHING
            RETURNING id
            """,
            (
                message.chat_id,
                message.message_id,
                message.sender_id,
                message.sender_name,
                message.text,
                message.sent_at,
                int(message.is_group),
                json.dumps([str(p) for p in message.media_paths]),
                status,
                now(),
            ),
        ).fetchone()
    return int(row[0]) if row else 0


_COLUMNS = (
    "id, chat_id, message_id, sender_id, sender_name, text, sent_at, is_group, media_paths, "
    "status, attempts"
)


def _row(row) -> InboxRow:
    return InboxRow(
        row["id"],
        row["chat_id"],
        row["message_id"],
        row["sender_id"],
        row["sender_name"],
        row["text"],
        row["sent_at"],
        bool(row["is_group"]),
        tuple(Path(p) for p in json.loads(row["media_paths"])),
        row["status"],
        row["attempts"],
    )


def get_row(store: Store, row_id: int) -> InboxRow | None:
    rows = store.query(f"SELECT {_COLUMNS} FROM bridge_inbox WHERE id = ?", (row_id,))  # noqa: S608
    return _row(rows[0]) if rows else None


def unfinished(store: Store) -> list[InboxRow]:
    """Rows a previous bridge accepted but never finished, oldest first."""
    rows = store.query(
        f"SELECT {_COLUMNS} FROM bridge_inbox WHERE status IN ('pending', 'running') "  # noqa: S608
        "ORDER BY id"
    )
    return [_row(row) for row in rows]


def mark_running(store: Store, row_id: int) -> None:
    with store.transaction() as conn:
        conn.execute(
            "UPDATE bridge_inbox SET status = 'running', attempts = attempts + 1, started_at = ? "
            "WHERE id = ?",
            (now(), row_id),
        )


def mark_finished(store: Store, row_id: int, status: str, error: str | None = None) -> None:
    if status not in ("done", "failed", "cancelled"):
        raise ValueError(f"not a final status: {status!r}")
    with store.transaction() as conn:
        conn.execute(
            "UPDATE bridge_inbox SET status = ?, finished_at = ?, error = ? WHERE id = ?",
            (status, now(), error, row_id),
        )


def session_for(store: Store, chat_id: int) -> str | None:
    rows = store.query("SELECT session_id FROM chat_sessions WHERE chat_id = ?", (chat_id,))
    return rows[0]["session_id"] if rows else None


def save_session(
    store: Store, chat_id: int, session_id: str | None, cost_usd: float, duration_ms: float
) -> None:
    with store.transaction() as conn:
        conn.execute(
            """
            INSERT INTO chat_sessions (chat_id, session_id, updated_at, last_cost_usd,
                                       last_duration_ms, total_cost_usd)
            VALUES (?, ?, ?, ?, ?, ?)
            ON CONFLICT (chat_id) DO UPDATE SET session_id = excluded.session_id,
                updated_at = excluded.updated_at, last_cost_usd = excluded.last_cost_usd,
                last_duration_ms = excluded.last_duration_ms,
                total_cost_usd = chat_sessions.total_cost_usd + excluded.last_cost_usd
            """,
            (chat_id, session_id, now(), cost_usd, duration_ms, cost_usd),
        )


def forget_session(store: Store, chat_id: int) -> None:
    """`/new`: the next message starts a fresh Claude Code session."""
    with store.transaction() as conn:
        conn.execute(
            "UPDATE chat_sessions SET session_id = NULL, updated_at = ? WHERE chat_id = ?",
            (now(), chat_id),
        )


def last_cost(store: Store, chat_id: int) -> tuple[float | None, float]:
    rows = store.query(
        "SELECT last_cost_usd, total_cost_usd FROM chat_sessions WHERE chat_id = ?", (chat_id,)
    )
    return (rows[0][0], rows[0][1]) if rows else (None, 0.0)
